"""SSKD's self-supervised pretext tasks (the paper's Table 2), selected by ``sskd.pretext``.

The paper (Sec. 2 and 4.1, Table 2) compares four pretext tasks for the teacher's auxiliary module and
the knowledge the student mimics; it adopts contrastive prediction (SimCLR) and reports, for
vgg13 → vgg8, students of 74.57 (Exemplar), 74.85 (Jigsaw), 75.01 (Rotation) and 75.48 % (Contrastive),
in the order of the tasks' own linear-evaluation quality. Here each task is one :class:`Pretext`: the
views it needs (``data.views: auto`` picks them), the width of the SS head on the pooled feature, and
its *predictions* — a score matrix ``(M, C)`` with the target column of each row — from the head's
outputs ``z`` (b, V, e):

=============  ===========================  ======================  ==========================================
task           views (auto)                 head                    predictions (rows × columns, target)
=============  ===========================  ======================  ==========================================
contrastive    ``rotation`` (rot90/180/270)  MLP d → d → d          cosine of each SS view with every normal
                                                                    view of the batch (Eq. 4), own image
exemplar       ``paper`` (the four heavy    MLP d → d → d          scaled dot product of each SS view with the
               transforms)                                          batch's normal views, own image
rotation       ``rotation``                 MLP d → d → 4          every view's quarter turns (0 for view 0)
jigsaw         ``jigsaw`` (3 tiled crops)   MLP d → d → 24         each SS view's tile order (0..23)
=============  ===========================  ======================  ==========================================

The teacher's head learns its task on the frozen backbone (``train-ss-head --method sskd``: contrastive
with Eq. 5's InfoNCE at ``head_tau``, the others with cross-entropy); the student, with its own head of
the same kind, mimics the teacher's predictions row by row (``KL`` at ``ss_T`` over the rows selective
transfer keeps, Eq. 6 and Sec. 3.3), beside the same CE, KD and transformed-view KD terms (Eq. 8).
The rotation and jigsaw labels come with the batch (``rotation_label``, ``jigsaw_label``: recomputed
from the augmentation plan by :class:`pipelines.ViewLoader`, so they always match the pixels).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

from sskd.core.errors import SSKDError
from sskd.core.registry import Registry
from sskd.losses import contrastive_loss, similarity_matrix

PRETEXTS = Registry("pretext task")
DEFAULT = "contrastive"
CLASSES = {"rotation": 4, "jigsaw": 24}  # classification heads' widths (None: an embedding of width d)


def register_pretext(name: str):
    def deco(cls):
        cls.name = name
        PRETEXTS.register(name)(cls())
        return cls

    return deco


def get_pretext(name: str) -> Pretext:
    return PRETEXTS.get(name)


def head_width(pretext: str, feat_dim: int) -> int:
    """Output width of the SS head for ``pretext`` on a backbone with pooled feature width ``feat_dim``."""
    return CLASSES.get(pretext, feat_dim)


def own_image_targets(b: int, v: int, device) -> torch.Tensor:
    """Column of each transformed-view row: rows are ordered (image, view) for views 1..v-1."""
    return repeat(torch.arange(b, device=device), "b -> (b v)", v=v - 1)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return rearrange(t[:, 1:], "b v x -> (b v) x")


class Pretext:
    """One pretext task (see the module docstring)."""

    name: ClassVar[str] = ""
    views: ClassVar[str] = "rotation"  # the views ``data.views: auto`` resolves to
    label: ClassVar[str | None] = None  # the view label kind it classifies (a batch key ``<label>_label``)

    def check_views(self, names: tuple[str, ...]) -> None:
        """Refuse a view set the task cannot use (one line)."""

    def predictions(
        self, z: torch.Tensor, batch: dict[str, Any], gather=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Score rows and their targets from the SS head's outputs ``z`` (b, V, e).

        Args:
            gather: the method's all-gather of rows across ranks, for the tasks whose columns are the
                batch's normal views (``--global-ss-batch``); None: this rank's batch.
        Returns:
            scores (M, C), target (M,) int64.
        """
        raise NotImplementedError

    def head_loss(self, scores: torch.Tensor, target: torch.Tensor, cfg) -> torch.Tensor:
        """The teacher head's training loss on its predictions (default: cross-entropy)."""
        return F.cross_entropy(scores, target)


