"""tests/scripts/digit_pairs.py: the 100-class digit pairs (docs/cache.md, "100 classes") are what they say.

Each half of every image is matched, pixel for pixel, against the scikit-learn scans resized here (not by
the script), so a label is checked against the digits it was drawn from, not against the script's own
bookkeeping; and ``sskd shard cifar100`` must accept the folder as the official layout.
"""

import importlib.util
import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sskd.cli import main

REPO = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("digit_pairs", REPO / "tests/scripts/digit_pairs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def scans_by_pixels(columns: int) -> dict:
    """Every scan as the 32-row x ``columns``-column slot it becomes, keyed by its pixels: (scan index, digit)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    gray = np.clip(digits.images / 16.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)
    out = {}
    for i, g in enumerate(gray):
        slot = np.asarray(Image.fromarray(g, "L").resize((columns, 32), Image.BICUBIC))
        assert slot.tobytes() not in out  # every scan distinct, so a slot names its scan
        out[slot.tobytes()] = (i, int(digits.target[i]))
    return out


@pytest.fixture(scope="module")
def halves_by_pixels():
    return scans_by_pixels(16)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs") / "cifar-100-python"
    load_script().build(out, n_train=300, n_test=200, seed=3)
    return out


def unpickle(path):
    with open(path, "rb") as fh:
        return pickle.load(fh, encoding="bytes")


def test_labels_are_ten_left_plus_right_of_the_scans_drawn(pairs, halves_by_pixels):
    scans = {}
    for split, n in (("train", 300), ("test", 200)):
        d = unpickle(pairs / split)
        data = np.asarray(d[b"data"])
        assert data.dtype == np.uint8 and data.shape == (n, 3072)
        images = data.reshape(n, 3, 32, 32)
        assert (images == images[:, :1]).all()  # grey: the three channels equal
        labels = d[b"fine_labels"]
        assert sorted(labels) == sorted(list(range(100)) * (n // 100))  # every class equally often
        assert d[b"coarse_labels"] == [c // 10 for c in labels]
        used = set()
        for img, label, name in zip(images[:, 0], labels, d[b"filenames"], strict=True):
            (li, ld) = halves_by_pixels[np.ascontiguousarray(img[:, :16]).tobytes()]
            (ri, rd) = halves_by_pixels[np.ascontiguousarray(img[:, 16:]).tobytes()]
            assert label == 10 * ld + rd
            assert name.decode().endswith(f"_l{li:04d}_r{ri:04d}.png")  # the file name says which scans
            used |= {li, ri}
        scans[split] = used
    assert not scans["train"] & scans["test"]  # test images use scans no train image uses
    meta = unpickle(pairs / "meta")
    assert meta[b"fine_label_names"] == [f"{c:02d}".encode() for c in range(100)]


def test_same_seed_same_bytes_other_seed_other_draws(pairs, tmp_path):
    mod = load_script()
    mod.build(tmp_path / "again", n_train=300, n_test=200, seed=3)
    mod.build(tmp_path / "other", n_train=300, n_test=200, seed=4)
    for name in ("train", "test", "meta"):
        assert (tmp_path / "again" / name).read_bytes() == (pairs / name).read_bytes()
    assert (tmp_path / "other" / "train").read_bytes() != (pairs / "train").read_bytes()
    with pytest.raises(SystemExit, match="exists"):
        mod.build(tmp_path / "again", n_train=300, n_test=200, seed=3)


def test_shard_cifar100_accepts_it(pairs, tmp_path):
    import webdataset as wds

    out = tmp_path / "shards"
    assert main(["shard", "cifar100", str(pairs.parent), str(out), "--no-progress"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["num_classes"] == 100 and m["classes"][:3] == ["00", "01", "02"]
    assert m["splits"]["train"]["num_samples"] == 300 and m["splits"]["val"]["num_samples"] == 200
    raw = unpickle(pairs / "train")
    seen = 0
    for e in m["splits"]["train"]["shards"]:
        for s in wds.WebDataset(str(out / e["file"]), shardshuffle=False):
            i = int(json.loads(s["json"])["src"].split("pair_")[1][:5])
            assert int(s["cls"]) == raw[b"fine_labels"][i]
            pixels = np.array(Image.open(io.BytesIO(s["png"])).convert("RGB"))
            assert np.array_equal(pixels, raw[b"data"][i].reshape(3, 32, 32).transpose(1, 2, 0))
            seen += 1
    assert seen == 300
    assert main(["shard", "verify", str(out)]) == 0


def test_triples_are_1000_classes_of_three_scans_each(tmp_path):
    """``--digits 3``: each image is a blank column, three 10-column scans, a blank column; its label is the
    three digits read left to right, matched pixel for pixel against the scans resized here."""
    thirds = scans_by_pixels(10)
    out = load_script().build(tmp_path / "trip", n_train=1000, n_test=1000, seed=1, n_digits=3)
    scans = {}
    for split in ("train", "test"):
        d = unpickle(out / split)
        images = np.asarray(d[b"data"]).reshape(1000, 3, 32, 32)[:, 0]
        assert sorted(d[b"fine_labels"]) == list(range(1000))  # one image per class
        assert d[b"coarse_labels"] == [c // 100 for c in d[b"fine_labels"]]
        assert (images[:, :, 0] == 0).all() and (images[:, :, 31] == 0).all()
        used = set()
        for img, label, name in zip(images, d[b"fine_labels"], d[b"filenames"], strict=True):
            drawn = [
                thirds[np.ascontiguousarray(img[:, 1 + 10 * j : 11 + 10 * j]).tobytes()] for j in range(3)
            ]
            assert label == 100 * drawn[0][1] + 10 * drawn[1][1] + drawn[2][1]
            (a, _), (b, _), (c, _) = drawn
            assert name.decode().startswith("trip_") and name.decode().endswith(
                f"_a{a:04d}_b{b:04d}_c{c:04d}.png"
            )
            used |= {a, b, c}
        scans[split] = used
    assert not scans["train"] & scans["test"]
    assert unpickle(out / "meta")[b"fine_label_names"][:2] == [b"000", b"001"]
    with pytest.raises(SystemExit, match=">= 1000"):
        load_script().build(tmp_path / "few", n_train=500, n_test=1000, n_digits=3)
