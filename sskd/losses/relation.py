"""Relation-based KD losses (RKD, PKT, SP): the student matches how the teacher relates the samples of a
batch to each other, not the teacher's tensors themselves, so student and teacher widths may differ.

Each follows RepDistiller's code (HobbitLong/RepDistiller ``distiller_zoo/``), the implementation behind
the CRD paper's benchmark table; the papers' equations are named in each docstring. All three run in
float32 with autocast off (Gram matrices and squared distances of wide features overflow fp16), and the
teacher side is detached: gradients reach the student only.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

PKT_EPS = 1e-7  # RepDistiller's PKT.cosine_similarity_loss eps
PDIST_EPS = 1e-12  # RepDistiller's RKDLoss.pdist clamp before the square root


def _fp32(fn):
    """Run ``fn`` with autocast off on its two tensors in at least float32 (float64 stays), the teacher's
    detached."""

    @functools.wraps(fn)
    def wrapper(s: torch.Tensor, t: torch.Tensor, *args, **kwargs):
        dtype = torch.promote_types(torch.promote_types(s.dtype, t.dtype), torch.float32)
        with torch.autocast(s.device.type, enabled=False):
            return fn(s.to(dtype), t.detach().to(dtype), *args, **kwargs)

    return wrapper


def _pdist(e: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (b, b) as RepDistiller's ``pdist``: ‖x_i‖² + ‖x_j‖² − 2⟨x_i, x_j⟩ clamped at
    1e-12 before the root (so duplicates sit at 1e-6, not 0, and the root's gradient stays finite);
    the diagonal is exactly 0."""
    sq = e.pow(2).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp(min=PDIST_EPS).sqrt()
    return d.masked_fill(torch.eye(len(e), dtype=torch.bool, device=e.device), 0)


def _normalised_pdist(e: torch.Tensor) -> torch.Tensor:
    """Distances divided by the mean of their strictly positive entries (RKD's μ).

    All entries are >= 0, so the sum over positives is the sum over all: no boolean indexing (no host
    sync on a GPU). Without any positive entry (a batch of one) the matrix stays 0 instead of NaN.
    """
    d = _pdist(e)
    mean = d.sum() / (d > 0).sum().clamp(min=1)
    return d / mean.clamp(min=PDIST_EPS)


def _angles(e: torch.Tensor) -> torch.Tensor:
    """A[i, j, k] = ⟨u_ij, u_ik⟩ with u_ij = normalize(x_j − x_i) (eps 1e-12: a zero difference stays 0)."""
    u = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)  # (b, b, d): u[i, j] from x_i to x_j
    return torch.bmm(u, u.transpose(1, 2))


@_fp32
def rkd_terms(s_emb: torch.Tensor, t_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RKD's two unweighted terms (Park et al., CVPR 2019, Sec. 3.2), as RepDistiller's ``RKDLoss``: the
    distance-wise loss L_RKD-D (ψ_D = ‖x_i − x_j‖ / μ, μ the mean distance over the batch's pairs, under the
    Huber loss l_δ) and the angle-wise loss L_RKD-A (ψ_A = cos of the angle each triplet makes, under l_δ).

    Args:
        s_emb: (b, ...) student features (flattened to (b, d_s)); t_emb: (b, ...) teacher's, any width.

    Returns:
        ``(distance, angle)``, 0-dim: smooth-L1 (β = 1, mean over the b² entries) between the
        mean-normalised distance matrices, and smooth-L1 (mean over the b³ entries) between the angle
        tensors over all triplets.
    """
    s, t = s_emb.flatten(1), t_emb.flatten(1)
    with torch.no_grad():
        t_d, t_a = _normalised_pdist(t), _angles(t)
    return F.smooth_l1_loss(_normalised_pdist(s), t_d), F.smooth_l1_loss(_angles(s), t_a)


def rkd_loss(
    s_emb: torch.Tensor, t_emb: torch.Tensor, w_dist: float = 25, w_angle: float = 50
) -> torch.Tensor:
    """RKD (Park et al., CVPR 2019): ``w_dist · L_RKD-D + w_angle · L_RKD-A`` of :func:`rkd_terms`,
    RepDistiller's ``RKDLoss(w_d=25, w_a=50)``. Returns a 0-dim tensor."""
    dist, angle = rkd_terms(s_emb, t_emb)
    return w_dist * dist + w_angle * angle


def _pkt_probabilities(e: torch.Tensor) -> torch.Tensor:
    """Rows normalised by ‖row‖ + eps (NaN → 0), cosines mapped by c → (c + 1) / 2, rows summing to 1."""
    e = e / (e.norm(dim=1, keepdim=True) + PKT_EPS)
    e = torch.where(torch.isnan(e), torch.zeros_like(e), e)
    c = (e @ e.t() + 1) / 2
    return c / c.sum(dim=1, keepdim=True)


@_fp32
def pkt_loss(s_emb: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
    """PKT (Passalis & Tefas, ECCV 2018): the KL divergence between the teacher's and the student's
    conditional probabilities p_{i|j} built from the cosine-similarity kernel (Sec. 3), as RepDistiller's
    ``PKT.cosine_similarity_loss`` (the authors' code, rows as the conditioning sample): the mean over the
    b² entries of
    ``P_t · log((P_t + eps) / (P_s + eps))``, eps = 1e-7, P the row-normalised (cos + 1) / 2.

    Args:
        s_emb: (b, d_s) student features; t_emb: (b, d_t) teacher's, any width.

    Returns:
        0-dim tensor; exactly 0 when the two sides have the same cosines.
    """
    p_s = _pkt_probabilities(s_emb.flatten(1))
    with torch.no_grad():
        p_t = _pkt_probabilities(t_emb.flatten(1))
    return (p_t * torch.log((p_t + PKT_EPS) / (p_s + PKT_EPS))).mean()


def _sp_gram(f: torch.Tensor) -> torch.Tensor:
    f = f.flatten(1)
    return F.normalize(f @ f.t(), p=2, dim=1)


@_fp32
def sp_loss(s_map: torch.Tensor, t_map: torch.Tensor) -> torch.Tensor:
    """SP (Tung & Mori, ICCV 2019): L_SP = (1/b²) Σ ‖G_T − G_S‖²_F over the Gram matrices G̃ = Q Qᵀ (b, b) of
    the flattened maps Q, each row L2-normalised (G), as RepDistiller's ``Similarity``.

    Args:
        s_map: (b, C_s, H_s, W_s) (any (b, ...)); t_map: (b, C_t, H_t, W_t), any channels and size.

    Returns:
        0-dim tensor (RepDistiller returns shape (1,)); unchanged by scaling either map.
    """
    b = s_map.shape[0]
    with torch.no_grad():
        g_t = _sp_gram(t_map)
    return (g_t - _sp_gram(s_map)).pow(2).sum() / (b * b)


__all__ = ["pkt_loss", "rkd_loss", "rkd_terms", "sp_loss"]
