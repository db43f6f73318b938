"""Methods as modules: ``method(batch) -> {"loss", "logits", <named terms>}``; one loop serves all.

A batch is ``{"views": (b, v, c, h, w), "label": (b,), "id": (b,)}`` with view 0 the normal view. A
student method may also find the frozen teacher's outputs already in the batch (``t_logits``
(b, v, K), ``t_embed`` (b, v, d)) from the teacher cache; then the teacher is not run.

The teacher inside a student method is frozen by construction: eval mode, no gradients, run under
``no_grad`` and *not a registered submodule* — it is in no ``parameters()`` or ``state_dict()`` and
DDP never sees it; ``method.to(device)`` still moves it (see ``_apply``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

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
from sskd.registry import Registry

METHODS = Registry("method")


class Method(nn.Module):
    """Base: holds the trained model as ``student`` and an optional frozen ``teacher``."""

    views_needed: int | None = None  # 1 = only the normal view is used; None = all views

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, *, num_classes: int,
                 loss_cfg: SSKDLossConfig | None = None):
        super().__init__()
        self.student = student
        self.num_classes = num_classes
        self.cfg = loss_cfg or SSKDLossConfig()
        # Not a submodule on purpose: no parameters, no state_dict entries, never wrapped by DDP.
        self.__dict__["teacher"] = teacher
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)
        # Optional all-gather of normal-view embeddings across ranks: gather(z) -> (z_all, offset).
        self.gather: Callable[[torch.Tensor], tuple[torch.Tensor, int]] | None = None

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if self.teacher is not None:
            self.teacher._apply(fn, *args, **kwargs)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # BN running statistics of the teacher never move
        return self

    def trainable_module(self) -> nn.Module:
        """The model whose weights a run exports (``model.safetensors``)."""
        return self.student


def _normal(batch) -> torch.Tensor:
    return batch["views"][:, 0]


@METHODS.register("teacher")
class TeacherCE(Method):
    """Stage 1: cross-entropy on the normal view."""

    views_needed = 1

    def forward(self, batch):
        logits = self.student(_normal(batch))
        ce = F.cross_entropy(logits, batch["label"])
        return {"loss": ce, "logits": logits, "ce": ce}


@METHODS.register("ce")
class StudentCE(TeacherCE):
    """A student without a teacher: cross-entropy on the normal view (the baseline)."""


@METHODS.register("kd")
class StudentKD(Method):
    """Hinton KD on the normal view: ``ce_weight · CE + kd_weight · KD`` (CRD's -r 0.1 -a 0.9)."""

    views_needed = 1

    def forward(self, batch):
        x = _normal(batch)
        logits = self.student(x)
        if "t_logits" in batch:
            t_logits = batch["t_logits"][:, 0].float()
        else:
            with torch.no_grad():
                t_logits = self.teacher(x)
                t_logits = t_logits if torch.is_tensor(t_logits) else t_logits[0]
        ce = F.cross_entropy(logits, batch["label"])
        kd = kd_loss(logits, t_logits, self.cfg.kd_T)
        return {"loss": self.cfg.ce_weight * ce + self.cfg.kd_weight * kd, "logits": logits, "ce": ce, "kd": kd}


def _ss_targets(b: int, v: int, device) -> torch.Tensor:
    """Column of each transformed-view row: rows are ordered (image, view) for views 1..v-1."""
    return repeat(torch.arange(b, device=device), "b -> (b v)", v=v - 1)


@METHODS.register("ss_head")
class SSHeadStage(Method):
    """Stage 2 (Eq. 5): only the SS head trains; backbone and classifier are frozen and in eval mode."""

    def __init__(self, student: SSModel, teacher=None, **kw):
        super().__init__(student, None, **kw)
        student.backbone.requires_grad_(False)

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
        target = _ss_targets(b, v, views.device)
        loss = contrastive_loss(sim, target, self.cfg.head_tau)
        logits = rearrange(f.logits, "(b v) k -> b v k", b=b)[:, 0]
        ss_acc = (sim.argmax(1) == target).float().mean() * 100
        return {"loss": loss, "logits": logits, "ss": loss.detach(), "ss_acc": ss_acc}


@METHODS.register("sskd")
class SSKD(Method):
    """Eq. 8: ``λ1 CE + λ2 KD + λ3 L_T + λ4 L_ss``; the student (backbone + its SS head) sees all views."""

    def _teacher(self, batch, flat_views, b):
        if "t_logits" in batch and "t_embed" in batch:
            return batch["t_logits"].float(), batch["t_embed"].float()
        with torch.no_grad():
            out = self.teacher(flat_views)
        return (rearrange(out.logits.float(), "(b v) k -> b v k", b=b),
                rearrange(out.embed.float(), "(b v) d -> b v d", b=b))

    def forward(self, batch):
        views, labels = batch["views"], batch["label"]
        b, v = views.shape[:2]
        flat = rearrange(views, "b v c h w -> (b v) c h w")
        out = self.student(flat)
        s_logits = rearrange(out.logits, "(b v) k -> b v k", b=b)
        s_embed = rearrange(out.embed, "(b v) d -> b v d", b=b)
        t_logits, t_embed = self._teacher(batch, flat, b)
        terms = {"ce": F.cross_entropy(s_logits[:, 0], labels), "kd": kd_loss(s_logits[:, 0], t_logits[:, 0], self.cfg.kd_T)}
        if v > 1:
            rows = lambda t: rearrange(t[:, 1:], "b v x -> (b v) x")
            terms["tf"] = transformed_kd_loss(rows(s_logits), rows(t_logits), repeat(labels, "b -> (b v)", v=v - 1),
                                              self.cfg.tf_T, self.cfg.tf_ratio)
            s_cols, t_cols, offset = s_embed[:, 0], t_embed[:, 0], 0
            if self.gather is not None:
                s_cols, offset = self.gather(s_cols)
                t_cols, _ = self.gather(t_cols)
            target = _ss_targets(b, v, views.device) + offset
            terms["ss"] = ss_kd_loss(similarity_matrix(rows(s_embed), s_cols),
                                     similarity_matrix(rows(t_embed), t_cols), target, self.cfg.ss_T, self.cfg.ss_ratio)
        else:  # no SS views configured: Eq. 8 reduces to CE + KD
            terms["tf"] = terms["ss"] = s_logits.sum() * 0.0
        return {"loss": sskd_total(terms, self.cfg), "logits": s_logits[:, 0], **terms}


def create_method(name: str, *, student: nn.Module, teacher: nn.Module | None = None, num_classes: int,
                  loss_cfg: SSKDLossConfig | None = None) -> Method:
    """A method by registry name: ``teacher``, ``ss_head``, ``ce``, ``kd`` or ``sskd``."""
    cls = METHODS.get(name)
    if name in ("ss_head", "sskd") and not isinstance(student, SSModel):
        raise TypeError(f"method {name!r} trains an SSModel (backbone + SS head)")
    # kd/sskd without a teacher is allowed: its outputs then come from a cache in every batch.
    return cls(student, teacher, num_classes=num_classes, loss_cfg=loss_cfg)
