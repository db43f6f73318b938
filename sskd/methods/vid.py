"""VID, variational information distillation (Ahn et al., CVPR 2019), as RepDistiller runs it
(``--distill vid``): at every map a regressor μ(f_s) predicts the teacher's map under a Gaussian with a
learned per-channel variance; ``ce_weight · CE + kd_weight · KD_T + weight · Σ_layers NLL`` (:func:`vid_loss`: the mean of
``½·[(μ(f_s) − f_t)²/σ² + log σ²]``, the larger map pooled to the smaller first). The regressors and their log-scales are submodules, trained (and weight-decayed) by the
student's optimizer, as RepDistiller's ``trainable_list``.

Not cacheable: every map of the teacher, 114,688 floats per sample for resnet32x4 (224 KB fp16 per sample
and epoch, 11.5 GB per CIFAR-100 epoch).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from sskd.core.fields import bound
from sskd.losses.feature import vid_loss
from sskd.methods.base import normal, register
from sskd.methods.families import CEKDConfig, FeatureMethod
from sskd.models.connectors import PairShapes, VIDRegressor, features_of, flatten_maps, split_maps


@dataclass
class VIDConfig(CEKDConfig):
    """RepDistiller's README weights for VID: -r 1 -a 0 -b 1, init_pred_var 5.0, eps 1e-5, kd_T 4."""

    weight: float = bound(1.0, ge=0)
    init_var: float = bound(5.0, gt=0)  # the variance every channel starts with
    eps: float = bound(1e-5, gt=0)


@register("student", "vid")
class VID(FeatureMethod):
    """Layer i of the student predicts layer i of the teacher through its own 1×1-conv regressor."""

    summary = "VID: regress every teacher map from the student's under a learned per-channel Gaussian"
    paper = "Ahn et al., CVPR 2019"  # Variational Information Distillation for Knowledge Transfer
    section, Config = "vid", VIDConfig
    outputs = ("logits", "maps")
    cache_refusal = (
        "it reads every teacher map, 114,688 floats a sample for resnet32x4 (224 KB fp16 per sample and "
        "epoch, 11.5 GB per CIFAR-100 epoch): more to read back than the teacher's forward costs"
    )

    def connect(self, pair: PairShapes) -> None:
        # RepDistiller builds VIDLoss(C_s, C_t, C_t): the middle width is the teacher's
        self.regressors = nn.ModuleList(
            VIDRegressor(s[0], t[0], t[0], self.cfg.init_var, self.cfg.eps)
            for s, t in zip(pair.student, pair.teacher)
        )

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
        return self.with_ce_kd(f, t, batch, vid=vid)
