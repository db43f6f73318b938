"""The teacher-output cache: run the frozen teacher once, distill students without it.

Layout (keyed by sample identity, never by batch position, so a student run of any batch size and rank
layout reads it)::

    CACHE/manifest.json                               binding + shape; "complete": true only at the end
    CACHE/epoch-{e:04d}/r{rank:03d}-b{first batch:06d}.safetensors

Each chunk holds, for the samples one rank saw in a run of consecutive batches (the first one and
how many are in its metadata): ``ids`` int64 (n,) and every teacher output the method declares
(:attr:`sskd.methods.Method.outputs`), per view: SSKD's ``logits`` (n, V, K) and ``embed`` (n, V, d) —
the SS projections —, HSSAKD's ``logits`` and ``aux`` (n, V, L, 4K), KD's ``logits`` (n, 1, K), each at
the *storage level* the manifest records for it (:mod:`sskd.cache.levels`): fp16; top-K values, int16 or
int32 classes and the log-sum-exp (``<name>.topv`` / ``.topi`` / ``.lse``); 8-bit codes of class scores
(``<name>.q`` / ``.mid`` / ``.step``); top-K values and classes over an int8 code of the row (``topK-dD``);
int8 unit rows with a
per-row scale (``<name>.q`` / ``.scale``), optionally projected by a basis stored in
``CACHE/projections.safetensors``. Embeddings are stored, not batch similarity matrices, so the matrix
is recomputed for whatever batch size and rank layout the student run has. Chunks are written under a
temporary name and renamed; readers memory-map them (safetensors header → numpy memmap).

Format version 4 adds the levels (``storage`` per output, ``level`` in the binding), version 5 the top K
over a code (``topK-dD``: ``<name>.topv`` / ``.topi`` / ``.q`` / ``.scale`` and the code's basis in
``projections.safetensors``); version 3 and 4 caches are read as they are.

Integrity: every chunk carries a CRC-32 of its arrays in its metadata. A reader checks every chunk's
header and size when it opens the cache (a damaged or truncated file fails at the start, not hours
in), and each chunk's checksum the first time it reads from it; ``sskd cache --verify`` checks all.

A student run reads a cache as its teacher source (:class:`CachedTeacher`), opened from a
:class:`CacheFolder` by :func:`sskd.engine.prepare.prepare` once the run knows what the cache must have
been made from.
"""

from __future__ import annotations

import json
import logging
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sskd.core import atomic
from sskd.core.errors import SSKDError

log = logging.getLogger(__name__)

FORMAT = "sskd-teacher-cache"
# 5: top-K over a code (topK-dD); 4: storage levels; 3: the method's named outputs; 2: chunks named by
# first batch, CRC-32
VERSION = 5
READ_VERSIONS = (3, 4, 5)
MANIFEST = "manifest.json"
PROJECTIONS = "projections.safetensors"
BINDING_FIELDS = (
    "method",
    "teacher_weights_sha256",
    "shards_manifest_sha256",
    "seed",
    "views",
    "size",
    "pipeline_version",
    "device_type",
    "split",
)
_DT = {
    "F16": np.float16,
    "F32": np.float32,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
}


def epoch_dir(cache: Path, epoch: int) -> Path:
    return cache / f"epoch-{epoch:04d}"


def chunk_path(cache: Path, epoch: int, rank: int, first_batch: int) -> Path:
    return epoch_dir(cache, epoch) / f"r{rank:03d}-b{first_batch:06d}.safetensors"


def rank_chunks(cache: Path, epoch: int, rank: int) -> list[Path]:
    """One rank's chunk files of one epoch, in batch order."""
    return sorted(epoch_dir(cache, epoch).glob(f"r{rank:03d}-b*.safetensors"))


