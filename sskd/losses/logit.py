"""Logit-only distillation losses beyond Hinton KD: DKD, DIST and logit standardisation, as pure functions.

Formulas and defaults of DKD, DIST and LS-KD as read from the official
code (megvii-research/mdistiller, hunto/image_classification_sota, sunshangquan/logit-standardization-KD).
Every function takes (n, K) logits and detaches the teacher's; none weighs in the CE term or a warm-up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def standardize_logits(z: torch.Tensor) -> torch.Tensor:
    """Logit standardisation (Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024,
    the Z-score pre-process of its Algorithm 1): ``Z(z) = (z − mean_k z) / (std_k z + 1e-7)`` per row.

    As the official code (LS mdistiller/distillers/KD.py ``normalize``): torch's Bessel-corrected std
    (divides by K − 1) and the 1e-7 added to the std, not to the variance. A constant row gives zeros.

    Args:
        z: (n, K) logits, K >= 2.
    Returns:
        (n, K), each row of mean 0 and (Bessel) std ~1; invariant to ``a·z + c`` for ``a > 0``.
    """
    mean = z.mean(dim=-1, keepdim=True)
    std = z.std(dim=-1, keepdim=True)
    return (z - mean) / (std + 1e-7)


def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-row ``KL(p ‖ q) = Σ_k p_k (log p_k − log q_k)`` from log-probabilities, shape (n,)."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def _split_target(a: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The target entry (n,) and the K − 1 non-target entries (n, K − 1) of each row, in class order."""
    target = F.one_hot(labels, a.shape[1]).bool()
    return a[target], a[~target].view(a.shape[0], a.shape[1] - 1)


def _binary_and_rest(a: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of DKD's binary vector ``b = [p_y, Σ_{k≠y} p_k]`` (n, 2) and of the non-target
    softmax ``q`` (n, K − 1), all from log-sum-exps of the scaled logits ``a``: never the log of a sum.

    With ``r = LSE_{k≠y} a_k`` (so ``Σ_{k≠y} p_k = exp(r − LSE a)``), ``log b = [−softplus(r − a_y),
    −softplus(a_y − r)]``: softplus keeps ``log(1 − ε) ≈ −ε`` when one side holds nearly all the mass, where a
    log-softmax of ``[a_y, r]`` rounds it to 0 in float32 and loses TCKD's leading term.
    """
    a_y, a_rest = _split_target(a, labels)
    d = torch.logsumexp(a_rest, dim=1) - a_y
    log_b = torch.stack([-F.softplus(d), -F.softplus(-d)], dim=1)
    return log_b, a_rest.log_softmax(dim=1)


def dkd_terms(
    s_logits: torch.Tensor, t_logits: torch.Tensor, labels: torch.Tensor, T: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """DKD's two parts (Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022, Eq. 7:
    ``KD = TCKD + (1 − p_t,y)·NCKD`` per sample), each ``T² · mean_rows KL(teacher ‖ student)``.

    - TCKD: KL of the binary target / non-target vectors ``b = [p_y, 1 − p_y]``, ``p = softmax(z / T)``;
    - NCKD: KL of the softmax over the K − 1 non-target classes ``q = softmax(z_{k≠y} / T)``.

    mdistiller (distillers/DKD.py) takes ``log`` of the summed student probabilities, which is +inf once
    the student's non-target (or target) mass underflows, and masks the target with −1000
    before the softmax for NCKD. Here both come from log-sum-exps and the target entry is left out of
    NCKD exactly: the same values to float32 rounding wherever mdistiller's are finite (its −1000 mask is
    exact unless the teacher's target logit / T leads by ~900), and finite where it returns inf.

    Args:
        s_logits, t_logits: (n, K) student and teacher logits, K >= 2; labels: (n,) int64.
        T: temperature.
    Returns:
        ``(tckd, nckd)``, two scalars.
    """
    log_b_s, log_q_s = _binary_and_rest(s_logits / T, labels)
    log_b_t, log_q_t = _binary_and_rest(t_logits.detach() / T, labels)
    scale = T * T
    return _kl_rows(log_b_t, log_b_s).mean() * scale, _kl_rows(log_q_t, log_q_s).mean() * scale


def dkd_loss(
    s_logits: torch.Tensor, t_logits: torch.Tensor, labels: torch.Tensor, alpha: float, beta: float, T: float
) -> torch.Tensor:
    """DKD (Zhao et al., CVPR 2022, Eq. 8): ``alpha · TCKD + beta · NCKD`` (see :func:`dkd_terms`), without
    the epoch warm-up factor the training loss multiplies it by.

    Args:
        s_logits, t_logits: (n, K); labels: (n,) int64; alpha, beta: the two weights; T: temperature.
    Returns:
        A scalar.
    """
    tckd, nckd = dkd_terms(s_logits, t_logits, labels, T)
    return alpha * tckd + beta * nckd


def _pearson_rows(u: torch.Tensor, v: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Row-wise Pearson correlation ``⟨u − ū, v − v̄⟩ / (‖u − ū‖·‖v − v̄‖ + eps)``, shape (n,).

    The eps in the denominator (the official code's) makes a constant row correlate 0, never NaN.
    """
    u = u - u.mean(dim=1, keepdim=True)
    v = v - v.mean(dim=1, keepdim=True)
    return (u * v).sum(dim=1) / (u.norm(dim=1) * v.norm(dim=1) + eps)


def dist_terms(
    s_logits: torch.Tensor, t_logits: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """DIST's relation distances (Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS
    2022: ``d_p(u, v) = 1 − ρ_p(u, v)``, Pearson's ρ), on ``Y = softmax(z / tau)`` of each network:

    - inter-class: ``1 − mean_i ρ(Y_s[i, :], Y_t[i, :])``, each sample's row over the K classes;
    - intra-class: ``1 − mean_k ρ(Y_s[:, k], Y_t[:, k])``, each class's column over the batch (so it
      depends on which samples share the batch: recomputed per batch, also from a cache).

    Args:
        s_logits, t_logits: (n, K) student and teacher logits; tau: temperature.
    Returns:
        ``(inter, intra)``, two scalars, without the τ² of :func:`dist_loss`.
    """
    y_s = (s_logits / tau).softmax(dim=1)
    y_t = (t_logits.detach() / tau).softmax(dim=1)
    return 1 - _pearson_rows(y_s, y_t).mean(), 1 - _pearson_rows(y_s.t(), y_t.t()).mean()


def dist_loss(
    s_logits: torch.Tensor, t_logits: torch.Tensor, beta: float, gamma: float, tau: float
) -> torch.Tensor:
    """DIST (Huang et al., NeurIPS 2022): ``tau² · (beta · inter + gamma · intra)`` (:func:`dist_terms`),
    as the official code (image_classification_sota lib/models/losses/dist_kd.py) scales both terms by τ².

    Args:
        s_logits, t_logits: (n, K); beta, gamma: the inter- and intra-class weights; tau: temperature.
    Returns:
        A scalar; 0 when the student's and teacher's logits agree (up to a per-row shift).
    """
    inter, intra = dist_terms(s_logits, t_logits, tau)
    return tau * tau * (beta * inter + gamma * intra)
