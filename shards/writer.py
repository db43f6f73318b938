"""Write a :class:`shards.sources.Source` as webdataset tars + DALI indexes + manifest.

Guarantees:
- deterministic: the same input and seed give byte-identical shards whatever ``workers`` (items are
  shuffled with the seed before ids are given; tar headers carry no time or owner);
- nothing half-written looks complete: a shard is written under a temporary name and renamed with its
  index once complete; ``OUT/.progress.json`` records finished shards; the manifest is written last;
- ``resume=True`` keeps finished shards (checked by sha256) and continues after them;
- a bad item stops the run with a one-line error naming the file, or with ``skip_bad`` is skipped and
  listed in the manifest. Never a silently short dataset.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import io
import json
import logging
import math
import multiprocessing as mp
import os
import re
import shutil
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shards import format as fmt
from shards.index import sums_bytes, sums_line, sums_path
from shards.sources import BadItem, Source
from sskd import __version__
from sskd.core import atomic
from sskd.core.atomic import sha256_file
from sskd.core.errors import SSKDError
from sskd.core.lock import LOCK_NAME, FolderLock

log = logging.getLogger(__name__)
PROGRESS = ".progress.json"
LISTING = ".source-listing.json.gz"  # what an unfinished run is made from (see _source_changes)
ASIDE = ".replaced"  # --overwrite: the earlier shards, kept here until the new run has its manifest
_SHARD_FILE = re.compile(r"^[A-Za-z0-9_]+-\d{6}\.[A-Za-z0-9]+$")  # train-000003.tar, .idx, ...
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
    overwrite: bool = False  # replace a folder's shards (finished or not); set aside until the new run ends


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
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
        len(data),
        0,
        0o644,
        0,
        0,
        "",
        "",
    )
    offset = tar.offset + tarfile.BLOCKSIZE  # USTAR: one 512-byte header block per member
    tar.addfile(info, io.BytesIO(data))
    return offset, len(data)


class ShardBuilder:
    """Accumulates samples of one shard in memory-light form and writes tar + idx + per-sample checksums
    (``{stem}.sums``, :mod:`shards.index`) atomically, the tar last."""

    def __init__(self, out: Path, split: str, number: int, first_id: int):
        self.out, self.split, self.number, self.first_id = out, split, number, first_id
        self.stem = fmt.shard_name(split, number)
        self.tar_tmp = atomic.tmp_name(out / f"{self.stem}.tar")
        # O_NOFOLLOW: a symbolic link planted at the temporary name is refused (ELOOP), never written through
        flags = (
            os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        )
        self.fh = os.fdopen(os.open(self.tar_tmp, flags, 0o666), "wb")
        self.tar = tarfile.open(fileobj=self.fh, mode="w", format=tarfile.USTAR_FORMAT)
        self.lines: list[str] = []
        self.sums: list[
            str
        ] = []  # per-sample checksum lines (shards.index: the loader checks them before decoding)
        self.count = 0

    def add(self, sample_id: int, label: int, image: bytes, ext: str, src: str) -> None:
        key = fmt.sample_key(sample_id)
        meta = json.dumps({"id": sample_id, "label": label, "src": src}, sort_keys=True).encode()
        parts = [
            (ext, image),
            (fmt.CLS_EXT, str(label).encode()),
            (fmt.ID_EXT, fmt.encode_int64(sample_id)),
            (fmt.LABEL_EXT, fmt.encode_int64(label)),
            (fmt.META_EXT, meta),
        ]
        entries = []
        for e, data in parts:
            name = f"{key}.{e}"
            offset, size = _add(self.tar, name, data)
            entries.append(f"{e} {offset} {size} {name}")
        self.lines.append(" ".join(entries))
        self.sums.append(sums_line(key, parts))
        self.count += 1

    @property
    def size(self) -> int:
        return self.tar.offset

    def finish(self) -> dict:
        self.tar.close()  # writes the end-of-archive blocks
        self.fh.close()
        tar, idx = self.out / f"{self.stem}.tar", self.out / f"{self.stem}.idx"
        digest = sha256_file(self.tar_tmp)
        sums = sums_bytes(self.sums, digest)  # beside the tar, listed in its manifest entry
        atomic.write_bytes(sums_path(tar), sums)
        atomic.write_bytes(idx, (f"v1.2 {self.count}\n" + "\n".join(self.lines) + "\n").encode())
        self.tar_tmp.replace(tar)  # last: the tar under its name says the shard is complete
        return {
            "file": tar.name,
            "index": idx.name,
            "samples": self.count,
            "first_id": self.first_id,
            "bytes": tar.stat().st_size,
            "sha256": digest,
            "sums": sums_path(tar).name,
            "sums_sha256": hashlib.sha256(sums).hexdigest(),
        }

    def abort(self) -> None:
        """Drop the unfinished shard: close (a full disk may fail the last flush: ignored) and delete it."""
        with contextlib.suppress(OSError):
            self.tar.close()
        with contextlib.suppress(OSError):
            self.fh.close()
        self.tar_tmp.unlink(missing_ok=True)


def _order(n: int, seed: int, split: str) -> np.ndarray:
    """The fixed shuffle of a split's items (DALI's reader only shuffles inside a buffer)."""
    salt = {"train": 1, "val": 2}.get(split, 3)
    return np.random.default_rng([seed, salt]).permutation(n)


def _items(
    source: Source, split: str, order: np.ndarray, start: int, workers: int
) -> Iterator[tuple[int, bytes | None, str]]:
    jobs = [(split, int(i)) for i in order[start:]]
    if workers <= 1:
        yield from map(_encode, jobs)
        return
    with mp.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(_encode, jobs, chunksize=8)


def write_shards(source: Source, out: str | Path, opts: ShardOptions | None = None) -> dict:
    """Write ``source`` into ``out``; returns the manifest (also written to ``out/manifest.json``).

    The folder is locked for the run (one writer at a time). A finished folder (one with a manifest) is
    never rewritten unless ``opts.overwrite``: ``opts.resume`` on it checks that the source and settings
    are the ones it was written with and then does nothing, or refuses naming what differs. With
    ``opts.overwrite`` the earlier shards are set aside (``OUT/.replaced``) once every check has passed,
    restored if the new run fails, and deleted when its manifest is written."""
    opts = opts or ShardOptions()
    out = Path(out)
    if opts.max_count < 1 or opts.max_size < 1:
        raise SSKDError("--max-count and --max-size must be positive")
    if opts.resume and opts.overwrite:
        raise SSKDError(
            "--resume and --overwrite exclude each other: --resume continues (or checks) the shards "
            f"in {out}, --overwrite replaces them"
        )
    progress_path = out / PROGRESS
    if out.is_symlink() and not out.is_dir() or out.exists() and not out.is_dir():
        raise SSKDError(f"{out}: exists and is not a folder")
    entries = [p for p in out.iterdir() if p.name != LOCK_NAME] if out.is_dir() else []
    finished = (out / fmt.MANIFEST).exists()
    if entries and not (opts.resume or opts.overwrite):
        if finished:
            raise SSKDError(
                f"{out}: holds finished shards ({fmt.MANIFEST}); nothing was changed (use --resume to "
                "check that they are complete, --overwrite to replace them, or choose a new folder)"
            )
        raise SSKDError(
            f"{out}: output folder is not empty (use --resume to continue an interrupted run, "
            "--overwrite to replace it, or choose a new folder)"
        )
    if opts.overwrite:
        foreign = sorted(p.name for p in entries if not _ours(p))
        if foreign:
            raise SSKDError(
                f"{out}: --overwrite replaces only the files of a shard folder, and {foreign[0]} is not "
                f"one{f' (nor {len(foreign) - 1} more)' if len(foreign) > 1 else ''}; nothing was "
                "changed: move them away or choose another folder"
            )
    atomic.check_writable_folder(out, "shard folder")  # a read-only mount, no permission
    try:
        lock = FolderLock(out, "shard folder").acquire()
    except OSError as exc:
        raise SSKDError(f"{out}: cannot write the shard folder here ({exc.strerror or exc})") from None
    state: dict = {}
    try:
        return _write(source, out, opts, progress_path, state)
    except Exception as exc:
        from sskd.core.stop import Interrupted

        # A failed --overwrite puts the earlier shards back; an interrupted one keeps both (--resume goes on)
        if not state.get("aside") or isinstance(exc, Interrupted):
            raise
        try:
            _restore_aside(out)
        except OSError as err:
            raise SSKDError(
                f"{exc}; putting the earlier shards back failed too ({err.strerror or err}): they are "
                f"in {out / ASIDE}, move them back by hand"
            ) from None
        if isinstance(exc, SSKDError):
            raise SSKDError(f"{exc} (the earlier shards of {out} were put back)") from None
        raise
    finally:
        lock.release()


def _ours(path: Path) -> bool:
    """Whether ``path`` (in a shard folder) is a file this writer makes: what --overwrite may set aside."""
    name = path.name
    return (
        name in (fmt.MANIFEST, PROGRESS, LISTING, LOCK_NAME, LOCK_NAME + ".excl", ASIDE)
        or bool(_SHARD_FILE.match(name))
        or (name.startswith(".") and name.endswith(atomic.TMP_SUFFIX))
    )


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn a failed write (disk full, file-size limit, I/O error) of ``path`` into one line naming it.

    Whatever was half-written is removed by the writer of that file (atomic temporaries, the shard's
    ``abort``); what the progress record lists stays, so ``--resume`` continues once the cause is gone."""
    try:
        yield
    except OSError as exc:
        raise _write_error(path, exc) from None