def bytes_per_sample(
    num_views: int, outputs: list[dict[str, Any]], topk: int | None = None, storage: dict | None = None
) -> int:
    """Disk per sample per epoch: every output of every view, plus the id.

    ``outputs``: ``[{"name", "shape" (per view), "topk": bool}]`` as in the cache manifest; ``storage``:
    ``{name: levels.Storage}`` (format 4); without it, format 3's fp16 or top-K with int32 classes.
    """
    if storage is not None:
        from sskd.cache.levels import bytes_per_image

        return bytes_per_image(num_views, outputs, storage)
    total = 8
    for o in outputs:
        rows = num_views * int(np.prod(o["shape"][:-1], dtype=np.int64))
        total += rows * (topk * (2 + 4) + 4 if topk and o["topk"] else o["shape"][-1] * 2)
    return total


def checksum(arrays: dict[str, np.ndarray]) -> str:
    """CRC-32 over the arrays' names and bytes in name order (fast: a bit flip anywhere changes it)."""
    crc = 0
    for name in sorted(arrays):
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(memoryview(np.ascontiguousarray(arrays[name])).cast("B"), crc)
    return f"{crc:08x}"


def teacher_arrays(
    ids: np.ndarray,
    outputs: dict[str, torch.Tensor],
    topk: int | None = None,
    topk_names: tuple[str, ...] = (),
    *,
    storage: dict | None = None,
    bases: dict[str, dict[str, np.ndarray]] | None = None,
) -> dict[str, np.ndarray]:
    """The stored form of a run of batches: ids (n,) and each output (n, V, ...) at its ``storage``
    (``{name: levels.Storage}``; without it fp16, or top-K for ``topk_names`` with ``topk``)."""
    from sskd.cache.levels import Storage, encode

    if storage is None:
        storage = {n: Storage("topk", k=topk) if topk and n in topk_names else Storage() for n in outputs}
    arrays = {"ids": np.ascontiguousarray(ids, dtype=np.int64)}
    for name, value in outputs.items():
        arrays.update(encode(name, value.float().cpu().numpy(), storage[name], (bases or {}).get(name)))
    return arrays


def write_chunk(path: Path, arrays: dict[str, np.ndarray], first_batch: int, batches: int) -> None:
    """One chunk, atomically, with its batch range and checksum in the metadata.

    A full disk or the file-size limit is one line naming the chunk; the chunks before it are kept and
    no partial chunk is left (``--resume`` goes on from there)."""
    from safetensors.numpy import save

    # One metadata key: safetensors writes several in a random order, and chunks are byte-deterministic.
    meta = {
        "sskd": json.dumps(
            {"first_batch": first_batch, "batches": batches, "crc32": checksum(arrays)}, sort_keys=True
        )
    }
    data = save(arrays, metadata=meta)  # the bytes save_file writes; written here so errors keep their errno
    try:
        atomic.write_bytes(path, data)
    except OSError as exc:
        raise SSKDError(
            atomic.write_error(
                path,
                exc,
                "cache chunk",
                kept="the chunks written before it are kept: "
                "free space, then rerun the same command with --resume",
            )
        ) from None


def _header(path: Path) -> tuple[int, dict[str, Any], int]:
    """(header length, header, file size) of a chunk, checked against the file's size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            if n > size:
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(fh.read(n))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as exc:
        raise SSKDError(f"{path}: unreadable cache chunk ({exc})") from exc
    try:
        meta = json.loads((header.get("__metadata__") or {})["sskd"])
        meta = {
            "first_batch": int(meta["first_batch"]),
            "batches": int(meta["batches"]),
            "crc32": str(meta["crc32"]),
        }
    except (KeyError, TypeError, ValueError, json.JSONDecodeError):
        raise SSKDError(
            f"{path}: cache chunk without its batch range and checksum (made by an older sskd? "
            "rebuild the cache)"
        ) from None
    header["__metadata__"] = meta
    for name, t in header.items():
        if name == "__metadata__":
            continue
        if t.get("dtype") not in _DT or 8 + n + t["data_offsets"][1] > size:
            raise SSKDError(
                f"{path}: truncated cache chunk ({size} bytes, header needs {8 + n + t['data_offsets'][1]})"
                if t.get("dtype") in _DT
                else f"{path}: unknown dtype in cache chunk"
            )
    if "ids" not in header:
        raise SSKDError(f"{path}: cache chunk has no 'ids'")
    return n, header, size


def chunk_meta(path: Path) -> dict[str, int | str]:
    """A chunk's ``first_batch``, ``batches`` and ``crc32`` (header checked, data not read)."""
    return _header(path)[1]["__metadata__"]


