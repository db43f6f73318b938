"""VID, variational information distillation (Ahn et al., CVPR 2019), as RepDistiller runs it
(``--distill vid``): at every map a regressor μ(f_s) predicts the teacher's map under a Gaussian with a
learned per-channel variance; ``ce_weight · CE + kd_weight · KD_T + weight · Σ_layers NLL`` (facts §6,
:func:`vid_loss`). The regressors and their log-scales are submodules, trained (and weight-decayed) by the
student's optimizer, as RepDistiller's ``trainable_list``.

Not cacheable: every map of the teacher, 114,688 floats per sample for resnet32x4 (224 KB fp16 per sample
and epoch, 11.5 GB per CIFAR-100 epoch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from sskd.core.fields import bound
from sskd.losses import kd_loss
from sskd.losses.feature import vid_loss
from sskd.methods.base import BuildContext, Method, normal, register
from sskd.models.connectors import (
    PairShapes,
    VIDRegressor,
    build_pair,
    features_of,
    flatten_maps,
    probe_pair,
    split_maps,
)


@dataclass
class VIDConfig:
    """RepDistiller's README weights for VID: -r 1 -a 0 -b 1, init_pred_var 5.0, eps 1e-5, kd_T 4."""

    ce_weight: float = bound(1.0, ge=0)
    kd_weight: float = bound(0.0, ge=0)
    T: float = bound(4.0, gt=0)
    weight: float = bound(1.0, ge=0)
    init_var: float = bound(5.0, gt=0)  # the variance every channel starts with
    eps: float = bound(1e-5, gt=0)


@register("student", "vid")
class VID(Method):
    """Layer i of the student predicts layer i of the teacher through its own 1×1-conv regressor."""

    summary = "VID: regress every teacher map from the student's under a learned per-channel Gaussian"
    paper = "Ahn et al., CVPR 2019"  # Variational Information Distillation for Knowledge Transfer
    section, Config = "vid", VIDConfig
    needs_teacher = True
    outputs = ("logits", "maps")
    cache_refusal = (
        "it reads every teacher map, 114,688 floats a sample for resnet32x4 (224 KB fp16 per sample and "
        "epoch, 11.5 GB per CIFAR-100 epoch): more to read back than the teacher's forward costs"
    )

    def __init__(self, student, teacher=None, *, num_classes: int, cfg=None, pair: PairShapes | None = None):
        super().__init__(student, teacher, num_classes=num_classes, cfg=cfg)
        self.pair = pair or probe_pair(student, teacher)
        self.pair.check_count(self.name)
        # RepDistiller builds VIDLoss(C_s, C_t, C_t): the middle width is the teacher's
        self.regressors = nn.ModuleList(
            VIDRegressor(s[0], t[0], t[0], self.cfg.init_var, self.cfg.eps)
            for s, t in zip(self.pair.student, self.pair.teacher)
        )

    @classmethod
    def build(cls, ctx: BuildContext) -> Method:
        student, teacher, pair = build_pair(ctx, cls.name)
        return cls(student, teacher, num_classes=ctx.num_classes, cfg=ctx.section(cls), pair=pair)

    @staticmethod
    def teacher_outputs(teacher, views):
        f = features_of(teacher, views[:, 0])
        return {"logits": f.logits[:, None], "maps": flatten_maps(f.maps)}

    def forward(self, batch):
        f = self.student(normal(batch), features=True)
        t = self.teacher_batch(batch)
        t_maps = split_maps(t["maps"][:, 0], self.pair.teacher)
        vid = sum(
            vid_loss(*reg(f_s, f_t), reg.log_scale, reg.eps)
            for reg, f_s, f_t in zip(self.regressors, f.maps, t_maps)
        )
        ce = F.cross_entropy(f.logits, batch["label"])
        kd = kd_loss(f.logits, t["logits"][:, 0], self.cfg.T)
        loss = self.cfg.ce_weight * ce + self.cfg.kd_weight * kd + self.cfg.weight * vid
        return {"loss": loss, "logits": f.logits, "ce": ce, "kd": kd, "vid": vid}
