"""SP on the normal view (Tung & Mori, ICCV 2019), as RepDistiller runs it: CE + KD + weight · the distance
between the row-normalised Gram matrices (b, b) of the last feature maps (RepDistiller's ``feat[-2]``).

Cacheable: the Gram matrix depends on the batch, so ``sskd cache`` stores the teacher's map itself (fp16)
and the matrix is recomputed per batch. A resnet32x4 map is 256x8x8: 32,976 B per sample and epoch with the
logits, 1.65 GB per CIFAR-100 epoch (396 GB for 240 distinct epochs; fewer reuse e mod E), against a teacher
forward (1.08 G multiply-adds per image) that costs about twice the resnet8x4 student's whole step: a local
disk or the page cache serves that.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sskd.core.fields import bound
from sskd.losses.relation import sp_loss
from sskd.methods.base import register
from sskd.methods.families import CEKDConfig
from sskd.methods.rkd import RelationMethod  # via rkd: RKD registers, and `sskd methods` lists it, first


@dataclass
class SPConfig(CEKDConfig):
    """RepDistiller: ``--distill similarity -r 1 -a 0 -b 3000``."""

    weight: float = bound(3000.0, ge=0)


@register("student", "sp")
class StudentSP(RelationMethod):
    """Pairwise similarities of the batch's samples in the last feature map. Logs ``sp``."""

    summary = "SP: the batch's pairwise similarities in the last feature map (any channels and size)"
    paper = "Tung & Mori, ICCV 2019"  # Similarity-Preserving Knowledge Distillation
    section, Config = "sp", SPConfig
    feature = "map"
    outputs = ("logits", "map")
    needs = "compares the b x b Gram matrices of each network's last feature map (any channels and size)"

    @staticmethod
    def relation_input(f):
        return f.maps[-1] if f.maps else None

    @staticmethod
    def check_input(t: torch.Tensor, batch: int) -> bool:
        return t.ndim >= 2 and t.shape[0] == batch and t[0].numel() > 0

    @staticmethod
    def teacher_outputs(teacher, views):
        f = teacher(views[:, 0], features=True)
        return {"logits": f.logits[:, None], "map": f.maps[-1][:, None]}  # (b, 1, K), (b, 1, C, H, W)

    def relation(self, s, t):
        return {"sp": sp_loss(s, t)}
