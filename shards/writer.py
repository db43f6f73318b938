"""Write a :class:`shards.sources.Source` as webdataset tars + DALI indexes + manifest.

Guarantees (DESIGN.md, invariant 5):
- deterministic: the same input and seed give byte-identical shards whatever ``workers`` (items are
  shuffled with the seed before ids are given; tar headers carry no time or owner);
- nothing half-written looks complete: a shard is written under a temporary name and renamed with its
  index once complete; ``OUT/.progress.json`` records finished shards; the manifest is written last;
- ``resume=True`` keeps finished shards (checked by sha256) and continues after them;
- a bad item stops the run with a one-line error naming the file, or with ``skip_bad`` is skipped and
  listed in the manifest. Never a silently short dataset.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import multiprocessing as mp
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shards import format as fmt
from shards.sources import BadItem, Source
from sskd import __version__, atomic
from sskd.atomic import sha256_file
from sskd.errors import SSKDError
from sskd.lock import LOCK_NAME, FolderLock

log = logging.getLogger(__name__)
PROGRESS = ".progress.json"
LISTING = ".source-listing.json.gz"  # what an unfinished run is made from (see _source_changes)
SPLITS = ("train", "val")


@dataclass
class ShardOptions:
    seed: int = 0
    max_count: int = 10_000  # samples per shard at most
    max_size: int = 1 << 30  # bytes per shard at most (~1 GB, webdataset's recommended range)
    workers: int = 1
    skip_bad: bool = False
    resume: bool = False
    progress: bool = True


_SOURCE: Source | None = None  # set in each worker by fork inheritance


def _encode(job: tuple[str, int]) -> tuple[int, bytes | None, str]:
    split, index = job
    try:
        data, ext = _SOURCE.encode(split, index)
        return index, data, ext
    except BadItem as exc:
        return index, None, str(exc)



def _add(tar: tarfile.TarFile, name: str, data: bytes) -> tuple[int, int]:
    """Add a member with a fixed header; returns (data offset, size) for the DALI index."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
    offset = tar.offset + tarfile.BLOCKSIZE  # USTAR: one 512-byte header block per member
    tar.addfile(info, io.BytesIO(data))
    return offset, len(data)


class ShardBuilder:
    """Accumulates samples of one shard in memory-light form and writes tar + idx atomically."""

    def __init__(self, out: Path, split: str, number: int, first_id: int):
        self.out, self.split, self.number, self.first_id = out, split, number, first_id
        self.stem = fmt.shard_name(split, number)
        self.tar_tmp = atomic.tmp_name(out / f"{self.stem}.tar")
        self.fh = open(self.tar_tmp, "wb")
        self.tar = tarfile.open(fileobj=self.fh, mode="w", format=tarfile.USTAR_FORMAT)
        self.lines: list[str] = []
        self.count = 0

    def add(self, sample_id: int, label: int, image: bytes, ext: str, src: str) -> None:
        key = fmt.sample_key(sample_id)
        meta = json.dumps({"id": sample_id, "label": label, "src": src}, sort_keys=True).encode()
        parts = [(ext, image), (fmt.CLS_EXT, str(label).encode()), (fmt.ID_EXT, fmt.encode_int64(sample_id)),
                 (fmt.LABEL_EXT, fmt.encode_int64(label)), (fmt.META_EXT, meta)]
        entries = []
        for e, data in parts:
            name = f"{key}.{e}"
            offset, size = _add(self.tar, name, data)
            entries.append(f"{e} {offset} {size} {name}")
        self.lines.append(" ".join(entries))
        self.count += 1

    @property
    def size(self) -> int:
        return self.tar.offset

    def finish(self) -> dict:
        self.tar.close()  # writes the end-of-archive blocks
        self.fh.close()
        tar, idx = self.out / f"{self.stem}.tar", self.out / f"{self.stem}.idx"
        atomic.write_bytes(idx, (f"v1.2 {self.count}\n" + "\n".join(self.lines) + "\n").encode())
        self.tar_tmp.replace(tar)
        return {"file": tar.name, "index": idx.name, "samples": self.count, "first_id": self.first_id,
                "bytes": tar.stat().st_size, "sha256": sha256_file(tar)}

    def abort(self) -> None:
        self.tar.close()
        self.fh.close()
        self.tar_tmp.unlink(missing_ok=True)


