"""Shard writers: round trip, determinism, bad input, interruption and resume, verify, source formats."""

import io
import json
import pickle
import shutil

import numpy as np
import pytest
from PIL import Image

from shards import ShardOptions, write_shards
from shards.sources import FolderSource, cifar100_source, digits_source
from shards.verify import verify
from sskd.cli import main
from sskd.core.errors import SSKDError


def tar_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))} | {
        p.name: p.read_bytes() for p in sorted(folder.glob("*.idx"))
    }


def read_back(folder, split="train"):
    import webdataset as wds

    m = json.loads((folder / "manifest.json").read_text())
    out = {}
    for e in m["splits"][split]["shards"]:
        for s in wds.WebDataset(str(folder / e["file"]), shardshuffle=False):
            ext = "png" if "png" in s else "jpg"
            out[int.from_bytes(s["sid"], "little")] = (
                np.array(Image.open(io.BytesIO(s[ext])).convert("RGB")),
                int(s["cls"]),
                json.loads(s["json"])["src"],
            )
    return m, out


def test_digits_round_trip_pixels_labels_and_manifest(digits_shards):
    src = digits_source(seed=0)
    m, samples = read_back(digits_shards)
    assert m["dataset"] == "digits" and m["num_classes"] == 10 and m["layout"] == "cifar"
    assert m["splits"]["train"]["num_samples"] == 1437 and m["splits"]["val"]["num_samples"] == 360
    assert sorted(samples) == list(range(1437))
    assert len(m["splits"]["train"]["shards"]) == 6  # 256 per shard
    by_path = {p: i for i, p in enumerate(src.splits["train"].paths)}
    for sid in (0, 1, 700, 1436):
        pixels, label, path = samples[sid]
        i = by_path[path]
        assert np.array_equal(pixels, src.arrays["train"][i])  # PNG is lossless
        assert label == src.splits["train"].labels[i]
    assert all(len(e["sha256"]) == 64 for e in m["splits"]["train"]["shards"])


def test_dali_reads_the_shards(digits_shards):
    assert verify(digits_shards, log=lambda *_: None) == []


def test_byte_identical_whatever_workers(tmp_path):
    src = digits_source(seed=3)
    write_shards(src, tmp_path / "w1", ShardOptions(seed=3, max_count=400, workers=1, progress=False))
    write_shards(src, tmp_path / "w2", ShardOptions(seed=3, max_count=400, workers=2, progress=False))
    assert tar_bytes(tmp_path / "w1") == tar_bytes(tmp_path / "w2")
    m1, m2 = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("w1", "w2"))
    assert m1 == m2


def test_interrupted_run_leaves_nothing_complete_looking_and_resumes(tmp_path, monkeypatch):
    from shards import writer

    src = digits_source(seed=0)
    opts = ShardOptions(max_count=300, progress=False)
    write_shards(src, tmp_path / "ref", opts)
    real_finish, calls = writer.ShardBuilder.finish, {"n": 0}

    def dying_finish(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as if the job were killed while the third shard closes
        return real_finish(self)

    monkeypatch.setattr(writer.ShardBuilder, "finish", dying_finish)
    with pytest.raises(KeyboardInterrupt):
        write_shards(src, tmp_path / "cut", opts)
    out = tmp_path / "cut"
    assert not (out / "manifest.json").exists()
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "train-000001.tar"]
    assert not list(out.glob(".*partial"))
    monkeypatch.setattr(writer.ShardBuilder, "finish", real_finish)
    with pytest.raises(SSKDError, match="not empty"):
        write_shards(src, out, opts)
    write_shards(src, out, ShardOptions(max_count=300, progress=False, resume=True))
    assert tar_bytes(out) == tar_bytes(tmp_path / "ref")
    assert json.loads((out / "manifest.json").read_text()) == json.loads(
        (tmp_path / "ref" / "manifest.json").read_text()
    )