def _write_error(path: Path, exc: OSError) -> SSKDError:
    """One line for a failed write of ``path``: what failed and how to go on."""
    why = exc.strerror or str(exc)
    if exc.errno == errno.EFBIG:
        hint = "a file-size limit (ulimit -f) stops it: raise the limit, then rerun with --resume"
    elif exc.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "the disk or quota is full: free space, then rerun with --resume"
    elif exc.errno == errno.ELOOP:
        why, hint = "a symbolic link is where this file goes", "remove the link, then rerun with --resume"
    else:
        hint = "rerun with --resume once it can be written"
    return SSKDError(f"{path}: cannot write it ({why}); the finished shards are kept: {hint}")


def _read_progress(path: Path) -> dict:
    """The progress record of an interrupted run (``{}`` if there is none)."""
    if not path.is_file():
        return {}
    try:
        done = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SSKDError(
            f"{path}: unreadable progress record ({exc}); rerun with --overwrite to start over, "
            "or write to a new folder"
        ) from None
    if not isinstance(done, dict) or not isinstance(done.get("splits", {}), dict):
        raise SSKDError(
            f"{path}: not a progress record of `sskd shard`; rerun with --overwrite to start over, "
            "or write to a new folder"
        )
    return done


def _check_finished(out: Path, source: Source, opts: ShardOptions, fingerprint: dict) -> dict:
    """``--resume`` of a finished folder: its manifest if made from this source with these settings.

    Otherwise one line naming every difference; nothing in the folder is changed either way."""
    manifest = fmt.load_manifest(out)
    diffs = []
    if manifest["dataset"] != source.dataset:
        diffs.append(f"dataset {manifest['dataset']} then, {source.dataset} now")
    if manifest.get("seed") != opts.seed:
        diffs.append(f"--seed {manifest.get('seed')} then, {opts.seed} now")
    settings = manifest.get("settings")
    if isinstance(settings, dict):
        # A setting counts where it changes the output: a limit no shard reached under either value (the
        # library's 1 GB --max-size and the CLI's 100 MB on 11 MB of digits) or --skip-bad where nothing
        # was skipped makes the same shards.
        entries = [e for info in manifest["splits"].values() for e in info["shards"]]
        reached = {
            "max_count": max((e["samples"] for e in entries), default=0),
            "max_size": max((e.get("bytes", math.inf) for e in entries), default=0),
        }
        skipped = any(info.get("skipped") for info in manifest["splits"].values())
        shown = {
            "max_count": ("--max-count", str),
            "max_size": ("--max-size", lambda v: f"{v / 1e6:g} MB"),
            "skip_bad": ("--skip-bad", lambda v: "on" if v else "off"),
        }
        for key, (flag, text) in shown.items():
            then, now = settings.get(key), getattr(opts, key)
            if then == now:
                continue
            if key in reached and fmt._is_int(then) and reached[key] < min(then, now):
                continue
            if key == "skip_bad" and isinstance(then, bool) and not skipped:
                continue
            diffs.append(f"{flag} {text(then) if then is not None else '?'} then, {text(now)} now")
        before = settings.get("source") if isinstance(settings.get("source"), dict) else {}
        for split in sorted(set(before) | set(fingerprint)):
            a, b = before.get(split), fingerprint.get(split)
            if a == b:
                continue
            if not isinstance(a, dict) or b is None:
                diffs.append(
                    f"the source has {'no' if b is None else 'a'} {split} split now, "
                    f"{'one' if b is None else 'none'} then"
                )
            elif a.get("count") != b["count"]:
                diffs.append(f"the source's {split} split has {b['count']} items now, {a.get('count')} then")
            else:
                diffs.append(
                    f"the source's {split} split has other items now (as many, {b['count']}, but other "
                    "files, labels or contents)"
                )
    else:  # written before the settings were recorded: compare what the manifest tells
        for split in sorted(set(manifest["splits"]) | set(source.splits)):
            info, items = manifest["splits"].get(split), source.splits.get(split)
            if info is None or items is None:
                diffs.append(
                    f"the source has {'no' if items is None else 'a'} {split} split now, "
                    f"{'one' if items is None else 'none'} then"
                )
                continue
            skipped = [s for s in info.get("skipped", []) if isinstance(s, dict)]
            then = info["num_samples"] + len(skipped) - len(items.skipped)
            if then != len(items.paths):
                diffs.append(f"the source's {split} split has {len(items.paths)} items now, {then} then")
            largest = max((e["samples"] for e in info["shards"]), default=0)
            if largest > opts.max_count:
                diffs.append(f"--max-count {opts.max_count} now, but a {split} shard holds {largest} samples")
    if diffs:
        raise SSKDError(
            f"{out}: holds finished shards ({fmt.MANIFEST}) made from another source or with other "
            f"settings ({'; '.join(diffs)}); nothing was changed: shard into a new folder, or use "
            "--overwrite to replace them"
        )
    # leftovers of a run stopped just after it wrote its manifest
    (out / PROGRESS).unlink(missing_ok=True)
    (out / LISTING).unlink(missing_ok=True)
    _drop_aside(out)
    n = sum(info["num_samples"] for info in manifest["splits"].values())
    log.debug("%s: already complete (%d samples, same source and settings); nothing to do", out, n)
    return manifest