def map_chunk(path: Path) -> dict[str, np.ndarray]:
    """Memory-map every tensor of a chunk; a truncated or damaged file is an error naming it."""
    n, header, _ = _header(path)
    return {
        name: np.memmap(
            path,
            dtype=_DT[t["dtype"]],
            mode="r",
            offset=8 + n + t["data_offsets"][0],
            shape=tuple(t["shape"]),
        )
        for name, t in header.items()
        if name != "__metadata__"
    }


def verify_chunk(path: Path, arrays: dict[str, np.ndarray] | None = None) -> None:
    """Recompute a chunk's checksum (reads all of it); a mismatch is an error naming the file."""
    arrays = map_chunk(path) if arrays is None else arrays
    want = chunk_meta(path)["crc32"]
    if checksum(arrays) != want:
        raise SSKDError(
            f"{path}: checksum mismatch (the chunk is damaged); rebuild its epoch: delete the file and "
            "run `sskd cache ... --resume`"
        )


def read_manifest(cache: Path) -> dict[str, Any]:
    path = Path(cache) / MANIFEST
    if not path.is_file():
        raise SSKDError(f"{path}: no cache manifest (is {cache} a folder written by `sskd cache`?)")
    m = json.loads(path.read_text())
    if m.get("format") != FORMAT:
        raise SSKDError(f"{path}: not an sskd teacher cache")
    if m.get("version") not in READ_VERSIONS:
        raise SSKDError(
            f"{path}: a cache of format version {m.get('version')}; this sskd reads versions "
            f"{', '.join(map(str, READ_VERSIONS))}: rebuild it with `sskd cache`"
        )
    return m


def manifest_storage(manifest: dict[str, Any]) -> dict:
    """``{output: levels.Storage}`` of a cache: recorded per output (format 4), or format 3's fp16 / top-K."""
    from sskd.cache.levels import Storage

    out = {}
    for o in manifest["outputs"]:
        if "storage" in o:
            out[o["name"]] = Storage.from_json(o["storage"])
        elif manifest.get("topk") and o.get("topk"):
            out[o["name"]] = Storage("topk", k=int(manifest["topk"]))
        else:
            out[o["name"]] = Storage()
    return out


def manifest_level(manifest: dict[str, Any]) -> str:
    """The level name of a cache (``exact``, ``logits:top25+embed:int8-d128``), also for format 3."""
    from sskd.cache.levels import level_name

    return manifest["binding"].get("level") or level_name(manifest_storage(manifest))


def level_matches(manifest: dict[str, Any], asked: str) -> bool:
    """Whether a cache's level is the one a student asks for: ``any``, ``exact``, ``compact`` (the compact
    level for the cache's shapes) or a level name."""
    from sskd.cache.levels import compact, level_name

    have = manifest_level(manifest)
    if asked in (None, "any"):
        return True
    if asked == "compact":
        return have == level_name(compact(manifest["outputs"]))
    return have == asked


def check_binding(manifest: dict[str, Any], expected: dict[str, Any], where: str) -> None:
    """Refuse a cache made from another teacher, shards, plan, views, size, pipeline or device type."""
    for field in BINDING_FIELDS:
        have, want = manifest["binding"].get(field), expected.get(field)
        if have != want:
            raise SSKDError(
                f"{where}: cache was made with {field}={have!r} but this run has {want!r}; "
                "rebuild it with `sskd cache` for this run"
            )
    # The storage level: a student that names one (exact, compact or a level name) gets that one only.
    asked = expected.get("level")
    if asked not in (None, "any") and not level_matches(manifest, asked):
        raise SSKDError(
            f"{where}: cache stores level {manifest_level(manifest)} but this run asks for {asked}; "
            f"rebuild it with `sskd cache{' --exact' if asked == 'exact' else ''}` or ask for that level"
        )
    # Data settings: a cache of the whole split serves any few-shot subset of it (outputs are keyed by id);
    # a subset's cache serves only that subset. Label noise is recorded, not compared: teacher outputs
    # never read labels. Caches from before these fields hold the whole split.
    have = manifest["binding"].get("subset_fraction", 1.0)
    want = expected.get("subset_fraction", 1.0)
    if have != 1.0 and have != want:
        raise SSKDError(
            f"{where}: cache holds the data.subset_fraction={have} subset but this run has "
            f"{want}; rebuild it with `sskd cache` for this run (or cache the whole split)"
        )


