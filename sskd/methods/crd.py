"""CRD (Tian et al., ICLR 2020, "Contrastive Representation Distillation") with its memory bank, as
RepDistiller runs it (``--distill crd``): ``ce_weight · CE + kd_weight · KD_T + weight · CRD``.

Both sides' pooled penultimate features go through an embed head (Linear to ``feat_dim`` + L2
normalisation); each sample's student embedding is scored against the teacher bank's row of the
same sample (the positive, 'exact' mode) and of ``nce_k`` samples of other classes, and the other way
round; the banks then take the batch's embeddings with momentum ``nce_m``. The embed heads are
submodules, so the student's optimizer trains both (RepDistiller's ``trainable_list``).

The banks are training state, not buffers: DDP would broadcast every buffer from rank 0 on each
forward (51 MB per step for CIFAR-100). They travel in ``state_dict()`` as extra state, and every rank
applies the same update from all ranks' rows (``all_gather``), so the banks stay identical and cover
the whole dataset. The negatives of a sample are a pure function of (run seed, epoch, sample id):
a resumed run draws the same ones and ranks share no RNG state.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sskd.core.errors import SSKDError
from sskd.core.fields import bound
from sskd.losses import kd_loss
from sskd.losses.crd import bank_rows, crd_scores, nce_contrast_loss
from sskd.methods.base import BuildContext, Gather, Method, normal, register

log = logging.getLogger(__name__)

SAMPLING_TAG = 0xC7D  # keeps the negatives' random streams apart from any other use of (seed, epoch, id)


@dataclass
class CRDConfig:
    """RepDistiller's defaults (train_student.py): CRD is -r 1 -a 0 -b 0.8; CRD+KD sets kd_weight 1."""

    ce_weight: float = bound(1.0, ge=0)
    kd_weight: float = bound(0.0, ge=0)
    weight: float = bound(0.8, ge=0)  # of the CRD term (RepDistiller's -b)
    T: float = bound(4.0, gt=0)  # KD temperature
    feat_dim: int = bound(128, ge=1)  # embedding size of the heads and the banks
    nce_k: int = bound(16384, ge=1)  # negatives per sample
    nce_t: float = bound(0.07, gt=0)  # critic temperature
    nce_m: float = bound(0.5, ge=0, le=1)  # weight of a bank row's old value in its update
    mode: str = bound("exact", choices=("exact", "relax"))  # positive: the sample itself, or one of its class


class Embed(nn.Module):
    """RepDistiller's ``Embed``: Linear(dim_in, dim_out), then L2 normalisation (no eps)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x.flatten(1))
        return x / x.pow(2).sum(1, keepdim=True).pow(0.5)


class NegativeSampler:
    """Per sample: its positive and ``k`` negatives drawn from the samples of other classes (RepDistiller's
    ``CIFAR100InstanceSample``), as a pure function of (seed, epoch, id): without replacement, or, for a
    class with fewer than ``k`` samples of other classes, with replacement, as RepDistiller does
    (``replace = self.k > len(self.cls_negative[target])``; said once in the log). K is never clamped: a
    smaller K would change the loss's noise constant m·Pn.

    Args:
        labels: (N,) int64 label of every sample id (-1: an id the data does not hold).
        k: negatives per sample.
        seed: the run seed.
        mode: ``exact`` (the positive is the sample itself) or ``relax`` (a sample of its class).
        classes: class names, for the messages.

    Raises:
        SSKDError: when a class has no sample of another class at all (data of one class).
    """

    def __init__(
        self, labels: np.ndarray, k: int, seed: int, mode: str = "exact", classes: list[str] | None = None
    ):
        self.labels, self.k, self.seed, self.mode = np.asarray(labels, dtype=np.int64), k, seed, mode
        held = np.flatnonzero(self.labels >= 0)
        self.order = held[np.argsort(self.labels[held], kind="stable")]  # ids grouped by class
        self.counts = np.bincount(self.labels[held], minlength=len(classes or []))
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        pools = len(held) - self.counts
        worst = int(np.argmin(np.where(self.counts > 0, pools, np.iinfo(np.int64).max)))
        name = classes[worst] if classes and worst < len(classes) else str(worst)
        if pools[worst] < 1:
            raise SSKDError(
                f"crd: class {name!r} has no samples of other classes to draw negatives from (CRD "
                "contrasts classes: the training data needs at least two)"
            )
        # RepDistiller draws with replacement exactly where a class has fewer than k samples of other classes.
        self.replace = (self.counts > 0) & (pools < k)
        n = int(self.replace.sum())
        if n:
            few = (
                f"class {name!r} has {int(pools[worst])} samples of other classes, fewer than crd.nce_k={k}: its"
                if n == 1
                else f"{n} classes have fewer samples of other classes than crd.nce_k={k} (fewest: "
                f"class {name!r}, {int(pools[worst])}): their"
            )
            log.info("crd: %s negatives are drawn with replacement, as RepDistiller does", few)

    def draw(self, ids: np.ndarray, epoch: int) -> np.ndarray:
        """(b, k + 1) int64 sample ids: column 0 the positive, then the negatives of each sample."""
        out = np.empty((len(ids), self.k + 1), dtype=np.int64)
        for row, i in enumerate(np.asarray(ids, dtype=np.int64).tolist()):
            c = self.labels[i]
            start, n_c = self.starts[c], self.counts[c]
            rng = np.random.default_rng((SAMPLING_TAG, self.seed, epoch, i))
            # k distinct positions among the other classes' len(order) - n_c ids (the order has class c's block
            # cut out); the set is uniform, its order immaterial to the loss, so numpy need not shuffle it.
            # Fewer than k of them: k positions drawn with replacement (RepDistiller).
            j = rng.choice(len(self.order) - n_c, self.k, replace=bool(self.replace[c]), shuffle=False)
            out[row, 1:] = self.order[j + n_c * (j >= start)]
            out[row, 0] = i if self.mode == "exact" else self.order[start + rng.integers(n_c)]
        return out


def pooled_feature(model: nn.Module, x: torch.Tensor) -> Any:
    """The model's output with ``.feat`` (pooled penultimate, RepDistiller's feat[-1]) and ``.logits``:
    a plain classifier answers ``features=True``, a wrapped one (SS head, branches) returns them anyway."""
    return model(x) if getattr(model, "wrapper", None) else model(x, features=True)


def teacher_feat_dim(ctx: BuildContext, teacher: nn.Module | None, info: dict[str, Any]) -> int:
    """The teacher's pooled feature size: the live model's, else (a cached run builds no teacher) its
    ``model.json``'s, else (torchvision: no ``model.json``) that of a stand-in of its architecture."""
    if teacher is None and info.get("feat_dim"):
        return int(info["feat_dim"])
    return int(ctx.probe_teacher(teacher, info).feat_dim)


