"""The same views in plain torch/torchvision: an exact reference of the plan, and the obvious baseline.

- :func:`reference_views` takes its parameters from the same plan function as the DALI graph
  (:mod:`pipelines.plan`) and applies each transform with torch ops on uint8 tensors. Tests use it to
  check DALI's output per transform: crops, flips, 90° rotations are exact; colour drop and colour
  distortion (the same 3x3 matrix) agree to within one uint8 step; random-resized crops agree to a
  tolerance, because torchvision crops an integer window (≤ 0.5 px shift) and its antialiasing
  kernel differs from DALI's.
- :class:`BaselineViews` is how a user would write these views with torchvision's own random
  transforms (``transforms.v2`` on uint8 tensors): the honest baseline of ``sskd bench pipeline``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from pipelines import plan
from pipelines.colors import GRAY_MATRIX, jitter_entries

F32 = np.float32


def _u(sid: int, seed: int, epoch: int, view: int, slot: int) -> np.float32:
    return plan.sample_uniforms(seed, epoch, np.array([sid]), view, slot)[0]


def _affine(img: torch.Tensor, entries, offset) -> torch.Tensor:
    m = torch.tensor(np.asarray(entries, dtype=F32).reshape(3, 3))
    out = torch.einsum("ij,jhw->ihw", m, img.float()) + float(offset)
    return out.round().clamp(0, 255).to(torch.uint8)


def _rrc_window(shape, sid, seed, epoch, view, scale):
    """The (y0, x0, h, w) window the DALI graph computes, in float32 like the graph."""
    h_img, w_img = F32(shape[0]), F32(shape[1])
    u = [_u(sid, seed, epoch, view, s) for s in plan.SLOT_CROP]
    area = h_img * w_img * (F32(scale[0]) + u[0] * F32(scale[1] - scale[0]))
    lo, hi = F32(math.log(plan.RRC_RATIO[0])), F32(math.log(plan.RRC_RATIO[1]))
    ratio = np.exp(lo + u[1] * (hi - lo), dtype=F32)
    w = min(np.sqrt(area * ratio, dtype=F32), w_img)
    h = min(np.sqrt(area / ratio, dtype=F32), h_img)
    return float(u[3] * (h_img - h)), float(u[2] * (w_img - w)), float(h), float(w)


def _crop_resize(img: torch.Tensor, y0: float, x0: float, h: float, w: float, size: int) -> torch.Tensor:
    """Resample the float window (y0, x0, h, w) of ``img`` to size x size.

    Upscaling is DALI's linear filter exactly (sample at pixel centres, clamp at the border); when the
    window is larger than the output DALI antialiases with its own kernel, and torchvision's antialiased
    resize of the integer-rounded window stands in for it (within a tolerance).
    """
    if h > size or w > size:
        return TF.resized_crop(img, round(y0), round(x0), max(1, round(h)), max(1, round(w)), [size, size],
                               antialias=True)
    H, W = img.shape[1:]
    o = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    ys, xs = (y0 + o * h) / H * 2 - 1, (x0 + o * w) / W * 2 - 1
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], dim=-1)[None].float()
    out = torch.nn.functional.grid_sample(img[None].float(), grid, mode="bilinear", padding_mode="border",
                                          align_corners=False)[0]
    return out.round().clamp(0, 255).to(torch.uint8)


def reference_view(img: torch.Tensor, sid: int, *, name: str, view: int, seed: int, epoch: int, size: int,
                   layout: str) -> torch.Tensor:
    """One uint8 view (3, size, size) of a decoded uint8 image ``img`` (3, H, W), as the DALI graph makes it."""
    if name == "crop_resize" or layout == "imagenet":
        scale = plan.CROP_RESIZE_SCALE[layout] if name == "crop_resize" else plan.RRC_SCALE
        y0, x0, h, w = _rrc_window(img.shape[1:], sid, seed, epoch, view, scale)
        v = _crop_resize(img, y0, x0, h, w, size)
    else:
        span = F32(2 * plan.PAD + 1)
        dy = int(_u(sid, seed, epoch, view, plan.SLOT_CROP[0]) * span) - plan.PAD
        dx = int(_u(sid, seed, epoch, view, plan.SLOT_CROP[1]) * span) - plan.PAD
        padded = TF.pad(img, [plan.PAD] * 4, fill=0)
        v = padded[:, plan.PAD + dy: plan.PAD + dy + size, plan.PAD + dx: plan.PAD + dx + size]
    if int(_u(sid, seed, epoch, 0, plan.SLOT_FLIP) * F32(2)):
        v = TF.horizontal_flip(v)
    if name in ("rot90", "rot180", "rot270", "rotation"):
        k = {"rot90": 1, "rot180": 2, "rot270": 3}.get(name)
        if k is None:
            k = int(_u(sid, seed, epoch, view, plan.SLOT_ROT) * F32(3)) + 1
        v = torch.rot90(v, k, dims=(1, 2))  # counter-clockwise, as np.rot90
    elif name == "color_drop":
        v = _affine(v, GRAY_MATRIX, 0.0)
    elif name == "color_distort":
        sb, sc, ss, sh = (F32(j) for j in plan.JITTER)
        u = [_u(sid, seed, epoch, view, s) for s in plan.SLOT_JITTER]
        b, c, s = (F32(1) - sb) + u[0] * (F32(2) * sb), (F32(1) - sc) + u[1] * (F32(2) * sc), (F32(1) - ss) + u[2] * (F32(2) * ss)
        hue = (u[3] * F32(2) - F32(1)) * (sh * F32(360))
        entries, offset = jitter_entries(b, c, s, hue, cos=lambda r: np.cos(F32(r)), sin=lambda r: np.sin(F32(r)))
        v = _affine(v, [F32(e) for e in entries], F32(offset))
    return v.contiguous()


def reference_views(img: torch.Tensor, sid: int, *, names, seed: int, epoch: int, size: int, layout: str,
                    mean, std) -> torch.Tensor:
    """All views (V, 3, size, size) float32, normalised, of one decoded uint8 image (3, H, W)."""
    views = [reference_view(img, sid, name=n, view=i, seed=seed, epoch=epoch, size=size, layout=layout)
             for i, n in enumerate(names)]
    return normalize(torch.stack(views), mean, std)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) * 255
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1) * 255
    return (x.float() - m) / s


class BaselineViews:
    """The straightforward torchvision implementation of the same views (its own random transforms)."""

    def __init__(self, names, *, size: int, layout: str, mean, std):
        if layout == "imagenet":
            base = [v2.RandomResizedCrop(size, scale=plan.RRC_SCALE, antialias=True), v2.RandomHorizontalFlip()]
        else:
            base = [v2.RandomCrop(size, padding=plan.PAD), v2.RandomHorizontalFlip()]
        sb, sc, ss, sh = plan.JITTER
        extra = {
            "normal": [], "color_drop": [v2.Grayscale(3)], "color_distort": [v2.ColorJitter(sb, sc, ss, sh)],
            "rotation": [v2.Lambda(lambda x: torch.rot90(x, int(torch.randint(1, 4, ())), dims=(-2, -1)))],
            "rot90": [v2.Lambda(lambda x: torch.rot90(x, 1, dims=(-2, -1)))],
            "rot180": [v2.Lambda(lambda x: torch.rot90(x, 2, dims=(-2, -1)))],
            "rot270": [v2.Lambda(lambda x: torch.rot90(x, 3, dims=(-2, -1)))],
        }
        tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
        self.transforms = []
        for n in names:
            if n == "crop_resize":
                geo = [v2.RandomResizedCrop(size, scale=plan.CROP_RESIZE_SCALE[layout], antialias=True),
                       v2.RandomHorizontalFlip()]
            else:
                geo = base
            self.transforms.append(v2.Compose([*geo, *extra[n], *tail]))

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return torch.stack([t(img) for t in self.transforms])
