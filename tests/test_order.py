"""The training order (pipelines.order): new every epoch, a pure function of (seed, epoch, rank, world
size); DALI reads exactly that order; every sample once per epoch; sskd bench shuffle's figures."""

import json
import shutil

import numpy as np
import pytest
import torch

from pipelines import ViewLoader
from pipelines.order import epoch_sequence, rank_segments, split_shards
from shards.format import load_manifest
from sskd.bench.shuffle import dali_epoch, layout_shards, measure, run, simulated_epoch


def loader_ids(loader, epoch):
    return [i for b in loader.epoch(epoch) for i in b["id"].tolist()]


def rank_ids(shards, seed: int, epoch: int, rank: int, world_size: int) -> np.ndarray:
    """The sample ids a rank reads in the epoch, in reading order: what DALI must yield."""
    segs = rank_segments(shards, seed, epoch, rank, world_size)
    return np.concatenate([shards[s].ids[lines] for s, lines in segs]) if segs else np.zeros(0, np.int64)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_epoch_a_new_order_disjoint_complete_equal_batches_and_dali_reads_it(digits_shards, world):
    n = load_manifest(digits_shards)["splits"]["train"]["num_samples"]
    per_epoch = []
    for epoch in range(3):
        ranks = []
        for rank in range(world):
            loader = ViewLoader(digits_shards, "train", batch_size=64, rank=rank, world_size=world)
            ids = loader_ids(loader, epoch)
            want = rank_ids(loader._order_shards(), loader.seed, epoch, rank, world)
            assert ids == want.tolist()  # DALI yields exactly what pipelines.order says
            ranks.append(ids)
        assert (
            len(
                {
                    len(ViewLoader(digits_shards, "train", batch_size=64, rank=r, world_size=world))
                    for r in range(world)
                }
            )
            == 1
        )
        flat = [i for r in ranks for i in r]
        assert sorted(flat) == list(range(n))  # every sample once, ranks disjoint
        per_epoch.append(ranks)
    assert per_epoch[0] != per_epoch[1] != per_epoch[2]
    if world > 1:  # samples move between ranks
        moved = np.mean([np.isin(per_epoch[0][0], per_epoch[1][0], invert=True).mean()])
        assert moved > 0.2


def test_the_order_is_a_pure_function_and_views_do_not_depend_on_it(digits_shards):
    shards = split_shards(digits_shards, load_manifest(digits_shards), "train")
    a = epoch_sequence(shards, 5, 2)
    b = epoch_sequence(shards, 5, 2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(epoch_sequence(shards, 5, 3)[1], a[1])
    one = ViewLoader(digits_shards, "train", batch_size=64, views="rotation")
    two = ViewLoader(digits_shards, "train", batch_size=32, views="rotation", rank=1, world_size=2)
    views_one = {i: v for b in one.epoch(1) for i, v in zip(b["id"].tolist(), b["views"])}
    for batch in two.epoch(1):
        for i, v in zip(batch["id"].tolist()[:8], batch["views"][:8]):
            assert torch.equal(views_one[i], v)


def test_the_simulation_equals_the_order_dali_produces(digits_shards):
    shards = split_shards(digits_shards, load_manifest(digits_shards), "train")
    args = dict(shards=digits_shards, split="train", batch_size=64, views=None, seed=4)
    for world in (1, 3):
        for epoch in (0, 1):
            real = dali_epoch(args, epoch, world)
            sim = simulated_epoch(shards, 4, epoch, world)
            assert [r.tolist() for r in real] == [s.tolist() for s in sim]
            assert [r.tolist() for r in real] == [
                rank_ids(shards, 4, epoch, k, world).tolist() for k in range(world)
            ]


def test_measure_against_hand_computed_figures():
    e0 = [np.array([0, 1]), np.array([2, 3])]
    e1 = [np.array([3, 2]), np.array([1, 0])]
    got = measure([e0, e1], batch=2, n_id=4, probes=np.arange(4))
    # every sample changes rank; positions (0,1,0,1) -> (1,0,1,0): Spearman -1; each meets one neighbour
    assert (
        got["rank_change"] == 1.0 and got["position_corr"] == pytest.approx(-1.0) and got["neighbours"] == 1.0
    )
    e2 = [np.array([0, 2]), np.array([1, 3])]
    got = measure([e0, e1, e2], batch=2, n_id=4, probes=np.array([0, 3]))
    # rank changes: e0->e1 all 4; e1->e2: 0 (rank1->0), 1 (1->1 stays), 2 (0->0 stays), 3 (0->1): 2 of 4
    assert got["rank_change"] == pytest.approx((1.0 + 0.5) / 2)
    # sample 0 meets 1 (e0, e1) and 2 (e2); sample 3 meets 2 (e0, e1) and 1 (e2)
    assert got["neighbours"] == 2.0


def test_a_manifest_alone_is_simulated_with_the_same_functions(digits_shards, tmp_path):
    only = tmp_path / "m"
    only.mkdir()
    shutil.copy(digits_shards / "manifest.json", only / "manifest.json")
    res = run(str(only), None, world=2, epochs=3, batch=16, seed=1, n_probes=50, progress=lambda s: None)
    assert res["mode"] == "simulated" and res["samples"] == 1437
    shards = split_shards(only, load_manifest(only), "train")
    all_ids = np.concatenate([s.ids for s in shards])
    probes = np.random.default_rng([1, 0x9B0BE]).choice(all_ids, size=50, replace=False)
    want = measure([simulated_epoch(shards, 1, e, 2) for e in range(3)], 16, 1437, probes)
    assert res["rank_change"] == want["rank_change"] and res["neighbours"] == want["neighbours"]
    assert {"rank_change", "rank_change_ideal", "position_corr", "neighbours", "neighbours_ideal"} <= set(res)


def test_bench_shuffle_command_on_a_large_simulated_layout(tmp_path, capsys):
    from sskd.cli import main

    out = tmp_path / "s.json"
    assert (
        main(
            [
                "bench",
                "shuffle",
                "--layout",
                "100000:64",
                "--ranks",
                "4",
                "--epochs",
                "3",
                "--probes",
                "200",
                "--legacy",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    assert res["rank_change"] >= 0.8 * (1 - 1 / 4) and abs(res["position_corr"]) <= 0.1
    assert res["legacy"]["rank_change"] == 0.0 and res["legacy"]["position_corr"] > 0.9  # the old order
    assert res["neighbours"] >= 0.5 * res["neighbours_ideal"]
    assert "this order" in capsys.readouterr().out
    assert len(layout_shards("10:3")) == 3 and sum(len(s.ids) for s in layout_shards("10:3")) == 10


def test_consecutive_shards_are_interleaved_in_chunks():
    from pipelines.order import GROUP, MAX_SEGMENTS, MIN_CHUNK, chunk_size

    shards = layout_shards("4000:32")  # 125 samples a shard
    shard_of, line_of = epoch_sequence(shards, 0, 0, world_size=2)
    c = chunk_size(4000, 2)
    assert c == MIN_CHUNK
    head = shard_of[: GROUP * c]
    assert len(set(head.tolist())) == GROUP  # the first round takes one chunk of each shard of the group
    assert all(len(set(head[k * c : (k + 1) * c].tolist())) == 1 for k in range(GROUP))
    pairs = set(zip(shard_of.tolist(), line_of.tolist()))
    assert len(pairs) == 4000  # still every sample once
    assert chunk_size(1_281_167, 8) == -(-(1_281_167 // 8) // MAX_SEGMENTS) == 10
