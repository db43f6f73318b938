"""Shared fixtures: real data the project makes itself (scikit-learn's digits and sample photographs)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "2")
torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory):
    """scikit-learn's 1,797 digits as shards (256 per shard, so train has several), written once."""
    from shards import write_digits

    out = tmp_path_factory.mktemp("digits") / "shards"
    write_digits(out, seed=0, max_count=256, progress=False)
    return out


def make_photo_tree(root, classes: int = 4, per_class: int = 12, val_per_class: int = 4, seed: int = 0):
    """An ImageNet-layout folder of real photographs: crops of scikit-learn's two sample photos.

    ``root/train/n0000000k/*.JPEG`` and ``root/val/n0000000k/*.JPEG``, ~500x375 JPEG q90 (varied sizes).
    """
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [np.asarray(p) for p in load_sample_images().images]  # two 427x640 RGB photos
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c in range(classes):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                photo = photos[(c + i) % 2]
                h, w = int(rng.integers(300, 400)), int(rng.integers(400, 520))
                y, x = int(rng.integers(0, photo.shape[0] - h)), int(rng.integers(0, photo.shape[1] - w))
                crop = Image.fromarray(photo[y:y + h, x:x + w])
                if c % 2:
                    crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                crop.resize((500, 375) if i % 3 else (w, h)).save(d / f"img_{c}_{i}.JPEG", quality=90)
    return root


@pytest.fixture(scope="session")
def photo_tree(tmp_path_factory):
    return make_photo_tree(tmp_path_factory.mktemp("photos") / "src")


@pytest.fixture(scope="session")
def photo_shards(photo_tree, tmp_path_factory):
    """ImageNet-layout shards of real photographs (JPEG bytes kept as they are)."""
    from shards import ShardOptions, write_shards
    from shards.sources import FolderSource

    out = tmp_path_factory.mktemp("photo_shards") / "shards"
    write_shards(FolderSource(photo_tree), out, ShardOptions(max_count=16, progress=False))
    return out
