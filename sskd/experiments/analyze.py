"""Analyses of trained runs: how close a student is to its teacher, what its features look like, and
what SSKD's selective transfer keeps (``sskd analyze similarity | tsne | selection``).

The measures are pure functions of arrays (:func:`linear_cka`, :func:`class_kl`) or of one batch of
teacher outputs (:func:`selection_batch`); :func:`collect` runs models over a loader and gathers their
logits and penultimate features through the models' ``model(x, features=True)`` interface only.

- **KL** (Table 6 of the SSKD paper): ``mean_i KL(p_teacher,i || p_student,i)`` with
  ``p = softmax(logits)`` at temperature 1, in nats (natural log).
- **Linear CKA** (Kornblith et al., ICML 2019, Eq. 5 with a linear kernel): for feature matrices
  ``X`` (n×d1) and ``Y`` (n×d2) with column means removed,
  ``CKA = ||Yᵀ X||²_F / (||Xᵀ X||_F · ||Yᵀ Y||_F)``; 1 for identical features, invariant to orthogonal
  transforms and isotropic scaling of either side, and defined for different widths.
- **Selective transfer** (Sec. 3.3): on the teacher's similarity matrix of each training batch
  (:func:`sskd.losses.similarity_matrix`), the share of transformed rows whose positive ranks first
  (the teacher's SS accuracy) and the share :func:`sskd.losses.select_rows` keeps at the keep ratio.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sskd.core.errors import SSKDError

# -- measures on arrays -----------------------------------------------------------------------------


def _as_float64(a: Any, name: str) -> np.ndarray:
    if hasattr(a, "detach"):  # a torch tensor
        a = a.detach().float().cpu().numpy()
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim != 2:
        raise SSKDError(f"{name}: expected a 2-D matrix (samples x dims), got shape {arr.shape}")
    return arr


def linear_cka(x: Any, y: Any) -> float:
    """Linear CKA of two feature matrices with the same rows (samples) and any widths.

    ``CKA(X, Y) = ||Ycᵀ Xc||²_F / (||Xcᵀ Xc||_F ||Ycᵀ Yc||_F)`` with ``Xc``, ``Yc`` the column-centred
    matrices (the centred-HSIC form of Kornblith et al. 2019 with linear kernels), computed in float64.

    Args:
        x: (n, d1) array or tensor; y: (n, d2).
    Returns:
        CKA in [0, 1]; NaN when either side is constant over the samples (its HSIC is 0).
    """
    x, y = _as_float64(x, "x"), _as_float64(y, "y")
    if x.shape[0] != y.shape[0]:
        raise SSKDError(f"linear_cka: x has {x.shape[0]} rows but y has {y.shape[0]}")
    x = x - x.mean(axis=0, keepdims=True)
    y = y - y.mean(axis=0, keepdims=True)
    cross = np.linalg.norm(y.T @ x, "fro") ** 2
    norm = np.linalg.norm(x.T @ x, "fro") * np.linalg.norm(y.T @ y, "fro")
    if norm == 0:
        return float("nan")
    return float(cross / norm)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def class_kl(t_logits: Any, s_logits: Any) -> float:
    """``mean_i KL(p_t,i || p_s,i)`` over samples, ``p = softmax(logits)`` at temperature 1, in nats.

    Args:
        t_logits: (n, K) teacher logits; s_logits: (n, K) student logits of the same samples.
    Returns:
        The mean KL divergence (0 for identical logits), computed in float64.
    """
    t, s = _as_float64(t_logits, "t_logits"), _as_float64(s_logits, "s_logits")
    if t.shape != s.shape:
        raise SSKDError(f"class_kl: teacher logits {t.shape} and student logits {s.shape} differ in shape")
    log_t, log_s = _log_softmax(t), _log_softmax(s)
    return float((np.exp(log_t) * (log_t - log_s)).sum(axis=1).mean())


# -- running models over a loader -------------------------------------------------------------------


@dataclass
class Collected:
    """What :func:`collect` gathers for one model, rows in loader order (the same for every model)."""

    logits: np.ndarray  # (n, K) float32
    feat: np.ndarray  # (n, d) penultimate pooled features, float32
    label: np.ndarray  # (n,) int64
    id: np.ndarray  # (n,) int64 sample ids

    @property
    def count(self) -> int:
        return len(self.label)


def _bar(iterable: Iterable, total: int | None, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(
        iterable, total=total, desc=desc, unit="batch", disable=not progress, dynamic_ncols=True, leave=False
    )


def collect(models: Any, loader, *, device: Any = None, progress: bool = False, desc: str = "analyze"):
    """Run each model over ``loader`` (epoch 0, view 0) and gather logits and features.

    Every model sees the same batches in one pass, so rows line up across models. Models are read only
    through ``model(x, features=True)`` (a :class:`sskd.models.base.Features`, whose ``.logits`` and
    ``.feat`` are used); a wrapped teacher (SS head, branches) answers with its backbone's.

    Args:
        models: one ``nn.Module`` or a sequence of them (put in eval mode here).
        loader: a :class:`pipelines.ViewLoader` (or any object with ``epoch(0)`` and ``len``).
        device: where batches go before the models see them (None: as the loader yields them).
        progress: show a tqdm bar over batches.
    Returns:
        A :class:`Collected` for one model, a list of them for a sequence.
    """
    import torch

    single = isinstance(models, torch.nn.Module)
    group: Sequence[torch.nn.Module] = [models] if single else list(models)
    for m in group:
        m.eval()
    parts: list[dict[str, list]] = [{"logits": [], "feat": []} for _ in group]
    labels, ids = [], []
    with torch.no_grad():
        for batch in _bar(loader.epoch(0), len(loader), desc, progress):
            x = batch["views"][:, 0]
            if device is not None:
                x = x.to(device)
            x = x.float()
            for m, out in zip(group, parts):
                f = m(x, features=True)
                out["logits"].append(f.logits.float().cpu().numpy())
                out["feat"].append(f.feat.float().flatten(1).cpu().numpy())
            labels.append(batch["label"].cpu().numpy())
            ids.append(batch["id"].cpu().numpy())
    if not labels:
        raise SSKDError("collect: the loader yielded no batches")
    label, sid = np.concatenate(labels).astype(np.int64), np.concatenate(ids).astype(np.int64)
    result = [Collected(np.concatenate(p["logits"]), np.concatenate(p["feat"]), label, sid) for p in parts]
    return result[0] if single else result


def similarity(teacher: Collected, student: Collected) -> dict[str, float]:
    """Table 6's two measures of teacher-student closeness on the same samples: ``{"kl", "cka"}``.

    ``kl``: :func:`class_kl` of the logits (teacher first); ``cka``: :func:`linear_cka` of the features.
    """
    if not np.array_equal(teacher.id, student.id):
        raise SSKDError("similarity: teacher and student rows are not the same samples")
    return {"kl": class_kl(teacher.logits, student.logits), "cka": linear_cka(teacher.feat, student.feat)}


# -- t-SNE -------------------------------------------------------------------------------------------


def subsample(n: int, max_samples: int | None, seed: int) -> np.ndarray:
    """Sorted row indices: all ``n`` rows, or ``max_samples`` of them drawn without replacement by ``seed``."""
    if max_samples is None or max_samples >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_samples, replace=False))


def tsne_embed(feat: np.ndarray, seed: int = 0, perplexity: float = 30.0) -> tuple[np.ndarray, float]:
    """scikit-learn's TSNE of ``feat`` (n, d) to 2-D with a fixed ``random_state``; PCA init.

    The perplexity is capped below the number of samples (TSNE requires it). Returns the (n, 2) embedding
    and the fit's ``kl_divergence_``.
    """
    from sklearn.manifold import TSNE

    n = len(feat)
    if n < 3:
        raise SSKDError(f"t-SNE needs at least 3 samples, got {n}")
    tsne = TSNE(n_components=2, perplexity=min(perplexity, (n - 1) / 3), init="pca", random_state=seed)
    emb = tsne.fit_transform(np.asarray(feat, dtype=np.float32))
    return emb, float(tsne.kl_divergence_)


def plot_tsne(
    path: str | Path, emb: np.ndarray, labels: np.ndarray, classes: Sequence[str], title: str
) -> None:
    """A scatter of the 2-D embedding coloured by class, with a legend; PNG written atomically (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sskd.core.atomic import atomic_path

    k = len(classes)
    cmap = plt.get_cmap("tab10" if k <= 10 else "tab20" if k <= 20 else "turbo")
    colours = [cmap(i if k <= 20 else i / max(1, k - 1)) for i in range(k)]
    ncol = max(1, -(-k // 25))
    fig, ax = plt.subplots(figsize=(7 + 1.6 * ncol, 6.5))
    for c in range(k):
        rows = labels == c
        if rows.any():
            ax.scatter(
                emb[rows, 0],
                emb[rows, 1],
                s=8,
                color=colours[c],
                label=str(classes[c]),
                alpha=0.8,
                linewidths=0,
            )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    ax.legend(
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        ncol=ncol,
        fontsize=7,
        markerscale=2,
        frameon=False,
        title="class",
        title_fontsize=8,
    )
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


# -- selective transfer ------------------------------------------------------------------------------


def selection_batch(embed: Any, keep_ratio: float) -> dict[str, Any]:
    """What SSKD's L_ss sees of one batch: per transformed view, rows ranked right and rows kept.

    Builds the teacher's similarity matrix exactly as :class:`sskd.methods.sskd.SSKD` does (rows: the
    transformed views ordered (image, view); columns: the normal views; ``similarity_matrix``), ranks
    each row's positive (:func:`sskd.losses.target_rank`, ties by column) and keeps rows with
    :func:`sskd.losses.select_rows` at ``keep_ratio``.

    Args:
        embed: (b, v, d) teacher SS embeddings, view 0 the normal view.
        keep_ratio: the share of wrongly ranked rows to keep (``sskd.ss_ratio``).
    Returns:
        ``{"rows", "correct", "kept"}``: each a (v - 1,) int64 array of counts per transformed view.
    """
    import torch
    from einops import rearrange

    from sskd.losses import select_rows, similarity_matrix, target_rank
    from sskd.methods.sskd import ss_targets

    embed = torch.as_tensor(embed).float()
    b, v = embed.shape[:2]
    if v < 2:
        raise SSKDError("selection: the views have no transformed view (only the normal view)")
    sim = similarity_matrix(rearrange(embed[:, 1:], "b v d -> (b v) d"), embed[:, 0])
    target = ss_targets(b, v, embed.device)
    correct = rearrange(target_rank(sim, target) == 0, "(b v) -> b v", b=b)
    kept = rearrange(select_rows(sim, target, keep_ratio), "(b v) -> b v", b=b)
    return {
        "rows": np.full(v - 1, b, dtype=np.int64),
        "correct": correct.sum(0).cpu().numpy().astype(np.int64),
        "kept": kept.sum(0).cpu().numpy().astype(np.int64),
    }


def selection(
    teacher,
    loader,
    keep_ratio: float,
    *,
    device: Any = None,
    max_batches: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """SS accuracy and selective-transfer keep share of an SS teacher over a training loader's epoch 0.

    The teacher's outputs come from SSKD's own :meth:`sskd.methods.sskd.SSKD.teacher_outputs` (what
    distillation computes live), and each batch goes through :func:`selection_batch`.

    Args:
        teacher: an SS model (backbone + SS head), put in eval mode here.
        loader: a training :class:`pipelines.ViewLoader` with the SS views.
        keep_ratio: ``sskd.ss_ratio``.
        max_batches: stop after this many batches (None: the whole epoch).
    Returns:
        ``{"view_names", "views": {name: {"rows", "ss_acc", "keep"}}, "overall": {...}, "batches", "count"}``
        (``view_names``: the transformed views in loader order) with the
        shares in [0, 1] (``ss_acc``: positive ranked first; ``keep``: kept by ``select_rows``).
    """
    import torch

    from sskd.methods import method_class

    outputs = method_class("student", "sskd").teacher_outputs
    names = list(loader.view_names[1:])
    rows = correct = kept = np.zeros(len(names), dtype=np.int64)
    batches = count = 0
    total = len(loader) if max_batches is None else min(len(loader), max_batches)
    teacher.eval()
    with torch.no_grad():
        for batch in _bar(loader.epoch(0), total, "selection", progress):
            if max_batches is not None and batches >= max_batches:
                break
            views = batch["views"]
            if device is not None:
                views = views.to(device)
            got = selection_batch(outputs(teacher, views.float())["embed"].float(), keep_ratio)
            rows, correct, kept = rows + got["rows"], correct + got["correct"], kept + got["kept"]
            batches += 1
            count += views.shape[0]
    if not batches:
        raise SSKDError("selection: the loader yielded no batches")

    def shares(r, c, k) -> dict[str, Any]:
        return {"rows": int(r), "ss_acc": float(c / r), "keep": float(k / r)}

    return {
        "view_names": names,
        "views": {n: shares(r, c, k) for n, r, c, k in zip(names, rows, correct, kept)},
        "overall": shares(rows.sum(), correct.sum(), kept.sum()),
        "batches": batches,
        "count": count,
    }
