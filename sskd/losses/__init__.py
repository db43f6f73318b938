"""The loss terms of the family, as small pure functions over tensors, one module per method family.

Each docstring names the paper and the equation (or the official code) it follows; the methods in
:mod:`sskd.methods` combine them. Everything is importable from here: ``from sskd.losses import kd_loss``.
"""

from sskd.losses.crd import bank_rows, crd_scores, nce_contrast_loss
from sskd.losses.feature import (
    ab_loss,
    at_loss,
    at_loss_from_attention,
    attention_map,
    ft_factor,
    ft_loss,
    hint_loss,
    match_size,
    vid_loss,
    vid_variance,
)
from sskd.losses.hssakd import hssakd_online_terms, hssakd_student_terms, hssakd_teacher_terms, joint_labels
from sskd.losses.kdss import alignment_loss, instance_contrast, rotation_labels, rotation_loss
from sskd.losses.logit import dist_loss, dist_terms, dkd_loss, dkd_terms, standardize_logits
from sskd.losses.relation import pkt_loss, rkd_loss, rkd_terms, sp_loss
from sskd.losses.sskd import (
    SSKDLossConfig,
    contrastive_loss,
    kd_loss,
    select_rows,
    similarity_matrix,
    ss_kd_loss,
    sskd_total,
    target_rank,
    transformed_kd_loss,
)

__all__ = [
    "SSKDLossConfig",
    "ab_loss",
    "alignment_loss",
    "at_loss",
    "at_loss_from_attention",
    "attention_map",
    "ft_factor",
    "ft_loss",
    "hint_loss",
    "match_size",
    "vid_loss",
    "vid_variance",
    "bank_rows",
    "contrastive_loss",
    "crd_scores",
    "dist_loss",
    "dist_terms",
    "dkd_loss",
    "dkd_terms",
    "hssakd_online_terms",
    "hssakd_student_terms",
    "hssakd_teacher_terms",
    "instance_contrast",
    "joint_labels",
    "kd_loss",
    "nce_contrast_loss",
    "pkt_loss",
    "rkd_loss",
    "rkd_terms",
    "rotation_labels",
    "rotation_loss",
    "select_rows",
    "sp_loss",
    "similarity_matrix",
    "ss_kd_loss",
    "sskd_total",
    "standardize_logits",
    "target_rank",
    "transformed_kd_loss",
]
