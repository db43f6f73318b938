"""The augmentation plan: every random parameter of every view is a pure function of
(plan seed, epoch, sample id, view index, parameter slot).

This is what makes a view reproducible whatever the batch size, rank count, shuffle order or thread
count (DESIGN.md, invariant 1), and so what makes the teacher cache correct. DALI's own random
operators are seeded per pipeline and batch slot, so they are not used for view parameters: the
parameters are computed inside the DALI graph from the sample id stored in the shard, with integer
arithmetic. :func:`uniform` is written once and runs on numpy int64 arrays (the torchvision
reference, tests) and on DALI DataNodes (the pipelines) alike, with identical results:
all intermediates stay below 2**62, constants below 2**31, and the final float is exact in float32.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

PRIME = 2_147_483_647  # 2**31 - 1: products of two residues fit in int64
TWO24 = 16_777_216  # uniforms are k / 2**24: exact in float32

# Parameter slots (one independent uniform each).
SLOT_CROP = (0, 1, 2, 3)  # crop offsets / random-resized-crop area, ratio, x, y
SLOT_FLIP = 4
SLOT_ROT = 5
SLOT_JITTER = (6, 7, 8, 9)  # brightness, contrast, saturation, hue
SLOT_JITTER_ORDER = 10

VIEW_NAMES = ("normal", "color_drop", "rotation", "crop_resize", "color_distort", "rot90", "rot180", "rot270")
PRESETS = {
    "paper": ("color_drop", "rotation", "crop_resize", "color_distort"),  # SSKD paper, Sec. 3.1
    "rotation": ("rot90", "rot180", "rot270"),  # the official code's views
    "none": (),
}

# Ranges (documented in the README).
PAD = 4  # CIFAR-layout normal view: pad-4 random crop
RRC_SCALE = (0.08, 1.0)  # ImageNet-layout normal view: torchvision's RandomResizedCrop
RRC_RATIO = (3 / 4, 4 / 3)
CROP_RESIZE_SCALE = {"cifar": (0.2, 0.6), "imagenet": (0.08, 0.4)}  # the SS crop+resize view: a zoom-in
JITTER = (0.4, 0.4, 0.4, 0.1)  # SimCLR colour-jitter strengths: brightness, contrast, saturation, hue


@dataclass(frozen=True)
class ViewConfig:
    """Which SS views follow the normal view 0. ``ss_views`` names come from :data:`VIEW_NAMES`."""

    ss_views: tuple[str, ...] = field(default_factory=lambda: PRESETS["rotation"])

    def __post_init__(self):
        from sskd.errors import SSKDError

        for name in self.ss_views:
            if name not in VIEW_NAMES[1:]:
                raise SSKDError(f"unknown view {name!r}; choose from {', '.join(VIEW_NAMES[1:])} "
                                f"or a preset ({', '.join(PRESETS)})")

    @classmethod
    def parse(cls, text: str | ViewConfig | None) -> ViewConfig:
        """``"paper"``, ``"rotation"``, ``"none"`` or a comma list such as ``"color_drop,rot90"``."""
        if isinstance(text, ViewConfig):
            return text
        if text is None or text == "":
            return cls(())
        if text in PRESETS:
            return cls(PRESETS[text])
        return cls(tuple(v.strip() for v in text.split(",") if v.strip()))

    @property
    def names(self) -> tuple[str, ...]:
        return ("normal", *self.ss_views)

    @property
    def num_views(self) -> int:
        return 1 + len(self.ss_views)


def _mix(h):
    """A non-linear integer hash step on residues mod PRIME (numpy arrays or DALI DataNodes)."""
    h = (h * 48271 + 1013904223 % PRIME) % PRIME
    h = (h * h + 12345) % PRIME  # the square makes it non-linear; h < 2**31 so h*h < 2**62
    h = h ^ (h // 65536)
    h = (h * 69621 + 7) % PRIME
    return h


def stream_constant(seed: int, epoch: int, view: int, slot: int) -> int:
    """An integer < 2**31 naming one random stream; computed in Python, a constant in the graph."""
    digest = hashlib.sha256(f"sskd-plan/{seed}/{epoch}/{view}/{slot}".encode()).digest()
    return int.from_bytes(digest[:4], "little") % PRIME


def uniform(ids, seed: int, epoch: int, view: int, slot: int):
    """U[0, 1) per sample id, identical on numpy int64 arrays and DALI int64 DataNodes.

    Returns an int residue ``k`` in [0, 2**24); the caller turns it into ``k / 2**24`` with
    :func:`to_float` (numpy) or a DALI cast (graph).
    """
    c = stream_constant(seed, epoch, view, slot)
    h = _mix((ids % PRIME + c) % PRIME)
    h = _mix((h + c // 7 + 1) % PRIME)
    return h % TWO24


def to_float(k: np.ndarray) -> np.ndarray:
    return k.astype(np.float32) * np.float32(1.0 / TWO24)


def sample_uniforms(seed: int, epoch: int, ids: np.ndarray, view: int, slot: int) -> np.ndarray:
    """The float32 uniforms the DALI graph uses for ``ids`` (numpy side of :func:`uniform`)."""
    return to_float(uniform(np.asarray(ids, dtype=np.int64), seed, epoch, view, slot))


def reader_seed(seed: int, epoch: int) -> int:
    """Seed of DALI's reader shuffle for one epoch (the epoch's order is seeded too)."""
    return stream_constant(seed, epoch, -1, -1) % (2**31 - 1)