def _set_aside(out: Path) -> bool:
    """--overwrite: move the folder's earlier shard files into ``OUT/.replaced``; whether any were there.

    The manifest goes first, so the folder stops looking complete at once. If ``.replaced`` is already
    there (an --overwrite run was stopped), it keeps the earlier finished shards and what lies beside
    it is that stopped run's partial output, which is deleted."""
    aside = out / ASIDE
    if aside.is_symlink() or aside.exists() and not aside.is_dir():
        raise SSKDError(f"{aside}: not a folder this writer made (a link or a file); remove it, then rerun")
    mine = sorted(
        (p for p in out.iterdir() if _ours(p) and p.name not in (LOCK_NAME, LOCK_NAME + ".excl", ASIDE)),
        key=lambda p: p.name != fmt.MANIFEST,
    )
    if aside.is_dir():
        if (out / fmt.MANIFEST).exists():  # stale: the run that replaced them had finished
            shutil.rmtree(aside)
        else:
            for p in mine:
                _remove(p)
            return True
    if not mine:
        return False
    aside.mkdir()
    for p in mine:
        os.replace(p, aside / p.name)
    return True


def _restore_aside(out: Path) -> None:
    """Undo :func:`_set_aside` after a failed run: delete its files, put the earlier ones back."""
    aside = out / ASIDE
    if not aside.is_dir() or aside.is_symlink():
        return
    for p in out.iterdir():
        if _ours(p) and p.name not in (LOCK_NAME, LOCK_NAME + ".excl", ASIDE):
            _remove(p)
    for p in sorted(aside.iterdir(), key=lambda p: p.name == fmt.MANIFEST):  # the manifest last
        os.replace(p, out / p.name)
    aside.rmdir()


