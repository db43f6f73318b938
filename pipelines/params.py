"""The pure parameter hashing and constants of the augmentation plan: every random parameter of every
view is a pure function of (plan seed, epoch, sample id, view index, parameter slot).

This is what makes a view reproducible whatever the batch size, rank count, shuffle order or thread
count, and so what makes the teacher cache correct. DALI's own random operators are seeded per pipeline
and batch slot, so they are not used for view parameters: the parameters are computed from the sample id
stored in the shard by integer arithmetic (:func:`hash_streams`: all intermediates below 2**62, constants
below 2**31, the final float exact in float32). This module sits below the view classes
(:mod:`pipelines.view_registry`), which draw their uniforms through it; :mod:`pipelines.plan` turns the
uniforms of a set of views into every operator argument of a batch.
"""

from __future__ import annotations

import hashlib

import numpy as np

PRIME = 2_147_483_647  # 2**31 - 1: products of two residues fit in int64
TWO24 = 16_777_216  # uniforms are k / 2**24: exact in float32

# Parameter slots (one independent uniform each).
SLOT_CROP = (0, 1, 2, 3)  # crop offsets / random-resized-crop area, ratio, x, y
SLOT_FLIP = 4
SLOT_ROT = 5
SLOT_JITTER = (6, 7, 8, 9)  # brightness, contrast, saturation, hue
SLOT_PERM = 11  # the jigsaw view's permutation index

# Ranges.
PAD = 4  # CIFAR-layout normal view: pad-4 random crop
RRC_SCALE = (0.08, 1.0)  # ImageNet-layout normal view: torchvision's RandomResizedCrop
RRC_RATIO = (3 / 4, 4 / 3)
CROP_RESIZE_SCALE = {"cifar": (0.2, 0.6), "imagenet": (0.08, 0.4)}  # the SS crop+resize view: a zoom-in
JITTER = (0.4, 0.4, 0.4, 0.1)  # SimCLR colour-jitter strengths: brightness, contrast, saturation, hue


def _mix(h):
    """A non-linear integer hash step on residues mod PRIME (numpy arrays)."""
    h = (h * 48271 + 1013904223 % PRIME) % PRIME
    h = (h * h + 12345) % PRIME  # the square makes it non-linear; h < 2**31 so h*h < 2**62
    h = h ^ (h // 65536)
    h = (h * 69621 + 7) % PRIME
    return h


def stream_constant(seed: int, epoch: int, view: int, slot: int) -> int:
    """An integer < 2**31 naming one random stream (one view's slot in one epoch of one plan seed)."""
    digest = hashlib.sha256(f"sskd-plan/{seed}/{epoch}/{view}/{slot}".encode()).digest()
    return int.from_bytes(digest[:4], "little") % PRIME


def hash_streams(ids, c, c2):
    """U[0, 1) per int64 sample id for the streams ``c = stream_constant(...)`` and ``c2 = c // 7 + 1``,
    as int residues ``k`` in [0, 2**24) (:func:`to_float` makes them ``k / 2**24``).

    ``c``/``c2`` may be ints or arrays that broadcast against ``ids``.
    """
    h = _mix((ids % PRIME + c) % PRIME)
    h = _mix((h + c2) % PRIME)
    return h % TWO24


def to_float(k: np.ndarray) -> np.ndarray:
    """The residues of :func:`hash_streams` as float32 uniforms ``k / 2**24`` (exact)."""
    return k.astype(np.float32) * np.float32(1.0 / TWO24)


def reader_seed(seed: int, epoch: int) -> int:
    """Seed of DALI's reader shuffle for one epoch (the epoch's order is seeded too)."""
    return stream_constant(seed, epoch, -1, -1) % (2**31 - 1)
