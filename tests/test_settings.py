"""Few-shot subsets and noisy labels (pipelines.settings): stratified, deterministic, disjoint across
ranks, the same views as the full split, validation untouched, recorded in runs and cache bindings."""

import json
from collections import Counter

import numpy as np
import pytest
import torch

from pipelines import ViewLoader
from pipelines.settings import noisy_labels, subset_ids
from shards.labels import split_labels
from sskd.cache import check_binding
from sskd.cli import main as sskd_main
from sskd.core.errors import SSKDError


def epoch_ids_labels(loader, epoch=0):
    ids, labels, views = [], [], {}
    for batch in loader.epoch(epoch):
        ids += batch["id"].tolist()
        labels += batch["label"].tolist()
        for i, v in zip(batch["id"].tolist(), batch["views"]):
            views[i] = v.clone()
    return ids, labels, views


def test_subset_is_stratified_per_class_and_the_same_every_time(digits_shards):
    labels = split_labels(digits_shards, "train")
    keep = subset_ids(labels, 0.25)
    assert np.array_equal(keep, subset_ids(labels, 0.25)) and np.all(np.diff(keep) > 0)
    full, kept = Counter(labels.tolist()), Counter(labels[keep].tolist())
    assert set(kept) == set(full)
    for c, n in full.items():
        assert abs(kept[c] - 0.25 * n) <= 1, (c, kept[c], n)
    assert abs(len(keep) - 0.25 * len(labels)) <= 1
    assert np.array_equal(subset_ids(labels, 1.0), np.arange(len(labels)))
    with pytest.raises(SSKDError, match="subset_fraction=0.001"):
        subset_ids(labels, 0.001)  # 1 sample for 10 classes


