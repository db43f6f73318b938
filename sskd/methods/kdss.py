"""The KDSS variant: distillation with self-supervision through a rotation head, contrastive instance
discrimination and cross-network feature alignment. No public code implements it; where its description is
silent, the defaults (:class:`KDSSConfig`) and the choices made here are said below.

- ``train-ss-head --method kdss --teacher RUN``: on the frozen teacher backbone, a 4-way rotation head
  (``Linear(d, 4)``) learns rotation prediction (CE) and a projection MLP (SSKD's design) learns
  contrastive instance discrimination (the same multi-positive InfoNCE the student uses);
- ``distill --method kdss``: ``0.1 CE + 0.9 KD + 1.0 L_rot + 1.0 L_con + 1.0 L_align`` with
  ``L_rot = CE(r_S, k) + τ_r² KL(r_T ‖ r_S)`` over all 4b rows, ``L_con`` the InfoNCE of every student
  view against the teacher's views (the same image's four are the positives: the description's "makes
  teacher and student representations consistent under augmentation"; the student-only form, each
  student view against the student's own views, is ``con_mode: student``),
  ``L_align = mean(1 − cos(P(g_S), g_T))`` on the pooled features through a student-side projection
  ``P = Linear(d_S, d_T) + BN``.

Views: the normal view and its exact rotations by 90°, 180°, 270° (``shared_rotation``), as HSSAKD's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from sskd.core.fields import bound
from sskd.losses.kdss import alignment_loss, instance_contrast, rotation_loss
from sskd.losses.sskd import kd_loss
from sskd.methods.base import BuildContext, Method, register
from sskd.methods.families import FrozenBackboneStage
from sskd.models.kdss_heads import ROTATIONS, KDSSModel, KDSSOutput

PAPER = "KDSS variant"
VIEWS = "shared_rotation"


@dataclass
class KDSSConfig:
    """The defaults: CE 0.1 and KD 0.9 at τ 4 (the SSKD paper's KD weights), every SS term 1.0, τ_r 4,
    InfoNCE τ 0.5."""

    ce_weight: float = bound(0.1, ge=0)
    kd_weight: float = bound(0.9, ge=0)
    T: float = bound(4.0, gt=0)
    rot_weight: float = bound(1.0, ge=0)
    rot_T: float = bound(4.0, gt=0)
    con_weight: float = bound(1.0, ge=0)
    con_tau: float = bound(0.5, gt=0)
    con_mode: str = bound("cross", choices=("cross", "student"))  # student views vs the teacher's, or its own
    align_weight: float = bound(1.0, ge=0)


def _split(out: KDSSOutput, b: int) -> dict[str, torch.Tensor]:
    """Every output as (b, R, ...)."""
    return {
        k: rearrange(getattr(out, k), "(b v) x -> b v x", b=b) for k in ("logits", "rot", "embed", "feat")
    }


def _run(model: nn.Module, views: torch.Tensor) -> dict[str, torch.Tensor]:
    return _split(model(rearrange(views, "b v c h w -> (b v) c h w")), views.shape[0])


@register("head", "kdss")
class KDSSHeads(FrozenBackboneStage):
    """The teacher's rotation head and projection on its frozen backbone (bit-identical, eval mode)."""

    summary = "the KDSS teacher's rotation head and projection: rotation CE + InfoNCE on the frozen backbone"
    paper = PAPER
    section, Config = "kdss", KDSSConfig
    views = VIEWS
    min_ss_views = 3  # rotation prediction and the instance contrast are over the four rotations
    produces = "kdss_heads"

    @classmethod
    def wrap(cls, backbone, ctx):
        return KDSSModel(backbone)

    def forward(self, batch):
        views = batch["views"]
        b = views.shape[0]
        f = self.backbone_features(views)
        rot = rearrange(self.student.rot_head(f.feat), "(b v) x -> b v x", b=b)
        embed = rearrange(self.student.proj(f.feat), "(b v) x -> b v x", b=b)
        terms = rotation_loss(rot, None)
        terms["con"] = instance_contrast(embed, embed, self.cfg.con_tau)
        rot_acc = (rot.argmax(-1) == torch.arange(ROTATIONS, device=rot.device)).float().mean() * 100
        return {
            "loss": terms["rot_ce"] + terms["con"],
            "logits": rearrange(f.logits, "(b v) k -> b v k", b=b)[:, 0],
            "rot_ce": terms["rot_ce"],
            "con": terms["con"],
            "rot_acc": rot_acc.detach(),
        }


@register("student", "kdss")
class KDSS(Method):
    """The student (backbone + its own rotation head and projection) and the alignment projection P."""

    summary = (
        "KDSS variant: KD + rotation prediction + contrastive instance discrimination + feature alignment"
    )
    paper = PAPER
    section, Config = "kdss", KDSSConfig
    views = VIEWS
    min_ss_views = 3  # rotation prediction and the instance contrast are over the four rotations
    teacher_part = "kdss_heads"
    needs_teacher = True
    outputs = ("logits", "rot", "embed", "feat")
    topk_outputs = ("logits",)

    def __init__(self, student: KDSSModel, teacher=None, *, teacher_dim: int | None = None, **kw):
        super().__init__(student, teacher, **kw)
        d_t = teacher_dim or (teacher.feat_dim if teacher is not None else student.embed_dim)
        # P is on the student's side, so the teacher stays frozen and the two widths may differ
        self.align = nn.Sequential(nn.Linear(student.feat_dim, d_t), nn.BatchNorm1d(d_t))

    @classmethod
    def build(cls, ctx: BuildContext) -> Method:
        backbone = ctx.backbone()  # the student first: the run seed decides its weights
        teacher, info = ctx.teacher_model(cls.teacher_part, method=cls.name)
        d_t = teacher.feat_dim if teacher is not None else info.get("feat_dim") or backbone.feat_dim
        student = KDSSModel(backbone, embed_dim=(info.get("wrapper_args") or {}).get("embed_dim", d_t))
        return cls(student, teacher, teacher_dim=d_t, cfg=ctx.section(cls))

    @classmethod
    def student_model(cls, backbone, num_classes):
        return KDSSModel(backbone)

    @staticmethod
    def teacher_outputs(teacher, views):
        return _run(teacher, views)

    def forward(self, batch):
        views, labels = batch["views"], batch["label"]
        s = _run(self.student, views)
        t = self.teacher_batch(batch)
        cfg = self.cfg
        terms = {
            "ce": F.cross_entropy(s["logits"][:, 0], labels),
            "kd": kd_loss(s["logits"][:, 0], t["logits"][:, 0], cfg.T),
        }
        terms.update(rotation_loss(s["rot"], t["rot"], cfg.rot_T))
        keys = t["embed"] if cfg.con_mode == "cross" else s["embed"]
        terms["con"] = instance_contrast(s["embed"], keys, cfg.con_tau)
        aligned = self.align(s["feat"].reshape(-1, s["feat"].shape[-1]))
        terms["align"] = alignment_loss(aligned, t["feat"].reshape(-1, t["feat"].shape[-1]))
        loss = (
            cfg.ce_weight * terms["ce"]
            + cfg.kd_weight * terms["kd"]
            + cfg.rot_weight * (terms["rot_ce"] + terms["rot_kd"])
            + cfg.con_weight * terms["con"]
            + cfg.align_weight * terms["align"]
        )
        return {"loss": loss, "logits": s["logits"][:, 0], **terms}
