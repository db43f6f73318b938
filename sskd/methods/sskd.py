"""SSKD (Xu et al., ECCV 2020): the teacher's SS head (stage 2, Eq. 5) and the student (Eq. 8).

The SS task is selectable, ``sskd.pretext: contrastive | exemplar | rotation | jigsaw`` (the paper's
Table 2; :mod:`sskd.losses.pretext`): the head learns it on the frozen teacher backbone, the student mimics
the teacher's predictions of it. Contrastive (the default) is the paper's Eq. 4-6 exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

from sskd.losses import SSKDLossConfig, kd_loss, ss_kd_loss, sskd_total, transformed_kd_loss
from sskd.losses.pretext import check_teacher_pretext, get_pretext, own_image_targets
from sskd.methods.base import BuildContext, Gather, Method, check_part, register
from sskd.methods.families import FrozenBackboneStage
from sskd.models.heads import SSModel

PAPER = "Xu et al., ECCV 2020"  # Knowledge Distillation Meets Self-Supervision


def ss_targets(b: int, v: int, device) -> torch.Tensor:
    """Column of each transformed-view row: rows are ordered (image, view) for views 1..v-1."""
    return own_image_targets(b, v, device)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return rearrange(t[:, 1:], "b v x -> (b v) x")


class _PretextViews:
    """Both SSKD stages: ``data.views: auto`` is the pretext task's views, and the task checks the views."""

    @classmethod
    def auto_views(cls, cfg):
        return get_pretext(cfg.section(cls.section).pretext).views

    @classmethod
    def _task(cls, ctx: BuildContext):
        cfg = ctx.section(cls)
        task = get_pretext(cfg.pretext)
        task.check_views(ctx.views.names if ctx.views is not None else ("normal",))
        return cfg, task


@register("head", "sskd")
class SSHeadStage(_PretextViews, FrozenBackboneStage):
    """Stage 2 (Eq. 5): only the SS head trains; backbone and classifier are frozen and in eval mode."""

    summary = "the teacher's SS head: the sskd.pretext task (contrastive, Eq. 5) over the SS views on the frozen backbone"
    paper = PAPER
    section, Config = "sskd", SSKDLossConfig
    views = "ss"
    min_ss_views = 1  # L_T and L_ss are over the SS views: without one Eq. 8 would silently be CE + KD
    produces = "ss_head"

    def __init__(self, student: SSModel, teacher=None, **kw):
        if not isinstance(student, SSModel):
            raise TypeError("the ss_head stage trains an SSModel (backbone + SS head)")
        super().__init__(student, None, **kw)
        self.task = get_pretext(student.pretext)

    @classmethod
    def build(cls, ctx: BuildContext) -> Method:
        cls._task(ctx)  # the pretext task checks the views before the teacher is loaded
        return super().build(ctx)

    @classmethod
    def wrap(cls, backbone, ctx):
        return SSModel(backbone, pretext=get_pretext(ctx.section(cls).pretext).name)

    def forward(self, batch):
        views = batch["views"]
        b = views.shape[0]
        f = self.backbone_features(views)
        z = rearrange(self.student.head(f.feat), "(b v) d -> b v d", b=b)
        scores, target = self.task.predictions(z, batch)
        loss = self.task.head_loss(scores, target, self.cfg)
        logits = rearrange(f.logits, "(b v) k -> b v k", b=b)[:, 0]
        ss_acc = (scores.argmax(1) == target).float().mean() * 100
        return {"loss": loss, "logits": logits, "ss": loss.detach(), "ss_acc": ss_acc}


