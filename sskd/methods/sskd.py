"""SSKD (Xu et al., ECCV 2020): the teacher's SS head (stage 2, Eq. 5) and the student (Eq. 8)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

from sskd.heads import SSModel
from sskd.losses import (
    SSKDLossConfig,
    contrastive_loss,
    kd_loss,
    similarity_matrix,
    ss_kd_loss,
    sskd_total,
    transformed_kd_loss,
)
from sskd.methods.base import BuildContext, Method, register

PAPER = "Xu et al., ECCV 2020"  # Knowledge Distillation Meets Self-Supervision


def ss_targets(b: int, v: int, device) -> torch.Tensor:
    """Column of each transformed-view row: rows are ordered (image, view) for views 1..v-1."""
    return repeat(torch.arange(b, device=device), "b -> (b v)", v=v - 1)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return rearrange(t[:, 1:], "b v x -> (b v) x")


@register("head", "sskd")
class SSHeadStage(Method):
    """Stage 2 (Eq. 5): only the SS head trains; backbone and classifier are frozen and in eval mode."""

    summary = "the teacher's SS head: contrastive task over the SS views on the frozen backbone (Eq. 5)"
    paper = PAPER
    section, Config = "sskd", SSKDLossConfig
    views = "ss"
    produces = "ss_head"

    def __init__(self, student: SSModel, teacher=None, **kw):
        if not isinstance(student, SSModel):
            raise TypeError("the ss_head stage trains an SSModel (backbone + SS head)")
        super().__init__(student, None, **kw)
        student.backbone.requires_grad_(False)

    @classmethod
    def build(cls, ctx: BuildContext) -> Method:
        from sskd.stages import teacher_backbone

        backbone = teacher_backbone(ctx)
        return cls(SSModel(backbone), num_classes=ctx.num_classes, cfg=ctx.section(cls))

    def train(self, mode: bool = True):
        super().train(mode)
        self.student.backbone.eval()
        return self

    def forward(self, batch):
        views = batch["views"]
        b, v = views.shape[:2]
        with torch.no_grad():
            f = self.student.backbone(rearrange(views, "b v c h w -> (b v) c h w"), features=True)
        z = rearrange(self.student.head(f.feat), "(b v) d -> b v d", b=b)
        sim = similarity_matrix(rearrange(z[:, 1:], "b v d -> (b v) d"), z[:, 0])
        target = ss_targets(b, v, views.device)
        loss = contrastive_loss(sim, target, self.cfg.head_tau)
        logits = rearrange(f.logits, "(b v) k -> b v k", b=b)[:, 0]
        ss_acc = (sim.argmax(1) == target).float().mean() * 100
        return {"loss": loss, "logits": logits, "ss": loss.detach(), "ss_acc": ss_acc}


@register("student", "sskd")
class SSKD(Method):
    """Eq. 8: ``λ1 CE + λ2 KD + λ3 L_T + λ4 L_ss``; the student (backbone + its SS head) sees all views."""

    summary = "SSKD: CE + KD + KD on transformed views + the teacher's SS similarities (Eq. 8)"
    paper = PAPER
    section, Config = "sskd", SSKDLossConfig
    views = "ss"
    teacher_part = "ss_head"
    needs_teacher = True
    outputs = ("logits", "embed")
    topk_outputs = ("logits",)

    def __init__(self, student: SSModel, teacher=None, **kw):
        if not isinstance(student, SSModel):
            raise TypeError("method 'sskd' trains an SSModel (backbone + SS head)")
        super().__init__(student, teacher, **kw)

    @classmethod
    def student_model(cls, backbone, num_classes):
        return SSModel(backbone)  # the student learns its own SS head with its backbone

    @staticmethod
    def teacher_outputs(teacher, views):
        b = views.shape[0]
        out = teacher(rearrange(views, "b v c h w -> (b v) c h w"))
        return {"logits": rearrange(out.logits, "(b v) k -> b v k", b=b),
                "embed": rearrange(out.embed, "(b v) d -> b v d", b=b)}

    def forward(self, batch):
        views, labels = batch["views"], batch["label"]
        b, v = views.shape[:2]
        out = self.student(rearrange(views, "b v c h w -> (b v) c h w"))
        s_logits = rearrange(out.logits, "(b v) k -> b v k", b=b)
        s_embed = rearrange(out.embed, "(b v) d -> b v d", b=b)
        t = self.teacher_batch(batch)
        t_logits, t_embed = t["logits"], t["embed"]
        terms = {"ce": F.cross_entropy(s_logits[:, 0], labels),
                 "kd": kd_loss(s_logits[:, 0], t_logits[:, 0], self.cfg.kd_T)}
        if v > 1:
            terms["tf"] = transformed_kd_loss(_rows(s_logits), _rows(t_logits), repeat(labels, "b -> (b v)", v=v - 1),
                                              self.cfg.tf_T, self.cfg.tf_ratio)
            s_cols, t_cols, offset = s_embed[:, 0], t_embed[:, 0], 0
            if self.gather is not None:
                s_cols, offset = self.gather(s_cols)
                t_cols, _ = self.gather(t_cols)
            target = ss_targets(b, v, views.device) + offset
            terms["ss"] = ss_kd_loss(similarity_matrix(_rows(s_embed), s_cols),
                                     similarity_matrix(_rows(t_embed), t_cols), target, self.cfg.ss_T, self.cfg.ss_ratio)
        else:  # no SS views configured: Eq. 8 reduces to CE + KD
            terms["tf"] = terms["ss"] = s_logits.sum() * 0.0
        return {"loss": sskd_total(terms, self.cfg), "logits": s_logits[:, 0], **terms}
