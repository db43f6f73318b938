"""FT, factor transfer (Kim et al., NeurIPS 2018), as RepDistiller runs it (``--distill factor``): an **init
stage** (``init_epochs``, 30) trains a paraphraser to reconstruct the teacher's last map (MSE; lr 0.01 for
resnet/wrn students, else the student's, as RepDistiller's ``init()``); then, with the paraphraser frozen and
in eval mode, ``ce_weight · CE + kd_weight · KD_T + weight · |factor(T(f_s)) − factor(P(f_t))|`` trains the
student and its translator T (facts §10, :func:`ft_loss`). Both read the last map (RepDistiller's feat[-2]).

Not cacheable: the paraphraser trains inside the run on the teacher's last map (16,384 floats per sample for
resnet32x4, 32 KB fp16 per sample and epoch) and the main stage reads its factor, which no cache made
before the run can hold.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sskd.core.fields import bound
from sskd.losses import kd_loss
from sskd.losses.feature import ft_loss
from sskd.methods.base import BuildContext, Method, Phase, normal, register
from sskd.models.connectors import (
    PairShapes,
    Paraphraser,
    ShapeError,
    Translator,
    build_pair,
    features_of,
    probe_pair,
)

INIT = "init"


def rd_init_lr(arch: str | None) -> float | None:
    """RepDistiller's paraphraser lr: 0.01 for its CIFAR ResNets and WRNs (resnet8..110, resnet8x4,
    resnet32x4, wrn_*), else None (the student's lr)."""
    return 0.01 if arch and arch.startswith(("resnet", "wrn_")) else None


@dataclass
class FTConfig:
    """RepDistiller's README weights for FT: -r 1 -a 0 -b 200, p1 2, p2 1, k 0.5, --init_epochs 30, kd_T 4."""

    ce_weight: float = bound(1.0, ge=0)
    kd_weight: float = bound(0.0, ge=0)
    T: float = bound(4.0, gt=0)
    weight: float = bound(200.0, ge=0)
    p1: float = bound(2.0, gt=0)  # the factor's power (channel mean of x^p1)
    p2: float = bound(1.0, gt=0)  # 1: L1 between factors
    k: float = bound(0.5, gt=0, le=1)  # paraphrase rate: factor channels = k · teacher channels
    init_epochs: int = bound(30, ge=0)  # the paraphraser's pre-training; 0 = a random frozen paraphraser
    init_lr: float | None = bound(None, gt=0)  # None: 0.01 for resnet/wrn students, else the student's lr


@register("student", "ft")
class FT(Method):
    """Paraphraser pre-training on the teacher's last map, then the student's translator mimics its factor."""

    summary = (
        "FT: a paraphraser pre-trained on the teacher's last map; the student's translator mimics its factor"
    )
    paper = (
        "Kim et al., NeurIPS 2018"  # Paraphrasing Complex Network: Network Compression via Factor Transfer
    )
    section, Config = "ft", FTConfig
    needs_teacher = True
    has_phases = True
    outputs = ("logits", "last")
    cache_refusal = (
        "the paraphraser trains in the run on the teacher's last map (16,384 floats a sample for resnet32x4, "
        "32 KB fp16 per sample and epoch) and the main stage reads its factor, which no cache can hold"
    )

    def __init__(self, student, teacher=None, *, num_classes: int, cfg=None, pair: PairShapes | None = None):
        super().__init__(student, teacher, num_classes=num_classes, cfg=cfg)
        self.pair = pair or probe_pair(student, teacher)
        (s_c, _, _), (t_c, _, _) = self.pair.student[-1], self.pair.teacher[-1]
        try:
            self.paraphraser = Paraphraser(t_c, self.cfg.k)
            self.translator = Translator(s_c, t_c, self.cfg.k)
        except ShapeError as exc:
            raise self.pair.error(self.name, str(exc)) from None
        self.student_arch = self.pair.student_arch

    @classmethod
    def build(cls, ctx: BuildContext) -> Method:
        student, teacher, pair = build_pair(ctx, cls.name)
        return cls(student, teacher, num_classes=ctx.num_classes, cfg=ctx.section(cls), pair=pair)

    @staticmethod
    def teacher_outputs(teacher, views):
        f = features_of(teacher, views[:, 0])
        return {"logits": f.logits[:, None], "last": f.maps[-1][:, None]}

    def phases(self) -> list[Phase]:
        return [Phase(INIT, self.cfg.init_epochs, lr=self.cfg.init_lr or rd_init_lr(self.student_arch))]

    def phase_parameters(self, name):
        if name == INIT:
            return list(self.paraphraser.parameters())
        return [*self.student.parameters(), *self.translator.parameters()]  # the paraphraser stays frozen

    def set_phase(self, name):
        super().set_phase(name)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.phase == INIT:
            self.student.eval()  # RepDistiller's init() keeps the student in eval mode: no BN statistic moves
        else:
            self.paraphraser.eval()
        return self

    def forward(self, batch):
        x, t = normal(batch), self.teacher_batch(batch)
        last = t["last"][:, 0]
        if self.phase == INIT:
            rec = F.mse_loss(self.paraphraser(last)[1].float(), last)
            with torch.no_grad():
                logits = self.student(x)  # for the logged accuracy only
            return {"loss": rec, "logits": logits, "rec": rec}
        f = self.student(x, features=True)
        with torch.no_grad():
            factor_t = self.paraphraser.encoder(last)
        ft = ft_loss(self.translator(f.maps[-1]), factor_t, self.cfg.p1, self.cfg.p2)
        ce = F.cross_entropy(f.logits, batch["label"])
        kd = kd_loss(f.logits, t["logits"][:, 0], self.cfg.T)
        loss = self.cfg.ce_weight * ce + self.cfg.kd_weight * kd + self.cfg.weight * ft
        return {"loss": loss, "logits": f.logits, "ce": ce, "kd": kd, "ft": ft}
