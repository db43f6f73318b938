"""DALI pipeline definitions: read (rank-sharded) → decode (cpu | mixed) → the SSKD views.

One graph for CPU and GPU: ``device`` only picks the decoder (``cpu`` or ``mixed``/nvJPEG) and where
the view operators run. Every random parameter is computed in the graph from the sample id
(:mod:`pipelines.plan`), and parameter tensors stay on the CPU as DALI requires for argument inputs.

Work order per view keeps resampling to one pass: crop (or random-resized-crop straight from the
decoded image to the output size) → flip → exact 90° rotation as transpose+flip → one colour matrix
→ one crop_mirror_normalize to float CHW.
"""

from __future__ import annotations

import math

import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types
from nvidia.dali import pipeline_def

from pipelines import plan
from pipelines.colors import GRAY_MATRIX, jitter_entries
from shards import format as sfmt

READER = "reader"


def _u(sid, seed, epoch, view, slot):
    """U[0,1) float32 scalar per sample: see :func:`pipelines.plan.uniform`."""
    return fn.cast(plan.uniform(sid, seed, epoch, view, slot), dtype=types.FLOAT) * (1.0 / plan.TWO24)


def _floor_int(x):
    """floor(x) as int32: DALI's float→int cast rounds to nearest, so floor first."""
    return fn.cast(dmath.floor(x), dtype=types.INT32)


def _read(tars, idxs, *, shard_id, num_shards, shuffle, seed, initial_fill):
    img, sid, lbl = fn.readers.webdataset(
        paths=tars, index_paths=idxs, ext=["jpg;png", sfmt.ID_EXT, sfmt.LABEL_EXT],
        dtypes=[types.UINT8, types.INT64, types.INT64], missing_component_behavior="error",
        random_shuffle=shuffle, initial_fill=initial_fill, seed=seed, shard_id=shard_id, num_shards=num_shards,
        pad_last_batch=True, stick_to_shard=True, name=READER)
    return img, fn.reshape(sid, shape=[]), fn.reshape(lbl, shape=[])


def _decode(img, device):
    return fn.decoders.image(img, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB)


def _pad_crop(img, sid, seed, epoch, view, size):
    """CIFAR augmentation: a size x size window of the image zero-padded by PAD on each side."""
    span = 2 * plan.PAD + 1
    dy = _floor_int(_u(sid, seed, epoch, view, plan.SLOT_CROP[0]) * float(span)) - plan.PAD
    dx = _floor_int(_u(sid, seed, epoch, view, plan.SLOT_CROP[1]) * float(span)) - plan.PAD
    return fn.slice(img, start=fn.stack(dy, dx), shape=[size, size], axis_names="HW",
                    out_of_bounds_policy="pad", fill_values=0)


def _rrc(img, shape, sid, seed, epoch, view, size, scale):
    """Random-resized-crop as one resize of a region of interest (one draw; the window is clamped)."""
    h_img = fn.cast(shape[0], dtype=types.FLOAT)
    w_img = fn.cast(shape[1], dtype=types.FLOAT)
    u = [_u(sid, seed, epoch, view, s) for s in plan.SLOT_CROP]
    area = h_img * w_img * (scale[0] + u[0] * (scale[1] - scale[0]))
    lo, hi = math.log(plan.RRC_RATIO[0]), math.log(plan.RRC_RATIO[1])
    ratio = dmath.exp(lo + u[1] * (hi - lo))
    w = dmath.min(dmath.sqrt(area * ratio), w_img)
    h = dmath.min(dmath.sqrt(area / ratio), h_img)
    x0 = u[2] * (w_img - w)
    y0 = u[3] * (h_img - h)
    return fn.resize(img, size=[size, size], roi_start=fn.stack(y0, x0), roi_end=fn.stack(y0 + h, x0 + w),
                     roi_relative=False, interp_type=types.INTERP_LINEAR, antialias=True)


def _flip_h(img):
    return fn.flip(img, horizontal=1, vertical=0)


def _rot(img, k: int):
    """Exact counter-clockwise rotation by k x 90° (np.rot90 on HWC) as transpose + flip."""
    if k == 1:
        return fn.transpose(_flip_h(img), perm=[1, 0, 2], output_layout="HWC")
    if k == 2:
        return fn.flip(img, horizontal=1, vertical=1)
    return _flip_h(fn.transpose(img, perm=[1, 0, 2], output_layout="HWC"))


