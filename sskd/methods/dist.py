"""DIST on the normal view (Huang et al., NeurIPS 2022): ``ce_weight·CE + kd_weight·τ²(β·inter + γ·intra)``
over the inter- and intra-class Pearson relations of the softened predictions."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from sskd.config import bound
from sskd.losses.logit import dist_terms, standardize_logits
from sskd.methods.base import Method, logits_of, normal, register


@dataclass
class DISTConfig:
    """The official CIFAR-100 recipe (image_classification_sota configs/strategies/distill/dist_cifar.yaml,
    ``kd: dist_t4``; facts §16): CE 1, DIST 2, beta = gamma = 1, tau 4. ImageNet's ``kd: dist`` is tau 1.

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
class StudentDIST(Method):
    """DIST on the normal view; the teacher is any trained classifier run (or ``torchvision:NAME``).

    The intra-class term correlates each class's column over the batch, so it depends on the batch (and,
    across processes, on each process's own batch: it is not gathered, as in the official code). Logs
    ``inter`` and ``intra`` (without τ²) and ``dist`` = τ²(β·inter + γ·intra).
    """

    summary = "DIST: Pearson relations of the softened class scores, per sample and per class over the batch"
    paper = "Huang et al., NeurIPS 2022"  # Knowledge Distillation from A Stronger Teacher
    section, Config = "dist", DISTConfig
    needs_teacher = True
    outputs = ("logits",)
    topk_outputs = ("logits",)

    @staticmethod
    def teacher_outputs(teacher, views):
        return {"logits": logits_of(teacher(views[:, 0]))[:, None]}  # (b, 1, K): the normal view

    def forward(self, batch):
        cfg = self.cfg
        logits = self.student(normal(batch))
        t_logits = self.teacher_batch(batch)["logits"][:, 0]
        ce = F.cross_entropy(logits, batch["label"])
        s, t = logits, t_logits
        if cfg.standardize:  # LS: Z-scored logits in the distillation term only
            s, t = standardize_logits(s), standardize_logits(t)
        inter, intra = dist_terms(s, t, cfg.tau)
        dist = cfg.tau * cfg.tau * (cfg.beta * inter + cfg.gamma * intra)
        return {"loss": cfg.ce_weight * ce + cfg.kd_weight * dist, "logits": logits, "ce": ce, "dist": dist,
                "inter": inter, "intra": intra}
