"""Decoupled KD on the normal view (Zhao et al., CVPR 2022; mdistiller):
``ce_weight · CE + min((epoch + 1) / warmup, 1) · (alpha · TCKD + beta · NCKD)``."""

from __future__ import annotations

from dataclasses import dataclass

from sskd.core.fields import bound
from sskd.losses.logit import dkd_terms
from sskd.methods.base import register
from sskd.methods.kd import LogitMethod  # via kd: KD registers, and `sskd methods` lists it, first


@dataclass
class DKDConfig:
    """mdistiller's defaults (engine/cfg.py): CE 1, alpha 1, beta 8, T 4, a 20-epoch warm-up.

    The CIFAR-100 recipes change only ``beta`` per pair (2 for resnet56→resnet20; 6 for vgg13→vgg8,
    vgg13→MobileNetV2, wrn_40_2→wrn_16_2 and wrn_40_2→wrn_40_1; 8 otherwise). ``warmup``: the DKD term
    is scaled by ``e / warmup`` in the e-th epoch (1-based, as mdistiller), 1 from epoch ``warmup`` on;
    0 = no warm-up.

    ``standardize``: DKD + logit standardisation (Sun et al., CVPR 2024), Z-scored logits in both DKD
    parts (the CE stays on the raw logits). It only switches the Z-score; nothing is rescaled behind the
    keys. LS's ``--logit-stand --base-temp t --kd-weight w`` multiplies mdistiller's ALPHA and BETA by w
    and sets T to t, so their run is ``standardize: true, alpha: w·ALPHA, beta: w·BETA, T: t``
    here: for their resnet32x4→resnet8x4 (t 2, w 9, BETA 8) ``alpha: 9, beta: 72, T: 2``. The warm-up and
    ``ce_weight`` are unchanged by LS.
    """

    ce_weight: float = bound(1.0, ge=0)
    alpha: float = bound(1.0, ge=0)  # TCKD weight
    beta: float = bound(8.0, ge=0)  # NCKD weight
    T: float = bound(4.0, gt=0)
    warmup: int = bound(20, ge=0)  # epochs
    standardize: bool = False


def warmup_factor(epoch: int, warmup: int) -> float:
    """mdistiller's ``min(e / warmup, 1)`` for the 0-based ``epoch`` (e = epoch + 1); 1 if ``warmup`` is 0."""
    return 1.0 if warmup == 0 else min((epoch + 1) / warmup, 1.0)


@register("student", "dkd")
class StudentDKD(LogitMethod):
    """DKD on the normal view; the teacher is any trained classifier run (or ``torchvision:NAME``).

    Logs ``tckd`` and ``nckd`` unweighted and ``dkd = alpha·tckd + beta·nckd`` before the warm-up factor.
    """

    summary = "Decoupled KD: target-class and non-target-class parts of KD, weighted apart"
    paper = "Zhao et al., CVPR 2022"  # Decoupled Knowledge Distillation
    section, Config = "dkd", DKDConfig

    def forward(self, batch):
        cfg = self.cfg
        logits, t_logits, ce = self.logit_pair(batch)
        s, t = self.distilled_pair(logits, t_logits)  # LS: Z-scored in the distillation term only
        tckd, nckd = dkd_terms(s, t, batch["label"], cfg.T)
        dkd = cfg.alpha * tckd + cfg.beta * nckd
        loss = cfg.ce_weight * ce + warmup_factor(self.epoch, cfg.warmup) * dkd
        return {"loss": loss, "logits": logits, "ce": ce, "dkd": dkd, "tckd": tckd, "nckd": nckd}
