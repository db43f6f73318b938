"""The trainable helper modules of the feature-map baselines, as RepDistiller builds them (``models/util.py``,
``distiller_zoo/VID.py``), and the shape probing that sizes them.

- :class:`ConvReg` (FitNet's regressor), :class:`Connector` (AB), :class:`Paraphraser` / :class:`Translator`
  (FT), :class:`VIDRegressor` (VID's μ(·) and per-channel log-variance). PyTorch's default initialisation,
  as RepDistiller (no Kaiming re-init).
- :func:`probe_pair`: one forward of zeros through student and teacher at the run's input size gives their
  maps' ``(C, H, W)`` (:class:`PairShapes`; :class:`sskd.methods.families.FeatureMethod` probes the pair as it
  builds); a pair the modules cannot bridge is one :class:`sskd.core.errors.SSKDError` line naming both
  architectures and their shapes (:meth:`PairShapes.error`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from sskd.core.errors import SSKDError
from sskd.losses.feature import match_size

Shape = tuple[int, int, int]  # (C, H, W) of one map, without the batch


class ShapeError(ValueError):
    """Two maps a module cannot connect (wrapped into :meth:`PairShapes.error` by the methods)."""


def fmt_shapes(shapes: Sequence[Shape]) -> str:
    return ", ".join("x".join(map(str, s)) for s in shapes) or "none"


def _check_out(module: nn.Module, s: Shape, t: Shape) -> None:
    out = tuple(module(torch.empty(1, *s, device="meta")).shape[1:])  # shape only: no compute, no RNG
    if out != tuple(t):
        raise ShapeError(f"a regressor maps {fmt_shapes([s])} to {fmt_shapes([out])}, not {fmt_shapes([t])}")


class ConvReg(nn.Module):
    """FitNet's convolutional regressor (RepDistiller ``ConvReg``): a 3×3 stride-2 conv when the student map
    is twice the teacher's size, a 4×4 stride-2 transposed conv when half, else a (1+H_s−H_t)×(1+W_s−W_t)
    conv (1×1 for equal sizes); then BatchNorm and (``use_relu``) ReLU.

    Args:
        s_shape, t_shape: (C, H, W) of the student's and the teacher's map.
    """

    def __init__(self, s_shape: Shape, t_shape: Shape, use_relu: bool = True):
        super().__init__()
        (s_c, s_h, s_w), (t_c, t_h, t_w) = s_shape, t_shape
        if s_h == 2 * t_h:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif s_h * 2 == t_h:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h and s_w >= t_w:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            raise ShapeError(
                f"no regressor from a {s_h}x{s_w} map to a larger {t_h}x{t_w} one (only to 2x the size)"
            )
        _check_out(self.conv, s_shape, t_shape)
        self.bn = nn.BatchNorm2d(t_c)
        self.relu = nn.ReLU(inplace=True) if use_relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b, C_s, H_s, W_s) -> (b, C_t, H_t, W_t)."""
        return self.relu(self.bn(self.conv(x)))


