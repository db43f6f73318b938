"""DALI pipeline definitions: read (rank-sharded) → decode (cpu | mixed) → the SSKD views.

One graph for CPU and GPU: ``device`` only picks the decoder (``cpu`` or ``mixed``/nvJPEG) and hence
where the view operators run. Every random parameter comes from the sample id stored in the shard
(:func:`pipelines.plan.view_params`, one CPU node per batch); argument inputs stay on the CPU as DALI
requires, also for GPU operators.

Work order keeps resampling to one pass per view: one shared flip (of the small CIFAR image, or folded
into each resize window) → per view a crop (or a random-resized-crop straight to the output size) →
exact 90° rotations (transpose+flip for the fixed ones; the per-sample k is left to the finishing step);
colour drop takes DALI's luma of the whole image once and crops and resamples that one channel. The
training graph ends in uint8 HWC views (colour drop: one channel) plus the colour-distortion matrices
and the per-sample quarter turns; :mod:`pipelines.finish` applies those matrices and turns, replicates
the grey channel, and makes the CHW layout and the normalisation in torch on the training device (measured
cheaper than DALI's CPU colour-matrix, stack and normalise operators, and a quarter of the bytes to
move to a GPU).
"""

from __future__ import annotations

import functools

import numpy as np
from nvidia.dali import fn, pipeline_def, types

from pipelines import plan
from pipelines.view_registry import get_view
from shards import format as sfmt

READER = "reader"


def _read(tars, idxs, *, shard_id, num_shards, shuffle, seed, initial_fill):
    img, sid, lbl = fn.readers.webdataset(
        paths=tars,
        index_paths=idxs,
        ext=["jpg;png", sfmt.ID_EXT, sfmt.LABEL_EXT],
        dtypes=[types.UINT8, types.INT64, types.INT64],
        missing_component_behavior="error",
        random_shuffle=shuffle,
        initial_fill=initial_fill,
        seed=seed,
        shard_id=shard_id,
        num_shards=num_shards,
        pad_last_batch=True,
        stick_to_shard=True,
        name=READER,
    )
    return img, fn.reshape(sid, shape=[]), fn.reshape(lbl, shape=[])


def _decode(img, device):
    return fn.decoders.image(img, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB)


def _batch_params(ids, shapes, *, seed, epoch, views, layout):
    """python_function body: lists of per-sample arrays in, a tuple of lists of per-sample arrays out.

    ImageNet layout: the shared flip is folded into the windows (a window whose x end lies left of its
    start makes ``fn.resize`` mirror it), so the decoded image is never flipped as a whole.
    """
    ids = np.array([np.asarray(i).reshape(()) for i in ids], dtype=np.int64)
    hw = np.stack([np.asarray(s)[:2] for s in shapes])
    params = plan.view_params(ids, hw, seed=seed, epoch=epoch, views=views, layout=layout)
    if layout == "imagenet":
        flip = params["flip"].astype(bool)
        width = hw[:, 1].astype(np.float32)
        for view in range(len(views)):
            if f"v{view}.roi_start" not in params:  # no resize window of its own (e.g. made from view 0)
                continue
            start, end = params[f"v{view}.roi_start"].copy(), params[f"v{view}.roi_end"].copy()
            start[flip, 1], end[flip, 1] = width[flip] - start[flip, 1], width[flip] - end[flip, 1]
            params[f"v{view}.roi_start"], params[f"v{view}.roi_end"] = start, end
    return tuple([np.array(a) for a in params[name]] for name in plan.param_names(views, layout))


def params_node(sid, shape, *, seed, epoch, views, layout) -> dict:
    """DALI nodes of every view parameter of the batch, by name (see :func:`plan.param_names`)."""
    names = plan.param_names(views, layout)
    body = functools.partial(_batch_params, seed=seed, epoch=epoch, views=tuple(views), layout=layout)
    outs = fn.python_function(sid, shape, function=body, batch_processing=True, num_outputs=len(names))
    outs = outs if isinstance(outs, (list, tuple)) else [outs]
    return dict(zip(names, outs))


def _luma(img):
    return fn.color_space_conversion(img, image_type=types.RGB, output_type=types.GRAY)


def make_view(img, prm: dict, *, name: str, view: int, size: int, gray=None, normal=None):
    """One uint8 HWC view of the (already flipped) decoded image: the registered view's own graph
    (:meth:`pipelines.view_registry.View.dali`); colour drop has one channel (its luma).

    ``gray``: the image's luma (1 channel), if the caller made it once; colour drop then crops and
    resamples one channel instead of three (luma and resampling are both linear, so they commute up to
    rounding; for CIFAR-layout crops exactly). ``normal``: view 0, for the views made from it.
    """
    return get_view(name).dali(img, prm, view=view, size=size, gray=gray, normal=normal)


@pipeline_def
def train_pipeline(
    tars, idxs, *, views, plan_seed, epoch, size, layout, device="cpu", shard_id=0, num_shards=1
):
    """Training views of one epoch, per sample: V uint8 views (size, size, 3), the label, the id, then
    ``M`` (3, 3) and ``T`` (3,) of each view of :func:`plan.colour_views` and the quarter turns ``k`` of
    each view of :func:`plan.turn_views` (finished by :mod:`pipelines.finish`).

    The samples come in the order of ``tars``/``idxs`` (DALI's shuffle is off): the loader passes the
    epoch's segments for its rank (:mod:`pipelines.order`), with ``shard_id=0, num_shards=1``."""
    enc, sid, lbl = _read(
        tars, idxs, shard_id=shard_id, num_shards=num_shards, shuffle=False, seed=0, initial_fill=1
    )
    prm = params_node(sid, fn.peek_image_shape(enc), seed=plan_seed, epoch=epoch, views=views, layout=layout)
    # One flip decision per sample, shared by all its views as in the official code, as if applied to the
    # decoded image (before every crop and rotation): CIFAR layout flips the small image once, ImageNet
    # layout mirrors each resize window instead (see _batch_params).
    img = _decode(enc, device)
    if layout != "imagenet":
        img = fn.flip(img, horizontal=prm["flip"])
    gray = _luma(img) if any(get_view(n).luma for n in views) else None  # once per image, see make_view
    out = []
    for view, name in enumerate(views):
        out.append(
            make_view(img, prm, name=name, view=view, size=size, gray=gray, normal=out[0] if out else None)
        )
    colour = [prm[f"v{v}.{a}"] for v in plan.colour_views(views) for a in ("M", "T")]
    turns = [prm[f"v{v}.k"] for v in plan.turn_views(views)]
    return (*out, lbl, sid, *colour, *turns)


@pipeline_def
def eval_pipeline(
    tars, idxs, *, size, layout, mean, std, device="cpu", shard_id=0, num_shards=1, dtype=types.FLOAT
):
    """The deterministic evaluation view: the image as is (CIFAR), or resize to size/0.875 + center crop."""
    enc, sid, lbl = _read(
        tars, idxs, shard_id=shard_id, num_shards=num_shards, shuffle=False, seed=0, initial_fill=1
    )
    img = _decode(enc, device)
    if layout == "imagenet":
        img = fn.resize(
            img, resize_shorter=round(size / 0.875), interp_type=types.INTERP_LINEAR, antialias=True
        )
    v = fn.crop_mirror_normalize(
        img,
        crop=[size, size],
        mean=[255 * m for m in mean],
        std=[255 * s for s in std],
        dtype=dtype,
        output_layout="CHW",
        out_of_bounds_policy="pad",
    )
    return fn.stack(v), lbl, sid