def _order(n: int, seed: int, split: str) -> np.ndarray:
    """The fixed shuffle of a split's items (DALI's reader only shuffles inside a buffer)."""
    salt = {"train": 1, "val": 2}.get(split, 3)
    return np.random.default_rng([seed, salt]).permutation(n)


def _items(source: Source, split: str, order: np.ndarray, start: int, workers: int) -> Iterator[tuple[int, bytes | None, str]]:
    jobs = [(split, int(i)) for i in order[start:]]
    if workers <= 1:
        yield from map(_encode, jobs)
        return
    with mp.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(_encode, jobs, chunksize=8)


def write_shards(source: Source, out: str | Path, opts: ShardOptions | None = None) -> dict:
    """Write ``source`` into ``out``; returns the manifest (also written to ``out/manifest.json``).

    The folder is locked for the run (one writer at a time)."""
    opts = opts or ShardOptions()
    out = Path(out)
    if opts.max_count < 1 or opts.max_size < 1:
        raise SSKDError("--max-count and --max-size must be positive")
    progress_path = out / PROGRESS
    if out.exists() and any(p.name != LOCK_NAME for p in out.iterdir()) and not opts.resume:
        raise SSKDError(f"{out}: output folder is not empty (use --resume to continue an interrupted run, "
                        "or choose a new folder)")
    lock = FolderLock(out, "shard folder").acquire()
    try:
        return _write(source, out, opts, progress_path)
    finally:
        lock.release()


def _write(source: Source, out: Path, opts: ShardOptions, progress_path: Path) -> dict:
    global _SOURCE
    atomic.remove_stale_partials(out)
    done = json.loads(progress_path.read_text()) if opts.resume and progress_path.is_file() else {}
    if done and done.get("options") != _opts_key(source, opts):
        raise SSKDError(f"{progress_path}: the interrupted run used other options ({done.get('options')}); "
                        "rerun with the same ones or write to a new folder")
    listings = {split: source.listing(split) for split in SPLITS if split in source.splits}
    fingerprint = {split: {"count": len(items), "sha256": _listing_sha256(items)} for split, items in listings.items()}
    if done.get("source") and done["source"]["splits"] != fingerprint:
        raise SSKDError(_source_changes(out, done["source"], listings, source.root))
    if not done:  # a new run records what it is made from, for a later --resume to compare
        atomic.write_bytes(out / LISTING, gzip.compress(json.dumps(listings).encode(), mtime=0))
    done = {"options": _opts_key(source, opts), "source": {"root": source.root, "splits": fingerprint},
            "splits": done.get("splits", {})}
    _SOURCE = source
    t0, total_bytes, total_samples = time.perf_counter(), 0, 0
    manifest_splits = {}
    for split in [s for s in SPLITS if s in source.splits]:
        entries = [e for e in done["splits"].get(split, []) if _intact(out, e)]
        done["splits"][split] = entries
        items = source.splits[split]
        order = _order(len(items.paths), opts.seed, split)
        consumed = sum(e["consumed"] for e in entries)
        next_id = sum(e["samples"] for e in entries)
        bar = _bar(opts, split, len(order), consumed)
        builder: ShardBuilder | None = None
        pending: list[dict] = []  # items skipped since the last finished shard

        def finish() -> None:
            nonlocal builder, pending, total_bytes
            entry = builder.finish()
            entries.append(dict(entry, consumed=entry["samples"] + len(pending), skipped=pending))
            total_bytes += builder.size
            builder, pending = None, []
            atomic.write_json(progress_path, done)

        try:
            for index, data, ext in _items(source, split, order, consumed, opts.workers):
                bar.update(1)
                path = items.paths[index]
                if data is None:
                    if not opts.skip_bad:
                        raise SSKDError(f"{path}: {ext} (use --skip-bad to skip bad files)")
                    pending.append({"path": path, "reason": ext})
                    continue
                if builder is None:
                    builder = ShardBuilder(out, split, len(entries), next_id)
                builder.add(next_id, items.labels[index], data, ext, path)
                next_id += 1
                if builder.count >= opts.max_count or builder.size >= opts.max_size:
                    finish()
            if builder is not None:
                finish()
            elif pending:  # bad items after the last shard: they belong to it
                if not entries:
                    raise SSKDError(f"split {split!r} of {source.dataset}: every image was bad, nothing to write")
                entries[-1]["consumed"] += len(pending)
                entries[-1]["skipped"] += pending
                atomic.write_json(progress_path, done)
        except BaseException:
            if builder is not None:
                builder.abort()
            raise
        finally:
            bar.close()
        skipped = list(items.skipped) + [s for e in entries for s in e.get("skipped", [])]
        if not entries:
            raise SSKDError(f"split {split!r} of {source.dataset}: no images found")
        total_samples += next_id
        manifest_splits[split] = {
            "num_samples": next_id,
            "shards": [{k: e[k] for k in ("file", "index", "samples", "first_id", "bytes", "sha256") if k in e}
                       for e in entries],
            "skipped": skipped,
        }
    manifest = _manifest(source, opts, manifest_splits)
    atomic.write_json(out / fmt.MANIFEST, manifest)
    progress_path.unlink(missing_ok=True)
    (out / LISTING).unlink(missing_ok=True)
    dt = time.perf_counter() - t0
    log.info("%s: %d samples in %d shards, %.1f MB, %.1f s (%.0f images/s, %.1f MB/s)", out, total_samples,
             sum(len(s["shards"]) for s in manifest_splits.values()), total_bytes / 1e6, dt,
             total_samples / max(dt, 1e-9), total_bytes / 1e6 / max(dt, 1e-9))
    return manifest


