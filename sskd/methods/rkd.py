"""RKD on the normal view (Park et al., CVPR 2019), as RepDistiller runs it, and :class:`RelationMethod`,
the skeleton RKD, PKT and SP share: ``ce_weight · CE + kd_weight · KD_T + weight · L_method`` (RepDistiller's
``γ·CE + α·KD + β·L``, helper/loops.py), the relation term over one teacher feature of the normal view.

Features come from the model interface only (``model(x, features=True)``): ``feat`` is RepDistiller's
``feat[-1]`` (pooled penultimate vector), ``maps[-1]`` its ``feat[-2]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from sskd.core.errors import SSKDError
from sskd.core.fields import bound
from sskd.losses import kd_loss
from sskd.losses.relation import rkd_terms
from sskd.methods.base import BuildContext, Method, normal, register
from sskd.models.base import Features

PROBE_BATCH = 2  # images of the build-time shape check


@dataclass
class RelationConfig:
    """RepDistiller's README-table weights for the relation methods: -r 1 -a 0, --kd_T 4."""

    ce_weight: float = bound(1.0, ge=0)
    kd_weight: float = bound(0.0, ge=0)  # e.g. 0.9 to combine with KD (as the SSKD paper's tables do)
    T: float = bound(4.0, gt=0)


def shape_of(t: torch.Tensor | None) -> str:
    return "none" if t is None else "x".join(str(d) for d in t.shape)


class RelationMethod(Method):
    """CE + KD + ``weight`` · a relation term between student and teacher tensors of the normal view.

    Subclasses say which tensor (:meth:`relation_input`, ``feature`` its ``outputs`` name), what the
    relation needs of it (:meth:`check_input`) and the term (:meth:`relation`: named terms, the weighted one
    under the method's name). The teacher is any classifier run; only view 0 is used.
    """

    needs_teacher = True
    feature: ClassVar[str] = "feat"
    topk_outputs = ("logits",)
    needs: ClassVar[str] = ""  # what the relation needs, for the build-time error

    @staticmethod
    def relation_input(f: Features) -> torch.Tensor | None:
        return f.feat

    @staticmethod
    def check_input(t: torch.Tensor, batch: int) -> bool:
        """Whether a probed tensor serves the relation (default: a (b, d) vector per sample)."""
        return t.ndim == 2 and t.shape[0] == batch and t.shape[1] > 0

    def relation(self, s: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @classmethod
    def build(cls, ctx: BuildContext) -> Method:
        student = cls.student_model(ctx.backbone(), ctx.num_classes)  # first: the run seed decides it
        teacher, info = ctx.teacher_model(cls.teacher_part, method=cls.name)
        cls.check_shapes(ctx, student, teacher, info["arch"])
        return cls(student, teacher, num_classes=ctx.num_classes, cfg=ctx.section(cls))

    @classmethod
    def check_shapes(cls, ctx: BuildContext, student, teacher, t_arch: str) -> None:
        """Probe both models on a small batch of the run's image size; one line if the relation cannot pair
        what they give. From a cache the teacher is a fresh model of its architecture (shapes only)."""
        from pipelines.loader import DEFAULT_SIZE

        size = ctx.cfg.data.size or DEFAULT_SIZE[ctx.manifest["layout"]]
        x = torch.zeros(PROBE_BATCH, 3, size, size)
        with torch.random.fork_rng(devices=[]):  # a stand-in teacher's initial weights must not move the RNG
            probes = [(ctx.arch, student), (t_arch, teacher if teacher is not None else ctx.backbone(t_arch))]
            got = [cls.probe(model, x) for _, model in probes]
        if not all(t is not None and cls.check_input(t, PROBE_BATCH) for t in got):
            raise SSKDError(
                f"--method {cls.name} {cls.needs}: student {ctx.arch} gives {shape_of(got[0])}, "
                f"teacher {t_arch} gives {shape_of(got[1])} (for {PROBE_BATCH} images of "
                f"{size}x{size})"
            )

    @classmethod
    def probe(cls, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        training = model.training
        model.eval()  # no BN statistics move
        try:
            with torch.no_grad():
                return cls.relation_input(model(x, features=True))
        finally:
            model.train(training)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        f = self.student(normal(batch), features=True)
        t = self.teacher_batch(batch)
        ce = F.cross_entropy(f.logits, batch["label"])
        kd = kd_loss(f.logits, t["logits"][:, 0], cfg.T)  # always computed and logged, as RepDistiller does
        terms = self.relation(self.relation_input(f), t[self.feature][:, 0])
        loss = cfg.ce_weight * ce + cfg.kd_weight * kd + cfg.weight * terms[self.name]
        return {"loss": loss, "logits": f.logits, "ce": ce, "kd": kd, **terms}


@dataclass
class RKDConfig(RelationConfig):
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
    outputs = ("logits", "feat")
    needs = "relates the pooled features (b, d) of each network's own batch (any d)"

    @staticmethod
    def teacher_outputs(teacher, views):
        f = teacher(views[:, 0], features=True)
        return {"logits": f.logits[:, None], "feat": f.feat[:, None]}  # (b, 1, K), (b, 1, d)

    def relation(self, s, t):
        dist, angle = rkd_terms(s, t)
        rkd = self.cfg.w_dist * dist + self.cfg.w_angle * angle
        return {"rkd": rkd, "rkd_dist": dist, "rkd_angle": angle}
