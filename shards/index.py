"""DALI index files: checking one against its tar before DALI reads it, and rebuilding it from the tar.

DALI's webdataset reader trusts its index blindly: an index copied from another shard, or one left
stale by a rewritten tar, makes it read at wrong offsets, and on garbage it can crash the process
(exit 139, no file named). :func:`check_shard` runs before any pipeline is built and costs one pass
over the index text plus a few 512-byte tar header reads per shard; :func:`reindex` rewrites missing
or stale indexes from the tars themselves (``sskd shard reindex``).

Index format (wds2idx v1.2, as the writer makes it): a header ``v1.2 <samples>``, then one line per
sample: ``<ext> <data offset> <size> <member name>`` for each of its members, in tar order.
"""

from __future__ import annotations

import logging
import tarfile
from pathlib import Path
from typing import Any

from shards import format as fmt
from sskd import atomic
from sskd.errors import SSKDError

log = logging.getLogger(__name__)

BLOCK = tarfile.BLOCKSIZE
HEADER_SAMPLES = 3  # samples per shard whose tar headers are read at open (first, middle, last)
_CHECKED: dict[tuple, None] = {}  # (tar, idx, sizes, mtimes, entry) already checked in this process


def _fail(path, text: str) -> SSKDError:
    return SSKDError(f"{path}: {text}; rebuild the index with `sskd shard reindex {Path(path).parent}` "
                     "(or check the shard with `sskd shard verify`)")


