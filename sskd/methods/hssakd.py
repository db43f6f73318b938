"""HSSAKD (Yang et al., IJCAI 2021 "HSAKD" / TNNLS 2022): auxiliary branches at every stage learn the joint
class × rotation task; the student mimics the teacher's joint distributions at every branch.

Roles (official code: winycg/HSAKD):

- ``train-teacher --method hssakd``: joint mode, backbone and branches from scratch (the 240-epoch recipe);
- ``train-ss-head --method hssakd``: frozen mode, a trained backbone (or ``torchvision:resnet34``) frozen
  and in eval mode, only the branches train (the 100-epoch recipe);
- ``distill --method hssakd``: CE + T²·KL of the main logits and of every branch over all 4b rows;
- ``distill --method hssakd_online``: two peers from scratch, no teacher.

Views: the normal view and its exact rotations by 90°, 180°, 270° (one crop and flip for all four).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange
from torch import nn

from sskd.core.errors import SSKDError
from sskd.core.fields import bound
from sskd.losses import hssakd_online_terms, hssakd_student_terms, hssakd_teacher_terms, joint_labels
from sskd.methods.base import BuildContext, Method, register
from sskd.methods.families import FrozenBackboneStage
from sskd.models.branches import BranchedModel

PAPER = "Yang et al., IJCAI 2021 / TNNLS 2022"  # Hierarchical Self-supervised Augmented KD
VIEWS = "shared_rotation"  # view r = r quarter turns of view 0


@dataclass
class HSSAKDConfig:
    """The official scripts' values: T = 3 for every KL, every weight 1."""

    T: float = bound(3.0, gt=0)
    ce_weight: float = bound(1.0, ge=0)
    kd_weight: float = bound(1.0, ge=0)
    aux_weight: float = bound(1.0, ge=0)