def _drop_aside(out: Path) -> None:
    aside = out / ASIDE
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _write(source: Source, out: Path, opts: ShardOptions, progress_path: Path, state: dict) -> dict:
    global _SOURCE
    atomic.remove_stale_partials(out)
    done = _read_progress(progress_path) if opts.resume and not opts.overwrite else {}
    if done and done.get("options") != _opts_key(source, opts):
        raise SSKDError(
            f"{progress_path}: the interrupted run used other options ({done.get('options')}); "
            "rerun with the same ones or write to a new folder"
        )
    listings = {split: source.listing(split) for split in SPLITS if split in source.splits}
    fingerprint = {
        split: {"count": len(items), "sha256": _listing_sha256(items)} for split, items in listings.items()
    }
    if (out / fmt.MANIFEST).exists() and not opts.overwrite:  # finished: never rewritten, only checked
        return _check_finished(out, source, opts, fingerprint)
    if done.get("source") and done["source"]["splits"] != fingerprint:
        raise SSKDError(_source_changes(out, done["source"], listings, source.root))
    if opts.overwrite:  # every check has passed: the earlier shards go aside until this run has its manifest
        with _writing(out / ASIDE):
            state["aside"] = _set_aside(out)
    if not done:  # a new run records what it is made from, for a later --resume to compare
        with _writing(out / LISTING):
            atomic.write_bytes(out / LISTING, gzip.compress(json.dumps(listings).encode(), mtime=0))
    done = {
        "options": _opts_key(source, opts),
        "source": {"root": source.root, "splits": fingerprint},
        "splits": done.get("splits", {}),
    }
    _SOURCE = source
    target = progress_path  # the file being written, named if writing it fails (disk full, file-size limit)
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
            nonlocal builder, pending, total_bytes, target
            entry = builder.finish()
            entries.append(dict(entry, consumed=entry["samples"] + len(pending), skipped=pending))
            total_bytes += builder.size
            builder, pending, target = None, [], progress_path
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
                    target = out / f"{fmt.shard_name(split, len(entries))}.tar"
                    builder = ShardBuilder(out, split, len(entries), next_id)
                builder.add(next_id, items.labels[index], data, ext, path)
                next_id += 1
                if builder.count >= opts.max_count or builder.size >= opts.max_size:
                    finish()
            if builder is not None:
                finish()
            elif pending:  # bad items after the last shard: they belong to it
                if not entries:
                    raise SSKDError(
                        f"split {split!r} of {source.dataset}: every image was bad, nothing to write"
                    )
                entries[-1]["consumed"] += len(pending)
                entries[-1]["skipped"] += pending
                target = progress_path
                atomic.write_json(progress_path, done)
        except BaseException as exc:
            if builder is not None:
                builder.abort()
            if isinstance(exc, OSError):
                raise _write_error(target, exc) from None
            raise
        finally:
            bar.close()
        skipped = list(items.skipped) + [s for e in entries for s in e.get("skipped", [])]
        if not entries:
            raise SSKDError(f"split {split!r} of {source.dataset}: no images found")
        total_samples += next_id
        manifest_splits[split] = {
            "num_samples": next_id,
            "shards": [
                {
                    k: e[k]
                    for k in (
                        "file",
                        "index",
                        "samples",
                        "first_id",
                        "bytes",
                        "sha256",
                        "sums",
                        "sums_sha256",
                    )
                    if k in e
                }
                for e in entries
            ],
            "skipped": skipped,
        }
    manifest = _manifest(source, opts, manifest_splits, fingerprint)
    with _writing(out / fmt.MANIFEST):
        atomic.write_json(out / fmt.MANIFEST, manifest)
    progress_path.unlink(missing_ok=True)
    (out / LISTING).unlink(missing_ok=True)
    _drop_aside(out)  # the earlier shards an --overwrite set aside: replaced for good now
    dt = time.perf_counter() - t0
    log.info(
        "%s: %d samples in %d shards, %.1f MB, %.1f s (%.0f images/s, %.1f MB/s)",
        out,
        total_samples,
        sum(len(s["shards"]) for s in manifest_splits.values()),
        total_bytes / 1e6,
        dt,
        total_samples / max(dt, 1e-9),
        total_bytes / 1e6 / max(dt, 1e-9),
    )
    return manifest


