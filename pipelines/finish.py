"""The per-pixel float work on the views, in torch on the training device: colour distortion, layout,
normalisation and dtype.

DALI makes every view's geometry and its cheap integer operations (decode, crops, random-resized
crops, 90° rotations, colour drop) and hands over uint8 HWC views; this module turns them into the
batch the model sees, ``(b, V, 3, H, W)`` normalised floats, in one pass per view. Doing the float
part here rather than in DALI's CPU operators is measured (``sskd bench pipeline``): DALI's CPU colour
matrix, stack and normalise kernels cost about 3 ms per 224-px image more than these few batched
torch operations, and on a GPU both are negligible while moving uint8 instead of float to the device
carries a quarter of the bytes.

Colour distortion (:func:`pipelines.colors.jitter_matrices`) is applied to the float values before any
rounding and clamped to [0, 255]; the reference (:mod:`pipelines.reference`) does the same.
"""

from __future__ import annotations

import torch


def finish_views(views_u8: list[torch.Tensor], colour: dict[int, tuple[torch.Tensor, torch.Tensor]], mean, std,
                 *, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised float views from uint8 ones.

    Args:
        views_u8: V tensors (b, H, W, 3) uint8, one per view, all on one device.
        colour: ``{view: (M (b, 3, 3), T (b, 3))}`` float32 colour matrices of the colour-distortion
            views (``out = clamp(M @ rgb + T, 0, 255)`` on 0-255 values).
        mean, std: per-channel normalisation on the 0-1 scale (the manifest's).
        dtype: output dtype (the arithmetic is float32).
        out: a float32 (b, V, 3, H, W) tensor to write into (reused across batches), or None.
    Returns:
        (b, V, 3, H, W) normalised views.
    """
    b, h, w, _ = views_u8[0].shape
    device = views_u8[0].device
    shape = (b, len(views_u8), 3, h, w)
    if out is None or tuple(out.shape) != shape or out.device != device:
        out = torch.empty(shape, dtype=torch.float32, device=device)
    for v, x in enumerate(views_u8):
        x = x.permute(0, 3, 1, 2)
        if v in colour:
            m, t = (a.to(device=device, dtype=torch.float32).view(b, 3, -1, 1, 1) for a in colour[v])
            xf = x.float()
            # Element-wise in a fixed order (not a batched matmul, whose kernel and summation order may
            # depend on the batch size): a sample's pixels never depend on its batch.
            y = m[:, :, 0] * xf[:, 0:1]
            y += m[:, :, 1] * xf[:, 1:2]
            y += m[:, :, 2] * xf[:, 2:3]
            out[:, v].copy_(y.add_(t[:, :, 0]).clamp_(0, 255))
        else:
            out[:, v].copy_(x)
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 1, 3, 1, 1) * 255
    inv = 1 / (torch.tensor(std, dtype=torch.float32, device=device).view(1, 1, 3, 1, 1) * 255)
    out.sub_(m).mul_(inv)
    return out if dtype == torch.float32 else out.to(dtype)