def _forward(model: BranchedModel, views: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Main logits (b, R, K) and each branch's joint logits (b, R, R·K) for views (b, R, c, h, w)."""
    b = views.shape[0]
    out = model(rearrange(views, "b v c h w -> (b v) c h w"))
    return (
        rearrange(out.logits, "(b v) k -> b v k", b=b),
        [rearrange(a, "(b v) k -> b v k", b=b) for a in out.aux],
    )


def _aux_accuracy(aux: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Top-1 (%) of the deepest branch on the joint labels, over all b·R rows (the official log's)."""
    joint = joint_labels(labels, aux[-1].shape[1])
    return (aux[-1].argmax(-1) == joint).float().mean().detach() * 100


def _weighted(terms: dict[str, torch.Tensor], cfg: HSSAKDConfig) -> torch.Tensor:
    w = {"ce": cfg.ce_weight, "kd": cfg.kd_weight, "aux": cfg.aux_weight}
    return sum(w[k] * v for k, v in terms.items() if k in w)


class _Teacher(Method):
    """Both teacher modes: CE of the main head on the unrotated rows + CE of every branch on the joint labels."""

    paper = PAPER
    section, Config = "hssakd", HSSAKDConfig
    views = VIEWS
    min_ss_views = 3  # the joint class x rotation task is over all four rotations
    produces = "branches"

    def forward(self, batch):
        logits, aux = _forward(self.student, batch["views"])
        terms = hssakd_teacher_terms(logits, aux, batch["label"])
        loss = self.cfg.ce_weight * terms["ce"] + self.cfg.aux_weight * terms["aux"]
        return {
            "loss": loss,
            "logits": logits[:, 0],
            "ce": terms["ce"],
            "aux": terms["aux"],
            "aux_acc": _aux_accuracy(aux, batch["label"]),
        }


@register("teacher", "hssakd")
class JointTeacher(_Teacher):
    summary = "HSSAKD teacher, joint mode: backbone + branches from scratch on classes and class x rotation"

    @classmethod
    def student_model(cls, backbone, num_classes):
        return BranchedModel(backbone, num_classes)


@register("head", "hssakd")
class FrozenTeacherBranches(_Teacher, FrozenBackboneStage):
    """Frozen mode: the backbone and its classifier stay bit-identical (eval mode, no gradient reaches them)."""

    summary = "HSSAKD teacher, frozen mode: only the branches train, on a trained backbone kept frozen"

    def __init__(self, student: BranchedModel, teacher=None, **kw):
        super().__init__(student, None, **kw)
        student.detach_taps = True  # the branches read the backbone's maps without a gradient into it

    @classmethod
    def wrap(cls, backbone, ctx):
        return BranchedModel(backbone, ctx.num_classes)


def check_branches(student: BranchedModel, teacher_info: dict[str, Any], source: str, arch: str) -> None:
    """Branch l of the student learns from branch l of the teacher: the counts must match."""
    have = (teacher_info.get("wrapper_args") or {}).get("num_branches")
    if have is not None and have != student.num_branches:
        raise SSKDError(
            f"--teacher {source}: {teacher_info.get('arch')} has {have} branches but the student {arch} "
            f"has {student.num_branches}; HSSAKD pairs branch l with branch l: choose a student with "
            f"{have} (3: CIFAR ResNets, WRNs, ShuffleNets; 4: VGG, ResNet50, MobileNetV2, ImageNet ResNets)"
        )


@register("student", "hssakd")
class HSSAKD(Method):
    """The student (backbone + its own branches, trained together) mimics the frozen teacher."""

    summary = "HSSAKD: KD of the main logits and of every branch's class x rotation scores over 4 rotations"
    paper = PAPER
    section, Config = "hssakd", HSSAKDConfig
    views = VIEWS
    min_ss_views = 3  # the joint class x rotation task is over all four rotations
    teacher_part = "branches"
    needs_teacher = True
    outputs = ("logits", "aux")
    topk_outputs = ("logits", "aux")

    @classmethod
    def student_model(cls, backbone, num_classes):
        return BranchedModel(backbone, num_classes)

    @classmethod
    def build(cls, ctx: BuildContext) -> Method:
        student = cls.student_model(
            ctx.backbone(), ctx.num_classes
        )  # before the teacher: the run seed decides it
        teacher, info = ctx.teacher_model(cls.teacher_part, method=cls.name)
        check_branches(student, info, ctx.teacher, ctx.arch)
        return cls(student, teacher, cfg=ctx.section(cls))

    @staticmethod
    def teacher_outputs(teacher, views):
        logits, aux = _forward(teacher, views)
        return {"logits": logits, "aux": torch.stack(aux, dim=2)}  # aux: (b, R, L, R·K)

    def forward(self, batch):
        logits, aux = _forward(self.student, batch["views"])
        t = self.teacher_batch(batch)
        t_aux = list(t["aux"].unbind(dim=2))
        if len(t_aux) != len(aux):
            raise SSKDError(f"teacher outputs hold {len(t_aux)} branches, the student has {len(aux)}")
        terms = hssakd_student_terms(logits, aux, t["logits"], t_aux, batch["label"], self.cfg.T)
        return {
            "loss": _weighted(terms, self.cfg),
            "logits": logits[:, 0],
            "ce": terms["ce"],
            "kd": terms["kd"],
            "aux": terms["aux"],
            "aux_acc": _aux_accuracy(aux, batch["label"]),
        }


@register("student", "hssakd_online")
class HSSAKDOnline(Method):
    """Two peers of the student architecture, trained together from scratch; the better one is exported."""

    summary = "HSSAKD online: two peers with branches teach each other, no teacher; exports the better one"
    paper = PAPER
    section, Config = "hssakd", HSSAKDConfig
    views = VIEWS
    min_ss_views = 3  # the joint class x rotation task is over all four rotations

    def __init__(self, student: nn.ModuleList, teacher=None, **kw):
        super().__init__(student, None, **kw)
        self.exported = 0  # the peer with the better validation top-1 (after the last evaluation)
        self.peer_results: list[dict[str, Any]] = []

    @classmethod
    def build(cls, ctx: BuildContext) -> Method:
        peers = nn.ModuleList([BranchedModel(ctx.backbone(), ctx.num_classes) for _ in range(2)])  # two inits
        return cls(peers, cfg=ctx.section(cls))

    def forward(self, batch):
        outs = [_forward(peer, batch["views"]) for peer in self.student]
        terms = hssakd_online_terms([o[0] for o in outs], [o[1] for o in outs], batch["label"], self.cfg.T)
        loss = (
            self.cfg.ce_weight * (terms["ce"] + terms["aux_ce"])
            + self.cfg.kd_weight * terms["kd"]
            + self.cfg.aux_weight * terms["aux"]
        )
        return {"loss": loss, "logits": outs[0][0][:, 0], **{k: v for k, v in terms.items() if k != "loss"}}

    def trainable_module(self) -> nn.Module:
        return self.student[self.exported]

    def validate(self, evaluate) -> dict[str, Any]:
        self.peer_results = [evaluate(peer) for peer in self.student]
        self.exported = max(range(2), key=lambda i: (self.peer_results[i]["top1"], -i))
        best = self.peer_results[self.exported]
        return dict(best, peer_top1=[r["top1"] for r in self.peer_results])

    def export_info(self) -> dict[str, Any]:
        return {
            "exported_peer": self.exported,
            "peers": [{k: r[k] for k in ("top1", "top5")} for r in self.peer_results],
        }
