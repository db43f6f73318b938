"""The uniform model interface every architecture answers.

``model(x)`` returns logits ``(b, K)``; ``model(x, features=True)`` returns :class:`Features` with the
penultimate pooled feature ``(b, d)`` and each stage's feature map. Both go through ``forward`` so DDP
hooks see them. ``model.feat_dim`` is ``d`` (the SS head's width).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn


class Features(NamedTuple):
    logits: torch.Tensor  # (b, K)
    feat: torch.Tensor  # (b, d) penultimate pooled, flattened
    stages: list[torch.Tensor]  # stage outputs, shallow to deep


class BranchSpec(NamedTuple):
    """Where HSSAKD's auxiliary branches attach and what they are made of (:mod:`sskd.models.branches`).

    Branch l reads ``stages[taps[l]]``, runs fresh copies of ``bodies[l + 1:]`` (``bodies[j]`` maps the
    output of tap j - 1 to that of tap j; ``bodies[0]`` is unused) — the last branch runs ``last()``
    instead, the last stage again at stride 1 — then ``tail()`` if given, pooling and the joint head.
    """

    taps: list[int]
    bodies: list[nn.Module | None]
    last: Callable[[], nn.Module]
    tail: Callable[[], nn.Module] | None
    out_dim: int


class Classifier(nn.Module):
    """Base: subclasses implement ``stages_and_feat(x) -> (stages, feat)`` and own ``self.fc``."""

    feat_dim: int

    def stages_and_feat(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        raise NotImplementedError

    def branch_spec(self) -> BranchSpec:
        """HSSAKD's branch layout for this architecture (as the official code builds it)."""
        raise NotImplementedError(f"{type(self).__name__} has no auxiliary-branch layout")

    def forward(self, x: torch.Tensor, features: bool = False):
        stages, feat = self.stages_and_feat(x)
        logits = self.fc(feat)
        return Features(logits, feat, stages) if features else logits


def run_stages(x: torch.Tensor, layers) -> list[torch.Tensor]:
    """Apply ``layers`` in turn; returns every stage's output (the feature maps later methods tap)."""
    stages = []
    for layer in layers:
        x = layer(x)
        stages.append(x)
    return stages


def pool_flat(x: torch.Tensor) -> torch.Tensor:
    return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal convolutions, unit BN, as the CRD/SSKD model files do."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
