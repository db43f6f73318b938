"""Feature-map distillation terms of RepDistiller's baselines (FitNet, AT, VID, AB, FT), as pure functions.

Every function follows RepDistiller's re-implementation (HobbitLong/RepDistiller, ``distiller_zoo/``) where
it differs from the paper: AT and FT average
squared / absolute differences of normalised maps instead of taking a norm, VID has no log 2π, AB is
scaled by 3/1000 per sample. Maps are ``(b, C, H, W)``; when two compared maps differ in size the larger
one is adaptive-average-pooled to the smaller (:func:`match_size`), as RepDistiller does. All sums and
means are taken in fp32 (the inputs may be bf16/fp16 under autocast).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def match_size(f_s: torch.Tensor, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool the spatially larger of two maps to the other's size (RepDistiller compares the heights and
    pools to ``(H, H)``; for the square maps of every model here that is the other map's ``(H, W)``).

    Args:
        f_s, f_t: (b, C_s, H_s, W_s), (b, C_t, H_t, W_t); channel counts may differ.
    """
    if f_s.shape[2] > f_t.shape[2]:
        f_s = F.adaptive_avg_pool2d(f_s, tuple(f_t.shape[2:]))
    elif f_s.shape[2] < f_t.shape[2]:
        f_t = F.adaptive_avg_pool2d(f_t, tuple(f_s.shape[2:]))
    return f_s, f_t


def _same_length(s_maps: Sequence, t_maps: Sequence, what: str) -> None:
    if len(s_maps) != len(t_maps):  # RepDistiller zips, silently dropping layers; a count mismatch is a bug
        raise ValueError(f"{what}: {len(s_maps)} student maps but {len(t_maps)} teacher maps")


def hint_loss(s_regressed: torch.Tensor, t_map: torch.Tensor) -> torch.Tensor:
    """FitNet's hint loss L_HT (Romero et al., ICLR 2015: ½‖u_h − r(v_g)‖²), as RepDistiller's ``HintLoss``:
    ``nn.MSELoss``, the **mean** over all ``b·C·H·W`` entries of ``(r(f_s) − f_t)²``.

    Args:
        s_regressed: the regressor's output on the student's hint map, (b, C_t, H_t, W_t).
        t_map: the teacher's hint map, same shape.
    """
    return F.mse_loss(s_regressed.float(), t_map.float())


def attention_map(f: torch.Tensor, p: float = 2) -> torch.Tensor:
    """AT's activation-based spatial attention map (Zagoruyko & Komodakis, ICLR 2017: F(A) = Σ_c |A_c|^p,
    then ``Q/‖Q‖₂``), as RepDistiller's ``Attention.at``: the channel mean of ``f^p``, flattened and L2-normalised per sample
    (``F.normalize``, eps 1e-12).

    Args:
        f: (b, C, H, W). Returns (b, H·W).
    """
    return F.normalize(f.float().pow(p).mean(1).flatten(1), dim=1)


