"""FitNet (Romero et al., ICLR 2015): a regressor maps the student's hint map onto the teacher's, trained on
the MSE (:func:`hint_loss`, the mean over every entry); ``ce_weight · CE + kd_weight · KD_T + weight · hint``.

Two stages, as in the FitNets paper: a **hint stage** (``hint_epochs``, default 30 like RepDistiller's
``init_epochs``) trains only the student up to the hint layer and the regressor, on ``weight · hint``
alone; then the main training, RepDistiller's FitNet, trains everything on the total above. RepDistiller's
own FitNet (``--distill hint``) is single-stage: ``hint_epochs: 0`` gives exactly its behaviour (and is what
the recipes and the published numbers use). The paper's second stage is KD alone; here it keeps the hint
term, as RepDistiller does (set ``weight: 0`` and ``kd_weight`` for the paper's). The layers after the hint map
still run forward in the hint stage, so their BatchNorm statistics move; their weights do not.

Not cacheable: the hint map is 32,768 floats per sample for a resnet32x4 teacher (f2 = 128×16×16: 64 KB fp16
per sample and epoch, 3.3 GB per CIFAR-100 epoch).
"""

from __future__ import annotations

from dataclasses import dataclass

from sskd.core.fields import bound
from sskd.losses.feature import hint_loss
from sskd.methods.base import Phase, normal, register
from sskd.methods.families import CEKDConfig, FeatureMethod
from sskd.models.connectors import ConvReg, PairShapes, ShapeError, features_of, parameters_behind

HINT = "hint"


@dataclass
class FitNetConfig(CEKDConfig):
    """RepDistiller's README weights for FitNet: -r 1 -a 0 -b 100, --hint_layer 2, kd_T 4."""

    weight: float = bound(100.0, ge=0)  # β, also the hint stage's loss scale
    # RepDistiller's feat[hint_layer] = maps[hint_layer - 1] (feat[0] is the stem)
    hint_layer: int = bound(2, ge=1)
    hint_epochs: int = bound(30, ge=0)  # the FitNets hint stage; 0 = RepDistiller's single-stage FitNet


@register("student", "fitnet")
class FitNet(FeatureMethod):
    """Hint stage (student up to the hint layer + regressor), then CE (+ KD) + β·hint on everything."""

    summary = "FitNet: regress the student's hint-layer map onto the teacher's (MSE), after a hint stage"
    paper = "Romero et al., ICLR 2015"  # FitNets: Hints for Thin Deep Nets
    section, Config = "fitnet", FitNetConfig
    pairs_layers = False  # one map: the hint layer
    has_phases = True
    outputs = ("logits", "map1")  # the default hint layer; the others come with a live teacher
    cache_refusal = (
        "the hint map is 32,768 floats a sample for a resnet32x4 teacher (64 KB fp16 per sample and "
        "epoch, 3.3 GB per CIFAR-100 epoch): reading that back is no cheaper than the teacher forward"
    )

    def connect(self, pair: PairShapes) -> None:
        layer, count = self.cfg.hint_layer, min(len(pair.student), len(pair.teacher))
        if layer > count:
            raise pair.error(self.name, f"fitnet.hint_layer {layer} is past the last shared map (1..{count})")
        self.index = layer - 1
        try:
            self.regressor = ConvReg(pair.student[self.index], pair.teacher[self.index])
        except ShapeError as exc:
            raise ShapeError(f"hint layer {layer}: {exc}") from None
        self.hint_names = parameters_behind(self.student, self.index)  # "the student up to the hint layer"

    @staticmethod
    def teacher_outputs(teacher, views):
        f = features_of(teacher, views[:, 0])
        return {"logits": f.logits[:, None], **{f"map{i}": m[:, None] for i, m in enumerate(f.maps)}}

    def phases(self) -> list[Phase]:
        return [Phase(HINT, self.cfg.hint_epochs)]  # constant stage lr

    def phase_parameters(self, name):
        if name == HINT:
            return [p for n, p in self.student.named_parameters() if n in self.hint_names] + list(
                self.regressor.parameters()
            )
        return [*self.student.parameters(), *self.regressor.parameters()]

    def forward(self, batch):
        f = self.student(normal(batch), features=True)
        t = self.teacher_batch(batch)
        hint = hint_loss(self.regressor(f.maps[self.index]), t[f"map{self.index}"][:, 0])
        if self.phase == HINT:
            return {"loss": self.cfg.weight * hint, "logits": f.logits, "hint": hint}
        return self.with_ce_kd(f, t, batch, hint=hint)