class Connector(nn.Module):
    """AB's connector (RepDistiller ``Connector``): per layer the identity when channels and height already
    match, else a :class:`ConvReg` without ReLU."""

    def __init__(self, s_shapes: Sequence[Shape], t_shapes: Sequence[Shape]):
        super().__init__()
        if len(s_shapes) != len(t_shapes):
            raise ShapeError(f"{len(s_shapes)} student maps but {len(t_shapes)} teacher maps")
        self.connectors = nn.ModuleList(
            nn.Identity() if (s[0], s[1]) == (t[0], t[1]) else ConvReg(s, t, use_relu=False)
            for s, t in zip(s_shapes, t_shapes)
        )

    def forward(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [c(m) for c, m in zip(self.connectors, maps)]


def _lrelu_stack(convs: list[nn.Module], use_bn: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for conv in convs:
        layers += [
            conv,
            nn.BatchNorm2d(conv.out_channels) if use_bn else nn.Identity(),
            nn.LeakyReLU(0.1, inplace=True),
        ]
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """FT's teacher-side paraphraser (RepDistiller ``Paraphraser(t_shape, k=0.5)``): an encoder of three 3×3
    convs C→C→kC→kC and a mirrored decoder of transposed convs, each followed by LeakyReLU(0.1), no BN."""

    def __init__(self, channels: int, k: float = 0.5, use_bn: bool = False):
        super().__init__()
        out = int(channels * k)
        if out < 1:
            raise ShapeError(f"k = {k} leaves no channel of {channels}")
        self.encoder = _lrelu_stack(
            [
                nn.Conv2d(channels, channels, 3, 1, 1),
                nn.Conv2d(channels, out, 3, 1, 1),
                nn.Conv2d(out, out, 3, 1, 1),
            ],
            use_bn,
        )
        self.decoder = _lrelu_stack(
            [
                nn.ConvTranspose2d(out, out, 3, 1, 1),
                nn.ConvTranspose2d(out, channels, 3, 1, 1),
                nn.ConvTranspose2d(channels, channels, 3, 1, 1),
            ],
            use_bn,
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, C, H, W) -> the factor (b, kC, H, W) and the reconstruction (b, C, H, W)."""
        factor = self.encoder(x)
        return factor, self.decoder(factor)


class Translator(nn.Module):
    """FT's student-side translator (RepDistiller ``Translator(s_shape, t_shape, k=0.5)``): three 3×3 convs
    C_s→C_s→kC_t→kC_t, each with BatchNorm and LeakyReLU(0.1)."""

    def __init__(self, s_channels: int, t_channels: int, k: float = 0.5, use_bn: bool = True):
        super().__init__()
        out = int(t_channels * k)
        if out < 1:
            raise ShapeError(f"k = {k} leaves no channel of {t_channels}")
        self.encoder = _lrelu_stack(
            [
                nn.Conv2d(s_channels, s_channels, 3, 1, 1),
                nn.Conv2d(s_channels, out, 3, 1, 1),
                nn.Conv2d(out, out, 3, 1, 1),
            ],
            use_bn,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


def inverse_softplus(y: float) -> float:
    """x with softplus(x) = y, i.e. log(e^y − 1), written to stay finite for large y."""
    return y + math.log(-math.expm1(-y))


class VIDRegressor(nn.Module):
    """One VID layer (RepDistiller ``VIDLoss(C_s, C_t, C_t)``): μ(·) = 1×1 convs C_s→C_mid→C_mid→C_t with
    ReLU between, no biases; and ``log_scale`` (C_t,), initialised so that softplus(log_scale) + eps, the
    starting variance, is exactly ``init_var``."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, init_var: float = 5.0, eps: float = 1e-5):
        super().__init__()
        self.regressor = nn.Sequential(
            nn.Conv2d(c_in, c_mid, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(c_mid, c_mid, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(c_mid, c_out, 1, bias=False),
        )
        self.log_scale = nn.Parameter(torch.full((c_out,), inverse_softplus(init_var - eps)))
        self.eps = eps

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool the larger map to the smaller (RepDistiller pools the *input* before regressing), then
        μ(f_s): returns (μ, target), both (b, C_t, H, W)."""
        f_s, f_t = match_size(f_s, f_t)
        return self.regressor(f_s), f_t


# -- the maps of a model and of a student–teacher pair ------------------------------------------------------


def features_of(model: nn.Module, x: torch.Tensor, preact: bool = False):
    """``model(x, features=True | "preact")``; a run whose classifier carries parts (SS head, branches) holds
    it as ``backbone`` (the wrapper contract :func:`sskd.runs.models.teacher_backbone` reads too)."""
    net = getattr(model, "backbone", model)
    return net(x, features="preact" if preact else True)


def map_shapes(model: nn.Module, size: int) -> list[Shape]:
    """``(C, H, W)`` of each of ``model``'s maps at ``size``×``size`` (one forward of zeros in eval mode, so no
    BatchNorm statistic moves; the mode is put back)."""
    param = next(model.parameters())
    was = model.training
    model.eval()
    with torch.no_grad():
        maps = features_of(model, torch.zeros(1, 3, size, size, device=param.device, dtype=param.dtype)).maps
    model.train(was)
    return [tuple(int(d) for d in m.shape[1:]) for m in maps]


def parameters_behind(model: nn.Module, index: int | None = None, size: int = 32) -> set[str]:
    """Names of the parameters that map ``index`` (None: every map) depends on, found by autograd: the
    student "up to the hint layer", or RepDistiller's ``get_feat_modules`` (all but the classifier, and
    whatever runs after the last map), without naming any layer."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    param = named[0][1]
    was = model.training
    model.eval()
    with torch.enable_grad():
        maps = features_of(model, torch.zeros(1, 3, size, size, device=param.device, dtype=param.dtype)).maps
        maps = maps if index is None else [maps[index]]
        grads = torch.autograd.grad(sum(m.sum() for m in maps), [p for _, p in named], allow_unused=True)
    model.train(was)
    return {n for (n, _), g in zip(named, grads) if g is not None}


def flatten_maps(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Maps of any shapes as one (b, 1, ΣC·H·W) teacher output (a fixed name whatever the layer count)."""
    return torch.cat([m.flatten(1) for m in maps], dim=1)[:, None]


def split_maps(flat: torch.Tensor, shapes: Sequence[Shape]) -> list[torch.Tensor]:
    """Inverse of :func:`flatten_maps` for (b, ΣC·H·W): views (b, C, H, W), no copy."""
    parts = torch.split(flat, [c * h * w for c, h, w in shapes], dim=1)
    return [p.view(flat.shape[0], *s) for p, s in zip(parts, shapes)]


@dataclass
class PairShapes:
    """The maps' (C, H, W) of a student and a teacher at the input size, with names for error messages."""

    student: list[Shape]
    teacher: list[Shape]
    student_arch: str = ""  # registry names, for messages ("" when unknown)
    teacher_arch: str = ""
    size: int = 32

    def error(self, method: str, why: str) -> SSKDError:
        """One line: the method, both architectures with their maps, and why they do not fit."""
        s, t = (
            " ".join(filter(None, (role, arch)))
            for role, arch in (("student", self.student_arch), ("teacher", self.teacher_arch))
        )
        return SSKDError(
            f"--method {method}: {s} (maps {fmt_shapes(self.student)}) and {t} (maps "
            f"{fmt_shapes(self.teacher)}) at {self.size}x{self.size}: {why}"
        )

    def check_count(self, method: str) -> None:
        if len(self.student) != len(self.teacher):
            raise self.error(
                method,
                f"{len(self.student)} student maps but {len(self.teacher)} teacher maps; "
                "pair layer i with layer i needs equal counts",
            )


def probe_pair(
    student: nn.Module,
    teacher: nn.Module | None,
    size: int = 32,
    student_arch: str = "",
    teacher_arch: str = "",
) -> PairShapes:
    """:class:`PairShapes` from the two models (the teacher may be a fresh, untrained one of its architecture)."""
    if teacher is None:
        raise SSKDError(
            "a feature method made without a teacher needs the pair's map shapes (pair=PairShapes)"
        )
    return PairShapes(map_shapes(student, size), map_shapes(teacher, size), student_arch, teacher_arch, size)
