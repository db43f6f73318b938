"""DALI index files: checking one against its tar before DALI reads it, and rebuilding it from the tar.

DALI's webdataset reader trusts its index blindly: an index copied from another shard, or one left
stale by a rewritten tar, makes it read at wrong offsets, and on garbage it can crash the process
(exit 139, no file named). :func:`check_shard` runs before any pipeline is built and costs one pass
over the index text plus a few 512-byte tar header reads per shard; :func:`reindex` rewrites missing
or stale indexes from the tars themselves (``sskd shard reindex``).

Index format (wds2idx v1.2, as the writer makes it): a header ``v1.2 <samples>``, then one line per
sample: ``<ext> <data offset> <size> <member name>`` for each of its members, in tar order.

Per-sample checksums (``{stem}.sums``, below) go further: :func:`check_lines` reads the members of the
samples about to be decoded and checks their crc32s, ids and labels, so bytes flipped inside an image
(which pass every check above and can crash DALI's decoder) are one line naming shard, sample and
member; :func:`write_sums` makes the file for a shard written before checksums existed.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from shards import format as fmt
from sskd.core import atomic
from sskd.core.atomic import sha256_file
from sskd.core.errors import SSKDError

log = logging.getLogger(__name__)

BLOCK = tarfile.BLOCKSIZE
HEADER_SAMPLES = 3  # samples per shard whose tar headers are read at open (first, middle, last)
_CHECKED: dict[tuple, None] = {}  # (tar, idx, sizes, mtimes, entry) already checked in this process


def _fail(path, text: str) -> SSKDError:
    return SSKDError(
        f"{path}: {text}; rebuild the index with `sskd shard reindex {Path(path).parent}` "
        "(or check the shard with `sskd shard verify`)"
    )


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
            samples.append(
                [(tok[i], int(tok[i + 1]), int(tok[i + 2]), tok[i + 3]) for i in range(0, len(tok), 4)]
            )
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


def check_shard(
    tar: str | Path, idx: str | Path, entry: dict[str, Any] | None = None, *, lenient: bool = False
) -> None:
    """Check an index against its tar and the manifest ``entry``; raise :class:`SSKDError` naming the file.

    Checks: the header count against the lines and the manifest; sample keys are the manifest's ids
    in order; every sample has an image, ``sid`` and ``lbl`` (8 bytes each); offsets are tar blocks and
    every member lies inside the tar; the tar's size is the manifest's; and the tar headers of a few
    samples name the members the index says, with the same sizes.

    ``lenient``: a tar whose size differs from the manifest's, and members past its end (a truncated
    shard), are left to the per-sample check (:func:`check_lines`), which names each sample cut off, so
    ``data.skip_bad`` can leave those samples out; everything else is checked as before.
    """
    tar, idx = Path(tar), Path(idx)
    try:
        ts, xs = tar.stat(), idx.stat()
    except OSError as exc:
        raise SSKDError(f"{exc.filename}: missing shard file ({exc.strerror})") from exc
    key = (str(tar), str(idx), ts.st_size, ts.st_mtime_ns, xs.st_size, xs.st_mtime_ns, repr(entry), lenient)
    if key in _CHECKED:
        return
    count, samples = parse_index(idx)
    if count != len(samples):
        raise _fail(idx, f"header says {count} samples but it has {len(samples)} lines")
    if entry is not None:
        if entry.get("samples") != count:
            raise _fail(idx, f"{count} samples, the manifest says {entry.get('samples')} for {tar.name}")
        if entry.get("bytes") is not None and entry["bytes"] != ts.st_size and not lenient:
            cut = next(
                (
                    (m[0][3].split(".", 1)[0], name)
                    for m in samples
                    for _, off, size, name in m
                    if off + size > ts.st_size
                ),
                None,
            )
            where = f": it ends inside sample {cut[0]} (member {cut[1]})" if cut else ""
            raise SSKDError(
                f"{tar}: {ts.st_size} bytes, the manifest says {entry['bytes']} (replaced or truncated "
                f"shard{where}; `sskd shard verify` checks it)"
            )
    ids = None
    if entry is not None:  # a split's shards hold ids first_id.. in order; a subset shard lists its own
        ids = entry.get("ids") or range(entry.get("first_id", 0), entry.get("first_id", 0) + count)
    for i, members in enumerate(samples):
        names = {ext: (off, size, name) for ext, off, size, name in members}
        sample_key = members[0][3].split(".", 1)[0]
        if ids is not None and sample_key != fmt.sample_key(ids[i]):
            raise _fail(
                idx,
                f"line {i + 2} is sample {sample_key}, expected {fmt.sample_key(ids[i])} "
                f"(an index of another shard?)",
            )
        if (
            not any(e in names for e in fmt.IMAGE_EXTS)
            or fmt.ID_EXT not in names
            or fmt.LABEL_EXT not in names
        ):
            raise _fail(idx, f"sample {sample_key} lacks an image, {fmt.ID_EXT} or {fmt.LABEL_EXT} entry")
        for ext, (off, size, name) in names.items():
            past_end = off + size > ts.st_size and not lenient  # lenient: check_lines names the cut samples
            if off % BLOCK or off < BLOCK or past_end or not name.startswith(sample_key + "."):
                raise _fail(
                    idx,
                    f"sample {sample_key}: entry {name} ({off}+{size}) does not fit {tar.name} "
                    f"({ts.st_size} bytes)",
                )
            if ext in (fmt.ID_EXT, fmt.LABEL_EXT) and size != 8:
                raise _fail(idx, f"sample {sample_key}: {name} has {size} bytes, not 8")
    whole = [i for i, m in enumerate(samples) if all(off + size <= ts.st_size for _, off, size, _ in m)]
    picks = sorted({whole[0], whole[len(whole) // 2], whole[-1]}) if whole else []
    with open(tar, "rb") as fh:
        for i in picks[:HEADER_SAMPLES]:
            for _, off, size, name in samples[i]:
                if _tar_member(fh, off) != (name, size):
                    raise _fail(
                        idx, f"the tar has no member {name} of {size} bytes at offset {off} (stale index)"
                    )
    _CHECKED[key] = None


# Per-sample checksums -------------------------------------------------------------------------------
#
# ``{stem}.sums`` beside each tar (listed in the manifest's shard entry as ``sums`` with its ``sums_sha256``
# by writers that make it; for older folders ``sskd shard reindex`` adds it beside the tar)::
#
#     sskd-sums v1 <samples> <sha256 of the tar> <crc32 of the lines below, 8 hex digits>
#     <key> <ext>:<crc32> <ext>:<crc32> ...        one line per sample, members in the index's order
#
# A pure function of the tar's bytes (and the index's member order, which is the tar's), so it is
# deterministic and rebuilding it from an intact tar gives the same bytes. The loader checks every
# sample a rank reads against it before DALI decodes anything (:func:`check_lines`): bytes flipped inside
# an image pass every structural check, and on such bytes DALI's decoders can crash the process.

SUMS_MAGIC = "sskd-sums"
SUMS_VERSION = 1
SUMS_SUFFIX = ".sums"
_VERIFIED: dict[
    tuple, np.ndarray
] = {}  # per shard (files and their stat): which index lines passed check_lines
_VERIFIED_MAX = 1 << 16  # shards remembered at most (one bool per sample each)
_WHOLE: dict[
    tuple, dict
] = {}  # shards without checksums: {} if the tar's sha256 is the manifest's, else what is bad
_WHOLE_BAD = -1  # key of _WHOLE's entry for a damaged tar in which no image fails to decode


def sums_path(tar: str | Path) -> Path:
    """Where the checksums of ``tar`` lie: ``{stem}.sums`` beside it."""
    return Path(tar).with_suffix(SUMS_SUFFIX)


def sums_line(key: str, parts) -> str:
    """The checksum line of one sample: its key, then ``ext:crc32`` of each ``(ext, bytes)`` member."""
    return key + " " + " ".join(f"{ext}:{zlib.crc32(data):08x}" for ext, data in parts)


def sums_bytes(lines: list[str], tar_sha256: str) -> bytes:
    """A whole checksum file from its sample lines and the sha256 of the tar they describe."""
    body = "".join(line + "\n" for line in lines).encode("ascii")
    return f"{SUMS_MAGIC} v{SUMS_VERSION} {len(lines)} {tar_sha256} {zlib.crc32(body):08x}\n".encode() + body


def _sums_fail(path: Path, text: str) -> SSKDError:
    return SSKDError(
        f"{path}: {text}; rebuild it from the intact tar with `sskd shard reindex {path.parent}`"
    )


def write_sums(tar: str | Path, idx: str | Path, sha256: str | None = None) -> Path:
    """Write ``{stem}.sums`` for ``tar`` (members located by its index ``idx``); returns its path.

    ``sha256``: the tar's sha256 from the manifest; if given and the tar differs, nothing is written (the
    checksums would vouch for damaged bytes) and :class:`SSKDError` says so. Byte-identical to what the
    shard writer made for an intact tar."""
    tar, idx = Path(tar), Path(idx)
    digest = sha256_file(tar)
    if sha256 is not None and digest != sha256:
        raise SSKDError(
            f"{tar}: sha256 differs from the manifest (corrupted or replaced): no checksums are made "
            "from it; re-shard it (`sskd shard verify` names the damage)"
        )
    _, samples = parse_index(idx)
    size = tar.stat().st_size
    lines = []
    with open(tar, "rb") as fh:
        for members in samples:
            parts = []
            for ext, off, n, name in members:
                if off + n > size:
                    raise SSKDError(f"{tar}: member {name} lies past the end of the file (truncated shard)")
                fh.seek(off)
                parts.append((ext, fh.read(n)))
            lines.append(sums_line(members[0][3].split(".", 1)[0], parts))
    path = sums_path(tar)
    atomic.write_bytes(path, sums_bytes(lines, digest))
    return path


class Sums:
    """The checksum file of one shard, checked against the index and the manifest entry at load; lines
    are parsed when a sample is checked."""

    def __init__(self, path: Path, lines: list[str]):
        self.path, self.lines = path, lines

    def of(self, line: int) -> dict[str, int]:
        out = {}
        for tok in self.lines[line].split()[1:]:
            ext, _, crc = tok.partition(":")
            try:
                out[ext] = int(crc, 16)
            except ValueError:
                raise _sums_fail(self.path, f"line {line + 2} is damaged") from None
        return out


def _sums_file(tar: Path, entry: dict[str, Any] | None) -> tuple[Path, bool]:
    """The checksum file of ``tar`` and whether the manifest lists it (else: the one beside it, if any)."""
    listed = entry.get("sums") if entry else None
    if listed is None:
        return sums_path(tar), False
    return tar.parent / fmt.plain_name(listed, str(tar.parent / fmt.MANIFEST), f"sums of {tar.name}"), True


def load_sums(tar: str | Path, entry: dict[str, Any] | None, samples: list | None = None) -> Sums | None:
    """The checksums of ``tar``: the file its manifest ``entry`` lists (an error if missing or damaged), else
    ``{stem}.sums`` beside it if there is one, else None (a shard written before checksums).

    ``samples``: the parsed index (:func:`parse_index`), whose keys the file's lines must match."""
    tar = Path(tar)
    path, listed = _sums_file(tar, entry)
    if not path.is_file():
        if listed:
            raise _sums_fail(
                path, f"the per-sample checksums of {tar.name} that the manifest lists are missing"
            )
        return None
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise _sums_fail(path, f"unreadable ({exc.strerror or exc})") from None
    if (
        listed is not None
        and entry.get("sums_sha256")
        and hashlib.sha256(raw).hexdigest() != entry["sums_sha256"]
    ):
        raise _sums_fail(path, "sha256 differs from the manifest (damaged checksum file)")
    header, _, body = raw.partition(b"\n")
    tok = header.decode("ascii", "replace").split()
    if len(tok) != 5 or tok[0] != SUMS_MAGIC or tok[1] != f"v{SUMS_VERSION}" or not tok[2].isdigit():
        raise _sums_fail(path, "not an sskd checksum file (bad header)")
    if entry and entry.get("sha256") and tok[3] != entry["sha256"]:
        raise _sums_fail(
            path, f"made for another {tar.name} (the tar's sha256 it records is not the manifest's)"
        )
    if f"{zlib.crc32(body):08x}" != tok[4]:
        raise _sums_fail(path, "damaged (its own checksum does not match)")
    lines = body.decode("ascii", "replace").splitlines()
    if len(lines) != int(tok[2]) or (samples is not None and len(lines) != len(samples)):
        raise _sums_fail(
            path, f"{len(lines)} lines for {len(samples) if samples is not None else tok[2]} samples"
        )
    if samples is not None:
        for i, (line, members) in enumerate(zip(lines, samples)):
            if line.split(" ", 1)[0] != members[0][3].split(".", 1)[0]:
                raise _sums_fail(
                    path,
                    f"line {i + 2} is sample {line.split(' ', 1)[0]}, the index says "
                    f"{members[0][3].split('.', 1)[0]}",
                )
    return Sums(path, lines)


