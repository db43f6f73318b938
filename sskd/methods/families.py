"""The family bases: what the methods of one family share, so that each method's module keeps only its own.

- :class:`LogitMethod` (KD, DIST, DKD): the teacher's class scores on the normal view and the student's CE.
- :class:`RelationMethod` (RKD, PKT, SP): CE + KD + a relation among the batch's samples in one tensor.
- :class:`FeatureMethod` (AT, FitNet, VID, AB, FT): CE + KD + a term over the stage maps of the pair, through
  trainable helper modules sized from the maps' shapes.
- :class:`FrozenBackboneStage` (the ``train-ss-head`` stages of SSKD, KDSS and HSSAKD): parts trained on a
  teacher run's backbone that stays bit-identical.

RelationMethod and FeatureMethod weigh their term like RepDistiller (helper/loops.py):
``ce_weight · CE + kd_weight · KD_T + weight · term`` (its ``γ·CE + α·KD + β·L``), with its README-table
defaults ``-r 1 -a 0 --kd_T 4`` (:class:`CEKDConfig`). Features come from the model interface only
(``model(x, features=True)``): ``feat`` is RepDistiller's ``feat[-1]`` (the pooled penultimate vector),
``maps[-1]`` its ``feat[-2]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from sskd.core.errors import SSKDError
from sskd.core.fields import bound
from sskd.losses import kd_loss
from sskd.losses.logit import standardize_logits
from sskd.methods.base import BuildContext, Method, normal, teacher_backbone
from sskd.models.base import Features, logits_of
from sskd.models.connectors import PairShapes, ShapeError, probe_pair

PROBE_BATCH = 2  # images of RelationMethod's build-time shape check


# -- logits ---------------------------------------------------------------------------------------------


class LogitMethod(Method):
    """Base of the logit methods (KD, DKD, DIST): the teacher's class scores on the normal view, cacheable
    (also as top-K), and the CE the student's own term sits beside. The config has ``standardize``."""

    needs_teacher = True
    outputs = ("logits",)
    topk_outputs = ("logits",)

    @staticmethod
    def teacher_outputs(teacher, views):
        return {"logits": logits_of(teacher(views[:, 0]))[:, None]}  # (b, 1, K): the normal view

    def logit_pair(self, batch):
        """``(student logits, teacher logits, CE on the labels)`` of a batch's normal view."""
        logits = self.student(normal(batch))
        t_logits = self.teacher_batch(batch)["logits"][:, 0]
        return logits, t_logits, F.cross_entropy(logits, batch["label"])

    def distilled_pair(self, logits, t_logits):
        """The logits the distillation term compares: Z-scored with ``standardize`` (LS), else as they are."""
        if self.cfg.standardize:
            return standardize_logits(logits), standardize_logits(t_logits)
        return logits, t_logits


# -- the CE + KD + weight · term families -----------------------------------------------------------------


@dataclass
class CEKDConfig:
    """The terms a relation or feature method adds its own ``weight ·`` term to: RepDistiller's README-table
    ``-r 1 -a 0 --kd_T 4`` (set ``kd_weight``, e.g. 0.9, to combine with KD as the SSKD paper's tables do)."""

    ce_weight: float = bound(1.0, ge=0)
    kd_weight: float = bound(0.0, ge=0)
    T: float = bound(4.0, gt=0)


def shape_of(t: torch.Tensor | None) -> str:
    return "none" if t is None else "x".join(str(d) for d in t.shape)


