"""``sskd shard verify``: re-read every shard with webdataset and with DALI and check it against the manifest.

:func:`check_samples` is the per-sample part (what the loader checks before DALI decodes a sample):
every member's bytes against the checksums written with the shard, each ``sid`` against its key and the
manifest's order, each label against the classes; one line per bad sample, naming shard, sample and
member. ``verify`` runs it on every shard; a supervisor uses it to name the sample behind a crash.
"""

from __future__ import annotations

from pathlib import Path

from shards import format as fmt
from shards.index import check_lines, check_shard
from sskd.core.atomic import sha256_file
from sskd.core.errors import SSKDError


def _shard_samples(folder: Path, entry: dict, num_classes: int) -> list[str]:
    """The per-sample problems of one shard (see :func:`check_samples`)."""
    try:
        tar, idx = fmt.shard_paths(folder, entry)
    except SSKDError as exc:
        return [str(exc)]
    if not tar.is_file() or not idx.is_file():
        return [f"{tar if not tar.is_file() else idx}: missing"]
    try:
        check_shard(tar, idx, entry, lenient=True)  # a truncated tar: each sample cut off is named below
        found = check_lines(tar, idx, entry, num_classes=num_classes)
    except SSKDError as exc:
        return [str(exc)]
    problems = [text for _, text in found.problems]
    if not found.summed and len(problems) == entry.get("samples") and "unverifiable" in problems[-1]:
        # damaged, no checksums, and every image decodes: one line for the shard, not one per sample
        return [
            f"{tar}: sha256 differs from the manifest, and the shard has no per-sample checksums to say which "
            "sample (`sskd shard reindex` adds them to intact shards)"
        ]
    return problems


def check_samples(folder: str | Path, split: str | None = None) -> list[str]:
    """Check every sample of ``split`` (every split if None) of a shard folder; one line per problem.

    Each line names the shard file, the sample key and the member: bytes that differ from the checksums
    recorded when the shard was written (a shard written before them: only a sha256 mismatch of the whole
    tar, narrowed to the images PIL cannot decode), a ``sid`` other than the sample's id, a label outside
    the classes or unlike ``cls``, a member cut off by a truncated tar. Empty: every sample is intact.
    """
    folder = Path(folder)
    manifest = fmt.load_manifest(folder)
    if split is not None and split not in manifest["splits"]:
        raise SSKDError(
            f"{folder / fmt.MANIFEST}: no split {split!r} (has {', '.join(sorted(manifest['splits']))})"
        )
    k = int(manifest["num_classes"])
    problems: list[str] = []
    for name in [split] if split is not None else list(manifest["splits"]):
        for entry in manifest["splits"][name]["shards"]:
            problems += _shard_samples(folder, entry, k)
    return problems


def _webdataset_samples(tar: Path) -> list[tuple[int, int, int]]:
    """(id, label from lbl, label from cls) of every sample of one tar, read with webdataset."""
    import webdataset as wds

    out = []
    for s in wds.WebDataset(str(tar), shardshuffle=False, empty_check=False):
        key = s["__key__"]
        if not any(e in s for e in fmt.IMAGE_EXTS) or fmt.ID_EXT not in s or fmt.LABEL_EXT not in s:
            raise ValueError(f"sample {key}: missing image, {fmt.ID_EXT} or {fmt.LABEL_EXT} component")
        out.append((fmt.decode_int64(s[fmt.ID_EXT]), fmt.decode_int64(s[fmt.LABEL_EXT]), int(s[fmt.CLS_EXT])))
    return out


def _dali_samples(tar: Path, idx: Path, n: int, threads: int = 2) -> list[tuple[int, int]]:
    """(id, label) of the ``n`` samples of one tar through DALI's CPU webdataset reader and its index."""
    from nvidia.dali import fn, pipeline_def, types

    batch = max(1, min(256, n))

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=None, prefetch_queue_depth=1)
    def pipe():
        img, sid, lbl = fn.readers.webdataset(
            paths=[str(tar)],
            index_paths=[str(idx)],
            ext=["jpg;png", fmt.ID_EXT, fmt.LABEL_EXT],
            dtypes=[types.UINT8, types.INT64, types.INT64],
            missing_component_behavior="error",
            pad_last_batch=True,
            name="reader",
        )
        return sid, lbl

    p = pipe()
    p.build()
    got: list[tuple[int, int]] = []
    while len(got) < n:
        sid, lbl = p.run()
        got += [(int(sid.at(i)[0]), int(lbl.at(i)[0])) for i in range(len(sid))]
    return got[:n]


def verify(folder: str | Path, *, dali: bool = True, log=print) -> list[str]:
    """Check every shard of ``folder``; returns the problems found (empty = all good)."""
    folder = Path(folder)
    manifest = fmt.load_manifest(folder)
    problems: list[str] = []
    k = manifest["num_classes"]
    for split, info in manifest["splits"].items():
        seen_ids: list[int] = []
        for entry in info["shards"]:
            tar, idx = folder / entry["file"], folder / entry["index"]
            if not tar.is_file() or not idx.is_file():
                problems.append(f"{tar if not tar.is_file() else idx}: missing")
                continue
            bad_samples = _shard_samples(folder, entry, k)  # which sample and member, where it can be known
            problems += bad_samples
            if sha256_file(tar) != entry["sha256"]:
                problems.append(f"{tar}: sha256 differs from the manifest (corrupted or replaced)")
                # not read further; its ids are counted as the manifest gives them (no second, misleading line)
                seen_ids += list(range(entry["first_id"], entry["first_id"] + entry["samples"]))
                continue
            try:
                samples = _webdataset_samples(tar)
            except Exception as exc:
                problems.append(f"{tar}: unreadable with webdataset ({exc})")
                continue
            if len(samples) != entry["samples"]:
                problems.append(f"{tar}: {len(samples)} samples, manifest says {entry['samples']}")
            ids = [s[0] for s in samples]
            if ids != list(range(entry["first_id"], entry["first_id"] + len(ids))):
                problems.append(
                    f"{tar}: ids are not {entry['first_id']}..{entry['first_id'] + len(ids) - 1} in order"
                )
            bad = [s for s in samples if s[1] != s[2] or not 0 <= s[1] < k]
            if bad:
                problems.append(
                    f"{tar}: sample {fmt.sample_key(bad[0][0])}: label {bad[0][1]} / cls {bad[0][2]} "
                    f"inconsistent or outside 0..{k - 1}"
                )
            if dali:
                try:
                    via_dali = _dali_samples(tar, idx, entry["samples"])
                except Exception as exc:
                    problems.append(
                        f"{tar}: DALI cannot read it with {idx.name} ({str(exc).splitlines()[0]})"
                    )
                    continue
                if via_dali != [(s[0], s[1]) for s in samples]:
                    problems.append(
                        f"{tar}: DALI reads other ids/labels than webdataset (stale index {idx.name}?)"
                    )
            seen_ids += ids
            log(f"ok   {entry['file']}: {len(samples)} samples")
        if sorted(seen_ids) != list(range(info["num_samples"])):
            problems.append(f"split {split}: ids do not cover 0..{info['num_samples'] - 1} exactly once")
    return problems
