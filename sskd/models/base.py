"""The uniform model interface every architecture answers.

``model(x)`` returns logits ``(b, K)``; ``model(x, features=True)`` returns :class:`Features`: the
penultimate pooled feature ``(b, d)``, every stage's output, and ``maps``, the intermediate feature
maps the feature-based methods read (RepDistiller's ``feat[1:-1]``); ``features="preact"`` also gives
those maps before their last ReLU (``preact``, as RepDistiller's ``preact=True``). Both go through
``forward`` so DDP hooks see them. ``model.feat_dim`` is ``d``. Which tensors each architecture
returns, with their shapes, is in the README ("Features") and tested in tests/test_models.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn


class Features(NamedTuple):
    logits: torch.Tensor  # (b, K)
    feat: torch.Tensor  # (b, d) penultimate pooled, flattened
    stages: list[torch.Tensor]  # stage outputs, shallow to deep (HSSAKD's branches tap these)
    maps: list[torch.Tensor]  # the maps feature methods read (RepDistiller's feat[1:-1]), shallow to deep
    preact: list[torch.Tensor] | None = None  # ``maps`` before their last ReLU (features="preact" only)


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
    """Base: subclasses implement ``stages_and_feat(x, preact) -> (stages, feat, preact maps or None)``
    and own ``self.fc``; ``maps`` selects which stages feature methods read."""

    feat_dim: int
    maps: slice = slice(None)  # which of ``stages`` are the feature methods' maps
    fixed_input_size: tuple[int, int] | None = None  # (h, w) a model takes only (a timm ViT's patch grid)

    def stages_and_feat(
        self, x: torch.Tensor, preact: bool = False
    ) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor] | None]:
        raise NotImplementedError

    def branch_spec(self) -> BranchSpec:
        """HSSAKD's branch layout for this architecture (as the official code builds it)."""
        raise NotImplementedError(f"{type(self).__name__} has no auxiliary-branch layout")

    def forward(self, x: torch.Tensor, features: bool | str = False):
        """Logits; with ``features=True`` :class:`Features`; with ``features="preact"`` also ``preact``."""
        if features not in (False, True, "preact"):
            raise ValueError(f"features must be False, True or 'preact', not {features!r}")
        stages, feat, pre = self.stages_and_feat(x, preact=features == "preact")
        logits = self.fc(feat)
        if not features:
            return logits
        return Features(logits, feat, stages, stages[self.maps], pre)


def run_stages(
    x: torch.Tensor, layers, preact: bool = False
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Apply ``layers`` in turn; returns every stage's output and, with ``preact``, each stage's output
    before its last ReLU (the last block's ``forward_pre``)."""
    stages, pres = [], []
    for layer in layers:
        if preact:
            x, pre = stage_pre(layer, x)
            pres.append(pre)
        else:
            x = layer(x)
        stages.append(x)
    return stages, (pres if preact else None)


def stage_pre(layer: nn.Sequential, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A stage's output and its last block's pre-activation (``block.forward_pre(x) -> (out, pre)``)."""
    blocks = list(layer)
    for block in blocks[:-1]:
        x = block(x)
    return blocks[-1].forward_pre(x)


def logits_of(output: Any) -> torch.Tensor:
    """Logits from a model output: a tensor, or a NamedTuple whose first field is the logits."""
    return output if torch.is_tensor(output) else output[0]


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
