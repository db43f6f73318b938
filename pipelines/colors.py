"""Colour operations as one 3x3 matrix + offset per sample, shared by DALI and the reference.

Colour drop and colour distortion are both affine maps of RGB, so the DALI pipeline applies each
with a single ``fn.coord_transform`` (one pass over the pixels, on CPU or GPU) and the torchvision
reference applies the very same matrix; the two then agree to within uint8 rounding.

Colour distortion composes, in this fixed order: hue rotation (about the grey axis, in YIQ space),
saturation (scales the chroma, as DALI's ``hsv``/``color_twist`` do), brightness (scales all), contrast
(about the fixed centre 128, as DALI's ``brightness_contrast`` does; a per-image mean centre would need
a reduction whose result a GPU pipeline cannot feed back as an argument).
"""

from __future__ import annotations

import math

import numpy as np

LUMA = (0.299, 0.587, 0.114)
CONTRAST_CENTER = 128.0

_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=np.float64)
_YIQ_INV = np.linalg.inv(_YIQ)
# M_hs = A + (s cos h) B + (s sin h) C, precomputed in float64 and rounded once to float32 constants.
_A = (_YIQ_INV @ np.diag([1.0, 0.0, 0.0]) @ _YIQ).astype(np.float32)
_B = (_YIQ_INV @ np.diag([0.0, 1.0, 1.0]) @ _YIQ).astype(np.float32)
_C = (_YIQ_INV @ np.array([[0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]]) @ _YIQ).astype(np.float32)

GRAY_MATRIX = list(LUMA) * 3  # row-major 3x3: every output channel is the luma


def jitter_entries(b, c, s, hue_deg, cos=math.cos, sin=math.sin):
    """The 9 matrix entries (row-major) and the offset of colour distortion.

    Works on floats, numpy float32 arrays and DALI DataNodes (pass ``nvidia.dali.math.cos/sin``).

    Args:
        b, c, s: brightness, contrast, saturation factors (1 = unchanged).
        hue_deg: hue rotation in degrees.
    Returns:
        (entries, offset): ``out = M @ rgb + offset`` with M from the 9 entries, the same offset on
        every channel.
    """
    rad = hue_deg * (math.pi / 180.0)
    sc, ss = s * cos(rad), s * sin(rad)
    cb = c * b
    entries = [cb * (float(_A.flat[i]) + sc * float(_B.flat[i]) + ss * float(_C.flat[i])) for i in range(9)]
    offset = (1.0 - c) * CONTRAST_CENTER
    return entries, offset
