"""Shared fixtures: real data the project makes itself (scikit-learn's digits and sample photographs)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "2")
torch.set_num_threads(2)


# Time limits (pytest-timeout) that hold on a loaded machine (CI runners, a 2-core VM shared with other jobs,
# where a test may run 5-7x slower than alone): they catch hangs, not slowness. A test without a
# `@pytest.mark.timeout` of its own gets FAST_TIMEOUT (tests not marked slow take seconds alone), a slow one
# the global limit of pyproject.toml (1800 s); the long ones carry their own, about 6-10x their time alone.
FAST_TIMEOUT = 600


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "slow" not in item.keywords and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(FAST_TIMEOUT))
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


@pytest.fixture(scope="session")
def photo_tree(tmp_path_factory):
    from shards.sources import sample_photo_tree

    return sample_photo_tree(
        tmp_path_factory.mktemp("photos") / "src", classes=4, per_class=12, val_per_class=4
    )


@pytest.fixture(scope="session")
def photo_shards(photo_tree, tmp_path_factory):
    """ImageNet-layout shards of real photographs (JPEG bytes kept as they are)."""
    from shards import ShardOptions, write_shards
    from shards.sources import FolderSource

    out = tmp_path_factory.mktemp("photo_shards") / "shards"
    write_shards(FolderSource(photo_tree), out, ShardOptions(max_count=16, progress=False))
    return out