def test_the_loader_reads_exactly_the_subset_once_per_epoch_across_ranks_with_unchanged_views(digits_shards):
    labels = split_labels(digits_shards, "train")
    keep = subset_ids(labels, 0.25)
    seen = []
    for rank in range(2):
        loader = ViewLoader(
            digits_shards,
            "train",
            batch_size=32,
            views="rotation",
            rank=rank,
            world_size=2,
            subset_fraction=0.25,
        )
        ids, got, views = epoch_ids_labels(loader)
        assert len(ids) == loader.rank_num_samples and got == labels[ids].tolist()
        seen.append(ids)
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == keep.tolist()
    a = ViewLoader(digits_shards, "train", batch_size=32, views="rotation", subset_fraction=0.25)
    b = ViewLoader(digits_shards, "train", batch_size=32, views="rotation")
    assert len(a) == -(-len(keep) // 32)
    _, _, va = epoch_ids_labels(a, epoch=1)
    _, _, vb = epoch_ids_labels(b, epoch=1)
    for i in list(va)[:20]:  # views depend on (seed, epoch, id, view), not on the samples around
        assert torch.equal(va[i], vb[i]), i


def test_label_noise_rate_determinism_and_clean_validation(digits_shards):
    labels = split_labels(digits_shards, "train")
    noisy, flipped = noisy_labels(labels, 0.4, seed=3, num_classes=10)
    assert len(flipped) == round(0.4 * len(labels))
    assert (
        np.all(noisy[flipped] != labels[flipped])
        and np.all(noisy[flipped] >= 0)
        and np.all(noisy[flipped] < 10)
    )
    rest = np.setdiff1d(np.arange(len(labels)), flipped)
    assert np.array_equal(noisy[rest], labels[rest])
    again, flipped2 = noisy_labels(labels, 0.4, seed=3, num_classes=10)
    assert np.array_equal(again, noisy) and np.array_equal(flipped, flipped2)
    other, _ = noisy_labels(labels, 0.4, seed=4, num_classes=10)
    assert not np.array_equal(other, noisy)
    # symmetric: the new class is spread over the other classes (each of the 9 shifts ~1/9 of the flips)
    shifts = Counter(((noisy[flipped] - labels[flipped]) % 10).tolist())
    assert set(shifts) == set(range(1, 10)) and max(shifts.values()) < 2.5 * len(flipped) / 9

    loader = ViewLoader(digits_shards, "train", batch_size=64, seed=3, label_noise=0.4)
    ids, got, _ = epoch_ids_labels(loader)
    assert got == noisy[ids].tolist() and loader.flipped_ids == flipped.tolist()
    val_clean = ViewLoader(digits_shards, "val", batch_size=64, train=False, seed=3)
    val_noisy = ViewLoader(digits_shards, "val", batch_size=64, train=False, seed=3, label_noise=0.4)
    assert val_noisy.label_noise == 0.0
    assert (
        epoch_ids_labels(val_noisy)[1]
        == epoch_ids_labels(val_clean)[1]
        == split_labels(digits_shards, "val")[epoch_ids_labels(val_clean)[0]].tolist()
    )


def test_a_run_records_its_setting_and_resume_refuses_another(digits_shards, tmp_path, capsys):
    out = tmp_path / "s"
    args = [
        "train-teacher",
        "--shards",
        str(digits_shards),
        "--arch",
        "resnet8",
        "--out",
        str(out),
        "--no-progress",
        "--batch-size",
        "32",
        "--max-steps",
        "2",
        "--set",
        "run.eval_every=0",
        "--set",
        "data.subset_fraction=0.5",
        "--set",
        "data.label_noise=0.2",
    ]
    assert sskd_main(args) == 0
    record = json.loads((out / "data.json").read_text())
    labels = split_labels(digits_shards, "train")
    assert record["subset_fraction"] == 0.5 and record["label_noise"] == 0.2
    assert record["kept_ids"] == subset_ids(labels, 0.5).tolist() and record["train_samples"] == len(
        record["kept_ids"]
    )
    noisy, flipped = noisy_labels(labels, 0.2, seed=0, num_classes=10)
    assert record["flipped_ids"] == flipped.tolist() and record["noisy_labels"] == noisy[flipped].tolist()
    assert "subset_fraction: 0.5" in (out / "config.yaml").read_text()
    capsys.readouterr()
    args[-1] = "data.label_noise=0.3"
    assert sskd_main([*args, "--resume", "--max-steps", "3"]) == 2
    assert "data.label_noise was 0.2, now 0.3" in capsys.readouterr().err


def test_cache_binding_a_whole_split_cache_serves_any_subset_a_subset_cache_only_its_own():
    base = {"subset_fraction": 1.0}
    check_binding({"binding": base}, {"subset_fraction": 0.25}, "c")
    check_binding({"binding": {}}, {"subset_fraction": 0.25}, "c")  # a cache from before the field
    check_binding({"binding": {"subset_fraction": 0.25}}, {"subset_fraction": 0.25}, "c")
    with pytest.raises(SSKDError, match="subset_fraction=0.25 subset but this run has 0.5"):
        check_binding({"binding": {"subset_fraction": 0.25}}, {"subset_fraction": 0.5}, "c")


def test_crd_draws_negatives_only_from_the_subset_with_the_noisy_labels(digits_shards):
    from pipelines.settings import training_labels
    from sskd.methods.crd import NegativeSampler

    labels = split_labels(digits_shards, "train")
    eff = training_labels(labels, 0.5, 0.2, seed=1, num_classes=10)
    keep = subset_ids(labels, 0.5)
    noisy, _ = noisy_labels(labels, 0.2, seed=1, num_classes=10)
    assert np.array_equal(np.flatnonzero(eff >= 0), keep) and np.array_equal(eff[keep], noisy[keep])
    sampler = NegativeSampler(eff, k=64, seed=0, classes=[str(i) for i in range(10)])
    drawn = sampler.draw(keep[:8], epoch=0)
    assert np.isin(drawn, keep).all()  # positives and negatives all come from the subset
    assert all((eff[row[1:]] != eff[row[0]]).all() for row in drawn)
