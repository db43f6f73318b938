"""The loss terms of the family, as small functions over tensors: SSKD (Sec. 3 of the paper) and HSSAKD.

SSKD equation numbers refer to Xu et al., "Knowledge Distillation Meets Self-Supervision" (ECCV 2020).
Shared steps (similarity matrix, rank-and-keep selection) are named functions, tested once. Every
KL term is ``KL(p_teacher || p_student)`` at a temperature, averaged over rows, times T².
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sskd.config import bound


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
    head_tau: float = bound(1.0, gt=0)  # Eq. 5 temperature when training the teacher's SS head (official: raw cosines)


__all__ = ["SSKDLossConfig", "contrastive_loss", "hssakd_online_terms", "hssakd_student_terms", "hssakd_teacher_terms",
           "joint_labels", "kd_loss", "select_rows", "similarity_matrix", "ss_kd_loss", "sskd_total", "target_rank",
           "transformed_kd_loss"]


def _kl_rows(student: torch.Tensor, teacher: torch.Tensor, T: float) -> torch.Tensor:
    """Per-row KL(softmax(teacher/T) || softmax(student/T)), shape (n,)."""
    log_p_s = F.log_softmax(student / T, dim=1)
    log_p_t = F.log_softmax(teacher / T, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """Eq. 2: Hinton KD, ``T² · mean_rows KL(p_t ‖ p_s)`` with ``p = softmax(logits / T)``.

    Args:
        student_logits, teacher_logits: (n, K).
    """
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


def ss_kd_loss(sim_student: torch.Tensor, sim_teacher: torch.Tensor, target: torch.Tensor, T: float,
               keep_ratio: float) -> torch.Tensor:
    """Eq. 6: KL between the teacher's and the student's similarity rows over the rows kept by
    :func:`select_rows` on the teacher's matrix; mean over kept rows, × T².

    Args:
        sim_student, sim_teacher: (M, B); target: (M,) column of each row's own image.
    """
    return _masked_kd(sim_student, sim_teacher, select_rows(sim_teacher, target, keep_ratio), T)


def transformed_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                        T: float, keep_ratio: float) -> torch.Tensor:
    """Eq. 7: KD on the transformed views' class scores, over the rows the same rule keeps when
    applied to the teacher's class scores (the label's rank); mean over kept rows, × T².

    Args:
        student_logits, teacher_logits: (M, K) for the transformed views; labels: (M,).
    """
    return _masked_kd(student_logits, teacher_logits, select_rows(teacher_logits, labels, keep_ratio), T)


def sskd_total(terms: dict[str, torch.Tensor], cfg: SSKDLossConfig) -> torch.Tensor:
    """Eq. 8: ``λ1 L_ce + λ2 L_kd + λ3 L_T + λ4 L_ss`` (defaults 0.1, 0.9, 2.7, 10: the official code)."""
    return (cfg.ce_weight * terms["ce"] + cfg.kd_weight * terms["kd"] + cfg.tf_weight * terms["tf"]
            + cfg.ss_weight * terms["ss"])


# ---- HSSAKD (Yang et al., IJCAI 2021 / TNNLS 2022; the official code is winycg/HSAKD) ---------------------
# Logits come as (b, R, K) and branch outputs as (b, R, R·K): image-major, rotation r = r quarter turns
# counter-clockwise, r = 0 the unrotated view. "Over all b·R rows" is batchmean over every row.


def joint_labels(labels: torch.Tensor, rotations: int = 4) -> torch.Tensor:
    """HSSAKD's joint class × rotation labels: (b,) → (b, R) with value ``R·y + r`` (class-major)."""
    return labels[:, None] * rotations + torch.arange(rotations, device=labels.device)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def hssakd_teacher_terms(logits: torch.Tensor, aux: list[torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The HSSAKD teacher's loss (train_teacher_cifar.py): ``CE(logits[:, 0], y) + Σ_l CE(aux_l, R·y + r)``.

    The main classifier sees only the unrotated rows; every branch is trained on all b·R rows; all
    weights 1, no temperature.

    Args:
        logits: (b, R, K); aux: L tensors (b, R, R·K); labels: (b,).
    Returns:
        ``{"ce", "aux", "loss"}``.
    """
    rotations = logits.shape[1]
    ce = F.cross_entropy(logits[:, 0], labels)
    joint = joint_labels(labels, rotations).reshape(-1)
    aux_ce = sum(F.cross_entropy(_flat(a), joint) for a in aux)
    return {"ce": ce, "aux": aux_ce, "loss": ce + aux_ce}


def hssakd_student_terms(s_logits: torch.Tensor, s_aux: list[torch.Tensor], t_logits: torch.Tensor,
                         t_aux: list[torch.Tensor], labels: torch.Tensor, T: float = 3.0) -> dict[str, torch.Tensor]:
    """The HSSAKD student's loss (train_student_cifar.py): CE on the unrotated rows, plus T²·KL of the main
    logits over all b·R rows (rotated ones included), plus Σ_l T²·KL of branch l over all b·R rows.

    KL(teacher ‖ student), batchmean over the b·R rows; the teacher's side is detached; no CE on the
    student's branches; all weights 1 (T = 3 in the official scripts).

    Args:
        s_logits, t_logits: (b, R, K); s_aux, t_aux: L tensors (b, R, R·K) each; labels: (b,).
    Returns:
        ``{"ce", "kd", "aux", "loss"}``.
    """
    if len(s_aux) != len(t_aux):
        raise ValueError(f"student has {len(s_aux)} branches, teacher {len(t_aux)}")
    ce = F.cross_entropy(s_logits[:, 0], labels)
    kd = kd_loss(_flat(s_logits), _flat(t_logits), T)
    aux = sum(kd_loss(_flat(s), _flat(t), T) for s, t in zip(s_aux, t_aux))
    return {"ce": ce, "kd": kd, "aux": aux, "loss": ce + kd + aux}


def hssakd_online_terms(logits: list[torch.Tensor], aux: list[list[torch.Tensor]], labels: torch.Tensor,
                        T: float = 3.0) -> dict[str, torch.Tensor]:
    """HSSAKD's online mode (train_online_kd_cifar.py) for two peers trained together, no teacher.

    Each peer: CE of its main head on the unrotated rows and CE of every branch on the joint labels; plus
    symmetric T²·KLs between the main heads (all b·R rows) and between matching branches, the peer's
    side detached in every KL (:func:`kd_loss` detaches its target).

    Args:
        logits: the two peers' (b, R, K); aux: the two peers' L tensors (b, R, R·K); labels: (b,).
    Returns:
        ``{"ce", "aux_ce", "kd", "aux", "loss"}`` (ce and aux_ce summed over the peers).
    """
    (la, lb), (aa, ab) = logits, aux
    ta, tb = hssakd_teacher_terms(la, aa, labels), hssakd_teacher_terms(lb, ab, labels)
    kd = kd_loss(_flat(la), _flat(lb), T) + kd_loss(_flat(lb), _flat(la), T)
    aux_kd = sum(kd_loss(_flat(x), _flat(y), T) + kd_loss(_flat(y), _flat(x), T) for x, y in zip(aa, ab))
    terms = {"ce": ta["ce"] + tb["ce"], "aux_ce": ta["aux"] + tb["aux"], "kd": kd, "aux": aux_kd}
    return {**terms, "loss": sum(terms.values())}
