"""The on-disk shard format: the one contract between the shard writers and every reader.

A shard folder ``OUT/`` holds::

    OUT/manifest.json                 what is in the folder (below); written last, atomically
    OUT/{split}-{NNNNNN}.tar          webdataset tar shards (split = train | val)
    OUT/{split}-{NNNNNN}.idx          DALI webdataset index beside each tar (wds2idx format v1.2)

Each sample in a tar has the key ``{id:09d}`` (no dots: DALI and webdataset end a key at the first
dot) and these components:

    ``<key>.png`` or ``<key>.jpg``    the encoded image (PNG lossless for 32x32 data, the original
                                      JPEG bytes for ImageNet-layout folders)
    ``<key>.cls``                     the label as decimal ASCII text (webdataset convention)
    ``<key>.sid``                     the sample id, 8-byte little-endian int64 (DALI reads it
                                      with ``dtypes=INT64`` and no Python)
    ``<key>.lbl``                     the label, 8-byte little-endian int64
    ``<key>.json``                    ``{"id", "label", "src"}``: provenance for people and tools

Sample ids run 0..N-1 within a split in shard order (shard 0 first). The writer shuffles the source
list with a fixed seed before assigning ids, because DALI's reader shuffles only inside a buffer.

``manifest.json``::

    {"format": "sskd-shards", "version": 1, "dataset": str, "layout": "cifar" | "imagenet",
     "classes": [names in label order], "num_classes": int, "image_ext": "png" | "jpg",
     "image_size": [h, w] or null (native size when all images share one),
     "mean": [r, g, b], "std": [r, g, b]  (0-1 scale, used for normalisation),
     "seed": int, "created_by": "sskd X.Y.Z",
     "splits": {split: {"num_samples": int,
                        "shards": [{"file", "index", "samples", "first_id", "bytes", "sha256"}],
                        "skipped": [{"path", "reason"}]}}}

(A subset folder made by ``sskd views`` holds chosen samples: its shard lists them in ``"ids"`` and its
split gives ``"id_count"``, the size of the split they come from.) Readers check the counts, ids and
sizes against the index files before DALI reads them (:mod:`shards.index`).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path
from typing import Any

from sskd.core.errors import SSKDError

FORMAT_NAME = "sskd-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IMAGE_EXTS = ("jpg", "png")
ID_EXT = "sid"
LABEL_EXT = "lbl"
CLS_EXT = "cls"
META_EXT = "json"

# Normalisation constants of the official SSKD code's CIFAR-100 loader and of torchvision's ImageNet models.
CIFAR100_MEAN = (0.5071, 0.4866, 0.4409)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def sample_key(sample_id: int) -> str:
    """The ``__key__`` of sample ``sample_id``: zero-padded decimal, no dots."""
    return f"{sample_id:09d}"


def shard_name(split: str, index: int) -> str:
    """File stem of shard number ``index`` of ``split`` (``train-000003``)."""
    return f"{split}-{index:06d}"


def encode_int64(value: int) -> bytes:
    """An int as the 8-byte little-endian form DALI reads with ``dtypes=INT64``."""
    return struct.pack("<q", int(value))


def decode_int64(data: bytes) -> int:
    if len(data) != 8:
        raise ValueError(f"expected 8 bytes of int64, got {len(data)}")
    return struct.unpack("<q", data)[0]


def load_manifest(folder: str | Path) -> dict[str, Any]:
    """Read and check ``folder/manifest.json``; raise :class:`SSKDError` naming the problem.

    Every field a reader uses is checked for its type (and the file names of the shards for being plain
    names inside ``folder``), so a damaged or hand-edited manifest is one line naming the field, never a
    traceback, a path outside the folder, or a silent NaN from a zero ``std``.
    """
    return load_manifest_and_sha256(folder)[0]


def load_manifest_and_sha256(folder: str | Path) -> tuple[dict[str, Any], str]:
    """:func:`load_manifest` and the sha256 of the very bytes it read (what binds a run or a cache to its
    data), from one read of the file."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise SSKDError(f"{path}: no shard manifest (is {folder} a folder written by `sskd shard`?)")
    try:
        data = path.read_bytes()
        manifest = json.loads(data)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SSKDError(f"{path}: unreadable manifest ({exc})") from exc
    if not isinstance(manifest, dict):
        raise SSKDError(
            f"{path}: not an sskd shard manifest (a JSON {_json_type(manifest)}, expected an object)"
        )
    if manifest.get("format") != FORMAT_NAME:
        raise SSKDError(f"{path}: not an sskd shard manifest (format={manifest.get('format')!r})")
    if manifest.get("version") != FORMAT_VERSION:
        raise SSKDError(f"{path}: shard format version {manifest.get('version')} is not {FORMAT_VERSION}")
    for field in ("dataset", "layout", "classes", "num_classes", "mean", "std", "splits"):
        if field not in manifest:
            raise SSKDError(f"{path}: manifest field {field!r} is missing")
    check_manifest(manifest, path)
    return manifest, hashlib.sha256(data).hexdigest()


