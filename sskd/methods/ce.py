"""Cross-entropy on the normal view: the plain teacher (stage 1) and the student without a teacher."""

from __future__ import annotations

import torch.nn.functional as F

from sskd.methods.base import Method, normal, register


@register("teacher", "ce")
class TeacherCE(Method):
    """Stage 1: cross-entropy on the normal view."""

    summary = "the teacher classifier: cross-entropy on the normal view (stage 1 of SSKD, KD, ...)"
    paper = "-"

    def forward(self, batch):
        logits = self.student(normal(batch))
        ce = F.cross_entropy(logits, batch["label"])
        return {"loss": ce, "logits": logits, "ce": ce}


@register("student", "ce")
class StudentCE(TeacherCE):
    """A student without a teacher: cross-entropy on the normal view (the baseline)."""

    summary = "the baseline: the student alone, cross-entropy on the normal view"
