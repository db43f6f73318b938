"""FT, factor transfer (Kim et al., NeurIPS 2018), as RepDistiller runs it (``--distill factor``): an **init
stage** (``init_epochs``, 30) trains a paraphraser to reconstruct the teacher's last map (MSE; lr 0.01 for
resnet/wrn students, else the student's, as RepDistiller's ``init()``); then, with the paraphraser frozen and
in eval mode, ``ce_weight · CE + kd_weight · KD_T + weight · |factor(T(f_s)) − factor(P(f_t))|`` trains the
student and its translator T (:func:`ft_loss`: the factors squeezed to L2-normalised channel means of x^p1,
their mean ``|Δ|`` at ``p2`` = 1). Both read the last map (RepDistiller's feat[-2]).

Not cacheable: the paraphraser trains inside the run on the teacher's last map (16,384 floats per sample for
resnet32x4, 32 KB fp16 per sample and epoch) and the main stage reads its factor, which no cache made
before the run can hold.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sskd.core.fields import bound
from sskd.losses.feature import ft_loss
from sskd.methods.base import Phase, normal, register
from sskd.methods.families import CEKDConfig, FeatureMethod
from sskd.models.connectors import PairShapes, Paraphraser, Translator, features_of

INIT = "init"


def rd_init_lr(arch: str | None) -> float | None:
    """RepDistiller's paraphraser lr: 0.01 for its CIFAR ResNets and WRNs (resnet8..110, resnet8x4,
    resnet32x4, wrn_*), else None (the student's lr)."""
    return 0.01 if arch and arch.startswith(("resnet", "wrn_")) else None


@dataclass
class FTConfig(CEKDConfig):
    """RepDistiller's README weights for FT: -r 1 -a 0 -b 200, p1 2, p2 1, k 0.5, --init_epochs 30, kd_T 4."""

    weight: float = bound(200.0, ge=0)
    p1: float = bound(2.0, gt=0)  # the factor's power (channel mean of x^p1)
    p2: float = bound(1.0, gt=0)  # 1: L1 between factors
    k: float = bound(0.5, gt=0, le=1)  # paraphrase rate: factor channels = k · teacher channels
    init_epochs: int = bound(30, ge=0)  # the paraphraser's pre-training; 0 = a random frozen paraphraser
    init_lr: float | None = bound(None, gt=0)  # None: 0.01 for resnet/wrn students, else the student's lr


@register("student", "ft")
class FT(FeatureMethod):
    """Paraphraser pre-training on the teacher's last map, then the student's translator mimics its factor."""

    summary = (
        "FT: a paraphraser pre-trained on the teacher's last map; the student's translator mimics its factor"
    )
    paper = (
        "Kim et al., NeurIPS 2018"  # Paraphrasing Complex Network: Network Compression via Factor Transfer
    )
    section, Config = "ft", FTConfig
    pairs_layers = False  # one map: the last
    has_phases = True
    outputs = ("logits", "last")
    cache_refusal = (
        "the paraphraser trains in the run on the teacher's last map (16,384 floats a sample for resnet32x4, "
        "32 KB fp16 per sample and epoch) and the main stage reads its factor, which no cache can hold"
    )

    def connect(self, pair: PairShapes) -> None:
        (s_c, _, _), (t_c, _, _) = pair.student[-1], pair.teacher[-1]
        self.paraphraser = Paraphraser(t_c, self.cfg.k)
        self.translator = Translator(s_c, t_c, self.cfg.k)
        self.student_arch = pair.student_arch

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
        return self.with_ce_kd(f, t, batch, ft=ft)
