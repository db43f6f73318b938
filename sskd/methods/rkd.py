"""RKD on the normal view (Park et al., CVPR 2019), as RepDistiller runs it (``--distill rkd``):
``ce_weight · CE + kd_weight · KD_T + weight · RKD`` over the batch's pooled features (the relation family,
:class:`~sskd.methods.families.RelationMethod`)."""

from __future__ import annotations

from dataclasses import dataclass

from sskd.core.fields import bound
from sskd.losses.relation import rkd_terms
from sskd.methods.base import register
from sskd.methods.families import CEKDConfig, RelationMethod


@dataclass
class RKDConfig(CEKDConfig):
    """RepDistiller: ``--distill rkd -r 1 -a 0 -b 1``, ``RKDLoss(w_d=25, w_a=50)``."""

    weight: float = bound(1.0, ge=0)
    w_dist: float = bound(25.0, ge=0)
    w_angle: float = bound(50.0, ge=0)


@register("student", "rkd")
class StudentRKD(RelationMethod):
    """Distances and angles between the pooled features of the batch's samples. Logs ``rkd`` (weighted by
    ``w_dist``, ``w_angle``) and its unweighted parts ``rkd_dist``, ``rkd_angle``."""

    summary = "RKD: distances and angles among the batch's pooled features (any widths)"
    paper = "Park et al., CVPR 2019"  # Relational Knowledge Distillation
    section, Config = "rkd", RKDConfig

    def relation(self, s, t):
        dist, angle = rkd_terms(s, t)
        rkd = self.cfg.w_dist * dist + self.cfg.w_angle * angle
        return {"rkd": rkd, "rkd_dist": dist, "rkd_angle": angle}
