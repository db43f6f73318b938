"""PKT on the normal view (Passalis & Tefas, ECCV 2018), as RepDistiller runs it: CE + KD + weight · the
KL between the teacher's and the student's cosine-similarity distributions over the batch's pooled
features."""

from __future__ import annotations

from dataclasses import dataclass

from sskd.core.fields import bound
from sskd.losses.relation import pkt_loss
from sskd.methods.base import register
from sskd.methods.families import CEKDConfig
from sskd.methods.rkd import RelationMethod  # via rkd: RKD registers, and `sskd methods` lists it, first


@dataclass
class PKTConfig(CEKDConfig):
    """RepDistiller: ``--distill pkt -r 1 -a 0 -b 30000``."""

    weight: float = bound(30000.0, ge=0)


@register("student", "pkt")
class StudentPKT(RelationMethod):
    """Each sample's distribution over the batch by cosine similarity of pooled features. Logs ``pkt``."""

    summary = "PKT: each sample's cosine-similarity distribution over the batch's pooled features"
    paper = "Passalis & Tefas, ECCV 2018"  # Learning Deep Representations with Probabilistic KT
    section, Config = "pkt", PKTConfig

    def relation(self, s, t):
        return {"pkt": pkt_loss(s, t)}
