"""HSSAKD's auxiliary branches and the model that carries them (winycg/HSAKD, models/*_aux).

Branch l reads the backbone's stage map at tap l and runs freshly initialised copies of every later
stage (the last branch: the last stage again at stride 1), then pooling and ``Linear(C, R·K)`` over
the joint class × rotation labels ``R·y + k`` (class-major: ``[c0r0, c0r1, ..., c1r0, ...]``). Where a
branch attaches and what it copies is each architecture's :meth:`~sskd.models.base.Classifier.branch_spec`;
nothing here reaches into a model by attribute name.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from torch import nn

from sskd.models.base import init_weights, pool_flat
from sskd.models.registry import WRAPPERS


class BranchOutput(NamedTuple):
    logits: torch.Tensor  # (n, K) the backbone's classifier
    aux: list[torch.Tensor]  # L x (n, R·K) joint logits, shallow to deep
    feat: torch.Tensor  # (n, d) pooled feature
    stages: list[torch.Tensor]


def _fresh(module: nn.Module) -> nn.Module:
    """Re-initialise every parameter and BN statistic: a copy in structure only ("fresh copies")."""
    for m in module.modules():
        if m is not module and hasattr(m, "reset_parameters"):
            m.reset_parameters()
    init_weights(module)
    return module


class Branch(nn.Module):
    def __init__(self, body: nn.Module, tail: nn.Module | None, out_dim: int, outputs: int):
        super().__init__()
        self.body = body
        self.tail = tail if tail is not None else nn.Identity()
        self.fc = nn.Linear(out_dim, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(pool_flat(self.tail(self.body(x))))


def branch_spec_of(backbone: nn.Module):
    """``backbone.branch_spec()``; an architecture without a branch layout is one line naming HSSAKD, the
    architecture and why (raised where the model is built, before any training)."""
    try:
        return backbone.branch_spec()
    except NotImplementedError as exc:
        from sskd.core.errors import SSKDError

        arch = getattr(backbone, "arch", type(backbone).__name__)
        raise SSKDError(f"HSSAKD's auxiliary branches cannot attach to {arch}: {exc}") from None


def build_branches(backbone: nn.Module, num_classes: int, rotations: int = 4) -> nn.ModuleList:
    """One branch per tap of ``backbone.branch_spec()``, each ending in ``Linear(C, rotations · K)``."""
    spec = branch_spec_of(backbone)
    branches = []
    for lvl in range(len(spec.taps)):
        later = spec.bodies[lvl + 1 :]
        body = nn.Sequential(*[copy.deepcopy(m) for m in later]) if later else spec.last()
        tail = spec.tail() if spec.tail is not None else None
        branches.append(_fresh(Branch(body, tail, spec.out_dim, rotations * num_classes)))
    return nn.ModuleList(branches)


@WRAPPERS.register("branches")
class BranchedModel(nn.Module):
    """Backbone (with its classifier) plus HSSAKD's branches; ``forward(x) -> BranchOutput``.

    ``detach_taps``: the branches see the stage maps without a gradient path into the backbone (the
    frozen-teacher mode); otherwise their loss trains the backbone too (joint teacher, student, online).
    """

    wrapper = "branches"

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        rotations: int = 4,
        detach_taps: bool = False,
        num_branches: int | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.taps = list(branch_spec_of(backbone).taps)
        self.branches = build_branches(backbone, num_classes, rotations)
        if num_branches is not None and num_branches != len(self.branches):
            from sskd.core.errors import SSKDError

            raise SSKDError(
                f"a model with {num_branches} branches was saved, this architecture has {len(self.branches)}"
            )
        self.rotations, self.detach_taps = rotations, detach_taps
        self.feat_dim = backbone.feat_dim

    @property
    def num_branches(self) -> int:
        return len(self.branches)

    def wrapper_args(self) -> dict:
        return {"rotations": self.rotations, "num_branches": self.num_branches}

    def forward(self, x: torch.Tensor, features: bool | str = False) -> BranchOutput:
        if features:  # the backbone's feature interface, so feature methods can read a branched teacher too
            return self.backbone(x, features=features)
        f = self.backbone(x, features=True)
        taps = [f.stages[i] for i in self.taps]
        if self.detach_taps:
            taps = [t.detach() for t in taps]
        return BranchOutput(f.logits, [b(t) for b, t in zip(self.branches, taps)], f.feat, f.stages)
