"""Hinton KD on the normal view (Hinton et al., 2015): ``ce_weight · CE + kd_weight · T² KL``; with
``standardize`` on the Z-scored logits (LS-KD, Sun et al., CVPR 2024)."""

from __future__ import annotations

from dataclasses import dataclass

from sskd.core.fields import bound
from sskd.losses import kd_loss
from sskd.methods.base import register
from sskd.methods.families import LogitMethod


@dataclass
class KDConfig:
    """RepDistiller's KD: -r 0.1 -a 0.9, T 4 (the SSKD paper's KD baseline).

    ``standardize``: LS-KD (Sun et al., CVPR 2024), Z-scored logits in the KD term (the CE stays on the raw
    logits). Their CIFAR recipe (``--logit-stand --base-temp 2 --kd-weight 9``, CE 0.1) is
    ``standardize: true, T: 2, kd_weight: 9`` here; the other keys keep their meaning.
    """

    ce_weight: float = bound(0.1, ge=0)
    kd_weight: float = bound(0.9, ge=0)
    T: float = bound(4.0, gt=0)
    standardize: bool = False


@register("student", "kd")
class StudentKD(LogitMethod):
    """Hinton KD on the normal view; the teacher is any trained classifier run (or ``torchvision:NAME``)."""

    summary = "Hinton KD: the teacher's softened class scores on the normal view"
    paper = "Hinton et al., 2015"  # Distilling the Knowledge in a Neural Network
    section, Config = "kd", KDConfig

    def forward(self, batch):
        logits, t_logits, ce = self.logit_pair(batch)
        kd = kd_loss(logits, t_logits, self.cfg.T, standardize=self.cfg.standardize)
        return {
            "loss": self.cfg.ce_weight * ce + self.cfg.kd_weight * kd,
            "logits": logits,
            "ce": ce,
            "kd": kd,
        }
