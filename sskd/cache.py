"""The teacher-output cache: run the frozen teacher once, distill students without it.

Layout (keyed by sample identity, never by batch position: DESIGN.md, invariant 3)::

    CACHE/manifest.json                               binding + shape; "complete": true only at the end
    CACHE/epoch-{e:04d}/r{rank:03d}-c{chunk:05d}.safetensors

Each chunk holds, for the samples one rank saw in a run of consecutive batches: ``ids`` int64 (n,),
``embed`` fp16 (n, V, d) — the teacher's SS projections — and either ``logits`` fp16 (n, V, K) or,
with ``--topk k``, ``topv`` fp16 / ``topi`` int32 (n, V, k) plus ``lse`` fp32 (n, V), the log-sum-exp
of all K logits. Embeddings are stored, not batch similarity matrices, so the matrix is recomputed for
whatever batch size and rank layout the student run has. Chunks are written under a temporary name
and renamed; readers memory-map them (safetensors header → numpy memmap).
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sskd import atomic
from sskd.errors import SSKDError

log = logging.getLogger(__name__)

FORMAT = "sskd-teacher-cache"
VERSION = 1
MANIFEST = "manifest.json"
BINDING_FIELDS = ("teacher_weights_sha256", "shards_manifest_sha256", "seed", "views", "size", "pipeline_version",
                  "device_type", "split")
_DT = {"F16": np.float16, "F32": np.float32, "I64": np.int64, "I32": np.int32}


def epoch_dir(cache: Path, epoch: int) -> Path:
    return cache / f"epoch-{epoch:04d}"


def chunk_path(cache: Path, epoch: int, rank: int, chunk: int) -> Path:
    return epoch_dir(cache, epoch) / f"r{rank:03d}-c{chunk:05d}.safetensors"


def bytes_per_sample(num_views: int, num_classes: int, embed_dim: int, topk: int | None) -> int:
    """Disk per sample per epoch: logits (or top-K + lse) and embeddings of every view, plus the id."""
    logits = num_views * (topk * (2 + 4) + 4 if topk else num_classes * 2)
    return 8 + logits + num_views * embed_dim * 2


def write_chunk(path: Path, ids: np.ndarray, logits: torch.Tensor, embed: torch.Tensor, topk: int | None) -> None:
    """One chunk, atomically: ids (n,), logits (n, V, K) float, embed (n, V, d) float."""
    from safetensors.numpy import save_file

    arrays = {"ids": np.ascontiguousarray(ids, dtype=np.int64),
              "embed": embed.float().cpu().numpy().astype(np.float16)}
    logits = logits.float().cpu()
    if topk:
        top = logits.topk(topk, dim=-1)
        arrays["topv"] = top.values.numpy().astype(np.float16)
        arrays["topi"] = top.indices.numpy().astype(np.int32)
        arrays["lse"] = torch.logsumexp(logits, dim=-1).numpy().astype(np.float32)
    else:
        arrays["logits"] = logits.numpy().astype(np.float16)
    with atomic.atomic_path(path) as tmp:
        save_file(arrays, str(tmp))


def map_chunk(path: Path) -> dict[str, np.ndarray]:
    """Memory-map every tensor of a chunk; a truncated or damaged file is an error naming it."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SSKDError(f"{path}: unreadable cache chunk ({exc})") from exc
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        begin, end = meta["data_offsets"]
        if 8 + n + end > size:
            raise SSKDError(f"{path}: truncated cache chunk ({size} bytes, header needs {8 + n + end})")
        out[name] = np.memmap(path, dtype=_DT[meta["dtype"]], mode="r", offset=8 + n + begin, shape=tuple(meta["shape"]))
    for field in ("ids", "embed"):
        if field not in out:
            raise SSKDError(f"{path}: cache chunk has no {field!r}")
    return out


def read_manifest(cache: Path) -> dict[str, Any]:
    path = Path(cache) / MANIFEST
    if not path.is_file():
        raise SSKDError(f"{path}: no cache manifest (is {cache} a folder written by `sskd cache`?)")
    m = json.loads(path.read_text())
    if m.get("format") != FORMAT or m.get("version") != VERSION:
        raise SSKDError(f"{path}: not an sskd teacher cache of version {VERSION}")
    return m


def check_binding(manifest: dict[str, Any], expected: dict[str, Any], where: str) -> None:
    """Refuse a cache made from another teacher, shards, plan, views, size, pipeline or device type."""
    for field in BINDING_FIELDS:
        have, want = manifest["binding"].get(field), expected.get(field)
        if have != want:
            raise SSKDError(f"{where}: cache was made with {field}={have!r} but this run has {want!r}; "
                            "rebuild it with `sskd cache` for this run")


