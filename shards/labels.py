"""Every sample's label of a split, read from the shards without decoding an image.

Methods that draw other samples by class (CRD's negatives: samples of *other* classes) need the
label of every training sample before the first batch. The labels are already on disk: each sample's
8-byte little-endian ``lbl`` member (:mod:`shards.format`), whose offset in the tar the DALI index
gives. One memory-mapped gather per shard reads them all (50,000 CIFAR labels in well under a second).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shards import format as fmt
from shards.index import check_shard, parse_index
from sskd.core.errors import SSKDError

MISSING = -1  # label of an id the folder does not hold (a subset folder of ``sskd views``)


def split_labels(folder: str | Path, split: str) -> np.ndarray:
    """The label of every sample id of ``split``.

    Args:
        folder: shard folder written by ``sskd shard``.
        split: ``train`` or ``val``.

    Returns:
        int64 array ``(id_count,)``: entry ``i`` is the label of sample id ``i``. ``id_count`` is the
        split's ``num_samples`` (a subset folder: the size of the split it comes from, and ids it does
        not hold read :data:`MISSING`).

    Raises:
        SSKDError: one line naming the shard or index at fault (missing, damaged, or a label outside
            ``0..num_classes-1``).
    """
    folder = Path(folder)
    manifest = fmt.load_manifest(folder)
    tars, idxs = fmt.split_files(folder, manifest, split)
    info = manifest["splits"][split]
    count = int(info.get("id_count", info["num_samples"]))
    num_classes = int(manifest["num_classes"])
    labels = np.full(count, MISSING, dtype=np.int64)
    for entry, tar, idx in zip(info["shards"], tars, idxs):
        check_shard(tar, idx, entry)  # the index fits its tar: members, 8-byte lbl, offsets, keys = ids
        _, samples = parse_index(idx)
        ids = np.asarray(
            entry.get("ids") or range(entry.get("first_id", 0), entry.get("first_id", 0) + len(samples)),
            dtype=np.int64,
        )
        offsets = np.asarray(
            [next(off for ext, off, _, _ in members if ext == fmt.LABEL_EXT) for members in samples],
            dtype=np.int64,
        )
        if len(ids) and (ids.min() < 0 or ids.max() >= count):
            raise SSKDError(
                f"{idx}: sample ids {ids.min()}..{ids.max()} lie outside the split's 0..{count - 1}"
            )
        try:
            data = np.memmap(tar, dtype=np.uint8, mode="r")
            raw = data[offsets[:, None] + np.arange(8)] if len(offsets) else np.zeros((0, 8), np.uint8)
        except (OSError, ValueError, IndexError) as exc:
            raise SSKDError(f"{tar}: cannot read the labels its index points at ({exc})") from exc
        got = np.ascontiguousarray(raw).view("<i8").reshape(-1)
        bad = np.flatnonzero((got < 0) | (got >= num_classes))
        if len(bad):
            i = int(bad[0])
            raise SSKDError(
                f"{tar}: sample {fmt.sample_key(int(ids[i]))} has label {int(got[i])}, outside "
                f"0..{num_classes - 1} (damaged shard: `sskd shard verify {folder}`)"
            )
        labels[ids] = got
    return labels