class RelationMethod(Method):
    """CE + KD + ``weight`` · a relation term between student and teacher tensors of the normal view.

    Subclasses say which tensor (:meth:`relation_input`, ``feature`` its ``outputs`` name; default the
    pooled feature ``feat``), what the relation needs of it (:meth:`check_input`, ``needs`` for the
    message) and the term (:meth:`relation`: named terms, the weighted one under the method's name). The
    teacher is any classifier run; only view 0 is used.
    """

    needs_teacher = True
    feature: ClassVar[str] = "feat"
    outputs = ("logits", "feat")
    topk_outputs = ("logits",)
    needs: ClassVar[str] = "relates the pooled features (b, d) of each network's own batch (any d)"

    @staticmethod
    def teacher_outputs(teacher, views):
        f = teacher(views[:, 0], features=True)
        return {"logits": f.logits[:, None], "feat": f.feat[:, None]}  # (b, 1, K), (b, 1, d)

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
        cls.check_shapes(ctx, student, ctx.probe_teacher(teacher, info), info["arch"])
        return cls(student, teacher, cfg=ctx.section(cls))

    @classmethod
    def check_shapes(cls, ctx: BuildContext, student, teacher, t_arch: str) -> None:
        """Probe both models on a small batch of the run's image size; one line if the relation cannot pair
        what they give. ``teacher`` is the model to probe (:meth:`BuildContext.probe_teacher`)."""
        x = torch.zeros(PROBE_BATCH, 3, ctx.size, ctx.size)
        got = [cls.probe(model, x) for model in (student, teacher)]
        if not all(t is not None and cls.check_input(t, PROBE_BATCH) for t in got):
            raise SSKDError(
                f"--method {cls.name} {cls.needs}: student {ctx.arch} gives {shape_of(got[0])}, "
                f"teacher {t_arch} gives {shape_of(got[1])} (for {PROBE_BATCH} images of "
                f"{ctx.size}x{ctx.size})"
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
        f = self.student(normal(batch), features=True)
        t = self.teacher_batch(batch)
        cfg = self.cfg
        ce = F.cross_entropy(f.logits, batch["label"])
        kd = kd_loss(f.logits, t["logits"][:, 0], cfg.T)  # always computed and logged, as RepDistiller does
        terms = self.relation(self.relation_input(f), t[self.feature][:, 0])
        loss = cfg.ce_weight * ce + cfg.kd_weight * kd + cfg.weight * terms[self.name]
        return {"loss": loss, "logits": f.logits, "ce": ce, "kd": kd, **terms}


class FeatureMethod(Method):
    """CE + KD + ``weight`` · a term over the stage maps of student and teacher on the normal view.

    A subclass gives its ``teacher_outputs``; :meth:`connect`, which makes its trainable helper modules
    (regressors, connectors) from the pair's map shapes; and a ``forward`` that returns :meth:`with_ce_kd`
    of its term (AB, whose main stage may run no teacher at all, sums its own). Its config extends
    :class:`CEKDConfig` with ``weight``.

    The base does the rest: :meth:`build` makes the student (first: the run seed decides it), the frozen
    teacher and the pair's map shapes (:class:`~sskd.models.connectors.PairShapes`, probed at the run's
    input size); the constructor checks that the map counts match (unless ``pairs_layers`` is False: a
    method that reads one map) and turns a :class:`~sskd.models.connectors.ShapeError` from ``connect``
    into the one-line error naming both architectures and their maps.
    """

    needs_teacher = True
    pairs_layers: ClassVar[bool] = True  # the term pairs every map: student and teacher need equal counts

    def __init__(self, student, teacher=None, *, cfg=None, pair: PairShapes | None = None):
        super().__init__(student, teacher, cfg=cfg)
        self.pair = pair or probe_pair(student, teacher)
        if not self.pair.student or not self.pair.teacher:  # else the term would be an empty sum: 0
            raise self.pair.error(self.name, "a feature method needs feature maps on both sides")
        if self.pairs_layers:
            self.pair.check_count(self.name)
        try:
            self.connect(self.pair)
        except ShapeError as exc:
            raise self.pair.error(self.name, str(exc)) from None

    def connect(self, pair: PairShapes) -> None:
        """Make the method's helper modules for the pair's map shapes (default: none)."""

    @classmethod
    def build(cls, ctx: BuildContext) -> Method:
        student = ctx.backbone()  # first: the run seed decides it
        teacher, info = ctx.teacher_model(None, method=cls.name)
        probe = ctx.probe_teacher(teacher, info)
        pair = probe_pair(student, probe, ctx.size, ctx.arch, info["arch"])
        return cls(student, teacher, cfg=ctx.section(cls), pair=pair)

    def with_ce_kd(self, f: Features, t: dict[str, torch.Tensor], batch, **term: torch.Tensor):
        """``forward``'s result for the method's term, passed under its logged name (``at=at``):
        ``ce_weight · CE + kd_weight · KD_T + weight · term``, KD always computed and logged (RepDistiller)."""
        ((name, value),) = term.items()
        ce = F.cross_entropy(f.logits, batch["label"])
        kd = kd_loss(f.logits, t["logits"][:, 0], self.cfg.T)
        loss = self.cfg.ce_weight * ce + self.cfg.kd_weight * kd + self.cfg.weight * value
        return {"loss": loss, "logits": f.logits, "ce": ce, "kd": kd, name: value}


# -- head stages on a frozen backbone ---------------------------------------------------------------------


class FrozenBackboneStage(Method):
    """A ``train-ss-head`` stage: ``student`` wraps a teacher run's backbone (``student.backbone``) with the
    parts that train; the backbone and its classifier stay bit-identical: no gradient reaches them and they
    stay in eval mode whatever the loop's mode, so no BatchNorm statistic moves. There is no teacher beside.

    A subclass says how it wraps the backbone (:meth:`wrap`); :meth:`backbone_features` is the backbone's
    no-grad pass over every view.
    """

    def __init__(self, student: nn.Module, teacher=None, **kw):
        super().__init__(student, None, **kw)
        student.backbone.requires_grad_(False)

    @classmethod
    def wrap(cls, backbone: nn.Module, ctx: BuildContext) -> nn.Module:
        """The model this stage trains around the teacher's ``backbone``."""
        raise NotImplementedError

    @classmethod
    def build(cls, ctx: BuildContext) -> Method:
        return cls(cls.wrap(teacher_backbone(ctx), ctx), cfg=ctx.section(cls))

    def train(self, mode: bool = True):
        super().train(mode)
        self.student.backbone.eval()
        return self

    def backbone_features(self, views: torch.Tensor) -> Features:
        """The frozen backbone on views (b, v, c, h, w) under ``no_grad``: features of the (b·v) rows."""
        with torch.no_grad():
            return self.student.backbone(rearrange(views, "b v c h w -> (b v) c h w"), features=True)