def fabricate_cifar100(root, n_train=40, n_test=20):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    names = [f"class_{i:02d}".encode() for i in range(100)]
    for fname, n in (("train", n_train), ("test", n_test)):
        d = {
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
            b"batch_label": fname.encode(),
            b"fine_labels": rng.integers(0, 100, n).tolist(),
            b"coarse_labels": rng.integers(0, 20, n).tolist(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        }
        with open(root / fname, "wb") as fh:
            pickle.dump(d, fh, protocol=2)
    with open(root / "meta", "wb") as fh:
        pickle.dump({b"fine_label_names": names, b"coarse_label_names": [b"c"] * 20}, fh, protocol=2)
    return root


def test_cifar100_official_format(tmp_path):
    src_dir = fabricate_cifar100(tmp_path / "cifar-100-python")
    assert main(["shard", "cifar100", str(tmp_path), str(tmp_path / "out"), "--no-progress"]) == 0
    m, samples = read_back(tmp_path / "out")
    with open(src_dir / "train", "rb") as fh:
        raw = pickle.load(fh, encoding="bytes")
    assert m["classes"][:2] == ["class_00", "class_01"] and m["num_classes"] == 100
    assert m["splits"]["val"]["num_samples"] == 20  # the test split is written as val
    for _sid, (pixels, label, path) in samples.items():
        i = int(path.split("img_")[1].split(".")[0])
        assert label == raw[b"fine_labels"][i]
        assert np.array_equal(pixels, raw[b"data"][i].reshape(3, 32, 32).transpose(1, 2, 0))
    assert main(["shard", "verify", str(tmp_path / "out")]) == 0


def test_imagefolder_layouts_keep_jpeg_bytes(photo_tree, tmp_path):
    assert (
        main(
            [
                "shard",
                "imagefolder",
                str(photo_tree),
                str(tmp_path / "a"),
                "--no-progress",
                "--max-count",
                "10",
            ]
        )
        == 0
    )
    m, samples = read_back(tmp_path / "a")
    assert m["layout"] == "imagenet" and m["classes"] == sorted(
        p.name for p in (photo_tree / "train").iterdir()
    )
    assert m["splits"]["train"]["num_samples"] == 48 and len(m["splits"]["train"]["shards"]) == 5
    import webdataset as wds

    first = next(iter(wds.WebDataset(str(tmp_path / "a" / "train-000000.tar"), shardshuffle=False)))
    src = json.loads(first["json"])["src"]
    assert first["jpg"] == open(src, "rb").read()  # original bytes, no re-encode
    # flat val folder + label file (ImageNet's ground-truth layout)
    flat = tmp_path / "flat"
    shutil.copytree(photo_tree / "train", flat / "train")
    (flat / "val").mkdir()
    files = sorted((photo_tree / "val").rglob("*.JPEG"))
    labels = []
    for i, f in enumerate(files):
        shutil.copy(f, flat / "val" / f"v_{i:03d}.JPEG")
        labels.append(m["classes"].index(f.parent.name))
    (tmp_path / "labels.txt").write_text("\n".join(map(str, labels)) + "\n")
    assert (
        main(
            [
                "shard",
                "imagefolder",
                str(flat),
                str(tmp_path / "b"),
                "--val-labels",
                str(tmp_path / "labels.txt"),
                "--no-progress",
            ]
        )
        == 0
    )
    mb, val = read_back(tmp_path / "b", "val")
    assert sorted(lab for _, lab, _ in val.values()) == sorted(labels)
    (tmp_path / "short.txt").write_text("\n".join(map(str, labels[:-1])) + "\n")
    assert (
        main(
            [
                "shard",
                "imagefolder",
                str(flat),
                str(tmp_path / "c"),
                "--val-labels",
                str(tmp_path / "short.txt"),
            ]
        )
        == 2
    )


@pytest.mark.parametrize("bad", ["truncated", "garbage", "unreadable", "empty_class"])
def test_bad_input_stops_or_is_skipped_and_listed(photo_tree, tmp_path, bad, capsys):
    src = tmp_path / "src"
    shutil.copytree(photo_tree, src)
    victim = sorted((src / "train" / "n00000001").glob("*.JPEG"))[0]
    if bad == "truncated":
        victim.write_bytes(victim.read_bytes()[:2000])
    elif bad == "garbage":
        victim.write_bytes(b"not an image at all" * 10)
    elif bad == "unreadable":
        victim.unlink()
        victim.symlink_to(tmp_path / "does-not-exist.JPEG")  # listed, but cannot be read
    else:
        for f in (src / "train" / "n00000002").iterdir():
            f.unlink()
        victim = src / "train" / "n00000002"
    rc = main(["shard", "imagefolder", str(src), str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and err.startswith("sskd: error:") and str(victim) in err
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert (
        main(["shard", "imagefolder", str(src), str(tmp_path / "skip"), "--skip-bad", "--no-progress"]) == 0
    )
    m = json.loads((tmp_path / "skip" / "manifest.json").read_text())
    skipped = m["splits"]["train"]["skipped"]
    assert [s["path"] for s in skipped] == [str(victim)] and skipped[0]["reason"]
    expected = 48 - (12 if bad == "empty_class" else 1)
    assert m["splits"]["train"]["num_samples"] == expected


def test_missing_cifar_pickle_names_the_file(tmp_path):
    src = fabricate_cifar100(tmp_path / "cifar-100-python")
    (src / "test").unlink()
    with pytest.raises(SSKDError, match="cifar-100-python/test: missing"):
        cifar100_source(src)


def test_verify_catches_tampering(digits_shards, tmp_path, capsys):
    folder = tmp_path / "s"
    shutil.copytree(digits_shards, folder)
    tar = folder / "train-000002.tar"
    data = bytearray(tar.read_bytes())
    data[5000] ^= 0xFF
    tar.write_bytes(bytes(data))
    assert main(["shard", "verify", str(folder)]) == 1
    assert "train-000002.tar: sha256 differs" in capsys.readouterr().err


def test_dry_run_writes_nothing(tmp_path, capsys):
    assert main(["shard", "digits", str(tmp_path / "d"), "--dry-run"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["splits"]["train"]["num_samples"] == 1437 and not (tmp_path / "d").exists()


def test_folder_source_errors(tmp_path):
    with pytest.raises(SSKDError, match="train: not found"):
        FolderSource(tmp_path)


def _loader_error(folder, capsys=None):
    from pipelines import ViewLoader

    with pytest.raises(SSKDError) as err:
        loader = ViewLoader(folder, "train", batch_size=64, views="rotation")
        for _ in loader.epoch(0):
            pass
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize("source", ["train-000003.idx", "val-000000.idx", "train-000005.idx"])
def test_stale_index_is_caught_before_dali_reads_it(digits_shards, tmp_path, source):
    """An index copied from another shard made DALI read at wrong offsets (exit 139, nothing named)."""
    folder = tmp_path / "s"
    shutil.copytree(digits_shards, folder)
    shutil.copy(folder / source, folder / "train-000001.idx")
    msg = _loader_error(folder)
    assert msg.startswith(f"{folder / 'train-000001.idx'}:") and "sskd shard reindex" in msg


def test_edited_manifest_count_is_caught(digits_shards, tmp_path):
    folder = tmp_path / "s"
    shutil.copytree(digits_shards, folder)
    m = json.loads((folder / "manifest.json").read_text())
    m["splits"]["train"]["num_samples"] += 100
    (folder / "manifest.json").write_text(json.dumps(m))
    assert "splits.train.num_samples is 1537 but its shards hold 1437" in _loader_error(folder)
    m["splits"]["train"]["num_samples"] -= 100
    m["splits"]["train"]["shards"][2]["samples"] -= 1
    m["splits"]["train"]["shards"][3]["samples"] += 1
    (folder / "manifest.json").write_text(json.dumps(m))
    assert "train-000002.idx: 256 samples, the manifest says 255" in _loader_error(folder)


def _member(folder, shard, line, ext):
    tok = (folder / f"{shard}.idx").read_text().splitlines()[line + 1].split()
    i = tok.index(ext)
    return int(tok[i + 1]), int(tok[i + 2]), tok[i + 3].split(".")[0]


def test_corrupt_label_and_image_name_the_shard_and_sample(digits_shards, tmp_path):
    folder = tmp_path / "s"
    shutil.copytree(digits_shards, folder)
    tar = folder / "train-000001.tar"
    data = bytearray(tar.read_bytes())
    off, _, key = _member(folder, "train-000001", 10, "lbl")
    data[off + 7] ^= 0x7F  # the label's high byte: a label far outside 0..9
    tar.write_bytes(bytes(data))
    msg = _loader_error(folder)
    assert msg.startswith(f"{tar}: sample {key}: label ") and "outside 0..9" in msg
    data[off + 7] ^= 0x7F
    off, size, key = _member(folder, "train-000001", 20, "png")
    data[off + 40 : off + size - 20] = bytes(size - 60)  # the image's compressed data zeroed
    tar.write_bytes(bytes(data))
    msg = _loader_error(folder)  # found by the per-sample checksums before DALI decodes it (issue 19)
    assert msg.startswith(f"{tar}: sample {key}: member {key}.png differs from its recorded checksum"), msg


def test_reindex_rebuilds_missing_and_stale_indexes_byte_identical(digits_shards, tmp_path, capsys):
    folder = tmp_path / "s"
    shutil.copytree(digits_shards, folder)
    shutil.copy(folder / "train-000003.idx", folder / "train-000001.idx")
    (folder / "val-000000.idx").unlink()
    assert main(["shard", "reindex", str(folder)]) == 0
    assert "2 rebuilt (train-000001.idx, val-000000.idx)" in capsys.readouterr().out
    assert tar_bytes(folder) == tar_bytes(digits_shards)
    assert verify(folder, log=lambda *_: None) == []
    assert main(["shard", "reindex", str(folder)]) == 0 and "0 rebuilt" in capsys.readouterr().out


@pytest.mark.parametrize("change", ["added", "removed", "changed", "other_folder"])
def test_resume_refuses_a_source_that_changed(photo_tree, tmp_path, monkeypatch, change):
    """--resume mixed old and new samples after the source folder was edited, and verify still passed."""
    from shards import writer

    src = tmp_path / "src"
    shutil.copytree(photo_tree, src)
    real_finish, calls = writer.ShardBuilder.finish, {"n": 0}

    def dying_finish(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_finish(self)

    monkeypatch.setattr(writer.ShardBuilder, "finish", dying_finish)
    opts = ShardOptions(max_count=10, progress=False)
    with pytest.raises(KeyboardInterrupt):
        write_shards(FolderSource(src), tmp_path / "out", opts)
    monkeypatch.setattr(writer.ShardBuilder, "finish", real_finish)
    victim = sorted((src / "train" / "n00000001").glob("*.JPEG"))[3]
    if change == "added":
        shutil.copy(victim, victim.with_name("extra.JPEG"))
        needle = "train: 1 added (e.g. train/n00000001/extra.JPEG)"
    elif change == "removed":
        victim.unlink()
        needle = f"train: 1 removed (e.g. train/n00000001/{victim.name})"
    elif change == "changed":
        victim.write_bytes(victim.read_bytes()[:-10] + b"\xff\xd9")
        needle = f"train: 1 changed (e.g. train/n00000001/{victim.name})"
    else:
        shutil.rmtree(src / "val" / "n00000000")
        shutil.move(str(src), str(tmp_path / "moved"))
        src = tmp_path / "moved"
        needle = "val: 4 removed"
    resumed = ShardOptions(max_count=10, progress=False, resume=True)
    with pytest.raises(SSKDError) as err:
        write_shards(FolderSource(src), tmp_path / "out", resumed)
    assert needle in str(err.value) and "new folder" in str(err.value), str(err.value)
    if change == "other_folder":
        assert f"now {src.resolve()}" in str(err.value)
    # the same source resumes, and a copy of it elsewhere too (same files, same bytes)
    if change != "other_folder":
        return
    shutil.rmtree(src)
    shutil.copytree(photo_tree, tmp_path / "copy")
    write_shards(FolderSource(tmp_path / "copy"), tmp_path / "out", resumed)
    assert verify(tmp_path / "out", log=lambda *_: None) == []


def test_two_shard_jobs_on_one_folder(tmp_path):
    from sskd.core.lock import FolderLock

    with FolderLock(tmp_path / "out", "shard folder"), pytest.raises(SSKDError, match="in use by pid"):
        write_shards(digits_source(), tmp_path / "out", ShardOptions(progress=False, resume=True))
