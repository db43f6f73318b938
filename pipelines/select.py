"""A small shard folder holding chosen samples of a split, byte for byte.

Views depend only on (seed, epoch, sample id, view), never on a sample's position, so running the
training pipeline over such a subset gives exactly the views those samples get in a full epoch; this
is how ``sskd views`` shows a few samples without decoding a whole ImageNet epoch.
"""

from __future__ import annotations

import json
from pathlib import Path

from shards import format as sfmt
from shards.writer import ShardBuilder
from sskd.core import atomic
from sskd.core.errors import SSKDError


def _components(tar: Path, idx: Path, sample_id: int, first_id: int) -> dict[str, bytes]:
    lines = idx.read_text().splitlines()
    line = lines[1 + sample_id - first_id].split()
    parts: dict[str, bytes] = {}
    with open(tar, "rb") as fh:
        for i in range(0, len(line), 4):
            ext, offset, size = line[i], int(line[i + 1]), int(line[i + 2])
            fh.seek(offset)
            parts[ext] = fh.read(size)
    return parts


def subset_folder(shards: str | Path, split: str, ids: list[int], out: str | Path) -> Path:
    """Write the samples ``ids`` of ``split`` into ``out`` as a one-shard ``train`` split."""
    shards, out = Path(shards), Path(out)
    manifest = sfmt.load_manifest(shards)
    info = manifest["splits"].get(split)
    if info is None:
        raise SSKDError(f"{shards / sfmt.MANIFEST}: no split {split!r}")
    n = info["num_samples"]
    bad = [i for i in ids if not 0 <= i < n]
    if bad:
        raise SSKDError(f"--ids: {bad[0]} is not a sample id of {split} (0..{n - 1})")
    out.mkdir(parents=True, exist_ok=True)
    builder = ShardBuilder(out, "train", 0, 0)
    for sample_id in ids:
        entry = next(e for e in info["shards"] if e["first_id"] <= sample_id < e["first_id"] + e["samples"])
        parts = _components(shards / entry["file"], shards / entry["index"], sample_id, entry["first_id"])
        ext = next(e for e in sfmt.IMAGE_EXTS if e in parts)
        label = sfmt.decode_int64(parts[sfmt.LABEL_EXT])
        src = json.loads(parts.get(sfmt.META_EXT, b"{}") or b"{}").get("src", "")
        builder.add(sample_id, label, parts[ext], ext, src)
    # Not ids 0..N-1 as a full split has: the shard lists its ids and the split the range they come from.
    entry = dict(builder.finish(), ids=[int(i) for i in ids])
    sub = dict(
        manifest, splits={"train": {"num_samples": len(ids), "id_count": n, "shards": [entry], "skipped": []}}
    )
    atomic.write_json(out / sfmt.MANIFEST, sub)
    return out
