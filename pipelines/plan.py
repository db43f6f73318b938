"""The augmentation plan: every random parameter of every view is a pure function of
(plan seed, epoch, sample id, view index, parameter slot).

This is what makes a view reproducible whatever the batch size, rank count, shuffle order or thread
count (DESIGN.md, invariant 1), and so what makes the teacher cache correct. DALI's own random
operators are seeded per pipeline and batch slot, so they are not used for view parameters: the
parameters are computed inside the DALI pipeline from the sample id stored in the shard, by integer
arithmetic (:func:`uniform`: all intermediates below 2**62, constants below 2**31, the final float
exact in float32). :func:`view_params` turns them into every operator argument of a batch at once; the
pipeline calls it from one ``python_function`` node per batch and the torchvision reference calls the
very same function, so both apply identical parameters. (The hash also runs on DALI DataNodes, but
on small images the ~30 arithmetic nodes it takes cost more than all the image operators together.)
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

SLOT_PERM = 11  # the jigsaw view's permutation index

# Rotations of view 0 itself, exact (same crop and flip), counter-clockwise as np.rot90: HSSAKD's views.
SHARED_ROTATIONS = {"shared_rot90": 1, "shared_rot180": 2, "shared_rot270": 3}
# The views of the SSKD paper, its code and HSSAKD (the presets below). Every registered view, jigsaw and
# your own included, is in :func:`pipelines.view_registry.view_names`; ViewConfig accepts all of them.
VIEW_NAMES = (
    "normal",
    "color_drop",
    "rotation",
    "crop_resize",
    "color_distort",
    "rot90",
    "rot180",
    "rot270",
    *SHARED_ROTATIONS,
)
PRESETS = {
    "paper": ("color_drop", "rotation", "crop_resize", "color_distort"),  # SSKD paper, Sec. 3.1
    "rotation": ("rot90", "rot180", "rot270"),  # the official SSKD code's views: each its own crop
    "shared_rotation": tuple(SHARED_ROTATIONS),  # the official HSSAKD code's: four rotations of one crop
    "jigsaw": ("jigsaw", "jigsaw", "jigsaw"),  # three crops, each in its own order of 2 x 2 tiles
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
    """Which SS views follow the normal view 0: names of registered views (:mod:`pipelines.view_registry`)."""

    ss_views: tuple[str, ...] = field(default_factory=lambda: PRESETS["rotation"])

    def __post_init__(self):
        from pipelines.view_registry import VIEWS, view_names
        from sskd.core.errors import SSKDError

        for name in self.ss_views:
            if name == "normal" or name not in VIEWS:
                raise SSKDError(
                    f"unknown view {name!r}; choose from {', '.join(view_names()[1:])} "
                    f"or a preset ({', '.join(PRESETS)})"
                )

    @classmethod
    def parse(cls, text: str | ViewConfig | None) -> ViewConfig:
        """``"paper"``, ``"rotation"``, ``"none"`` or a comma list such as ``"color_drop,rot90"``."""
        if isinstance(text, ViewConfig):
            return text
        if text is None or text == "":
            return cls(())
        if text in PRESETS:
            return cls(PRESETS[text])
        names = tuple(v.strip() for v in text.split(",") if v.strip())
        if not names:  # ",," or " ": a list with no name in it is a slip, not a way to say none
            from sskd.core.errors import SSKDError

            raise SSKDError(
                f"{text!r} names no view; give view names or a preset ({', '.join(PRESETS)}), "
                f"or none for the normal view only"
            )
        return cls(names)

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
    return hash_streams(ids, c, c // 7 + 1)


def hash_streams(ids, c, c2):
    """The hash behind :func:`uniform` for stream constants ``c`` and ``c2 = c // 7 + 1``.

    ``c``/``c2`` may be ints or arrays that broadcast against ``ids``.
    """
    h = _mix((ids % PRIME + c) % PRIME)
    h = _mix((h + c2) % PRIME)
    return h % TWO24


def to_float(k: np.ndarray) -> np.ndarray:
    return k.astype(np.float32) * np.float32(1.0 / TWO24)


def sample_uniforms(seed: int, epoch: int, ids: np.ndarray, view: int, slot: int) -> np.ndarray:
    """The float32 uniforms the DALI graph uses for ``ids`` (numpy side of :func:`uniform`)."""
    return to_float(uniform(np.asarray(ids, dtype=np.int64), seed, epoch, view, slot))


def reader_seed(seed: int, epoch: int) -> int:
    """Seed of DALI's reader shuffle for one epoch (the epoch's order is seeded too)."""
    return stream_constant(seed, epoch, -1, -1) % (2**31 - 1)


def param_keys(views) -> list[tuple[int, int]]:
    """The (view, slot) streams the given views use."""
    from pipelines.view_registry import get_view

    keys = [(0, SLOT_FLIP)]
    for view, name in enumerate(views):
        keys += [(view, s) for s in get_view(name).slots()]
    return keys


def colour_views(views) -> list[int]:
    """Views whose colour-distortion matrices (M, T) follow the label and id among the training outputs."""
    from pipelines.view_registry import get_view

    return [i for i, n in enumerate(views) if get_view(n).colour]


def param_names(views, layout: str) -> list[str]:
    """Names of the arrays :func:`view_params` returns, in order (one DALI node each)."""
    from pipelines.view_registry import get_view

    return ["flip"] + [p for view, name in enumerate(views) for p in get_view(name).param_names(view, layout)]


def _uniforms(ids: np.ndarray, seed: int, epoch: int, views):
    """``u(view, slot)``: the float32 uniforms (n,) of every stream the views use, computed at once."""
    keys = param_keys(views)
    pos = {k: i for i, k in enumerate(keys)}
    c = np.array([stream_constant(seed, epoch, v, s) for v, s in keys], dtype=np.int64)
    u = to_float(hash_streams(ids[:, None], c[None], c[None] // 7 + 1))  # (n, streams)
    return lambda view, slot: u[:, pos[(view, slot)]]


def view_params(ids: np.ndarray, shapes: np.ndarray, *, seed: int, epoch: int, views, layout: str) -> dict:
    """Every operator argument of every view of a batch, from the sample ids (each view's
    :meth:`pipelines.view_registry.View.params`).

    Args:
        ids: (n,) int64 sample ids.
        shapes: (n, 2) decoded image heights and widths (before any flip or crop).
        views: view names, view 0 = ``normal``.
        layout: ``cifar`` (pad-4 crops) or ``imagenet`` (random-resized crops).
    Returns:
        ``{name: array}`` for the names of :func:`param_names`: ``flip`` (n,) int32; for the built-in
        views ``v{i}.start`` (n, 2) int32 crop anchors (y, x); ``v{i}.roi_start`` / ``roi_end`` (n, 2)
        float32 windows (y, x) for random-resized crops; ``v{i}.k`` (n,) int32 quarter turns; ``v{i}.M``
        (n, 3, 3) and ``v{i}.T`` (n, 3) float32 colour matrices; ``v{i}.perm`` (n,) int32 jigsaw orders
        and ``v{i}.tile{j}`` (n, 2) float32 relative starts of their source tiles.
    """
    from pipelines.view_registry import get_view

    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    col = _uniforms(ids, seed, epoch, views)
    f32 = np.float32
    h_img, w_img = (np.asarray(shapes, dtype=f32)[:, i] for i in (0, 1))
    out = {"flip": np.floor(col(0, SLOT_FLIP) * f32(2)).astype(np.int32)}
    for view, name in enumerate(views):
        out.update(
            get_view(name).params(
                lambda slot, view=view: col(view, slot), view=view, layout=layout, h_img=h_img, w_img=w_img
            )
        )
    return out


def label_kinds(views) -> list[str]:
    """The pretext label kinds the SS views (1..) of a set carry (``rotation``, ``jigsaw``)."""
    from pipelines.view_registry import get_view

    return sorted({k for name in views[1:] for k in get_view(name).labels})


def view_labels(ids: np.ndarray, *, seed: int, epoch: int, views) -> dict[str, np.ndarray]:
    """Each pretext label of every view, from the plan (the same pure function of (seed, epoch, id, view)
    the pixels come from): ``{kind: (n, V) int64}`` for :func:`label_kinds`, -1 where a view carries no
    label of that kind (view 0, the normal view, is rotation 0)."""
    from pipelines.view_registry import get_view

    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    kinds = label_kinds(views)
    if not kinds:
        return {}
    col = _uniforms(ids, seed, epoch, views)
    out = {}
    for kind in kinds:
        lab = np.full((len(ids), len(views)), -1, dtype=np.int64)
        for view, name in enumerate(views):
            v = get_view(name)
            if kind in v.labels:
                lab[:, view] = v.label(kind, lambda slot, view=view: col(view, slot), view=view, n=len(ids))
        out[kind] = lab
    return out