def _json_type(value: Any) -> str:
    return {
        dict: "object",
        list: "list",
        str: "string",
        bool: "boolean",
        type(None): "null",
        int: "integer",
        float: "number",
    }.get(type(value), type(value).__name__)


def _shown(value: Any) -> str:
    """A field's value as the manifest writes it (JSON), or its type where that would be long."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else f"a {_json_type(value)}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def plain_name(value: Any, where: str, field: str) -> str:
    """``value`` if it is a plain file name (no folder part, not ``.``/``..``, not absolute), else raise.

    Every path a manifest names is one of these, resolved inside the shard folder: a manifest can
    neither make a reader read nor ``sskd shard reindex`` write outside it.
    """
    if not isinstance(value, str) or not value:
        raise SSKDError(f"{where}: manifest field {field} is {_shown(value)}, expected a file name")
    if "/" in value or "\\" in value or "\0" in value or value in (".", "..") or Path(value).is_absolute():
        raise SSKDError(
            f"{where}: manifest field {field} is {json.dumps(value)[:200]}: not a plain file name inside the shard "
            "folder (no folder part, no '..', not absolute)"
        )
    return value


def check_manifest(manifest: dict[str, Any], where: str | Path) -> None:
    """Check the types and values of a shard manifest's fields; raise :class:`SSKDError` naming the field."""

    def bad(field: str, value: Any, expected: str) -> SSKDError:
        shown = _shown(value)
        return SSKDError(f"{where}: manifest field {field} is {shown}, expected {expected}")

    def need(field: str, value: Any, ok: bool, expected: str) -> None:
        if not ok:
            raise bad(field, value, expected)

    m = manifest
    need("dataset", m["dataset"], isinstance(m["dataset"], str), "a string")
    need("layout", m["layout"], m["layout"] in ("cifar", "imagenet"), '"cifar" or "imagenet"')
    classes, k = m["classes"], m["num_classes"]
    need(
        "classes",
        classes,
        isinstance(classes, list) and all(isinstance(c, str) for c in classes),
        "a list of class names",
    )
    need("num_classes", k, _is_int(k) and k >= 1, "a positive integer")
    need("num_classes", k, k == len(classes), f"the number of classes ({len(classes)})")
    if "image_ext" in m:
        need(
            "image_ext",
            m["image_ext"],
            m["image_ext"] in IMAGE_EXTS,
            " or ".join(json.dumps(x) for x in IMAGE_EXTS),
        )
    size = m.get("image_size")
    need(
        "image_size",
        size,
        size is None
        or (isinstance(size, list) and len(size) == 2 and all(_is_int(v) and v > 0 for v in size)),
        "null or [height, width] in pixels",
    )
    for field in ("mean", "std"):
        value = m[field]
        need(
            field,
            value,
            isinstance(value, list) and len(value) == 3 and all(_is_number(v) for v in value),
            "a list of 3 numbers (r, g, b)",
        )
        need(field, value, all(math.isfinite(v) for v in value), "finite numbers")
    need("std", m["std"], all(v > 0 for v in m["std"]), "positive numbers (images are divided by it)")
    if "seed" in m:
        need("seed", m["seed"], _is_int(m["seed"]), "an integer")
    splits = m["splits"]
    need("splits", splits, isinstance(splits, dict), "an object of splits")
    for name, info in splits.items():
        at = f"splits.{name}"
        need(at, info, isinstance(info, dict), "an object")
        for field in ("num_samples", "shards"):
            if field not in info:
                raise SSKDError(f"{where}: manifest field {at}.{field} is missing")
        n = info["num_samples"]
        need(f"{at}.num_samples", n, _is_int(n) and n >= 0, "a count (integer >= 0)")
        if "id_count" in info:
            need(
                f"{at}.id_count",
                info["id_count"],
                _is_int(info["id_count"]) and info["id_count"] >= 0,
                "a count (integer >= 0)",
            )
        need(f"{at}.skipped", info.get("skipped", []), isinstance(info.get("skipped", []), list), "a list")
        shards = info["shards"]
        need(f"{at}.shards", shards, isinstance(shards, list), "a list of shards")
        for i, entry in enumerate(shards):
            e = f"{at}.shards[{i}]"
            need(e, entry, isinstance(entry, dict), "an object")
            for field in ("file", "index", "samples"):
                if field not in entry:
                    raise SSKDError(f"{where}: manifest field {e}.{field} is missing")
            for field in (
                "file",
                "index",
                "sums",
            ):  # every file a shard entry names (sums: per-sample checksums)
                if field in entry:
                    plain_name(entry[field], str(where), f"{e}.{field}")
            for field in ("samples", "first_id", "bytes"):
                if field in entry:
                    v = entry[field]
                    need(f"{e}.{field}", v, _is_int(v) and v >= 0, "an integer >= 0")
            for field in ("sha256", "sums_sha256"):
                if field in entry:
                    need(f"{e}.{field}", entry[field], isinstance(entry[field], str), "a hex string")
            if "ids" in entry:
                ids = entry["ids"]
                need(
                    f"{e}.ids",
                    ids,
                    isinstance(ids, list) and all(_is_int(v) and v >= 0 for v in ids),
                    "a list of sample ids",
                )


