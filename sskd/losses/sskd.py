"""SSKD's loss terms (Sec. 3 of the paper) and the KD term every method shares, as small functions.

Equation numbers refer to Xu et al., "Knowledge Distillation Meets Self-Supervision" (ECCV 2020).
Shared steps (similarity matrix, rank-and-keep selection) are named functions, tested once. Every
KL term is ``KL(p_teacher || p_student)`` at a temperature, averaged over rows, times T².
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sskd.core.fields import bound
from sskd.losses.logit import standardize_logits

PRETEXT_TASKS = (
    "contrastive",
    "exemplar",
    "rotation",
    "jigsaw",
)  # sskd.pretext's registry (tests check they agree)


@dataclass
class SSKDLossConfig:
    """Eq. 8 weights and temperatures (the ``sskd:`` config section); defaults are the official code's
    (student.py): 0.1 / 0.9 / 2.7 / 10, T 4 / 4 / 0.5, keep ratios 0.75 (L_ss) and 1.0 (L_T)."""

    ce_weight: float = bound(0.1, ge=0)
    kd_weight: float = bound(0.9, ge=0)
    tf_weight: float = bound(2.7, ge=0)
    ss_weight: float = bound(10.0, ge=0)
    kd_T: float = bound(4.0, gt=0)
    tf_T: float = bound(4.0, gt=0)
    ss_T: float = bound(0.5, gt=0)
    ss_ratio: float = bound(0.75, gt=0, le=1)
    tf_ratio: float = bound(1.0, gt=0, le=1)
    head_tau: float = bound(
        1.0, gt=0
    )  # Eq. 5 temperature when training the teacher's SS head (official: raw cosines)
    # The self-supervised task of the SS head (the paper's Table 2, sskd/losses/pretext.py): contrastive (Eq. 4-5,
    # the paper's and official code's), exemplar (each image its own class), rotation (4-way) or jigsaw
    # (24 orders of 2 x 2 tiles); used alike by `train-ss-head --method sskd` (what the teacher's head learns)
    # and `distill --method sskd` (what the student mimics); `data.views: auto` follows it.
    pretext: str = bound("contrastive", choices=PRETEXT_TASKS)


def _kl_rows(student: torch.Tensor, teacher: torch.Tensor, T: float) -> torch.Tensor:
    """Per-row KL(softmax(teacher/T) || softmax(student/T)), shape (n,)."""
    log_p_s = F.log_softmax(student / T, dim=1)
    log_p_t = F.log_softmax(teacher / T, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float, *, standardize: bool = False
) -> torch.Tensor:
    """Eq. 2: Hinton KD, ``T² · mean_rows KL(p_t ‖ p_s)`` with ``p = softmax(logits / T)``.

    With ``standardize`` both networks' logits are Z-scored per row first (:func:`standardize_logits`,
    Sun et al., CVPR 2024: LS-KD, where ``T`` is their base temperature); off, nothing changes.

    Args:
        student_logits, teacher_logits: (n, K).
    """
    if standardize:
        student_logits = standardize_logits(student_logits)
        teacher_logits = standardize_logits(teacher_logits)
    return _kl_rows(student_logits, teacher_logits.detach(), T).mean() * T * T


def similarity_matrix(z_views: torch.Tensor, z_normal: torch.Tensor) -> torch.Tensor:
    """Eq. 4: cosine similarity of each transformed-view row with each normal-view row.

    Args:
        z_views: (M, d) SS embeddings of the transformed views.
        z_normal: (B, d) SS embeddings of the normal views.
    Returns:
        (M, B) matrix ``A[i, j] = cos(z_views[i], z_normal[j])``.
    """
    return F.normalize(z_views, dim=1) @ F.normalize(z_normal, dim=1).t()


def contrastive_loss(sim: torch.Tensor, target: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 5: ``mean_i −log softmax(sim[i] / tau)[target[i]]``; ``target[i]`` = column of row i's image.

    Args:
        sim: (M, B) similarity matrix; target: (M,) int64.
    """
    return F.cross_entropy(sim / tau, target)


def target_rank(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Position of ``target[i]`` in row i of ``scores`` sorted descending (0 = ranked first).

    Ties are broken deterministically by column index (a stable sort): a target tied with an
    earlier column ranks after it. (The official code's unstable argsort makes ties random.)

    Args:
        scores: (M, C); target: (M,) int64.
    Returns:
        (M,) int64 ranks.
    """
    order = torch.sort(scores.detach(), dim=1, descending=True, stable=True).indices
    return (order == target[:, None]).int().argmax(dim=1)


def select_rows(teacher_scores: torch.Tensor, target: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Sec. 3.3, selective transfer, as the official code does it (after its 2020-07-07 fix).

    Every row the teacher ranks correctly (rank 0) is kept, plus ``int(n_wrong * keep_ratio)`` of the
    wrong rows: those with the smallest rank (ties: the earlier row).

    Args:
        teacher_scores: (M, C) teacher logits or similarities; target: (M,) int64.
        keep_ratio: share of the wrong rows to keep, in [0, 1].
    Returns:
        (M,) bool mask of kept rows.
    """
    rank = target_rank(teacher_scores, target)
    wrong = rank > 0
    n_keep_wrong = int(int(wrong.sum()) * keep_ratio)
    keep = ~wrong
    if n_keep_wrong > 0:
        wrong_rows = torch.nonzero(wrong).flatten()
        order = torch.sort(rank[wrong_rows], stable=True).indices
        keep = keep.clone()
        keep[wrong_rows[order[:n_keep_wrong]]] = True
    return keep


def _masked_kd(student: torch.Tensor, teacher: torch.Tensor, keep: torch.Tensor, T: float) -> torch.Tensor:
    if not bool(keep.any()):
        return student.sum() * 0.0  # no kept rows: 0 with the graph intact, never NaN
    return _kl_rows(student[keep], teacher.detach()[keep], T).mean() * T * T


def ss_kd_loss(
    sim_student: torch.Tensor, sim_teacher: torch.Tensor, target: torch.Tensor, T: float, keep_ratio: float
) -> torch.Tensor:
    """Eq. 6: KL between the teacher's and the student's similarity rows over the rows kept by
    :func:`select_rows` on the teacher's matrix; mean over kept rows, × T².

    Args:
        sim_student, sim_teacher: (M, B); target: (M,) column of each row's own image.
    """
    return _masked_kd(sim_student, sim_teacher, select_rows(sim_teacher, target, keep_ratio), T)


def transformed_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    T: float,
    keep_ratio: float,
) -> torch.Tensor:
    """Eq. 7: KD on the transformed views' class scores, over the rows the same rule keeps when
    applied to the teacher's class scores (the label's rank); mean over kept rows, × T².

    Args:
        student_logits, teacher_logits: (M, K) for the transformed views; labels: (M,).
    """
    return _masked_kd(student_logits, teacher_logits, select_rows(teacher_logits, labels, keep_ratio), T)


def sskd_total(terms: dict[str, torch.Tensor], cfg: SSKDLossConfig) -> torch.Tensor:
    """Eq. 8: ``λ1 L_ce + λ2 L_kd + λ3 L_T + λ4 L_ss`` (defaults 0.1, 0.9, 2.7, 10: the official code)."""
    return (
        cfg.ce_weight * terms["ce"]
        + cfg.kd_weight * terms["kd"]
        + cfg.tf_weight * terms["tf"]
        + cfg.ss_weight * terms["ss"]
    )
