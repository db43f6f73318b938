"""Issue 19, items 4 and 8: a corrupted shard never crashes the process, and a rewritten sample id is caught.

Shards carry per-sample checksums (``{stem}.sums``, listed in the manifest); the loader checks every
sample against them, against its key's id and against the classes before DALI decodes it. Each
corruption below (PNG shards of the digits, JPEG shards of the photos: bit flips, overwritten ranges,
truncations inside a member, rewritten ids and labels) is read by a ``ViewLoader`` in a subprocess, so
a segfault would show as a negative return code: each must stop with one line naming the shard file and
the sample, and with ``skip_bad`` the epoch must complete without exactly the bad samples.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shards.index import parse_index, sums_path, write_sums
from shards.verify import check_samples
from sskd.core.errors import SSKDError

ROOT = Path(__file__).resolve().parents[1]

# Reads each case's folder twice in one process: without skip_bad (must fail with one line) and with it
# (must complete); prints one JSON line per case and mode.
WORKER = r"""
import json, sys
from pipelines import ViewLoader
from sskd.core.errors import SSKDError

for case in json.loads(sys.argv[1]):
    for skip in ([False, True] if case["skip"] else [False]):
        out = {"name": case["name"], "skip": skip}
        try:
            loader = ViewLoader(case["folder"], "train", batch_size=256, views=None, size=case["size"],
                                skip_bad=skip)
            ids = [int(i) for b in loader.epoch(0) for i in b["id"]]
            out.update(ok=True, ids=ids, skipped=sorted(loader.skipped))
        except SSKDError as exc:
            out.update(ok=False, error=str(exc))
        print(json.dumps(out), flush=True)