def at_loss(s_maps: Sequence[torch.Tensor], t_maps: Sequence[torch.Tensor], p: float = 2) -> torch.Tensor:
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017, the AT term β/2 Σ_j ‖Q_S/‖Q_S‖ − Q_T/‖Q_T‖‖_p),
    as RepDistiller's ``Attention(p=2)``:
    per layer, pool the larger *feature map* to the smaller size, then the **mean** over ``b·H·W`` of
    ``(a(f_s) − a(f_t))²`` (not the paper's norm of the difference); summed over layers.

    Args:
        s_maps, t_maps: equally long lists of (b, C, H, W) maps, shallow to deep; channel counts and sizes
            may differ per layer. Returns a 0-dim tensor.
    """
    _same_length(s_maps, t_maps, "at_loss")
    total = 0
    for f_s, f_t in zip(s_maps, t_maps):
        f_s, f_t = match_size(f_s, f_t)
        total = total + (attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean()
    return total


def at_loss_from_attention(
    s_maps: Sequence[torch.Tensor],
    t_attention: Sequence[torch.Tensor],
    t_sizes: Sequence[tuple[int, int]],
    p: float = 2,
) -> torch.Tensor:
    """:func:`at_loss` against the teacher's attention maps instead of its feature maps (what a cache holds):
    equal to it whenever no teacher map has to be pooled, i.e. every student map is at least as large.

    Args:
        s_maps: (b, C, H_s, W_s) per layer.
        t_attention: the teacher's :func:`attention_map` per layer, (b, H_t·W_t).
        t_sizes: (H_t, W_t) per layer.
    """
    _same_length(s_maps, t_attention, "at_loss_from_attention")
    total = 0
    for f_s, a_t, (h, w) in zip(s_maps, t_attention, t_sizes):
        if f_s.shape[2] < h:
            raise ValueError(
                f"student map {tuple(f_s.shape[1:])} is smaller than the teacher's {h}x{w}: the "
                "teacher's feature map must be pooled first (use at_loss on the maps)"
            )
        if f_s.shape[2] > h:
            f_s = F.adaptive_avg_pool2d(f_s, (h, w))
        total = total + (attention_map(f_s, p) - a_t.float()).pow(2).mean()
    return total


def vid_variance(log_scale: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """VID's per-channel variance σ² = softplus(log_scale) + eps (RepDistiller's ``log(1 + exp(·)) + eps``)."""
    return F.softplus(log_scale.float()) + eps


def vid_loss(
    pred_mean: torch.Tensor, target: torch.Tensor, log_scale: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """Variational information distillation (Ahn et al., CVPR 2019: −log q(t | s) of a Gaussian with mean
    μ(s) and a learned per-channel variance), as RepDistiller's ``VIDLoss``: the **mean** over ``(b, C_t, H, W)`` of
    ``½·[(μ(f_s) − f_t)²/σ² + log σ²]`` with σ² from :func:`vid_variance`; no log 2π constant.

    Args:
        pred_mean: the regressor's μ(f_s) on the (pooled) student map, (b, C_t, H, W).
        target: the (pooled) teacher map, same shape.
        log_scale: (C_t,) the learnable pre-softplus variances.
    """
    var = vid_variance(log_scale, eps).view(1, -1, 1, 1)
    return (0.5 * ((pred_mean.float() - target.float()).pow(2) / var + var.log())).mean()


def ab_loss(
    s_maps: Sequence[torch.Tensor], t_preact: Sequence[torch.Tensor], margin: float = 1.0
) -> torch.Tensor:
    """Activation-boundary loss (Heo et al., AAAI 2019: the piecewise-differentiable alternative to the
    activation transfer loss, squared hinge with margin m), as RepDistiller's ``ABLoss(feat_num=n, margin=1)``: per layer i the sum over all elements of
    ``(s + m)²·[s > −m and t ≤ 0] + (s − m)²·[s ≤ m and t > 0]``, times ``w_i = 2^(i − n + 1)``, divided
    by the batch size and times 3/1000; summed over layers.

    Args:
        s_maps: the connector's outputs on the student's pre-ReLU maps, each shaped like the teacher's.
        t_preact: the teacher's maps before their last ReLU, (b, C, H, W) per layer, shallow to deep.
    """
    _same_length(s_maps, t_preact, "ab_loss")
    n, b = len(s_maps), s_maps[0].shape[0]
    total = 0
    for i, (s, t) in enumerate(zip(s_maps, t_preact)):
        s, t = s.float(), t.float()
        off = ((s > -margin) & (t <= 0)).float()  # the teacher's neuron is off: push s below −m
        on = ((s <= margin) & (t > 0)).float()  # on: push s above m
        layer = ((s + margin).pow(2) * off + (s - margin).pow(2) * on).sum()
        total = total + 2.0 ** (i - n + 1) * layer / b * 3 / 1000
    return total


def ft_factor(x: torch.Tensor, p: float = 2) -> torch.Tensor:
    """FT's factor as RepDistiller computes it: the AT-style squeeze of a paraphraser / translator output,
    L2-normalise(channel mean of ``x^p``), (b, C, H, W) -> (b, H·W) (the paper normalises the whole
    factor map instead, Kim et al., NeurIPS 2018)."""
    return attention_map(x, p)


def ft_loss(factor_s: torch.Tensor, factor_t: torch.Tensor, p1: float = 2, p2: float = 1) -> torch.Tensor:
    """Factor transfer (Kim et al., NeurIPS 2018: L_FT = ‖F_T/‖F_T‖₂ − F_S/‖F_S‖₂‖_p), as RepDistiller's
    ``FactorTransfer(p1=2, p2=1)``:
    pool the larger of the translator's and the paraphraser's outputs, squeeze both with :func:`ft_factor`
    (``p1``), then the **mean** over ``(b, H·W)`` of ``|Δ|`` (``p2 = 1``) or of ``Δ^p2``.

    Args:
        factor_s: the student translator's output, (b, C, H_s, W_s).
        factor_t: the teacher paraphraser's encoder output, (b, C, H_t, W_t).
    """
    factor_s, factor_t = match_size(factor_s, factor_t)
    diff = ft_factor(factor_s, p1) - ft_factor(factor_t, p1)
    return diff.abs().mean() if p2 == 1 else diff.pow(p2).mean()
