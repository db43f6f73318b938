"""The training sample order: a fresh one every epoch, a pure function of (seed, epoch, rank, world size).

Before (pipeline version < 6 of the order): every rank read the same contiguous slice of a fixed shard
list every epoch, shuffled by DALI's 1,024-sample buffer in shard order, so a sample came back on the
same rank, in nearly the same place, beside nearly the same neighbours (and SSKD's contrastive task
draws its negatives from those neighbours). Now each epoch

1. permutes the shard list (seeded by (plan seed, epoch)),
2. permutes the samples inside every shard (seeded by (plan seed, epoch), one stream for all shards),
3. interleaves every 8 consecutive shards of that list in small chunks (a batch mixes several shards),
4. splits the resulting sequence among the ranks by count, exactly as DALI's sharding did
   (rank r gets positions [floor(n r / W), floor(n (r+1) / W))),

and the loader hands DALI, per rank, the list of (tar, index file) *segments* that spell out that
rank's sequence: DALI's webdataset reader reads a sample wherever an index line points, in index order,
and a tar may appear in several segments. DALI's own shuffle is off, so the order DALI produces is
exactly :func:`rank_segments` (tested against a real pipeline) and ``sskd bench shuffle`` can simulate
an ImageNet-sized layout from its manifest alone.

Every sample still comes once per epoch, ranks stay disjoint with the same counts as before, and the
views stay bit-identical per (seed, epoch, id, view): they never depended on a sample's position.
"""

from __future__ import annotations

import os
import shutil
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sskd.core.atomic import private_tempdir

ORDER_STREAM = 0x6F726472  # "ordr": apart from every other use of the seed
ORDER_VERSION = (
    2  # 2: per-epoch shard and in-shard permutations, interleaved; 1: fixed shard list + DALI's buffer
)
GROUP = (
    8  # shards read at once: consecutive shards of the permuted list are interleaved in groups of this many
)
MIN_CHUNK = 4  # samples taken from one shard before the next of its group
MAX_SEGMENTS = 16_384  # index files per rank and epoch at most (DALI opens them at pipeline build)


