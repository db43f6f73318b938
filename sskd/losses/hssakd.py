"""HSSAKD's loss terms (Yang et al., IJCAI 2021 / TNNLS 2022; the official code is winycg/HSAKD).

Logits come as (b, R, K) and branch outputs as (b, R, R·K): image-major, rotation r = r quarter turns
counter-clockwise, r = 0 the unrotated view. "Over all b·R rows" is batchmean over every row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sskd.losses.sskd import kd_loss


def joint_labels(labels: torch.Tensor, rotations: int = 4) -> torch.Tensor:
    """HSSAKD's joint class × rotation labels: (b,) → (b, R) with value ``R·y + r`` (class-major)."""
    return labels[:, None] * rotations + torch.arange(rotations, device=labels.device)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def hssakd_teacher_terms(
    logits: torch.Tensor, aux: list[torch.Tensor], labels: torch.Tensor
) -> dict[str, torch.Tensor]:
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


def hssakd_student_terms(
    s_logits: torch.Tensor,
    s_aux: list[torch.Tensor],
    t_logits: torch.Tensor,
    t_aux: list[torch.Tensor],
    labels: torch.Tensor,
    T: float = 3.0,
) -> dict[str, torch.Tensor]:
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


def hssakd_online_terms(
    logits: list[torch.Tensor], aux: list[list[torch.Tensor]], labels: torch.Tensor, T: float = 3.0
) -> dict[str, torch.Tensor]:
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