def sums_state(tar: str | Path, idx: str | Path, entry: dict[str, Any] | None = None) -> str:
    """``ok``, ``missing`` or why the checksum file of a shard cannot be used (what `reindex` reports)."""
    try:
        _, samples = parse_index(idx)
        return "ok" if load_sums(tar, entry, samples) is not None else "missing"
    except SSKDError as exc:
        return str(exc).split(": ", 1)[-1].split(";", 1)[0]


def _sample_problem(
    mv, size: int, members, sample_id: int, want: dict[str, int] | None, num_classes: int | None
) -> str | None:
    """What is wrong with one sample's members (None: nothing): cut off, id or label not what they must be,
    bytes not their recorded checksum."""
    values = {}
    for ext, off, n, name in members:
        if off + n > size:
            return (
                f"member {name} is cut off (it ends at byte {off + n}, the file has {size}: truncated shard)"
            )
        if ext in (fmt.ID_EXT, fmt.LABEL_EXT):
            values[ext] = int.from_bytes(mv[off : off + n], "little", signed=True)
        elif ext == fmt.CLS_EXT:
            values[ext] = bytes(mv[off : off + n])
    names = {ext: name for ext, _, _, name in members}
    if values.get(fmt.ID_EXT, sample_id) != sample_id:
        return (
            f"id {values[fmt.ID_EXT]} in member {names[fmt.ID_EXT]}, but the sample is {sample_id} (its key and "
            "the manifest's order): a rewritten sample id"
        )
    label = values.get(fmt.LABEL_EXT)
    if label is not None and num_classes is not None and not 0 <= label < num_classes:
        return f"label {label} outside 0..{num_classes - 1} (member {names[fmt.LABEL_EXT]})"
    cls = values.get(fmt.CLS_EXT)
    if cls is not None and label is not None and cls.strip() != str(label).encode():
        return (
            f"label {label} in member {names[fmt.LABEL_EXT]}, but {names[fmt.CLS_EXT]} says "
            f"{cls[:20].decode('ascii', 'replace')!r}"
        )
    if want is not None:
        if set(want) != set(names):
            return f"members {sorted(names)} are not the ones its checksums list ({sorted(want)})"
        for ext, off, n, name in members:
            if zlib.crc32(mv[off : off + n]) != want[ext]:
                return f"member {name} differs from its recorded checksum (corrupted bytes)"
    return None


