"""DIST on the normal view (Huang et al., NeurIPS 2022): ``ce_weight·CE + kd_weight·τ²(β·inter + γ·intra)``
over the inter- and intra-class Pearson relations of the softened predictions."""

from __future__ import annotations

from dataclasses import dataclass

from sskd.core.fields import bound
from sskd.losses.logit import dist_terms
from sskd.methods.base import register
from sskd.methods.kd import LogitMethod  # via kd: KD registers, and `sskd methods` lists it, first


@dataclass
class DISTConfig:
    """The official CIFAR-100 recipe (image_classification_sota configs/strategies/distill/dist_cifar.yaml,
    ``kd: dist_t4``): CE 1, DIST 2, beta = gamma = 1, tau 4. ImageNet's ``kd: dist`` is tau 1.

    ``standardize``: Z-scored logits (Sun et al., CVPR 2024) before the softmax; LS published no DIST
    runs, so this is an option to try, not a reproduction (the CE stays on the raw logits).
    """

    ce_weight: float = bound(1.0, ge=0)
    kd_weight: float = bound(2.0, ge=0)
    beta: float = bound(1.0, ge=0)  # inter-class weight
    gamma: float = bound(1.0, ge=0)  # intra-class weight
    tau: float = bound(4.0, gt=0)
    standardize: bool = False


@register("student", "dist")
class StudentDIST(LogitMethod):
    """DIST on the normal view; the teacher is any trained classifier run (or ``torchvision:NAME``).

    The intra-class term correlates each class's column over the batch, so it depends on the batch (and,
    across processes, on each process's own batch: it is not gathered, as in the official code). Logs
    ``inter`` and ``intra`` (without τ²) and ``dist`` = τ²(β·inter + γ·intra).
    """

    summary = "DIST: Pearson relations of the softened class scores, per sample and per class over the batch"
    paper = "Huang et al., NeurIPS 2022"  # Knowledge Distillation from A Stronger Teacher
    section, Config = "dist", DISTConfig

    @classmethod
    def topk_temperatures(cls, cfg):
        return {"logits": (float(cfg.tau),)}

    def forward(self, batch):
        cfg = self.cfg
        logits, t_logits, ce = self.logit_pair(batch)
        s, t = self.distilled_pair(logits, t_logits)  # LS: Z-scored in the distillation term only
        inter, intra = dist_terms(s, t, cfg.tau)
        dist = cfg.tau * cfg.tau * (cfg.beta * inter + cfg.gamma * intra)
        return {
            "loss": cfg.ce_weight * ce + cfg.kd_weight * dist,
            "logits": logits,
            "ce": ce,
            "dist": dist,
            "inter": inter,
            "intra": intra,
        }
