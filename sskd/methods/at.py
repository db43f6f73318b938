"""AT, attention transfer (Zagoruyko & Komodakis, ICLR 2017), as RepDistiller runs it (``--distill attention``):
``ce_weight · CE + kd_weight · KD_T + weight · Σ_layers mean((a(f_s) − a(f_t))²)`` over the maps
(RepDistiller's feat[1:-1]), a(f) the L2-normalised channel mean of f² (:func:`at_loss`; a larger map is
average-pooled to the smaller one's size first).

Cacheable: a per-sample teacher output of only the attention maps (1,344 floats for a resnet32x4 teacher at
32×32, 2.7 KB fp16 per sample and epoch) serves every pair whose student maps are at least as large as the
teacher's, the pooling then being on the student side only; the pairs that pool the teacher's *feature
map* (e.g. resnet32x4 → ShuffleV1) run live, and a cached run of one is refused at build time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sskd.core.fields import bound
from sskd.losses.feature import at_loss, at_loss_from_attention, attention_map
from sskd.methods.base import BuildContext, Method, normal, register
from sskd.methods.families import CEKDConfig, FeatureMethod
from sskd.models.connectors import PairShapes, features_of


@dataclass
class ATConfig(CEKDConfig):
    """RepDistiller's README weights for AT: -r 1 -a 0 -b 1000, p = 2, kd_T 4."""

    weight: float = bound(1000.0, ge=0)  # β
    p: float = bound(2.0, gt=0)


@register("student", "at")
class AT(FeatureMethod):
    """The student's attention maps follow the teacher's at every map (layer i with layer i)."""

    summary = "AT: match the teacher's spatial attention maps (channel mean of squares) at every stage"
    paper = "Zagoruyko & Komodakis, ICLR 2017"  # Paying More Attention to Attention
    section, Config = "at", ATConfig
    outputs = ("logits", "attention")
    topk_outputs = ("logits",)

    def connect(self, pair: PairShapes) -> None:
        # No module to make. The teacher's attention maps (what a cache holds, at p = 2) give the same loss as its
        # feature maps whenever only student maps are pooled; otherwise the teacher's map must be pooled first.
        self.from_attention = self.cfg.p == 2 and all(
            s[1] >= t[1] for s, t in zip(pair.student, pair.teacher)
        )

    @classmethod
    def build(cls, ctx: BuildContext) -> Method:
        method = super().build(ctx)
        if ctx.cached and not method.from_attention:
            why = (
                f"at.p = {method.cfg.p}: a cache holds attention maps at p = 2"
                if method.cfg.p != 2
                else "a teacher map is larger than the student's and must be pooled before its attention map"
            )
            raise method.pair.error(cls.name, f"{why}, which a cache cannot serve; run without --cache")
        return method

    @staticmethod
    def teacher_outputs(teacher, views):
        f = features_of(teacher, views[:, 0])
        attention = torch.cat([attention_map(m, 2) for m in f.maps], dim=1)  # (b, Σ H·W)
        return {
            "logits": f.logits[:, None],
            "attention": attention[:, None],
            **{f"map{i}": m[:, None] for i, m in enumerate(f.maps)},
        }  # maps: live runs that pool the teacher

    def forward(self, batch):
        f = self.student(normal(batch), features=True)
        t = self.teacher_batch(batch)
        if self.from_attention:
            sizes = [(h, w) for _, h, w in self.pair.teacher]
            t_att = torch.split(t["attention"][:, 0], [h * w for h, w in sizes], dim=1)
            at = at_loss_from_attention(f.maps, t_att, sizes, self.cfg.p)
        else:
            at = at_loss(f.maps, [t[f"map{i}"][:, 0] for i in range(len(f.maps))], self.cfg.p)
        return self.with_ce_kd(f, t, batch, at=at)