@register("student", "crd")
class CRD(Method):
    """CRD's two-sided NCE over memory banks of the whole training set, optionally with Hinton KD."""

    summary = "CRD: contrastive NCE between student and teacher embeddings over a memory bank of the dataset"
    paper = "Tian et al., ICLR 2020"  # Contrastive Representation Distillation
    section, Config = "crd", CRDConfig
    needs_teacher = True
    outputs = ("feat", "logits")  # logits only for the KD term (CRD+KD); both from one teacher pass
    topk_outputs = ("logits",)

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        *,
        cfg: Any = None,
        labels: np.ndarray | None = None,
        t_dim: int | None = None,
        n_data: int | None = None,
        seed: int = 0,
        classes: list[str] | None = None,
        all_gather: Gather | None = None,
    ):
        super().__init__(student, teacher, cfg=cfg)
        self.all_gather = all_gather  # None on one process
        if labels is None:
            raise SSKDError(
                "method 'crd' needs every training sample's label: build it with CRD.build, or pass "
                "labels=shards.labels.split_labels(SHARDS, 'train')"
            )
        t_dim = t_dim or getattr(teacher, "feat_dim", None)
        if t_dim is None:
            raise SSKDError(
                "method 'crd' without a live teacher needs t_dim (the teacher's pooled feature size)"
            )
        c = self.cfg
        self.embed_s, self.embed_t = Embed(student.feat_dim, c.feat_dim), Embed(t_dim, c.feat_dim)
        self.sampler = NegativeSampler(labels, c.nce_k, seed, c.mode, classes)
        self.n_data = int(n_data or (np.asarray(labels) >= 0).sum())  # N of Pn = 1/N and of Z
        # Banks (memory_v1: student embeddings, memory_v2: teacher's): uniform in [-s, s], s = 1/sqrt(d/3),
        # from a generator of the run seed, so every rank starts from the same banks (DDP does not sync them).
        g, s, rows = torch.Generator().manual_seed(seed), 1.0 / math.sqrt(c.feat_dim / 3), len(labels)
        self.bank_s = torch.rand(rows, c.feat_dim, generator=g).mul_(2 * s).add_(-s)
        self.bank_t = torch.rand(rows, c.feat_dim, generator=g).mul_(2 * s).add_(-s)
        self.z = [-1.0, -1.0]  # Z of the student and the teacher anchor; set on the first batch, then frozen

    @classmethod
    def build(cls, ctx: BuildContext) -> Method:
        from pipelines.settings import training_labels
        from shards.labels import split_labels

        student = cls.student_model(ctx.backbone(), ctx.num_classes)
        teacher, info = ctx.teacher_model(None, method=cls.name)
        t_dim = teacher_feat_dim(ctx, teacher, info)
        # The bank and its negatives cover the samples the run trains on, with the labels it trains with.
        d = ctx.cfg.data
        labels = training_labels(
            split_labels(d.shards, "train"),
            d.subset_fraction,
            d.label_noise,
            int(ctx.cfg.run.seed),
            ctx.num_classes,
        )
        return cls(
            student,
            teacher,
            cfg=ctx.section(cls),
            labels=labels,
            t_dim=t_dim,
            n_data=int(ctx.manifest["splits"]["train"]["num_samples"]),
            seed=int(ctx.cfg.run.seed),
            classes=ctx.manifest.get("classes"),
            all_gather=ctx.all_gather,
        )

    @staticmethod
    def teacher_outputs(teacher, views):
        out = pooled_feature(teacher, views[:, 0])
        return {"feat": out.feat[:, None], "logits": out.logits[:, None]}

    def forward(self, batch):
        ids = batch["id"]
        # The one host copy per step: negatives are drawn on the CPU (RepDistiller: in its data workers),
        # while the GPU runs the forward passes queued below.
        ids_host = ids.cpu().numpy()
        out = self.student(normal(batch), features=True)
        t = self.teacher_batch(batch)
        idx = torch.from_numpy(self.sampler.draw(ids_host, self.epoch)).to(ids.device, non_blocking=True)
        cfg = self.cfg
        with torch.autocast(out.feat.device.type, enabled=False):  # exp(<.,.>/0.07) wants fp32 dot products
            v_s, v_t = self.embed_s(out.feat.float()), self.embed_t(t["feat"][:, 0].float())
            p_s = crd_scores(self.bank_t, v_s, idx, cfg.nce_t)  # student anchor, teacher bank (out_v1)
            p_t = crd_scores(self.bank_s, v_t, idx, cfg.nce_t)  # teacher anchor, student bank (out_v2)
            if self.z[0] < 0:
                self._set_z(p_s, p_t)
            crd = nce_contrast_loss(p_s / self.z[0], self.n_data) + nce_contrast_loss(
                p_t / self.z[1], self.n_data
            )
        if self.training:
            self._update(ids, v_s, v_t)
        ce = F.cross_entropy(out.logits, batch["label"])
        kd = kd_loss(out.logits, t["logits"][:, 0], cfg.T)
        loss = cfg.ce_weight * ce + cfg.kd_weight * kd + cfg.weight * crd
        return {"loss": loss, "logits": out.logits, "ce": ce, "kd": kd, "crd": crd}

    # -- the banks: identical on every rank -----------------------------------------------------------

    def _set_z(self, p_s: torch.Tensor, p_t: torch.Tensor) -> None:
        """Z = mean score of the first batch (of all ranks' batches) x N, rounded to fp32 as RepDistiller
        keeps it (so a resumed run divides by the very same number)."""
        with torch.no_grad():
            count = torch.tensor(float(p_s.numel()), dtype=torch.float64, device=p_s.device)
            stats = torch.stack([p_s.double().sum(), p_t.double().sum(), count])[None]  # (1, 3) per rank
            if self.all_gather is not None:
                stats = self.all_gather(stats)[0]
            stats = stats.sum(0)
            self.z = (stats[:2] / stats[2] * self.n_data).float().tolist()
        log.info("crd: normalisation constants set on the first batch: Z_s %.1f, Z_t %.1f", *self.z)

    def _update(self, ids: torch.Tensor, v_s: torch.Tensor, v_t: torch.Tensor) -> None:
        """Every rank writes all ranks' rows (ids, student and teacher embeddings) of this step."""
        with torch.no_grad():
            if self.all_gather is not None:
                d = v_s.shape[1]
                rows = self.all_gather(torch.cat([ids[:, None].double(), v_s.double(), v_t.double()], 1))[0]
                ids, v_s, v_t = rows[:, 0].long(), rows[:, 1 : 1 + d].float(), rows[:, 1 + d :].float()
            m = self.cfg.nce_m
            new_s, new_t = bank_rows(self.bank_s, ids, v_s, m), bank_rows(self.bank_t, ids, v_t, m)
            self.bank_s.index_copy_(0, ids, new_s)
            self.bank_t.index_copy_(0, ids, new_t)

    def get_extra_state(self) -> torch.Tensor:
        """(2, N + 1, feat_dim) fp32: the student bank, the teacher bank, and a last row holding Z in
        column 0 (one tensor, so every reader of ``state_dict()`` sees only tensors)."""
        rows, d = self.bank_s.shape
        state = self.bank_s.new_zeros(2, rows + 1, d)
        state[0, :rows], state[1, :rows] = self.bank_s, self.bank_t
        state[:, rows, 0] = torch.tensor(self.z, dtype=state.dtype, device=state.device)
        return state

    def set_extra_state(self, state: Any) -> None:
        rows, d = self.bank_s.shape
        if not torch.is_tensor(state) or tuple(state.shape) != (2, rows + 1, d):
            have = (
                f"{state.shape[1] - 1} samples x {state.shape[2]} dims"
                if torch.is_tensor(state) and state.ndim == 3
                else "no CRD banks"
            )
            raise SSKDError(
                f"its CRD memory bank holds {have}, this run's holds {rows} samples x {d} dims "
                "(another crd.feat_dim or training split): start a new --out"
            )
        self.bank_s.copy_(state[0, :rows])
        self.bank_t.copy_(state[1, :rows])
        self.z = state[:, rows, 0].float().tolist()

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)  # the student, the embed heads and the unregistered teacher
        self.bank_s, self.bank_t = fn(self.bank_s), fn(self.bank_t)
        return self