def parse_index(idx: str | Path) -> tuple[int, list[list[tuple[str, int, int, str]]]]:
    """The header count and, per sample, its members ``(ext, offset, size, name)``."""
    idx = Path(idx)
    try:
        text = idx.read_bytes().decode("ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise SSKDError(f"{idx}: unreadable shard index ({exc})") from exc
    lines = text.splitlines()
    header = lines[0].split() if lines else []
    if len(header) != 2 or not header[0].startswith("v1") or not header[1].isdigit():
        raise _fail(idx, "not a DALI webdataset index (bad header)")
    samples = []
    for n, line in enumerate(lines[1:], 2):
        tok = line.split()
        if not tok or len(tok) % 4:
            raise _fail(idx, f"line {n} is damaged")
        try:
            samples.append([(tok[i], int(tok[i + 1]), int(tok[i + 2]), tok[i + 3]) for i in range(0, len(tok), 4)])
        except ValueError:
            raise _fail(idx, f"line {n} is damaged") from None
    return int(header[1]), samples


def _tar_member(fh, offset: int) -> tuple[str, int] | None:
    """Name and size from the USTAR header block just before a member's data, or None if there is none."""
    fh.seek(offset - BLOCK)
    block = fh.read(BLOCK)
    if len(block) < BLOCK:
        return None
    try:
        info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.TarError:
        return None
    return info.name, info.size


def check_shard(tar: str | Path, idx: str | Path, entry: dict[str, Any] | None = None) -> None:
    """Check an index against its tar and the manifest ``entry``; raise :class:`SSKDError` naming the file.

    Checks: the header count against the lines and the manifest; sample keys are the manifest's ids
    in order; every sample has an image, ``sid`` and ``lbl`` (8 bytes each); offsets are tar blocks and
    every member lies inside the tar; the tar's size is the manifest's; and the tar headers of a few
    samples name the members the index says, with the same sizes.
    """
    tar, idx = Path(tar), Path(idx)
    try:
        ts, xs = tar.stat(), idx.stat()
    except OSError as exc:
        raise SSKDError(f"{exc.filename}: missing shard file ({exc.strerror})") from exc
    key = (str(tar), str(idx), ts.st_size, ts.st_mtime_ns, xs.st_size, xs.st_mtime_ns, repr(entry))
    if key in _CHECKED:
        return
    count, samples = parse_index(idx)
    if count != len(samples):
        raise _fail(idx, f"header says {count} samples but it has {len(samples)} lines")
    if entry is not None:
        if entry.get("samples") != count:
            raise _fail(idx, f"{count} samples, the manifest says {entry.get('samples')} for {tar.name}")
        if entry.get("bytes") is not None and entry["bytes"] != ts.st_size:
            raise SSKDError(f"{tar}: {ts.st_size} bytes, the manifest says {entry['bytes']} (replaced or truncated "
                            "shard; `sskd shard verify` checks it)")
    ids = None
    if entry is not None:  # a split's shards hold ids first_id.. in order; a subset shard lists its own
        ids = entry.get("ids") or range(entry.get("first_id", 0), entry.get("first_id", 0) + count)
    for i, members in enumerate(samples):
        names = {ext: (off, size, name) for ext, off, size, name in members}
        sample_key = members[0][3].split(".", 1)[0]
        if ids is not None and sample_key != fmt.sample_key(ids[i]):
            raise _fail(idx, f"line {i + 2} is sample {sample_key}, expected {fmt.sample_key(ids[i])} "
                             f"(an index of another shard?)")
        if not any(e in names for e in fmt.IMAGE_EXTS) or fmt.ID_EXT not in names or fmt.LABEL_EXT not in names:
            raise _fail(idx, f"sample {sample_key} lacks an image, {fmt.ID_EXT} or {fmt.LABEL_EXT} entry")
        for ext, (off, size, name) in names.items():
            if off % BLOCK or off < BLOCK or off + size > ts.st_size or not name.startswith(sample_key + "."):
                raise _fail(idx, f"sample {sample_key}: entry {name} ({off}+{size}) does not fit {tar.name} "
                                 f"({ts.st_size} bytes)")
            if ext in (fmt.ID_EXT, fmt.LABEL_EXT) and size != 8:
                raise _fail(idx, f"sample {sample_key}: {name} has {size} bytes, not 8")
    picks = sorted({0, len(samples) // 2, len(samples) - 1}) if samples else []
    with open(tar, "rb") as fh:
        for i in picks[:HEADER_SAMPLES]:
            for _, off, size, name in samples[i]:
                if _tar_member(fh, off) != (name, size):
                    raise _fail(idx, f"the tar has no member {name} of {size} bytes at offset {off} (stale index)")
    _CHECKED[key] = None


def build_index(tar: str | Path) -> bytes:
    """The index of ``tar`` as the shard writer makes it, read from the tar's own headers."""
    samples: dict[str, list[str]] = {}
    try:
        with tarfile.open(tar, mode="r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, _, ext = m.name.partition(".")
                samples.setdefault(key, []).append(f"{ext} {m.offset_data} {m.size} {m.name}")
    except (OSError, tarfile.TarError) as exc:
        raise SSKDError(f"{tar}: unreadable tar ({exc}); the shard itself is damaged: re-shard it") from exc
    lines = [" ".join(parts) for parts in samples.values()]
    return (f"v1.2 {len(lines)}\n" + "\n".join(lines) + "\n").encode()


def reindex(folder: str | Path, log_line=print) -> dict[str, str]:
    """Rebuild every missing or stale index of a shard folder; returns ``{index file: what was done}``."""
    folder = Path(folder)
    manifest = fmt.load_manifest(folder)
    done: dict[str, str] = {}
    for split, info in manifest["splits"].items():
        for entry in info["shards"]:
            tar, idx = folder / entry["file"], folder / entry["index"]
            if not tar.is_file():
                raise SSKDError(f"{tar}: shard listed in the manifest is missing (cannot index it)")
            fresh = build_index(tar)
            n = int(fresh.split(b"\n", 1)[0].split()[1])
            if n != entry["samples"]:
                raise SSKDError(f"{tar}: holds {n} samples, the manifest says {entry['samples']}: the tar itself "
                                "is wrong (re-shard, or `sskd shard verify` for details)")
            if idx.is_file() and idx.read_bytes() == fresh:
                status = "ok"
            else:
                status = "rebuilt (was stale)" if idx.is_file() else "rebuilt (was missing)"
                atomic.write_bytes(idx, fresh)
            done[idx.name] = status
            log_line(f"{status:<22} {idx.name}")
    return done