class CacheReader:
    """Cached teacher outputs by (sample id, epoch), for :class:`sskd.methods.SSKD` and ``kd``."""

    def __init__(self, cache: str | Path, expected: dict[str, Any] | None = None, require_complete: bool = True):
        self.path = Path(cache)
        self.manifest = read_manifest(self.path)
        if require_complete and not self.manifest.get("complete"):
            raise SSKDError(f"{self.path / MANIFEST}: the cache is incomplete (interrupted?); finish it with "
                            "`sskd cache ... --resume`")
        if expected is not None:
            check_binding(self.manifest, expected, str(self.path))
        self.epochs = int(self.manifest["epochs"])
        self.num_samples = int(self.manifest["num_samples"])
        self.topk = self.manifest.get("topk")
        self.num_classes = int(self.manifest["num_classes"])
        self._index: dict[int, tuple[list[dict[str, np.ndarray]], np.ndarray, np.ndarray]] = {}

    def _epoch(self, epoch: int):
        if epoch not in self._index:
            folder = epoch_dir(self.path, epoch)
            files = sorted(folder.glob("r*-c*.safetensors"))
            if not files:
                raise SSKDError(f"{folder}: no cache chunks for epoch {epoch}")
            chunks, which, row = [], np.full(self.num_samples, -1, np.int64), np.zeros(self.num_samples, np.int64)
            for c, f in enumerate(files):
                arrays = map_chunk(f)
                ids = np.asarray(arrays["ids"])
                if len(ids) and (ids.min() < 0 or ids.max() >= self.num_samples):
                    raise SSKDError(f"{f}: sample ids outside 0..{self.num_samples - 1}")
                if (which[ids] >= 0).any():
                    raise SSKDError(f"{f}: sample {int(ids[(which[ids] >= 0).argmax()])} is cached twice in epoch {epoch}")
                which[ids], row[ids] = c, np.arange(len(ids))
                chunks.append(arrays)
            missing = np.flatnonzero(which < 0)
            if len(missing):
                raise SSKDError(f"{folder}: {len(missing)} samples missing from the cache (e.g. id {int(missing[0])})")
            self._index[epoch] = (chunks, which, row)
        return self._index[epoch]

    def lookup(self, ids: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        """``{"t_logits": (b, V, K), "t_embed": (b, V, d)}`` float32 for ``ids`` (b,) in ``epoch % E``."""
        chunks, which, row = self._epoch(epoch % self.epochs)
        idx = ids.cpu().numpy()
        parts: dict[str, list] = {"logits": [], "embed": []}
        order = np.empty(len(idx), np.int64)
        pos = 0
        for c in np.unique(which[idx]):
            sel = np.flatnonzero(which[idx] == c)
            rows = row[idx[sel]]
            arr = chunks[c]
            parts["embed"].append(np.asarray(arr["embed"][rows], dtype=np.float32))
            parts["logits"].append(self._dense(arr, rows))
            order[sel] = np.arange(pos, pos + len(sel))
            pos += len(sel)
        logits = np.concatenate(parts["logits"])[order]
        embed = np.concatenate(parts["embed"])[order]
        return {"t_logits": torch.from_numpy(logits), "t_embed": torch.from_numpy(embed)}

    def _dense(self, arr: dict[str, np.ndarray], rows: np.ndarray) -> np.ndarray:
        if not self.topk:
            return np.asarray(arr["logits"][rows], dtype=np.float32)
        return dense_from_topk(np.asarray(arr["topv"][rows], np.float32), np.asarray(arr["topi"][rows]),
                               np.asarray(arr["lse"][rows], np.float32), self.num_classes)


def dense_from_topk(topv: np.ndarray, topi: np.ndarray, lse: np.ndarray, num_classes: int) -> np.ndarray:
    """Dense logits from top-K values, their classes and the log-sum-exp of all logits.

    Every class outside the top K gets one common logit chosen so that the softmax (T = 1) keeps the
    exact probabilities of the top K and gives the rest their exact total mass, shared evenly. At T = 1
    the KD loss then only loses how that leftover mass is spread; at other temperatures it is an
    approximation (FKD's "marginal smoothing" idea).
    """
    k = topv.shape[-1]
    rest = num_classes - k
    out = np.empty(topv.shape[:-1] + (num_classes,), np.float32)
    if rest > 0:
        left = 1.0 - np.exp(topv - lse[..., None]).sum(-1)
        fill = lse + np.log(np.clip(left, 1e-12, None) / rest)
        out[:] = fill[..., None]
    np.put_along_axis(out, topi.astype(np.int64), topv, axis=-1)
    return out
