"""The per-pixel float work on the views, in torch on the training device: colour distortion, layout,
normalisation and dtype.

DALI makes every view's geometry and its cheap integer operations (decode, crops, random-resized
crops, fixed 90° rotations, colour drop) and hands over uint8 HWC views (colour drop as its one luma
channel); this module turns them into the batch the model sees, ``(b, V, 3, H, W)`` normalised floats.
A view turned by a per-sample number of quarter turns (the paper's rotation) is turned here, sample by
sample, in the copy that makes the CHW layout anyway: a uint8 ``rot90`` of each sample costs less than
DALI's nearest-neighbour warp of the whole view (``sskd bench pipeline``), with the same pixels.
Doing the float part here rather than in DALI's CPU operators is measured (``sskd bench pipeline``):
DALI's CPU colour matrix, stack and normalise kernels cost about 3 ms per 224-px image more than these
few batched torch operations, and on a GPU both are negligible while moving uint8 instead of float to
the device carries a quarter of the bytes.

Every operation writes into buffers kept across batches (a scratch buffer, and the output whenever
the caller is done with a batch before asking for the next), and no operation mixes uint8 and float
inputs (torch then casts through a temporary): a fresh 20 MB float temporary per batch costs the
kernel's page faults on every batch, which on the CPU cost as much as the arithmetic itself. Colour distortion (:func:`pipelines.colors.jitter_matrices`) is
applied to the float values before any rounding and clamped to [0, 255]; the reference
(:mod:`pipelines.reference`) does the same.
"""

from __future__ import annotations

import torch


class Finisher:
    """Turns uint8 views into normalised float views, reusing its buffers across batches.

    Args:
        mean, std: per-channel normalisation on the 0-1 scale (the manifest's).
        dtype: output dtype (the arithmetic is float32).
    """

    def __init__(self, mean, std, *, dtype: torch.dtype = torch.float32):
        self.mean, self.std, self.dtype = list(mean), list(std), dtype
        self._out: torch.Tensor | None = None
        self._scratch: torch.Tensor | None = None
        self._norm: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _buffer(self, name: str, shape, device) -> torch.Tensor:
        buf = getattr(self, name)
        if buf is None or tuple(buf.shape) != tuple(shape) or buf.device != device:
            buf = torch.empty(shape, dtype=torch.float32, device=device)
            setattr(self, name, buf)
        return buf

    def _scale_bias(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``x * scale + bias`` normalises 0-255 values: scale = 1 / (255 std), bias = -mean / std."""
        if device not in self._norm:
            m = torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
            s = torch.tensor(self.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
            self._norm[device] = (1 / (255 * s), -m / s)
        return self._norm[device]

    def __call__(
        self,
        views_u8: list[torch.Tensor],
        colour: dict[int, tuple[torch.Tensor, torch.Tensor]],
        turns: dict[int, torch.Tensor] | None = None,
        *,
        reuse: bool = False,
    ) -> torch.Tensor:
        """Normalised float views from uint8 ones.

        Args:
            views_u8: V tensors (b, H, W, C) uint8, one per view, all on one device; C is 3, or 1 for a
                grey view (replicated to three channels).
            colour: ``{view: (M (b, 3, 3), T (b, 3))}`` float32 colour matrices of the colour-distortion
                views (``out = clamp(M @ rgb + T, 0, 255)`` on 0-255 values).
            turns: ``{view: k (b,)}`` integer quarter turns, counter-clockwise (as ``np.rot90``), of the
                views turned sample by sample, before anything else (square views only).
            reuse: write into the output buffer of the previous ``reuse`` call (the caller is done with
                that batch); otherwise the result is a new tensor of its own.
        Returns:
            (b, V, 3, H, W) normalised views.
        """
        b, h, w, _ = views_u8[0].shape
        device = views_u8[0].device
        shape = (b, len(views_u8), 3, h, w)
        out = self._buffer("_out", shape, device) if reuse else torch.empty(shape, device=device)
        scale, bias = self._scale_bias(device)
        turns = turns or {}
        for v, x in enumerate(views_u8):
            k = turns[v].reshape(-1).tolist() if v in turns else None
            x = x.permute(0, 3, 1, 2)  # (b, C, H, W) view of the HWC bytes
            o = out[:, v]
            if v in colour:
                m, t = (a.to(device=device, dtype=torch.float32).view(b, 3, -1, 1, 1) for a in colour[v])
                xf = self._buffer("_scratch", (b, 3, h, w), device)
                _cast(xf, x, k)
                # Element-wise in a fixed order (not a batched matmul, whose kernel and summation order
                # may depend on the batch size): a sample's pixels never depend on its batch.
                torch.mul(m[:, :, 0], xf[:, 0:1], out=o)
                o.addcmul_(m[:, :, 1], xf[:, 1:2]).addcmul_(m[:, :, 2], xf[:, 2:3])
                o.add_(t[:, :, 0]).clamp_(0, 255).mul_(scale).add_(bias)
            else:  # cast (a grey channel broadcast to three), then scale and shift in place. (addcmul
                # straight from uint8 casts through a fresh temporary: 3x slower with the page faults.)
                _cast(o, x.expand(b, 3, h, w), k).mul_(scale).add_(bias)
        return out if self.dtype == torch.float32 else out.to(self.dtype)


def _cast(dst: torch.Tensor, x: torch.Tensor, turns: list[int] | None) -> torch.Tensor:
    """``dst.copy_(x)``, sample i turned by ``turns[i]`` quarter turns counter-clockwise when given (each
    sample's turn is a small uint8 copy that stays in the cache; the cast reads it in place)."""
    if turns is None:
        return dst.copy_(x)
    for i, k in enumerate(turns):
        dst[i].copy_(torch.rot90(x[i], k, dims=(1, 2)) if k % 4 else x[i])
    return dst
