"""``sskd views``: the exact tensors the student sees for chosen samples, and a labelled picture of them."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from pipelines.loader import ViewLoader
from pipelines.plan import ViewConfig
from pipelines.select import subset_folder
from sskd.core.atomic import atomic_path


def render_views(
    shards: str | Path,
    epoch: int,
    ids: list[int],
    *,
    views: str | ViewConfig = "paper",
    seed: int = 0,
    size: int | None = None,
    batch_size: int = 64,
    threads: int = 2,
    split: str = "train",
    device: str = "cpu",
) -> tuple[np.ndarray, np.ndarray, np.ndarray, ViewLoader]:
    """Views of samples ``ids`` in ``epoch``: ``(ids (N,), labels (N,), views (N, V, 3, H, W) float32)``.

    The result equals what those samples get inside a full training epoch (views are keyed by id).
    """
    with tempfile.TemporaryDirectory(prefix="sskd-views-") as tmp:
        sub = subset_folder(shards, split, ids, Path(tmp) / "subset")
        loader = ViewLoader(
            sub,
            "train",
            batch_size=min(batch_size, len(ids)),
            views=views,
            seed=seed,
            threads=threads,
            size=size,
            device=device,
        )
        got_ids, labels, tensors = [], [], []
        for batch in loader.epoch(epoch):
            got_ids.append(batch["id"].cpu().numpy())
            labels.append(batch["label"].cpu().numpy())
            tensors.append(batch["views"].float().cpu().numpy())
    got = np.concatenate(got_ids)
    order = np.argsort(np.argsort(ids))  # put rows back in the order asked for
    pos = np.argsort(got)[order] if sorted(ids) == list(np.sort(got)) else np.arange(len(got))
    return got[pos], np.concatenate(labels)[pos], np.concatenate(tensors)[pos].astype(np.float32), loader


def save_grid(
    path: str | Path, ids, labels, views: np.ndarray, names, classes, mean, std, epoch: int
) -> None:
    """A row per sample, a column per view, labelled; pixels de-normalised for display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, v = views.shape[:2]
    fig, axes = plt.subplots(n, v, figsize=(1.6 * v + 0.6, 1.6 * n + 0.4), squeeze=False)
    mean_a, std_a = np.asarray(mean).reshape(3, 1, 1), np.asarray(std).reshape(3, 1, 1)
    for r in range(n):
        for c in range(v):
            img = np.clip(views[r, c] * std_a + mean_a, 0, 1).transpose(1, 2, 0)
            ax = axes[r, c]
            ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(names[c], fontsize=9)
            if c == 0:
                ax.set_ylabel(f"id {ids[r]}\n{classes[labels[r]]}", fontsize=8)
    fig.suptitle(f"views of epoch {epoch}", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
