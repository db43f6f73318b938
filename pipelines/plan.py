"""The augmentation plan: every operator argument of every view of a batch, from the sample ids.

Each random parameter is a pure function of (plan seed, epoch, sample id, view index, parameter slot)
(:mod:`pipelines.params`), so a view is the same whatever the batch size, rank count, shuffle order or
thread count. :func:`view_params` turns the uniforms of a set of views into every operator argument of a
batch at once, asking each registered view (:meth:`pipelines.view_registry.View.params`); the DALI
pipeline calls it from one ``python_function`` node per batch and the torchvision reference calls the
very same function, so both apply identical parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipelines.params import SLOT_FLIP, hash_streams, stream_constant, to_float
from pipelines.view_registry import VIEWS, get_view, view_names
from sskd.core.errors import SSKDError

# The view sets of the SSKD paper, its code and HSSAKD, and the jigsaw's. Every registered view, jigsaw and
# your own included, is in :func:`pipelines.view_registry.view_names`; ViewConfig accepts all of them.
PRESETS = {
    "paper": ("color_drop", "rotation", "crop_resize", "color_distort"),  # SSKD paper, Sec. 3.1
    "rotation": ("rot90", "rot180", "rot270"),  # the official SSKD code's views: each its own crop
    # the official HSSAKD code's: view 0 itself turned by 90, 180 and 270 degrees (one crop)
    "shared_rotation": ("shared_rot90", "shared_rot180", "shared_rot270"),
    "jigsaw": ("jigsaw", "jigsaw", "jigsaw"),  # three crops, each in its own order of 2 x 2 tiles
    "none": (),
}


@dataclass(frozen=True)
class ViewConfig:
    """Which SS views follow the normal view 0: names of registered views (:mod:`pipelines.view_registry`)."""

    ss_views: tuple[str, ...] = field(default_factory=lambda: PRESETS["rotation"])

    def __post_init__(self):
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


def param_keys(views) -> list[tuple[int, int]]:
    """The (view, slot) streams the given views use."""
    keys = [(0, SLOT_FLIP)]
    for view, name in enumerate(views):
        keys += [(view, s) for s in get_view(name).slots()]
    return keys


def colour_views(views) -> list[int]:
    """Views whose colour-distortion matrices (M, T) follow the label and id among the training outputs."""
    return [i for i, n in enumerate(views) if get_view(n).colour]


def turn_views(views) -> list[int]:
    """Views whose per-sample quarter turns ``k`` follow the colour matrices among the training outputs."""
    return [i for i, n in enumerate(views) if get_view(n).turns]


def param_names(views, layout: str) -> list[str]:
    """Names of the arrays :func:`view_params` returns, in order (one DALI node each)."""
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
    return sorted({k for name in views[1:] for k in get_view(name).labels})


def view_labels(ids: np.ndarray, *, seed: int, epoch: int, views) -> dict[str, np.ndarray]:
    """Each pretext label of every view, from the plan (the same pure function of (seed, epoch, id, view)
    the pixels come from): ``{kind: (n, V) int64}`` for :func:`label_kinds`, -1 where a view carries no
    label of that kind (view 0, the normal view, is rotation 0)."""
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
