"""Data settings of the papers' robustness experiments: few-shot subsets and noisy labels.

Both touch only the *training* split and are pure functions of what the run records, so every rank,
every resume and every method of a sweep sees the same data:

- ``data.subset_fraction`` keeps that share of each class's training samples, chosen as the official
  code does: scikit-learn's ``StratifiedShuffleSplit(n_splits=1, train_size=fraction, random_state=0)``
  over the samples in id order. The choice does not depend on the run's seed ("for a fair comparison,
  we employ the same data for different methods", SSKD Sec. 4.3). The loader reads the subset through
  DALI index files that list only the kept samples (the tars are not copied).
- ``data.label_noise`` replaces the label of ``round(p * n)`` training samples (n = the whole training
  split, before any subset) by a different class drawn uniformly from the other K - 1 (symmetric noise
  at rate p). Which samples flip and to what is a function of (run seed, sample id) only. Validation
  labels stay clean.

Views depend on (seed, epoch, id, view), never on a sample's position, so a subset sample gets the
same views as in the full split, and a teacher cache keyed by id stays exact for it.
"""

from __future__ import annotations

import hashlib
import shutil
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from shards.index import parse_index
from sskd.core.atomic import private_tempdir
from sskd.core.errors import SSKDError

NOISE_STREAM = 0x6E6F6973  # "nois": keeps the noise's random stream apart from every other use of the seed


def subset_ids(labels: np.ndarray, fraction: float) -> np.ndarray:
    """The sample ids a few-shot run keeps: ``fraction`` of each class, stratified, sorted.

    Args:
        labels: the label of every sample id (``shards.labels.split_labels``; -1 for ids not held).
        fraction: share to keep, in (0, 1]; 1 keeps everything.
    """
    held = np.flatnonzero(labels >= 0)
    if fraction >= 1:
        return held
    from sklearn.model_selection import StratifiedShuffleSplit

    try:
        split = StratifiedShuffleSplit(n_splits=1, train_size=fraction, random_state=0)
        keep, _ = next(split.split(np.zeros(len(held)), labels[held]))
    except ValueError as exc:  # e.g. fewer kept samples than classes, or a class with one sample
        raise SSKDError(
            f"data.subset_fraction={fraction}: no stratified subset of {len(held)} samples ({exc})"
        ) from None
    return np.sort(held[keep])


def noisy_labels(
    labels: np.ndarray, rate: float, seed: int, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric label noise: ``(noisy labels by id, flipped ids sorted)``.

    ``round(rate * n)`` of the n held ids flip, each to one of the other ``num_classes - 1`` classes
    uniformly; both draws come from one generator seeded by (seed, NOISE_STREAM) over the id order,
    so the result depends only on (seed, id) for a given split.
    """
    out = labels.copy()
    held = np.flatnonzero(labels >= 0)
    if rate <= 0 or not len(held):
        return out, np.zeros(0, dtype=np.int64)
    if num_classes < 2:
        raise SSKDError("data.label_noise needs at least 2 classes")
    rng = np.random.default_rng([int(seed), NOISE_STREAM])
    order = rng.permutation(len(held))
    shift = rng.integers(1, num_classes, size=len(held))  # 1..K-1: never the true class
    pos = order[: int(round(rate * len(held)))]  # positions in ``held`` that flip
    flipped = held[pos]
    out[flipped] = (labels[flipped] + shift[pos]) % num_classes
    return out, np.sort(flipped)


def training_labels(
    labels: np.ndarray, fraction: float, rate: float, seed: int, num_classes: int
) -> np.ndarray:
    """The labels a run under these settings trains with, by id: noisy where flipped, -1 for ids outside
    the subset (what a method that reads every training label up front, CRD's sampler, must see)."""
    out, _ = noisy_labels(labels, rate, seed, num_classes)
    if fraction < 1:
        keep = np.zeros(len(labels), dtype=bool)
        keep[subset_ids(labels, fraction)] = True
        out[~keep] = -1
    return out


class SubsetIndexes:
    """DALI index files listing only the kept samples of a split's shards, in a private temporary folder
    (removed with this object): ``tars``, ``idxs`` and ``entries`` for the reader, shards left with no
    kept sample dropped."""

    def __init__(self, folder: Path, manifest: dict[str, Any], split: str, keep: np.ndarray):
        info = manifest["splits"][split]
        keep_set = np.zeros(int(info.get("id_count", info["num_samples"])), dtype=bool)
        keep_set[keep] = True
        self.dir = private_tempdir("sskd-subset-")  # also removes those of killed processes
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.dir), True)
        self.tars: list[str] = []
        self.idxs: list[str] = []
        self.entries: list[dict[str, Any]] = []
        for entry in info["shards"]:
            idx = folder / entry["index"]
            _, samples = parse_index(idx)
            first = entry.get("first_id", 0)
            ids = entry.get("ids") or range(first, first + len(samples))
            kept = [(i, m) for i, m in zip(ids, samples) if keep_set[i]]
            if not kept:
                continue
            lines = [" ".join(f"{ext} {off} {size} {name}" for ext, off, size, name in m) for _, m in kept]
            name = hashlib.sha1(str(idx).encode()).hexdigest()[:12] + "-" + idx.name
            path = self.dir / name
            path.write_text(f"v1.2 {len(lines)}\n" + "\n".join(lines) + "\n")
            self.tars.append(str(folder / entry["file"]))
            self.idxs.append(str(path))
            self.entries.append(dict(entry, samples=len(kept), ids=[int(i) for i, _ in kept]))

    @property
    def num_samples(self) -> int:
        return sum(e["samples"] for e in self.entries)

    def close(self) -> None:
        self._cleanup()


RECORD = "data.json"


def write_record(run: str | Path, loader) -> Path:
    """``RUN/data.json``: the data setting a run trained on: the subset's size per class and the flipped
    ids with their noisy labels (what a later analysis or report needs to know exactly)."""
    from sskd.core import atomic

    record: dict[str, Any] = {
        "subset_fraction": loader.subset_fraction,
        "label_noise": loader.label_noise,
        "seed": loader.seed,
        "train_samples": loader.num_samples,
    }
    if loader.kept_ids is not None:
        record["kept_ids"] = sorted(loader.kept_ids)
    if loader.label_map is not None:
        record["flipped_ids"] = loader.flipped_ids
        record["noisy_labels"] = [int(loader.label_map[i]) for i in loader.flipped_ids]
    path = Path(run) / RECORD
    atomic.write_json(path, record)
    return path


def describe(fraction: float, rate: float) -> str:
    """A short label of a data setting, for logs: ``subset 25%, label noise 40%``."""
    parts = ([f"subset {fraction:.0%}"] if fraction < 1 else []) + (
        [f"label noise {rate:.0%}"] if rate > 0 else []
    )
    return ", ".join(parts) or "full data, clean labels"


__all__ = ["subset_ids", "noisy_labels", "SubsetIndexes", "describe"]