def _color_distort(img, sid, seed, epoch, view):
    sb, sc, ss, sh = plan.JITTER
    u = [_u(sid, seed, epoch, view, s) for s in plan.SLOT_JITTER]
    b = (1.0 - sb) + u[0] * (2 * sb)
    c = (1.0 - sc) + u[1] * (2 * sc)
    s = (1.0 - ss) + u[2] * (2 * ss)
    hue = (u[3] * 2.0 - 1.0) * (sh * 360.0)
    entries, offset = jitter_entries(b, c, s, hue, cos=dmath.cos, sin=dmath.sin)
    m = fn.reshape(fn.stack(*entries), shape=[3, 3])
    t = fn.stack(offset, offset, offset)
    return fn.coord_transform(img, M=m, T=t, dtype=types.UINT8)


def make_view(img, shape, sid, *, name, view, seed, epoch, size, layout):
    """One uint8 HWC view (before normalisation) and whether it still needs the horizontal flip."""
    if name == "crop_resize":
        v = _rrc(img, shape, sid, seed, epoch, view, size, plan.CROP_RESIZE_SCALE[layout])
    elif layout == "cifar":
        v = _pad_crop(img, sid, seed, epoch, view, size)
    else:
        v = _rrc(img, shape, sid, seed, epoch, view, size, plan.RRC_SCALE)
    # One flip decision per sample, shared by all its views (as the official code); applied before a
    # rotation, otherwise folded into crop_mirror_normalize.
    flip = _floor_int(_u(sid, seed, epoch, 0, plan.SLOT_FLIP) * 2.0)
    if name in ("rot90", "rot180", "rot270"):
        return _rot(fn.flip(v, horizontal=flip), {"rot90": 1, "rot180": 2, "rot270": 3}[name]), None
    if name == "rotation":  # paper's rotation: k ∈ {1, 2, 3} per sample
        k = _floor_int(_u(sid, seed, epoch, view, plan.SLOT_ROT) * 3.0) + 1
        v = fn.flip(v, horizontal=flip)
        if k == 1:
            v = _rot(v, 1)
        elif k == 2:
            v = _rot(v, 2)
        else:
            v = _rot(v, 3)
        return v, None
    if name == "color_drop":
        v = fn.coord_transform(v, M=GRAY_MATRIX, dtype=types.UINT8)
    elif name == "color_distort":
        v = _color_distort(v, sid, seed, epoch, view)
    return v, flip


def _normalize(v, mirror, mean, std, dtype):
    kw = {} if mirror is None else {"mirror": mirror}
    return fn.crop_mirror_normalize(v, mean=[255 * m for m in mean], std=[255 * s for s in std], dtype=dtype,
                                    output_layout="CHW", **kw)


@pipeline_def(enable_conditionals=True)
def train_pipeline(tars, idxs, *, views, plan_seed, epoch, size, layout, mean, std, device="cpu", shard_id=0,
                   num_shards=1, initial_fill=1024, dtype=types.FLOAT):
    """Training views of one epoch: ``(views (V, 3, size, size), label, id)`` per sample."""
    enc, sid, lbl = _read(tars, idxs, shard_id=shard_id, num_shards=num_shards, shuffle=True,
                          seed=plan.reader_seed(plan_seed, epoch), initial_fill=initial_fill)
    shape = fn.peek_image_shape(enc)
    img = _decode(enc, device)
    out = []
    for view, name in enumerate(views):
        v, mirror = make_view(img, shape, sid, name=name, view=view, seed=plan_seed, epoch=epoch, size=size,
                              layout=layout)
        out.append(_normalize(v, mirror, mean, std, dtype))
    return fn.stack(*out), lbl, sid


@pipeline_def
def eval_pipeline(tars, idxs, *, size, layout, mean, std, device="cpu", shard_id=0, num_shards=1,
                  dtype=types.FLOAT):
    """The deterministic evaluation view: the image as is (CIFAR), or resize to size/0.875 + center crop."""
    enc, sid, lbl = _read(tars, idxs, shard_id=shard_id, num_shards=num_shards, shuffle=False, seed=0,
                          initial_fill=1)
    img = _decode(enc, device)
    if layout == "imagenet":
        img = fn.resize(img, resize_shorter=round(size / 0.875), interp_type=types.INTERP_LINEAR, antialias=True)
    v = fn.crop_mirror_normalize(img, crop=[size, size], mean=[255 * m for m in mean], std=[255 * s for s in std],
                                 dtype=dtype, output_layout="CHW", out_of_bounds_policy="pad")
    return fn.stack(v), lbl, sid