@register("student", "sskd")
class SSKD(_PretextViews, Method):
    """Eq. 8: ``λ1 CE + λ2 KD + λ3 L_T + λ4 L_ss``; the student (backbone + its SS head) sees all views.
    ``L_ss`` is the KL between the teacher's and the student's predictions of the pretext task."""

    summary = "SSKD: CE + KD + KD on transformed views + the teacher's SS predictions (Eq. 8; sskd.pretext)"
    paper = PAPER
    section, Config = "sskd", SSKDLossConfig
    views = "ss"
    min_ss_views = 1  # L_T and L_ss are over the SS views: without one Eq. 8 would silently be CE + KD
    teacher_part = "ss_head"
    needs_teacher = True
    outputs = ("logits", "embed")  # embed: the SS head's output per view (projection or pretext scores)
    topk_outputs = ("logits",)

    @classmethod
    def topk_temperatures(cls, cfg):
        return {"logits": (float(cfg.kd_T), float(cfg.tf_T))}  # kd on the normal view, tf on the SS views

    @classmethod
    def cosine_outputs(cls, teacher_info: dict) -> tuple[str, ...]:
        """``embed`` when the teacher's SS head is the contrastive one (its similarity matrix is all SSKD
        reads of it); the other pretext tasks' heads give scores, read as they are."""
        from sskd.losses.pretext import teacher_pretext

        return ("embed",) if teacher_pretext(teacher_info) == "contrastive" else ()

    def __init__(self, student: SSModel, teacher=None, *, gather: Gather | None = None, **kw):
        if not isinstance(student, SSModel):
            raise TypeError("method 'sskd' trains an SSModel (backbone + SS head)")
        super().__init__(student, teacher, **kw)
        self.task = get_pretext(student.pretext)
        # ``--global-ss-batch``: all ranks' rows for one global similarity matrix (None: this rank's own)
        self.gather = gather

    @classmethod
    def student_model(cls, backbone, num_classes):
        return SSModel(backbone)  # the student learns its own SS head with its backbone

    @classmethod
    def check_teacher(cls, info, source, cfg):
        check_part(info, cls.teacher_part, source, cls.name)
        check_teacher_pretext(info, source, cfg.section(cls.section).pretext)

    @classmethod
    def build(cls, ctx: BuildContext) -> Method:
        cfg, task = cls._task(ctx)
        student = SSModel(ctx.backbone(), pretext=task.name)  # the student first: the run seed decides it
        teacher, info = ctx.teacher_model(cls.teacher_part, method=cls.name)
        check_teacher_pretext(info, ctx.teacher, task.name)
        return cls(student, teacher, cfg=cfg, gather=ctx.gather)

    @staticmethod
    def teacher_outputs(teacher, views):
        b = views.shape[0]
        out = teacher(rearrange(views, "b v c h w -> (b v) c h w"))
        return {
            "logits": rearrange(out.logits, "(b v) k -> b v k", b=b),
            "embed": rearrange(out.embed, "(b v) d -> b v d", b=b),
        }

    def forward(self, batch):
        views, labels = batch["views"], batch["label"]
        b, v = views.shape[:2]
        out = self.student(rearrange(views, "b v c h w -> (b v) c h w"))
        s_logits = rearrange(out.logits, "(b v) k -> b v k", b=b)
        s_embed = rearrange(out.embed, "(b v) d -> b v d", b=b)
        t = self.teacher_batch(batch)
        t_logits, t_embed = t["logits"], t["embed"]
        terms = {
            "ce": F.cross_entropy(s_logits[:, 0], labels),
            "kd": kd_loss(s_logits[:, 0], t_logits[:, 0], self.cfg.kd_T),
        }
        if v > 1:
            terms["tf"] = transformed_kd_loss(
                _rows(s_logits),
                _rows(t_logits),
                repeat(labels, "b -> (b v)", v=v - 1),
                self.cfg.tf_T,
                self.cfg.tf_ratio,
            )
            s_scores, target = self.task.predictions(s_embed, batch, self.gather)
            t_scores, _ = self.task.predictions(t_embed, batch, self.gather)
            terms["ss"] = ss_kd_loss(s_scores, t_scores, target, self.cfg.ss_T, self.cfg.ss_ratio)
        else:  # no SS views (a method made directly; a run refuses them, min_ss_views): Eq. 8 reduces to CE + KD
            terms["tf"] = terms["ss"] = s_logits.sum() * 0.0
        return {"loss": sskd_total(terms, self.cfg), "logits": s_logits[:, 0], **terms}
