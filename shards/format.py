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

import json
import struct
from pathlib import Path
from typing import Any

from sskd.errors import SSKDError

FORMAT_NAME = "sskd-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IMAGE_EXTS = ("jpg", "png")
ID_EXT = "sid"
LABEL_EXT = "lbl"
CLS_EXT = "cls"
META_EXT = "json"
LAYOUTS = ("cifar", "imagenet")

# Normalisation constants of the official SSKD cifar.py (official-code-facts.md) and torchvision ImageNet.
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
    """Read and check ``folder/manifest.json``; raise :class:`SSKDError` naming the problem."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise SSKDError(f"{path}: no shard manifest (is {folder} a folder written by `sskd shard`?)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SSKDError(f"{path}: unreadable manifest ({exc})") from exc
    if manifest.get("format") != FORMAT_NAME:
        raise SSKDError(f"{path}: not an sskd shard manifest (format={manifest.get('format')!r})")
    if manifest.get("version") != FORMAT_VERSION:
        raise SSKDError(f"{path}: shard format version {manifest.get('version')} is not {FORMAT_VERSION}")
    for field in ("dataset", "layout", "classes", "num_classes", "mean", "std", "splits"):
        if field not in manifest:
            raise SSKDError(f"{path}: manifest field {field!r} is missing")
    return manifest


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
        tar, idx = folder / entry["file"], folder / entry["index"]
        if not tar.is_file():
            raise SSKDError(f"{tar}: shard listed in the manifest is missing")
        if not idx.is_file():
            raise SSKDError(f"{idx}: index of shard {entry['file']} is missing (rebuild it with "
                            f"`sskd shard reindex {folder}`)")
        tars.append(str(tar))
        idxs.append(str(idx))
    return tars, idxs
