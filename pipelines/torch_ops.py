"""The torch operations behind the views' references (:meth:`pipelines.view_registry.View.reference`):
the colour matrix and the resample of a float window, each as DALI computes it.

Imported only where a reference runs, so that the view classes stay importable without torch.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF


def affine(img: torch.Tensor, m, t) -> torch.Tensor:
    """Colour matrix on float 0-255 values, clamped, not rounded (as :mod:`pipelines.finish`)."""
    m = torch.as_tensor(np.asarray(m, dtype=np.float32).reshape(3, 3))
    x = img.float()
    out = m[:, 0].view(3, 1, 1) * x[0] + m[:, 1].view(3, 1, 1) * x[1] + m[:, 2].view(3, 1, 1) * x[2]
    return (out + torch.as_tensor(np.asarray(t, dtype=np.float32)).view(3, 1, 1)).clamp(0, 255)


def crop_resize(img: torch.Tensor, y0: float, x0: float, h: float, w: float, size: int) -> torch.Tensor:
    """Resample the float window (y0, x0, h, w) of ``img`` to size x size.

    Upscaling is DALI's linear filter exactly (sample at pixel centres, clamp at the border); when the
    window is larger than the output DALI antialiases with its own kernel, and torchvision's antialiased
    resize of the integer-rounded window stands in for it (within a tolerance).
    """
    if h > size or w > size:
        return TF.resized_crop(
            img, round(y0), round(x0), max(1, round(h)), max(1, round(w)), [size, size], antialias=True
        )
    H, W = img.shape[1:]
    o = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    ys, xs = (y0 + o * h) / H * 2 - 1, (x0 + o * w) / W * 2 - 1
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], dim=-1)[None].float()
    out = torch.nn.functional.grid_sample(
        img[None].float(), grid, mode="bilinear", padding_mode="border", align_corners=False
    )[0]
    return out.round().clamp(0, 255).to(torch.uint8)