class CacheReader:
    """Cached teacher outputs by (sample id, epoch), for any method that declares them."""

    def __init__(
        self, cache: str | Path, expected: dict[str, Any] | None = None, require_complete: bool = True
    ):
        self.path = Path(cache)
        self.manifest = read_manifest(self.path)
        if require_complete and not self.manifest.get("complete"):
            raise SSKDError(
                f"{self.path / MANIFEST}: the cache is incomplete (interrupted?); finish it with "
                "`sskd cache ... --resume`"
            )
        if expected is not None:
            check_binding(self.manifest, expected, str(self.path))
        self.epochs = int(self.manifest["epochs"])
        self.num_samples = int(self.manifest["num_samples"])
        self.topk = self.manifest.get("topk")
        self.outputs = self.manifest["outputs"]  # [{"name", "shape", "topk", "cosine", "storage"}]
        self.storage = manifest_storage(self.manifest)
        self.level = manifest_level(self.manifest)
        self.bases = read_projections(self.path, self.manifest)
        self.files = {e: self._files(e) for e in range(self.epochs)} if require_complete else {}
        self._index: dict[int, tuple[list[dict[str, np.ndarray]], np.ndarray, np.ndarray]] = {}
        self._verified: set[Path] = set()

    def _files(self, epoch: int) -> list[Path]:
        """The chunk files of an epoch, each header and size checked, and the list itself: each rank's
        chunks follow on from batch 0 without a gap or an overlap, named by their first batch, and hold
        the epoch's samples between them (a missing or duplicated chunk). Cheap: only headers are read,
        so a reader checks every epoch when it opens the cache (the ids themselves, every sample once,
        when an epoch is first read)."""
        folder = epoch_dir(self.path, epoch)
        files = sorted(folder.glob("r*-b*.safetensors"))
        if not files:
            raise SSKDError(f"{folder}: no cache chunks for epoch {epoch}")
        by_rank: dict[str, list[tuple[int, int, Path]]] = {}
        total = 0
        for f in files:
            _, header, _ = _header(f)
            meta = header["__metadata__"]
            rank = f.name.split("-b")[0]
            if f.name != f"{rank}-b{meta['first_batch']:06d}.safetensors":
                raise SSKDError(
                    f"{f}: holds the chunk that starts at batch {meta['first_batch']} (renamed or "
                    "copied from another chunk): rebuild the cache with `sskd cache`"
                )
            total += int(np.prod(header["ids"]["shape"]))
            by_rank.setdefault(rank, []).append((meta["first_batch"], meta["batches"], f))
        for rank, chunks in sorted(by_rank.items()):
            expect = 0
            for first, batches, f in sorted(chunks, key=lambda c: c[0]):
                if first > expect:
                    raise SSKDError(
                        f"{folder}: the chunk of rank {rank[1:]} for batches {expect}..{first - 1} of "
                        f"epoch {epoch} is missing (the next one is {f.name}); rebuild it: "
                        "`sskd cache ... --resume` writes what is missing"
                    )
                if first < expect:
                    raise SSKDError(
                        f"{f}: its batches {first}..{first + batches - 1} are also in another chunk of "
                        f"epoch {epoch} (a duplicated chunk); remove the extra file or rebuild the cache"
                    )
                expect = first + batches
        if total != self.num_samples:
            raise SSKDError(
                f"{folder}: the chunks of epoch {epoch} hold {total} samples, the cache has "
                f"{self.num_samples} per epoch ({'a chunk is missing' if total < self.num_samples else 'a chunk is there twice'}); "
                "rebuild it: `sskd cache ... --resume` writes what is missing"
            )
        return files

    def _epoch(self, epoch: int):
        if epoch not in self._index:
            self._index.clear()  # one epoch's maps at a time: memory maps are a per-process budget
            files = self.files.get(epoch) or self._files(epoch)
            maps = [map_chunk(f) for f in files]
            # Ids are the split's sample ids: a cache of a data.subset_fraction subset, or one that left out
            # unreadable samples (--skip-bad), holds num_samples of them, spread over the split's whole id
            # range (as long as its largest id).
            size = self.num_samples
            if self.manifest["binding"].get("subset_fraction", 1.0) != 1.0 or self.manifest.get("skipped"):
                size = max([size] + [int(np.max(a["ids"])) + 1 for a in maps if len(a["ids"])])
            chunks, which, row = [], np.full(size, -1, np.int64), np.zeros(size, np.int64)
            for c, (f, arrays) in enumerate(zip(files, maps, strict=True)):
                ids = np.asarray(arrays["ids"])
                if len(ids) and (ids.min() < 0 or ids.max() >= size):
                    raise SSKDError(f"{f}: sample ids outside 0..{size - 1}")
                if (which[ids] >= 0).any():
                    raise SSKDError(
                        f"{f}: sample {int(ids[(which[ids] >= 0).argmax()])} is cached twice in epoch {epoch}"
                    )
                which[ids], row[ids] = c, np.arange(len(ids))
                chunks.append(dict(arrays, __path__=f))
            held = int((which >= 0).sum())
            if held < self.num_samples:
                missing = np.flatnonzero(which < 0)
                raise SSKDError(
                    f"{epoch_dir(self.path, epoch)}: {self.num_samples - held} samples missing from the cache "
                    f"(e.g. id {int(missing[0])})"
                )
            self._index[epoch] = (chunks, which, row)
        return self._index[epoch]

    def check_epochs(self) -> None:
        """Every epoch's chunks hold every sample id exactly once, or an error naming the chunk or the id
        missing (what ``sskd cache`` checks before it marks a cache complete)."""
        for epoch in range(self.epochs):
            self._epoch(epoch)

    def lookup(self, ids: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        """``{"t_<name>": (b, V, ...)}`` float32 for ``ids`` (b,) in ``epoch % E``, one per output."""
        chunks, which, row = self._epoch(epoch % self.epochs)
        idx = ids.cpu().numpy()
        bad = (idx < 0) | (idx >= len(which))
        bad[~bad] = which[idx[~bad]] < 0
        if bad.any():
            first = int(idx[bad.argmax()])
            why = (self.manifest.get("skipped") or {}).get(str(first))
            raise SSKDError(
                f"{self.path}: sample {first} is not in the cache "
                + (
                    f"(left out as unreadable when it was made, --skip-bad: {why})"
                    if why
                    else "(a cache of another data.subset_fraction?)"
                )
            )
        chunk_of = which[idx]
        used = np.unique(chunk_of)
        for c in used:
            arr = chunks[c]
            if arr["__path__"] not in self._verified:  # the first read of a chunk checks all of it
                verify_chunk(arr["__path__"], {k: v for k, v in arr.items() if k != "__path__"})
                self._verified.add(arr["__path__"])
        if len(used) <= 1 and chunks:  # a batch from one chunk, as training reads them: decoded in place
            arr, rows = chunks[used[0] if len(used) else 0], row[idx]
            return {f"t_{o['name']}": torch.from_numpy(self._dense(arr, o, rows)) for o in self.outputs}
        out = {}
        for o in self.outputs:
            dense = None
            for c in used:
                sel = np.flatnonzero(chunk_of == c)
                part = self._dense(chunks[c], o, row[idx[sel]])
                if dense is None:
                    dense = np.empty((len(idx),) + part.shape[1:], part.dtype)
                dense[sel] = part
            out[f"t_{o['name']}"] = torch.from_numpy(dense)
        return out

    def _dense(self, arr: dict[str, np.ndarray], output: dict[str, Any], rows: np.ndarray) -> np.ndarray:
        from sskd.cache.levels import decode

        name = output["name"]
        return decode(arr, name, self.storage[name], int(output["shape"][-1]), rows, self.bases.get(name))

    def verify(self, log_line=None) -> list[str]:
        """Every epoch's coverage and every chunk's checksum; returns the problems (empty = all good)."""
        problems = []
        for epoch in range(self.epochs):
            try:
                chunks, _, _ = self._epoch(epoch)
            except SSKDError as exc:
                problems.append(str(exc))
                continue
            before = len(problems)
            for arr in chunks:
                try:
                    verify_chunk(arr["__path__"], {k: v for k, v in arr.items() if k != "__path__"})
                except SSKDError as exc:
                    problems.append(str(exc))
            if log_line and len(problems) == before:
                log_line(f"ok   epoch {epoch}: {len(chunks)} chunks, every sample once, checksums match")
        return problems


@dataclass(frozen=True)
class CachedTeacher:
    """The teacher source of a ``distill --cache`` run: the teacher's outputs are read from a cache, the
    teacher is never built. ``source`` and ``info`` are the teacher run the cache was made from (its
    ``model.json``, checked against the shards and the method)."""

    source: str
    info: dict[str, Any]
    reader: CacheReader
    cached = True

    def batch(self, batch: dict[str, Any], epoch: int) -> dict[str, Any]:
        """The batch with the teacher's cached outputs of augmentation epoch ``epoch`` (``t_<name>``), on
        the batch's device."""
        out = self.reader.lookup(batch["id"], epoch)
        return {**batch, **{k: v.to(batch["views"].device) for k, v in out.items()}}

    def data_epoch(self, epoch: int) -> int:
        """The augmentation epoch of training epoch ``epoch``: epochs beyond the cache's E reuse ``e mod E``."""
        return epoch % self.reader.epochs


@dataclass(frozen=True)
class CacheFolder:
    """A cache folder a student run asks to read (``distill --cache``): ``prepare`` opens it with the binding
    the run expects and the teacher it checked (:class:`sskd.engine.prepare.CacheOpener`)."""

    path: Path

    def open(
        self,
        binding: dict[str, Any],
        method: type,
        teacher: Any,
        temperatures: dict[str, tuple] | None = None,
    ) -> CachedTeacher:
        """The cache as ``method``'s teacher source; refused in one line when it was made from anything
        else than ``binding`` says, holds not every output the method reads, or keeps a top-K output's tail
        at another temperature than the run reads it at (``temperatures``: ``Method.topk_temperatures``)."""
        reader = CacheReader(self.path, expected=binding)
        missing = [n for n in method.outputs if n not in {o["name"] for o in reader.outputs}]
        if missing:
            raise SSKDError(
                f"{self.path}: holds no {', '.join(missing)} for --method {method.name}; rebuild it with "
                f"`sskd cache --method {method.name}`"
            )
        check_usable(reader.manifest, method, teacher.info, str(self.path), temperatures)
        return CachedTeacher(teacher.source, teacher.info, reader)


def check_usable(
    manifest: dict[str, Any],
    method: type,
    info: dict[str, Any] | None,
    where: str,
    temperatures: dict[str, tuple] | None = None,
) -> None:
    """Refuse, naming the output, its level and the method, a cache storing an output the method reads at a
    level it cannot use (top-K of scores it does not read as class scores; int8 or projected rows of an
    output it reads other than through cosines; top-K whose tail is exact at another temperature than
    the run reads it at, ``temperatures``; a cache that recorded none, T = 1 before, serves any)."""
    from sskd.cache.levels import allowed, cosine_outputs

    cosine = cosine_outputs(method, info)
    storage = manifest_storage(manifest)
    for o in manifest["outputs"]:
        if o["name"] not in method.outputs:
            continue
        want = {**o, "topk": o["name"] in method.topk_outputs, "cosine": o["name"] in cosine}
        s = storage[o["name"]]
        if not allowed(want, s):
            why = (
                "it reads them as more than the top classes"
                if s.kind == "topk" and not s.dim
                else "it reads them as more than class scores"
                if s.kind in ("topk", "q8")
                else "it reads them other than through cosine similarities"
            )
            raise SSKDError(
                f"{where}: stores {o['name']} as {s.name}, which --method {method.name} cannot use ({why}); "
                f"rebuild it with `sskd cache --method {method.name} --exact`"
            )
        wanted = sorted(set((temperatures or {}).get(o["name"], ())))
        if s.kind == "topk" and s.t is not None and any(t != s.t for t in wanted):
            raise SSKDError(
                f"{where}: stores {o['name']} as {s.name} with the tail's mass exact at T = {s.t:g}, but this "
                f"run (--method {method.name}) reads it at T = {' and '.join(f'{t:g}' for t in wanted)}; "
                "rebuild the cache with this run's settings (`sskd cache` with the same --set)"
            )


def read_projections(cache: Path, manifest: dict[str, Any]) -> dict[str, np.ndarray]:
    """The projections a cache stores (``{output: {"basis": (d, D), "mean": (D,)}}`` for embeddings,
    ``{"levels": (w, D), "step": (w,), "center": (w,)}`` for a top-K over a code; in the file as
    ``<output>.basis`` and so on), checked against the manifest's hash."""
    want = manifest.get("projections_sha256")
    if not want:
        return {}
    path = Path(cache) / PROJECTIONS
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SSKDError(f"{path}: the cache's projections are unreadable ({exc.strerror})") from None
    import hashlib

    if hashlib.sha256(data).hexdigest() != want:
        raise SSKDError(
            f"{path}: does not match the cache manifest's projections_sha256 (damaged or replaced)"
        )
    from safetensors.numpy import load

    out: dict[str, dict[str, np.ndarray]] = {}
    for key, value in load(data).items():
        name, _, part = key.rpartition(".")
        out.setdefault(name, {})[part] = value
    return out


def dense_from_topk(
    topv: np.ndarray, topi: np.ndarray, lse: np.ndarray, num_classes: int, t: float = 1.0
) -> np.ndarray:
    """Dense logits from top-K values, their classes and ``lse = t · logsumexp(logits / t)``.

    Every class outside the top K gets one common logit chosen so that the softmax at temperature ``t``
    keeps the exact probabilities of the top K and gives the rest their exact total mass, shared evenly
    (FKD's "marginal smoothing" idea). A loss at temperature ``t`` then only loses how that leftover mass
    is spread; at another temperature the leftover's mass is off too (an even fill of the T = 1 mass
    holds too much of it at T = 4), which is why a cache keeps the tail at the temperature its method
    reads (``Method.topk_temperatures``).
    """
    k = topv.shape[-1]
    rest = num_classes - k
    out = np.empty(topv.shape[:-1] + (num_classes,), np.float32)
    if rest > 0:
        left = 1.0 - np.exp((topv - lse[..., None]) / np.float32(t)).sum(-1)
        fill = lse + np.float32(t) * np.log(np.clip(left, 1e-12, None) / rest)
        out[:] = fill[..., None]
    put_top(out, topv, topi)
    return out


def put_top(out: np.ndarray, topv: np.ndarray, topi: np.ndarray) -> None:
    """Write the top-K values ``topv`` at their classes ``topi`` into the rows of ``out`` (contiguous, (...,
    classes)) in place: one flat scatter, since numpy's put_along_axis builds an index per axis and reading
    a top-K cache is this."""
    k = topv.shape[-1]
    rows = np.arange(topv.size // max(k, 1), dtype=np.int64)[:, None] * out.shape[-1]
    out.reshape(-1)[(rows + topi.reshape(-1, k)).ravel()] = topv.ravel()
