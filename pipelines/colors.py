"""Colour operations: one 3x3 matrix + offset per sample, shared by the pipeline and the reference.

Colour distortion is an affine map of RGB, applied as one batched 3x3 matrix per sample on the float
values by :mod:`pipelines.finish` (on the training device; DALI's CPU colour-matrix operators cost
~1.3 ms per 224-px view) and by the torchvision reference alike; the two agree to float rounding.
Colour drop is the luma, made by DALI's ``color_space_conversion`` (about 20x faster than a matrix on
CPU) and reproduced bit for bit by :func:`gray_u8`.

Colour distortion composes, in this fixed order: hue rotation (about the grey axis, in YIQ space),
saturation (scales the chroma, as DALI's ``hsv``/``color_twist`` do), brightness (scales all), contrast
(about the fixed centre 128, as DALI's ``brightness_contrast`` does; a per-image mean centre would need
a reduction whose result a GPU pipeline cannot feed back as an argument).
"""

from __future__ import annotations

import math

import numpy as np

from pipelines.params import JITTER

LUMA = (0.299, 0.587, 0.114)
CONTRAST_CENTER = 128.0

_YIQ = np.array([LUMA, [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=np.float64)
_YIQ_INV = np.linalg.inv(_YIQ)
# M_hs = A + (s cos h) B + (s sin h) C, precomputed in float64 and rounded once to float32 constants.
_A = (_YIQ_INV @ np.diag([1.0, 0.0, 0.0]) @ _YIQ).astype(np.float32)
_B = (_YIQ_INV @ np.diag([0.0, 1.0, 1.0]) @ _YIQ).astype(np.float32)
_C = (_YIQ_INV @ np.array([[0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]]) @ _YIQ).astype(np.float32)

# DALI's CPU RGB->GRAY conversion: LUMA in 15-bit fixed point (summing to 2**15), rounded half up
# (checked bit-exact against DALI on 262,144 random pixels in tests/test_dali.py).
LUMA_Q15 = (9798, 19235, 3735)


def gray_u8(rgb: np.ndarray) -> np.ndarray:
    """Colour drop of uint8 RGB (..., 3) exactly as DALI's CPU ``color_space_conversion`` (3 equal channels)."""
    y = (rgb.astype(np.int64) @ np.array(LUMA_Q15, dtype=np.int64) + (1 << 14)) >> 15
    return np.repeat(y[..., None], 3, axis=-1).astype(np.uint8)


def jitter_matrices(u_b, u_c, u_s, u_h) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample colour-distortion matrices from four U[0,1) float32 arrays (n,).

    Factors are uniform in [1 - v, 1 + v] for brightness, contrast and saturation and the hue turns by
    up to ±v_hue x 360 degrees, with the SimCLR strengths of :data:`pipelines.params.JITTER`.

    Returns:
        M (n, 3, 3) and T (n, 3) float32: ``out = M @ rgb + T`` on 0-255 values.
    """
    f32 = np.float32
    sb, sc, ss, sh = (f32(v) for v in JITTER)
    b = (f32(1) - sb) + u_b * (f32(2) * sb)
    c = (f32(1) - sc) + u_c * (f32(2) * sc)
    s = (f32(1) - ss) + u_s * (f32(2) * ss)
    rad = (u_h * f32(2) - f32(1)) * (sh * f32(360)) * f32(math.pi / 180.0)
    sc_, ss_ = s * np.cos(rad), s * np.sin(rad)
    m = (c * b)[:, None, None] * (_A[None] + sc_[:, None, None] * _B[None] + ss_[:, None, None] * _C[None])
    t = np.repeat(((f32(1) - c) * f32(CONTRAST_CENTER))[:, None], 3, axis=1)
    return m.astype(f32), t.astype(f32)
