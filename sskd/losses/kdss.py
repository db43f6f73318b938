"""The KDSS variant's loss terms (where its description is silent, the defaults are sskd/methods/kdss.py's).

KDSS distills a classifier with three weighted terms: the task KD, a self-supervised contrastive loss
that makes teacher and student representations consistent under augmentation, and a cosine alignment
of teacher and student features; its pretext tasks are rotation prediction and contrastive instance
discrimination. Rows come as in HSSAKD: (b, R) with rotation r = r quarter turns of one crop, r = 0 the
unrotated view, flattened image-major.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sskd.losses.sskd import kd_loss


def rotation_labels(b: int, rotations: int, device=None) -> torch.Tensor:
    """The rotation of every row of a (b, R) batch, flattened image-major: ``[0, 1, ..., R-1, 0, ...]``."""
    return torch.arange(rotations, device=device).repeat(b)


def rotation_loss(s_rot: torch.Tensor, t_rot: torch.Tensor | None, T: float = 4.0) -> dict[str, torch.Tensor]:
    """Pretext 1: both networks predict the rotation; ``CE(r_S, k) + T²·KL(r_T ‖ r_S)`` over all b·R rows.

    Args:
        s_rot: (b, R, R) the student's rotation logits; t_rot: (b, R, R) the teacher's, or None (its own
            head-training stage: CE only).
    Returns:
        ``{"rot_ce", "rot_kd"}`` (``rot_kd`` is 0 without a teacher).
    """
    b, rotations = s_rot.shape[:2]
    flat = s_rot.reshape(-1, rotations)
    ce = F.cross_entropy(flat, rotation_labels(b, rotations, s_rot.device))
    kd = kd_loss(flat, t_rot.reshape(-1, rotations), T) if t_rot is not None else flat.sum() * 0.0
    return {"rot_ce": ce, "rot_kd": kd}


def instance_contrast(queries: torch.Tensor, keys: torch.Tensor, tau: float = 0.5) -> torch.Tensor:
    """Pretext 2, contrastive instance discrimination with several positives (SupCon form).

    Every row ``(i, r)`` of ``queries`` is scored against every row of ``keys``; its positives are the
    key rows of the same image ``i``, every other image's rows are negatives. When queries and keys are
    the same tensor (one network's own views) a row is not its own candidate.
    ``L = mean_rows mean_positives −log softmax(q·k / tau)[positive]`` on L2-normalised embeddings.

    Args:
        queries, keys: (b, R, d) embeddings (normalised here).
        tau: temperature (0.5: SSKD's).
    """
    b, rotations = queries.shape[:2]
    q = F.normalize(queries.reshape(b * rotations, -1), dim=1)
    k = F.normalize(keys.reshape(b * rotations, -1), dim=1)
    logits = q @ k.t() / tau
    image = torch.arange(b, device=q.device).repeat_interleave(rotations)
    positive = image[:, None] == image[None, :]
    if queries is keys:
        self_pair = torch.eye(b * rotations, dtype=torch.bool, device=q.device)
        logits = logits.masked_fill(self_pair, float("-inf"))
        positive = positive & ~self_pair
    log_p = logits.log_softmax(dim=1).masked_fill(~positive, 0.0)
    return -(log_p.sum(dim=1) / positive.sum(dim=1)).mean()


def alignment_loss(s_feat: torch.Tensor, t_feat: torch.Tensor) -> torch.Tensor:
    """Term 3, cross-network alignment: ``mean_rows (1 − cos(P(g_S), sg(g_T)))``, in [0, 2].

    Args:
        s_feat: (n, d_T) the student's features after its projection P; t_feat: (n, d_T) the teacher's.
    """
    return (1 - F.cosine_similarity(s_feat, t_feat.detach(), dim=1)).mean()