def _opts_key(source: Source, opts: ShardOptions) -> dict:
    return {"dataset": source.dataset, "seed": opts.seed, "max_count": opts.max_count, "max_size": opts.max_size,
            "skip_bad": opts.skip_bad}


def _listing_sha256(items: list) -> str:
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


def _source_changes(out: Path, old: dict, listings: dict[str, list], root: str | None) -> str:
    """One line saying how the source differs from the one the interrupted run started from."""
    try:
        before = json.loads(gzip.decompress((out / LISTING).read_bytes()))
    except (OSError, ValueError):
        before = {}
    parts = []
    for split, items in listings.items():
        was = old["splits"].get(split)
        if was and was["sha256"] == _listing_sha256(items):
            continue
        if split not in before:
            parts.append(f"{split}: {len(items)} items now, {was['count'] if was else 0} then")
            continue
        a = {name: (label, size) for name, label, size in before[split]}
        b = {name: (label, size) for name, label, size in items}
        added, removed = sorted(b.keys() - a.keys()), sorted(a.keys() - b.keys())
        changed = sorted(n for n in a.keys() & b.keys() if a[n] != b[n])
        what = [f"{len(x)} {word} (e.g. {x[0]})" for x, word in ((added, "added"), (removed, "removed"),
                                                                   (changed, "changed")) if x]
        parts.append(f"{split}: " + (", ".join(what) or "the order of its items changed"))
    moved = f"; the source was {old.get('root')}, now {root}" if old.get("root") != root else ""
    return (f"{out}: the source changed since the interrupted run started ({'; '.join(parts)}{moved}); resuming would "
            "mix two datasets: shard into a new folder, or restore the source")


def _intact(out: Path, entry: dict) -> bool:
    tar, idx = out / entry["file"], out / entry["index"]
    return tar.is_file() and idx.is_file() and sha256_file(tar) == entry["sha256"]


def _bar(opts: ShardOptions, split: str, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"shard {split}", unit="img", disable=not opts.progress,
                dynamic_ncols=True)


def _manifest(source: Source, opts: ShardOptions, splits: dict) -> dict:
    size = None
    if isinstance(getattr(source, "arrays", None), dict):
        shapes = {a.shape[1:3] for a in source.arrays.values() if len(a)}
        size = list(shapes.pop()) if len(shapes) == 1 else None
    return {
        "format": fmt.FORMAT_NAME, "version": fmt.FORMAT_VERSION, "dataset": source.dataset,
        "layout": source.layout, "classes": source.classes, "num_classes": len(source.classes),
        "image_ext": source.image_ext, "image_size": size, "mean": [float(m) for m in source.mean],
        "std": [float(s) for s in source.std], "seed": opts.seed, "created_by": f"sskd {__version__}",
        "splits": splits,
    }


def write_digits(out: str | Path, *, seed: int = 0, val_fraction: float = 0.2, max_count: int = 512,
                 workers: int = 1, resume: bool = False, progress: bool = True) -> dict:
    """Shard scikit-learn's digits (the embedded default dataset) into ``out``."""
    from shards.sources import digits_source

    opts = ShardOptions(seed=seed, max_count=max_count, workers=workers, resume=resume, progress=progress)
    return write_shards(digits_source(seed=seed, val_fraction=val_fraction), out, opts)