def _opts_key(source: Source, opts: ShardOptions) -> dict:
    return {
        "dataset": source.dataset,
        "seed": opts.seed,
        "max_count": opts.max_count,
        "max_size": opts.max_size,
        "skip_bad": opts.skip_bad,
    }


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
        what = [
            f"{len(x)} {word} (e.g. {x[0]})"
            for x, word in ((added, "added"), (removed, "removed"), (changed, "changed"))
            if x
        ]
        parts.append(f"{split}: " + (", ".join(what) or "the order of its items changed"))
    moved = f"; the source was {old.get('root')}, now {root}" if old.get("root") != root else ""
    return (
        f"{out}: the source changed since the interrupted run started ({'; '.join(parts)}{moved}); resuming would "
        "mix two datasets: shard into a new folder, or restore the source"
    )


def _intact(out: Path, entry: dict) -> bool:
    try:
        tar, idx = fmt.shard_paths(
            out, entry
        )  # a progress record names plain files of the folder, or nothing
    except SSKDError:
        return False
    return tar.is_file() and idx.is_file() and sha256_file(tar) == entry["sha256"]


def _bar(opts: ShardOptions, split: str, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=f"shard {split}",
        unit="img",
        disable=not opts.progress,
        dynamic_ncols=True,
    )


def _manifest(source: Source, opts: ShardOptions, splits: dict, fingerprint: dict) -> dict:
    size = None
    if isinstance(getattr(source, "arrays", None), dict):
        shapes = {a.shape[1:3] for a in source.arrays.values() if len(a)}
        size = list(shapes.pop()) if len(shapes) == 1 else None
    return {
        "format": fmt.FORMAT_NAME,
        "version": fmt.FORMAT_VERSION,
        "dataset": source.dataset,
        "layout": source.layout,
        "classes": source.classes,
        "num_classes": len(source.classes),
        "image_ext": source.image_ext,
        "image_size": size,
        "mean": [float(m) for m in source.mean],
        "std": [float(s) for s in source.std],
        "seed": opts.seed,
        "created_by": f"sskd {__version__}",
        "splits": splits,
        # what a later `--resume` of the finished folder compares (a finished folder is never rewritten)
        "settings": {
            "max_count": opts.max_count,
            "max_size": opts.max_size,
            "skip_bad": opts.skip_bad,
            "source": fingerprint,
        },
    }


def write_digits(
    out: str | Path,
    *,
    seed: int = 0,
    val_fraction: float = 0.2,
    max_count: int = 512,
    workers: int = 1,
    resume: bool = False,
    progress: bool = True,
) -> dict:
    """Shard scikit-learn's digits (the embedded default dataset) into ``out``."""
    from shards.sources import digits_source

    opts = ShardOptions(seed=seed, max_count=max_count, workers=workers, resume=resume, progress=progress)
    return write_shards(digits_source(seed=seed, val_fraction=val_fraction), out, opts)