"""


def _link_copy(src: Path, dst: Path) -> Path:
    """A copy of a shard folder whose files are hard links (a corrupted file is replaced, never edited)."""
    dst.mkdir(parents=True)
    for p in src.iterdir():
        if p.is_file():
            try:
                os.link(p, dst / p.name)
            except OSError:
                shutil.copy2(p, dst / p.name)
    return dst


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _strip_sums(folder: Path) -> None:
    """Make a folder look written before checksums: no ``.sums`` files, none listed."""
    m = json.loads((folder / "manifest.json").read_text())
    for info in m["splits"].values():
        for e in info["shards"]:
            e.pop("sums", None)
            e.pop("sums_sha256", None)
    _replace(folder / "manifest.json", json.dumps(m).encode())
    for p in folder.glob("*.sums"):
        p.unlink()


def corrupt(src: Path, dst: Path, kind: str, seed: int) -> dict:
    """Copy ``src`` to ``dst`` and corrupt one train sample (two for ``sid-swap``); returns the case:
    folder, the corrupted tar and the ids of the samples that are now bad."""
    rng = random.Random(f"{kind}/{seed}")
    folder = _link_copy(src, dst)
    m = json.loads((folder / "manifest.json").read_text())
    entries = m["splits"]["train"]["shards"]
    entry = rng.choice(entries)
    _, samples = parse_index(folder / entry["index"])
    line = rng.randrange(len(samples))
    first = entry["first_id"]
    member = {ext: (off, size) for ext, off, size, _ in samples[line]}
    img_ext = next(e for e in ("png", "jpg") if e in member)
    off, size = member[img_ext]
    tar = folder / entry["file"]
    data = bytearray(tar.read_bytes())
    bad = [first + line]
    if kind == "flip":  # 1-8 single-bit flips anywhere in the image's bytes
        for _ in range(rng.randint(1, 8)):
            data[off + rng.randrange(size)] ^= 1 << rng.randrange(8)
    elif kind == "head":  # a few bytes of the image's headers (markers, dimensions, tables) replaced
        for _ in range(rng.randint(1, 6)):
            data[off + rng.randrange(min(size, 400))] = rng.randrange(256)
    elif kind == "overwrite":  # a random range of the image's data overwritten by random bytes
        a = off + rng.randrange(size // 2)
        n = rng.randint(1, off + size - a)
        data[a : a + n] = bytes(rng.randrange(256) for _ in range(n))
    elif kind == "magic":  # the image's first bytes (its format's signature) zeroed: no decoder takes it
        data[off : off + 16] = bytes(16)
    elif kind == "zero":  # the second half of the image zeroed
        data[off + size // 2 : off + size] = bytes(size - size // 2)
    elif kind == "truncate":  # the tar cut inside this sample's image: it and every later sample are cut off
        del data[off + rng.randrange(1, size) :]
        bad = list(range(first + line, first + len(samples)))
    elif kind == "sid":  # the id rewritten to another valid id of the split (item 8)
        other = rng.choice([i for i in range(m["splits"]["train"]["num_samples"]) if i != first + line])
        o = member["sid"][0]
        data[o : o + 8] = int(other).to_bytes(8, "little", signed=True)
    elif kind == "sid-swap":  # two samples' ids swapped: both valid, both wrong
        line2 = (line + 1 + rng.randrange(len(samples) - 1)) % len(samples)
        o1 = member["sid"][0]
        o2 = next(o for ext, o, _, _ in samples[line2] if ext == "sid")
        data[o1 : o1 + 8], data[o2 : o2 + 8] = data[o2 : o2 + 8], data[o1 : o1 + 8]
        bad = sorted([first + line, first + line2])
    elif kind == "lbl":  # the label rewritten to another valid class (cls left as it was)
        o = member["lbl"][0]
        old = int.from_bytes(data[o : o + 8], "little")
        data[o : o + 8] = ((old + 1 + rng.randrange(m["num_classes"] - 1)) % m["num_classes"]).to_bytes(
            8, "little"
        )
    elif kind == "json":  # one byte of the provenance record
        o, n = member["json"]
        data[o + rng.randrange(n)] ^= 0x20
    else:
        raise ValueError(kind)
    _replace(tar, bytes(data))
    return {
        "name": f"{src.parent.name}/{kind}/{seed}",
        "folder": str(folder),
        "tar": str(tar),
        "bad": bad,
        "total": m["splits"]["train"]["num_samples"],
    }


DIGITS_CASES = [("flip", s) for s in range(5)] + [
    ("overwrite", 0),
    ("overwrite", 1),
    ("zero", 0),
    ("truncate", 0),
    ("truncate", 1),
    ("sid", 0),
    ("sid", 1),
    ("sid-swap", 0),
    ("lbl", 0),
    ("json", 0),
]
PHOTO_CASES = [("head", s) for s in range(4)] + [
    ("flip", 0),
    ("flip", 1),
    ("overwrite", 0),
    ("truncate", 0),
    ("sid", 0),
]


def _run_worker(cases: list[dict], timeout: int = 400) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", WORKER, json.dumps(cases)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    done = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    # a signal (SIGSEGV: -11, SIGABRT: -6) is a negative return code; the case after the last one printed crashed
    assert proc.returncode == 0, (
        f"worker exited {proc.returncode} after {len(done)} results "
        f"(last: {done[-1]['name'] if done else None}): {proc.stderr[-3000:]}"
    )
    return done


def _check_results(cases: list[dict], results: list[dict]) -> None:
    by_case = {(r["name"], r["skip"]): r for r in results}
    for case in cases:
        stop = by_case[(case["name"], False)]
        assert not stop["ok"], f"{case['name']}: the corrupted shard was read without an error"
        err = stop["error"]
        assert "\n" not in err, err
        assert err.startswith(case["tar"] + ":"), f"{case['name']}: {err}"  # the shard file first
        keys = [f"sample {i:09d}" for i in case["bad"]]
        assert any(k in err for k in keys), f"{case['name']}: no bad sample named: {err}"
        if not case["skip"]:
            continue
        skip = by_case[(case["name"], True)]
        assert skip["ok"], f"{case['name']}: skip_bad did not complete: {skip.get('error')}"
        assert skip["skipped"] == case["bad"], case["name"]
        assert sorted(skip["ids"]) == sorted(set(range(case["total"])) - set(case["bad"])), case["name"]


def test_corrupted_png_shards_never_crash_and_name_shard_and_sample(digits_shards, tmp_path):
    cases = [
        dict(corrupt(digits_shards, tmp_path / f"{k}-{s}", k, s), size=None, skip=True)
        for k, s in DIGITS_CASES
    ]
    _check_results(cases, _run_worker(cases))


def test_corrupted_jpeg_shards_never_crash_and_name_shard_and_sample(photo_shards, tmp_path):
    cases = [
        dict(corrupt(photo_shards, tmp_path / f"{k}-{s}", k, s), size=64, skip=True) for k, s in PHOTO_CASES
    ]
    # shards written before checksums: a tar whose sha256 is not the manifest's is checked image by image
    # (these bytes made DALI's decoder crash the process: SIGSEGV)
    for k, s in [("magic", 0), ("magic", 1)]:
        case = dict(corrupt(photo_shards, tmp_path / f"old-{k}-{s}", k, s), size=64, skip=True)
        _strip_sums(Path(case["folder"]))
        case["name"] = "old/" + case["name"]
        cases.append(case)
    _check_results(cases, _run_worker(cases))


@pytest.mark.slow  # two tiny training runs: ~20 s on a loaded 2-core machine
def test_train_teacher_stops_in_one_line_and_skip_bad_completes(digits_shards, tmp_path):
    case = corrupt(digits_shards, tmp_path / "bad", "flip", 7)
    key = f"{case['bad'][0]:09d}"
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(ROOT))

    def train(out: str, *extra: str) -> subprocess.CompletedProcess:
        cmd = [
            sys.executable,
            "-m",
            "sskd",
            "train-teacher",
            "--shards",
            case["folder"],
            "--arch",
            "resnet8",
            "--out",
            str(tmp_path / out),
            "--max-steps",
            "2",
            "--batch-size",
            "32",
            "--no-progress",
            "--set",
            "data.eval_batch_size=128",
            "--set",
            "run.eval_every=0",
            *extra,
        ]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

    stopped = train("stop")
    assert stopped.returncode == 2, stopped.stderr[-2000:]
    errors = [ln for ln in stopped.stderr.splitlines() if ln.startswith("sskd: error:")]
    assert len(errors) == 1 and "Traceback" not in stopped.stderr, stopped.stderr[-2000:]
    assert errors[0].startswith(f"sskd: error: {case['tar']}: sample {key}: member {key}.png differs"), (
        errors[0]
    )
    skipped = train("skip", "--skip-bad")
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    assert "leaving out 1 bad sample(s) of split 'train'" in skipped.stderr and key in skipped.stderr
    assert (tmp_path / "skip" / "model.safetensors").is_file()


def test_rewritten_id_is_caught_without_checksums_and_by_the_batch_order(digits_shards, tmp_path, caplog):
    from pipelines import ViewLoader

    case = corrupt(digits_shards, tmp_path / "sid", "sid", 3)
    folder, key = Path(case["folder"]), f"{case['bad'][0]:09d}"
    _strip_sums(folder)
    with caplog.at_level(logging.WARNING, logger="pipelines.loader"), pytest.raises(SSKDError) as err:
        for _ in ViewLoader(folder, "train", batch_size=128, views=None).epoch(0):
            pass
    assert str(err.value).startswith(f"{case['tar']}: sample {key}: id ") and "rewritten sample id" in str(
        err.value
    )
    assert sum("no per-sample checksums" in r.getMessage() for r in caplog.records) == 1
    # the cheap defence behind it: each batch's ids are the ones the epoch's order puts there
    with pytest.raises(SSKDError) as err:
        for _ in ViewLoader(folder, "train", batch_size=128, views=None, verify_samples=False).epoch(0):
            pass
    assert str(err.value).startswith(f"{case['tar']}: sample {key}: read as id ") and "\n" not in str(
        err.value
    )
    with pytest.raises(SSKDError, match=f"sample {key}: read as id "):  # the evaluation order too
        for _ in ViewLoader(folder, "train", batch_size=128, train=False, verify_samples=False).epoch(0):
            pass


def test_sums_rebuilt_for_old_shards_are_the_writers_and_are_used(digits_shards, tmp_path, caplog):
    from pipelines import ViewLoader

    folder = _link_copy(digits_shards, tmp_path / "old")
    _strip_sums(folder)
    manifest = (folder / "manifest.json").read_bytes()
    m = json.loads(manifest)
    for e in m["splits"]["train"]["shards"] + m["splits"]["val"]["shards"]:
        path = write_sums(folder / e["file"], folder / e["index"], sha256=e["sha256"])
        assert path == sums_path(folder / e["file"])
        assert path.read_bytes() == sums_path(digits_shards / e["file"]).read_bytes()  # the writer's bytes
    assert (folder / "manifest.json").read_bytes() == manifest  # runs and caches stay bound to it
    # now found beside the tars: a flipped byte is named before decoding, no warning about missing sums
    e = m["splits"]["train"]["shards"][2]
    tar = folder / e["file"]
    off, size = next((o, n) for ext, o, n, _ in parse_index(folder / e["index"])[1][5] if ext == "png")
    data = bytearray(tar.read_bytes())
    data[off + size // 2] ^= 0x01
    _replace(tar, bytes(data))
    with caplog.at_level(logging.WARNING, logger="pipelines.loader"), pytest.raises(SSKDError) as err:
        ViewLoader(folder, "train", batch_size=128, views=None).epoch(0).__next__()
    key = f"{e['first_id'] + 5:09d}"
    assert str(err.value).startswith(
        f"{tar}: sample {key}: member {key}.png differs from its recorded checksum"
    )
    assert not any("no per-sample checksums" in r.getMessage() for r in caplog.records)
    # sums are never made from a tar that differs from the manifest (they would vouch for the damage)
    with pytest.raises(SSKDError, match="sha256 differs from the manifest"):
        write_sums(tar, folder / e["index"], sha256=e["sha256"])


def test_shard_verify_names_every_bad_sample(digits_shards, tmp_path, capsys):
    from sskd.cli import main

    case = corrupt(digits_shards, tmp_path / "two", "sid-swap", 1)
    folder = Path(case["folder"])
    found = check_samples(folder, "train")
    assert [ln.split(": ")[1] for ln in found] == [f"sample {i:09d}" for i in case["bad"]]
    assert all(ln.startswith(case["tar"] + ": ") and "rewritten sample id" in ln for ln in found)
    assert check_samples(folder, "val") == [] and check_samples(digits_shards) == []
    assert main(["shard", "verify", str(folder), "--no-dali"]) == 1
    err = capsys.readouterr().err
    assert all(f"FAIL {ln}" in err for ln in found)
    # a damaged checksum file is one line naming it, never trusted
    sums = folder / json.loads((folder / "manifest.json").read_text())["splits"]["val"]["shards"][0]["sums"]
    _replace(sums, sums.read_bytes().replace(b" png:", b" png:0", 1))
    assert any(
        ln.startswith(f"{sums}: sha256 differs from the manifest") for ln in check_samples(folder, "val")
    )


def test_duplicated_ids_in_the_manifest_are_refused(digits_shards, tmp_path):
    from pipelines import ViewLoader

    folder = _link_copy(digits_shards, tmp_path / "dup")
    m = json.loads((folder / "manifest.json").read_text())
    train = m["splits"]["train"]
    train["shards"][1] = dict(train["shards"][0])  # shard 0 listed twice: ids 0..255 twice, 256..511 never
    train["num_samples"] = sum(e["samples"] for e in train["shards"])
    _replace(folder / "manifest.json", json.dumps(m).encode())
    with pytest.raises(SSKDError, match=r"shards\[1\] \(train-000000.tar\) starts at id 0, expected 256"):
        ViewLoader(folder, "train", batch_size=64, views=None)


def test_the_check_changes_no_batch(digits_shards):
    from pipelines import ViewLoader

    kw = dict(batch_size=100, views="rotation", seed=2)
    a = [b for b in ViewLoader(digits_shards, "train", **kw).epoch(1)]
    b = [b for b in ViewLoader(digits_shards, "train", verify_samples=False, **kw).epoch(1)]
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(y) and all(np.array_equal(x[k].numpy(), y[k].numpy()) for k in x)


def test_shard_reindex_adds_checksums_to_old_shards_but_never_for_a_damaged_tar(
    digits_shards, tmp_path, capsys
):
    from sskd.cli import main

    folder = _link_copy(digits_shards, tmp_path / "old")
    _strip_sums(folder)
    e = json.loads((folder / "manifest.json").read_text())["splits"]["train"]["shards"][1]
    tar = folder / e["file"]
    off, size = next((o, n) for ext, o, n, _ in parse_index(folder / e["index"])[1][0] if ext == "png")
    data = bytearray(tar.read_bytes())
    data[off + size // 2] ^= 0x10
    _replace(tar, bytes(data))
    manifest = (folder / "manifest.json").read_bytes()
    assert main(["shard", "reindex", str(folder), "--list"]) == 0
    out = capsys.readouterr().out
    lines = [ln.split() for ln in out.splitlines()]
    assert ["checksums", "added", "train-000000.sums"] in lines and ["checksums", "refused", tar.name] in [
        ln[:3] for ln in lines
    ]
    assert (folder / "manifest.json").read_bytes() == manifest
    assert sorted(p.name for p in folder.glob("*.sums")) == sorted(
        p.name for p in digits_shards.glob("*.sums") if p.name != sums_path(tar).name
    )
    # the damaged shard, left without checksums, is still checked whole: its damaged sample is named
    assert check_samples(folder, "train") == [
        f"{tar}: sample {e['first_id']:09d}: member {e['first_id']:09d}.png cannot be decoded "
        f"({check_samples(folder, 'train')[0].split('cannot be decoded (', 1)[1]}"
    ]


def test_a_bad_sample_first_read_in_the_next_epoch_stops_that_epoch_not_the_one_before(
    digits_shards, tmp_path
):
    """A training epoch opens the next one ahead (pipelines.loader), checking its samples: a bad one there
    is no error in the epoch being read, and the next epoch, when asked for, stops with the usual line
    (its samples are checked before DALI decodes any of them, ahead or not)."""
    from pipelines import ViewLoader
    from pipelines.order import rank_segments

    case = corrupt(digits_shards, tmp_path / "flip", "flip", 0)
    bad = case["bad"][0]
    loader = ViewLoader(case["folder"], "train", batch_size=64, views=None, rank=0, world_size=2)
    shards = loader._order_shards()

    def reads(epoch: int) -> bool:
        return any(bad in shards[s].ids[lines] for s, lines in rank_segments(shards, 0, epoch, 0, 2))

    epoch = next(e for e in range(20) if not reads(e) and reads(e + 1))
    ids = [i for b in loader.epoch(epoch) for i in b["id"].tolist()]
    assert bad not in ids and loader._ahead is None  # opening epoch + 1 failed, quietly
    with pytest.raises(SSKDError) as err:
        next(loader.epoch(epoch + 1))
    assert str(err.value).startswith(case["tar"] + ":") and f"sample {bad:09d}" in str(err.value)
    assert "\n" not in str(err.value)