class _InstanceTask(Pretext):
    """Each image of the batch is its own class; columns are the batch's normal views."""

    def scores(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def predictions(self, z, batch, gather=None):
        b, v = z.shape[:2]
        cols, offset = z[:, 0], 0
        if gather is not None:
            cols, offset = gather(cols)
        return self.scores(_rows(z), cols), own_image_targets(b, v, z.device) + offset


@register_pretext("contrastive")
class Contrastive(_InstanceTask):
    """SimCLR-style contrastive prediction, the paper's choice (Sec. 3.1, Eq. 4-5): the cosine similarity
    of each transformed view's embedding with every normal view's; the positive is its own image."""

    views = "rotation"

    def scores(self, rows, cols):
        return similarity_matrix(rows, cols)

    def head_loss(self, scores, target, cfg):
        return contrastive_loss(scores, target, cfg.head_tau)


@register_pretext("exemplar")
class Exemplar(_InstanceTask):
    """Exemplar (Dosovitskiy et al., 2014; the paper's Table 2): heavy transformations of each image, and
    every image with all the views generated from it treated as one class of its own, learnt by a
    classifier. Here the classes are the images of the batch and the classifier's weight rows are the
    head outputs of their normal views (the exemplars): the scores of a transformed view are the scaled
    dot products ``z_view · z_normalᵀ / sqrt(e)`` and the head learns them with cross-entropy.

    How it differs from contrastive: it is classification, not a contrast of normalised embeddings —
    no cosine normalisation and no temperature (the scores' scale, hence the confidence of the
    predictions the student mimics, is learnt through the embeddings' norms, where contrastive prediction
    fixes it by ``head_tau``) — and its views are the heavy transformations (auto: the paper's four,
    colour drop, rotation, crop+resize, colour distortion), where contrastive prediction here defaults
    to the official code's rotations."""

    views = "paper"

    def scores(self, rows, cols):
        return rows @ cols.t() / math.sqrt(rows.shape[1])


class _LabelTask(Pretext):
    """Classification of a label every view carries (quarter turns, tile order)."""

    skip_normal: ClassVar[bool] = False  # classify views 1.. only

    def check_views(self, names):
        from pipelines.view_registry import get_view

        missing = [n for n in names[1:] if self.label not in get_view(n).labels]
        if missing:
            raise SSKDError(
                f"sskd.pretext {self.name}: view {missing[0]} carries no {self.label} label; use views "
                f"that do (--views {self.views}, or leave --views out)"
            )

    def predictions(self, z, batch, gather=None):
        key = f"{self.label}_label"
        if key not in batch:
            raise SSKDError(
                f"sskd.pretext {self.name}: the batch carries no {key} (none of its views has a "
                f"{self.label} label)"
            )
        labels = batch[key].to(z.device)
        if self.skip_normal:
            z, labels = z[:, 1:], labels[:, 1:]
        rows, target = rearrange(z, "b v c -> (b v) c"), rearrange(labels, "b v -> (b v)")
        keep = target >= 0
        return rows[keep], target[keep]


@register_pretext("rotation")
class RotationPrediction(_LabelTask):
    """Rotation prediction (Gidaris et al., ICLR 2018): 4-way classification of each view's rotation,
    0°, 90°, 180°, 270°, over all views (view 0 is the unrotated one)."""

    views = "rotation"
    label = "rotation"


@register_pretext("jigsaw")
class JigsawPuzzle(_LabelTask):
    """Jigsaw (Noroozi & Favaro, ECCV 2016), on 2 x 2 tiles: 24-way classification of the order in which
    each jigsaw view's tiles were put back (``pipelines.view_registry.PERMUTATIONS``); the whole
    reassembled image goes through the backbone. View 0 (the normal view, for CE and KD) is not a puzzle."""

    views = "jigsaw"
    label = "jigsaw"
    skip_normal = True


def teacher_pretext(info: dict[str, Any]) -> str:
    """The pretext task a teacher run's SS head was trained for (its ``model.json``)."""
    return (info.get("wrapper_args") or {}).get("pretext", DEFAULT)


def check_teacher_pretext(info: dict[str, Any], source: str, pretext: str) -> None:
    """A student distilling pretext X needs a teacher whose head learnt X; one line otherwise."""
    have = teacher_pretext(info)
    if have != pretext:
        raise SSKDError(
            f"--teacher {source}: its SS head was trained for the {have} pretext task, not sskd.pretext "
            f"{pretext}; pass --set sskd.pretext={have}, or train a {pretext} head with `sskd "
            f"train-ss-head --method sskd --set sskd.pretext={pretext} ...`"
        )