def chunk_size(n: int, world_size: int) -> int:
    """Samples per interleaving chunk: :data:`MIN_CHUNK`, or larger where a rank's share would need more
    than :data:`MAX_SEGMENTS` segments (ImageNet on 8 ranks: 10; on 64: 4)."""
    return max(MIN_CHUNK, -(-(n // max(1, world_size)) // MAX_SEGMENTS))


@dataclass
class Shard:
    """One shard of a split as the order sees it: its files and which of its samples are read."""

    tar: str
    idx: str
    ids: np.ndarray  # sample id of every index line, in line order
    keep: np.ndarray | None = None  # line numbers that are read (a few-shot subset); None = all
    entry: dict | None = None  # its manifest entry (what the sample check needs: ids, sha256, checksums)


def split_shards(
    folder: Path, manifest: dict[str, Any], split: str, keep_ids: np.ndarray | None = None
) -> list[Shard]:
    """The shards of ``split`` from the manifest (no index is read), restricted to ``keep_ids`` if given."""
    info = manifest["splits"][split]
    id_count = int(info.get("id_count", info["num_samples"]))
    mask = None
    if keep_ids is not None:
        mask = np.zeros(id_count, dtype=bool)
        mask[keep_ids] = True
    out = []
    for entry in info["shards"]:
        n = int(entry["samples"])
        ids = np.asarray(
            entry.get("ids") or np.arange(entry.get("first_id", 0), entry.get("first_id", 0) + n),
            dtype=np.int64,
        )
        keep = None if mask is None else np.flatnonzero(mask[ids])
        out.append(Shard(str(folder / entry["file"]), str(folder / entry["index"]), ids, keep, entry))
    return out


def epoch_sequence(
    shards: list[Shard], seed: int, epoch: int, world_size: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """The epoch's whole sequence before the rank split: ``(shard number, index line)`` per position.

    The shard list is permuted, each shard's samples are permuted, and every :data:`GROUP` consecutive
    shards are interleaved chunk by chunk (:func:`chunk_size` samples from each in turn), so a batch
    mixes several shards and a sample's neighbours come from some 10,000 samples rather than its own
    shard's ~1,250 (ImageNet)."""
    rng = np.random.default_rng([int(seed), int(epoch), ORDER_STREAM])
    perm = rng.permutation(len(shards))
    runs = []
    for s in perm:
        lines = shards[s].keep if shards[s].keep is not None else np.arange(len(shards[s].ids))
        if len(lines):
            runs.append((s, lines[rng.permutation(len(lines))]))
    if not runs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    chunk = chunk_size(sum(len(lines) for _, lines in runs), world_size)
    shard_of, line_of = [], []
    for g in range(0, len(runs), GROUP):
        group = runs[g : g + GROUP]
        # chunk k of shard j sorts by (k, j): round-robin over the group, a shard dropping out when done
        keys, shard_parts, line_parts = [], [], []
        for j, (s, lines) in enumerate(group):
            k = np.arange(len(lines)) // chunk
            keys.append(k * GROUP + j)
            shard_parts.append(np.full(len(lines), s, dtype=np.int64))
            line_parts.append(lines)
        order = np.argsort(np.concatenate(keys), kind="stable")
        shard_of.append(np.concatenate(shard_parts)[order])
        line_of.append(np.concatenate(line_parts)[order])
    return np.concatenate(shard_of), np.concatenate(line_of)


def rank_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    return (n * rank) // world_size, (n * (rank + 1)) // world_size


def rank_segments(
    shards: list[Shard], seed: int, epoch: int, rank: int, world_size: int
) -> list[tuple[int, np.ndarray]]:
    """This rank's sequence as runs of one shard: ``[(shard number, index lines in reading order), ...]``."""
    shard_of, line_of = epoch_sequence(shards, seed, epoch, world_size)
    lo, hi = rank_range(len(shard_of), rank, world_size)
    shard_of, line_of = shard_of[lo:hi], line_of[lo:hi]
    if not len(shard_of):
        return []
    cuts = np.flatnonzero(np.diff(shard_of)) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [len(shard_of)]])
    return [(int(shard_of[a]), line_of[a:b]) for a, b in zip(starts, ends)]


def eval_segments(shards: list[Shard], rank: int, world_size: int) -> list[tuple[int, np.ndarray]]:
    """What an evaluation reader of this rank reads, as :func:`rank_segments` spells it: the split's
    (kept) samples in shard order, this rank's contiguous slice (DALI's sharding by count)."""
    runs = [(s, sh.keep if sh.keep is not None else np.arange(len(sh.ids))) for s, sh in enumerate(shards)]
    lo, hi = rank_range(sum(len(lines) for _, lines in runs), rank, world_size)
    out, pos = [], 0
    for s, lines in runs:
        a, b = max(lo - pos, 0), min(hi - pos, len(lines))
        if a < b:
            out.append((s, lines[a:b]))
        pos += len(lines)
    return out


class SegmentFiles:
    """The index files of one rank's epochs (DALI's ``paths`` and ``index_paths``), in a private temporary
    folder removed with this object.

    Segment ``k`` of every epoch is written into the same file, overwritten in place and then cut to its
    new length: one small file per segment made and removed every epoch was most of an epoch's cost on a
    32-px split (create + unlink of 360 files: 0.08-0.5 s of wall time on an ext4 ``/tmp``), and so is
    opening them with truncation to zero (``"wb"``), which makes ext4 write the file back at close (its
    replace-via-truncate rule, ``auto_da_alloc``: 0.2-1 s for the same 360); overwriting and cutting took
    3-15 ms. DALI parses the index files when its reader is built (``lazy_init`` off), so rewriting them for
    the next epoch never changes what a pipeline already built reads. ``created`` counts the files made
    (a test keeps it at the largest epoch's segment count).
    """

    def __init__(self):
        self.dir = private_tempdir("sskd-order-")  # also removes those of killed processes
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.dir), True)
        self.created = 0  # files made so far; an epoch with no more segments than any before makes none

    def write(
        self, shards: list[Shard], segments: list[tuple[int, np.ndarray]]
    ) -> tuple[list[str], list[str]]:
        """Write ``segments`` (:func:`rank_segments`) as index files ``000000.idx``, ... over the last
        epoch's; returns DALI's ``paths`` and ``index_paths``. Files of a longer earlier epoch beyond
        ``len(segments)`` stay, unread (DALI is given only the paths returned)."""
        lines_of: dict[int, list[bytes]] = {}
        tars, idxs = [], []
        for k, (s, lines) in enumerate(segments):
            if s not in lines_of:
                lines_of[s] = Path(shards[s].idx).read_bytes().splitlines()[1:]
            body = b"\n".join(lines_of[s][i] for i in lines)
            path = self.dir / f"{k:06d}.idx"
            if k >= self.created:
                self.created += 1
            # no O_TRUNC (see the class docstring): write over the old bytes, then cut what is left of them
            with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as fh:
                fh.write(b"v1.2 %d\n" % len(lines) + body + b"\n")
                fh.truncate()
            tars.append(shards[s].tar)
            idxs.append(str(path))
        return tars, idxs

    def close(self) -> None:
        self._cleanup()