def split_files(folder: str | Path, manifest: dict[str, Any], split: str) -> tuple[list[str], list[str]]:
    """The tar and index paths of ``split``, checked to exist; raises :class:`SSKDError` otherwise."""
    folder = Path(folder)
    splits = manifest["splits"]
    if split not in splits:
        raise SSKDError(f"{folder / MANIFEST}: no split {split!r} (has {', '.join(sorted(splits))})")
    shards = splits[split]["shards"]
    if not shards:
        raise SSKDError(f"{folder / MANIFEST}: split {split!r} has no shards")
    tars, idxs = [], []
    for entry in shards:
        tar, idx = shard_paths(folder, entry)
        if not tar.is_file():
            raise SSKDError(f"{tar}: shard listed in the manifest is missing")
        if not idx.is_file():
            raise SSKDError(
                f"{idx}: index of shard {entry['file']} is missing (rebuild it with "
                f"`sskd shard reindex {folder}`)"
            )
        tars.append(str(tar))
        idxs.append(str(idx))
    return tars, idxs


def shard_paths(folder: str | Path, entry: dict[str, Any]) -> tuple[Path, Path]:
    """``folder/file`` and ``folder/index`` of a manifest's shard entry, each checked to be a plain name."""
    folder = Path(folder)
    where = str(folder / MANIFEST)
    return (
        folder / plain_name(entry.get("file"), where, "file of a shard"),
        folder / plain_name(entry.get("index"), where, "index of a shard"),
    )