class LineCheck:
    """What :func:`check_lines` found in one shard: ``problems`` as ``(index line, one-line message)`` and
    whether the shard has checksums (``summed``; without them only cut-off members, ids and labels are
    checked)."""

    def __init__(self, problems: list[tuple[int, str]], summed: bool):
        self.problems, self.summed = problems, summed


def check_lines(
    tar: str | Path,
    idx: str | Path,
    entry: dict[str, Any] | None,
    lines=None,
    *,
    num_classes: int | None = None,
) -> LineCheck:
    """Check the samples at index ``lines`` (all if None) of one shard, reading their members where the
    index says: each member inside the file, ``sid`` = the sample's id (its key, the manifest's order),
    ``lbl`` in 0..K-1 and equal to ``cls``, and every member's crc32 equal to the recorded one.

    A shard written before checksums (no ``.sums``) is checked as a whole instead, once: its sha256
    against the manifest's. If it differs, the images PIL cannot decode are named; a sample that PIL
    decodes in a shard where none fails is reported as unverifiable (DALI must not decode damaged bytes:
    on some it crashes the process).

    Samples that passed are remembered for this process (per shard, while its files are unchanged), so a
    sample is read for checking at most once. Call :func:`check_shard` first (it checks the index itself)."""
    tar, idx = Path(tar), Path(idx)
    spath, _ = _sums_file(tar, entry)
    try:
        ts, xs = tar.stat(), idx.stat()
    except OSError as exc:
        raise SSKDError(f"{exc.filename}: missing shard file ({exc.strerror})") from exc
    try:
        ss = spath.stat()
    except OSError:
        ss = None
    vkey = (
        str(tar),
        str(idx),
        ts.st_size,
        ts.st_mtime_ns,
        xs.st_size,
        xs.st_mtime_ns,
        None if ss is None else (ss.st_size, ss.st_mtime_ns),
        repr(entry),
        num_classes,
    )
    done = _VERIFIED.get(vkey)
    if done is not None:  # checked before: only the lines not yet passed are read (no index parsed if none)
        todo = [int(i) for i in (range(len(done)) if lines is None else lines) if not done[int(i)]]
        if not todo:
            return LineCheck([], ss is not None)
    _, samples = parse_index(idx)
    sums = load_sums(tar, entry, samples)
    if done is None or len(done) != len(samples):
        done = np.zeros(len(samples), dtype=bool)
    todo = [int(i) for i in (range(len(samples)) if lines is None else lines) if not done[int(i)]]
    if not todo:
        return LineCheck([], sums is not None)
    first = entry.get("first_id", 0) if entry else None
    ids = (entry.get("ids") or range(first, first + len(samples))) if entry else None
    problems = []
    size = ts.st_size
    with open(tar, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        try:
            with memoryview(mm if mm is not None else b"") as mv:
                damaged = None  # no checksums: {line: why} of a tar whose sha256 is not the manifest's
                if sums is None and entry and entry.get("sha256"):
                    damaged = _WHOLE.get(vkey)
                    if damaged is None:
                        damaged = (
                            {}
                            if hashlib.sha256(mv).hexdigest() == entry["sha256"]
                            else _damage(mv, size, samples, ids, num_classes)
                        )
                        _WHOLE[vkey] = damaged
                for i in todo:
                    key = samples[i][0][3].split(".", 1)[0]
                    sample_id = int(ids[i]) if ids is not None else int(key)
                    bad = _sample_problem(
                        mv, size, samples[i], sample_id, sums.of(i) if sums else None, num_classes
                    )
                    if bad is None and damaged is not None and (i in damaged or _WHOLE_BAD in damaged):
                        bad = damaged.get(i) or (
                            "unverifiable: the shard's sha256 differs from the manifest, it has "
                            "no per-sample checksums and no image in it fails to decode"
                        )
                    if bad is None:
                        done[i] = True
                    else:
                        problems.append((i, f"{tar}: sample {key}: {bad}"))
        finally:
            if mm is not None:
                mm.close()
    if len(_VERIFIED) >= _VERIFIED_MAX:
        _VERIFIED.clear()
        _WHOLE.clear()
    _VERIFIED[vkey] = done
    return LineCheck(problems, sums is not None)


def _damage(mv, size: int, samples, ids, num_classes: int | None) -> dict:
    """A damaged shard without checksums: ``{line: why}`` of its samples with a wrong id or label, or an
    image PIL cannot decode; ``{_WHOLE_BAD: True}`` if none (the damage is where PIL does not mind)."""
    import io

    from PIL import Image

    out = {}
    for i, members in enumerate(samples):
        sample_id = int(ids[i]) if ids is not None else int(members[0][3].split(".", 1)[0])
        bad = _sample_problem(mv, size, members, sample_id, None, num_classes)
        if bad is not None:
            out[i] = bad
            continue
        for ext, off, n, name in members:
            if ext not in fmt.IMAGE_EXTS or off + n > size:
                continue
            try:
                with Image.open(io.BytesIO(mv[off : off + n])) as im:
                    im.load()
            except Exception as exc:  # noqa: BLE001 - whatever PIL refuses is named
                why = str(exc).split(" <_io.", 1)[0][:120]
                out[i] = (
                    f"member {name} cannot be decoded ({type(exc).__name__}: {why}); the shard's sha256 differs "
                    "from the manifest and it has no per-sample checksums"
                )
    return out or {_WHOLE_BAD: True}


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
    for _split, info in manifest["splits"].items():
        for entry in info["shards"]:
            tar, idx = fmt.shard_paths(folder, entry)  # plain names inside the folder (load_manifest checked)
            if not tar.is_file():
                raise SSKDError(f"{tar}: shard listed in the manifest is missing (cannot index it)")
            fresh = build_index(tar)
            n = int(fresh.split(b"\n", 1)[0].split()[1])
            if n != entry["samples"]:
                raise SSKDError(
                    f"{tar}: holds {n} samples, the manifest says {entry['samples']}: the tar itself "
                    "is wrong (re-shard, or `sskd shard verify` for details)"
                )
            if idx.is_file() and idx.read_bytes() == fresh:
                status = "ok"
            else:
                status = "rebuilt (was stale)" if idx.is_file() else "rebuilt (was missing)"
                try:  # a new file renamed over the old name: a symbolic link there is replaced, never followed
                    atomic.write_bytes(idx, fresh)
                except OSError as exc:
                    raise SSKDError(f"{idx}: cannot write the index ({exc.strerror or exc})") from None
            done[idx.name] = status
            log_line(f"{status:<22} {idx.name}")
            _reindex_sums(tar, idx, entry, log_line)
    return done


def _reindex_sums(tar: Path, idx: Path, entry: dict[str, Any], log_line) -> None:
    """reindex: add (or rebuild) the per-sample checksums of a shard, from the tar only if its sha256 is the
    manifest's; the manifest is not touched (runs and caches bound to it stay valid)."""
    state = sums_state(tar, idx, entry)
    if state == "ok":
        return
    try:
        path = write_sums(tar, idx, sha256=entry.get("sha256"))
    except SSKDError as exc:  # a damaged tar: no checksums vouch for it; the loader checks it whole instead
        log.warning("%s", exc)
        log_line(f"{'checksums refused':<22} {tar.name} (its sha256 differs from the manifest)")
        return
    except OSError as exc:
        raise SSKDError(f"{sums_path(tar)}: cannot write the checksums ({exc.strerror or exc})") from None
    log_line(f"{'checksums ' + ('added' if state == 'missing' else 'rebuilt'):<22} {path.name}")
