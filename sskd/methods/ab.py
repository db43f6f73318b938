"""AB, activation-boundary distillation (Heo et al., AAAI 2019), as RepDistiller runs it (``--distill abound``):
an **init stage** (``init_epochs``, 30) trains a connector and the student's feature layers (everything the
maps depend on: all but the classifier) on the AB loss of the pre-ReLU maps alone (:func:`ab_loss`: a
squared hinge pushing each student pre-ReLU value past ±m on the side of the teacher's sign, deeper layers
weighted more), with its own SGD at the student's lr; then the main training is
``ce_weight · CE + kd_weight · KD_T`` on the whole student: RepDistiller's main stage has no AB term (``loss_kd = 0``; its ``-b 1`` is inert), so
``weight`` defaults to 0; a ``weight > 0`` adds ``weight · AB`` with the connector training too.

Not cacheable: the init stage reads the teacher's pre-ReLU maps, 114,688 floats per sample for resnet32x4
(224 KB fp16 per sample and epoch); the main stage needs the teacher only for a KD term (``kd_weight > 0``),
and runs no teacher at all otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sskd.core.fields import bound
from sskd.losses import kd_loss
from sskd.losses.feature import ab_loss
from sskd.methods.base import Phase, normal, register
from sskd.methods.families import CEKDConfig, FeatureMethod
from sskd.models.connectors import (
    Connector,
    PairShapes,
    features_of,
    flatten_maps,
    parameters_behind,
    split_maps,
)

INIT = "init"


@dataclass
class ABConfig(CEKDConfig):
    """RepDistiller's AB: --init_epochs 30, margin 1, -r 1 -a 0, kd_T 4, no main-stage AB term."""

    weight: float = bound(0.0, ge=0)  # main-stage AB weight; RepDistiller's is effectively 0
    margin: float = bound(1.0, ge=0)
    init_epochs: int = bound(30, ge=0)  # 0: no init stage (then AB is plain CE unless weight > 0)


@register("student", "ab")
class AB(FeatureMethod):
    """Init stage: connector + student feature layers on the AB loss; then CE (+ KD) on the whole student."""

    summary = "AB: an init stage matching the teacher's activation boundaries (pre-ReLU signs), then CE"
    paper = "Heo et al., AAAI 2019"  # Knowledge Transfer via Distillation of Activation Boundaries
    section, Config = "ab", ABConfig
    has_phases = True
    outputs = ("logits", "preact")
    cache_refusal = (
        "its init stage reads the teacher's pre-ReLU maps, 114,688 floats a sample for resnet32x4 (224 KB "
        "fp16 per sample and epoch), and its main stage runs no teacher unless ab.kd_weight > 0"
    )

    def connect(self, pair: PairShapes) -> None:
        for role, model in (("student", self.student), ("teacher", self.teacher)):
            why = getattr(getattr(model, "backbone", model), "preact_refusal", None)  # a timm:NAME model's
            if why:
                raise pair.error(self.name, f"the {role} has no pre-activation maps: {why}")
        self.connector = Connector(pair.student, pair.teacher)
        self.feature_names = parameters_behind(self.student)  # RepDistiller's get_feat_modules

    @staticmethod
    def teacher_outputs(teacher, views):
        f = features_of(teacher, views[:, 0], preact=True)
        return {"logits": f.logits[:, None], "preact": flatten_maps(f.preact)}

    def phases(self) -> list[Phase]:
        return [Phase(INIT, self.cfg.init_epochs)]  # lr: the student's, constant

    def phase_parameters(self, name):
        if name == INIT:
            return [p for n, p in self.student.named_parameters() if n in self.feature_names] + list(
                self.connector.parameters()
            )
        # RepDistiller: the connector is not in trainable_list in the main stage
        return [*self.student.parameters(), *(self.connector.parameters() if self.cfg.weight > 0 else [])]

    def set_phase(self, name):
        super().set_phase(name)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.phase is None and self.cfg.weight == 0:
            self.connector.eval()  # RepDistiller: module_list[1].eval() in the main stage
        return self

    def _ab(self, f, t) -> torch.Tensor:
        return ab_loss(
            self.connector(f.preact), split_maps(t["preact"][:, 0], self.pair.teacher), self.cfg.margin
        )

    def forward(self, batch):
        x = normal(batch)
        if self.phase == INIT:
            f = self.student(x, features="preact")
            ab = self._ab(f, self.teacher_batch(batch))
            return {"loss": ab, "logits": f.logits, "ab": ab}  # unweighted, as RepDistiller's init()
        use_ab, use_kd = self.cfg.weight > 0, self.cfg.kd_weight > 0
        f = self.student(x, features="preact" if use_ab else True)
        ce = F.cross_entropy(f.logits, batch["label"])
        out = {"logits": f.logits, "ce": ce}
        loss = self.cfg.ce_weight * ce
        if use_ab or use_kd:  # otherwise the teacher does not run at all
            t = self.teacher_batch(batch)
            if use_kd:
                out["kd"] = kd_loss(f.logits, t["logits"][:, 0], self.cfg.T)
                loss = loss + self.cfg.kd_weight * out["kd"]
            if use_ab:
                out["ab"] = self._ab(f, t)
                loss = loss + self.cfg.weight * out["ab"]
        return {"loss": loss, **out}
