"""The SS module of Sec. 3.1: a 2-layer MLP projection head on the pooled feature, and the wrapper
that holds backbone + classifier + head (one for the teacher, one for the student)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from sskd.models.registry import WRAPPERS


class SSHead(nn.Module):
    """Linear(d, d) – ReLU – Linear(d, out), no normalisation layer (official wrapper.py: out = d); a
    classification pretext task's head ends in its classes (rotation 4, jigsaw 24: :mod:`sskd.losses.pretext`)."""

    def __init__(self, dim: int, out_dim: int | None = None):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, out_dim or dim))

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        return self.net(feat)


class SSOutput(NamedTuple):
    logits: torch.Tensor  # (b, K)
    embed: torch.Tensor  # (b, e) the SS head's output: a projection (e = d), or the pretext's class scores
    feat: torch.Tensor  # (b, d) pooled feature
    stages: list[torch.Tensor]


@WRAPPERS.register("ss_head")
class SSModel(nn.Module):
    """Backbone (with its classifier) plus the SS head for ``pretext`` (:mod:`sskd.losses.pretext`; its width
    follows the task); ``forward(x) -> SSOutput``."""

    wrapper = "ss_head"  # how model.json names this part (sskd.runs.models.new_model rebuilds it)

    def wrapper_args(self) -> dict:
        # contrastive (the default) records nothing, as runs made before the pretext tasks existed
        return {} if self.pretext == "contrastive" else {"pretext": self.pretext}

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int | None = None,
        head: nn.Module | None = None,
        pretext: str = "contrastive",
    ):
        from sskd.losses.pretext import get_pretext, head_width

        super().__init__()
        self.pretext = get_pretext(pretext).name
        self.backbone = backbone
        self.head = (
            head if head is not None else SSHead(backbone.feat_dim, head_width(pretext, backbone.feat_dim))
        )
        self.feat_dim = backbone.feat_dim

    def forward(self, x: torch.Tensor, features: bool | str = False) -> SSOutput:
        if features:  # the backbone's feature interface, so feature methods can read an SS teacher too
            return self.backbone(x, features=features)
        f = self.backbone(x, features=True)
        return SSOutput(f.logits, self.head(f.feat), f.feat, f.stages)
