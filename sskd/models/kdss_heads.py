"""The KDSS teacher's parts (``wrapper: kdss_heads``): a rotation head and a projection MLP on the
pooled feature of a backbone; trained by ``train-ss-head --method kdss`` (:mod:`sskd.methods.kdss`)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from sskd.models.heads import SSHead
from sskd.models.registry import WRAPPERS

ROTATIONS = 4  # 0, 90, 180, 270 degrees


class KDSSOutput(NamedTuple):
    logits: torch.Tensor  # (n, K)
    rot: torch.Tensor  # (n, 4) rotation logits
    embed: torch.Tensor  # (n, e) projection (not normalised)
    feat: torch.Tensor  # (n, d) pooled feature
    stages: list[torch.Tensor]


@WRAPPERS.register("kdss_heads")
class KDSSModel(nn.Module):
    """Backbone plus a rotation head and a projection MLP on its pooled feature (``embed_dim`` wide)."""

    wrapper = "kdss_heads"

    def __init__(self, backbone: nn.Module, num_classes: int | None = None, embed_dim: int | None = None):
        super().__init__()
        self.backbone = backbone
        self.feat_dim = backbone.feat_dim
        self.embed_dim = embed_dim or backbone.feat_dim
        self.rot_head = nn.Linear(self.feat_dim, ROTATIONS)
        self.proj = (
            SSHead(self.feat_dim)
            if self.embed_dim == self.feat_dim
            else nn.Sequential(
                nn.Linear(self.feat_dim, self.feat_dim),
                nn.ReLU(inplace=True),
                nn.Linear(self.feat_dim, self.embed_dim),
            )
        )

    def wrapper_args(self) -> dict:
        return {"embed_dim": self.embed_dim}

    def forward(self, x: torch.Tensor, features: bool | str = False) -> KDSSOutput:
        if features:  # the backbone's feature interface, so feature methods can read this teacher too
            return self.backbone(x, features=features)
        f = self.backbone(x, features=True)
        return KDSSOutput(f.logits, self.rot_head(f.feat), self.proj(f.feat), f.feat, f.stages)
