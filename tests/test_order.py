"""The training order (pipelines.order): new every epoch, a pure function of (seed, epoch, rank, world
size); DALI reads exactly that order; every sample once per epoch; sskd bench shuffle's figures."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines import ViewLoader
from pipelines.order import MAX_SEGMENTS, chunk_size, epoch_sequence, rank_segments, split_shards
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


def _chunks(shards, world: int) -> int:
    """How many chunks the interleave cuts the epoch into: each is read from one shard, so an epoch never
    needs more segments than this, plus one per rank boundary that falls inside a chunk."""
    sizes = [len(s.keep) if s.keep is not None else len(s.ids) for s in shards]
    c = chunk_size(sum(sizes), world)
    return sum(-(-n // c) for n in sizes)


@pytest.mark.parametrize(
    "layout,world", [("1437:3", 1), ("1437:6", 2), ("4000:32", 3), ("20000:24", 8), ("1281167:1024", 8)]
)
def test_an_epoch_has_no_more_segments_than_the_order_needs(layout, world):
    """Counted, not timed: every segment is an index file written per epoch and a stream DALI's reader
    opens, so an order spelled in more segments than its chunks is slower for nothing."""
    shards = layout_shards(layout)
    for epoch in (0, 1):
        per_rank = [rank_segments(shards, 0, epoch, r, world) for r in range(world)]
        for segs in per_rank:
            assert all(a[0] != b[0] for a, b in zip(segs, segs[1:]))  # maximal runs of one shard
            assert len(segs) <= MAX_SEGMENTS
        assert sum(map(len, per_rank)) <= _chunks(shards, world) + world - 1
    # the digits split of `sskd bench pipeline` (3 shards of 479): 120 chunks of 4 from each shard
    assert len(rank_segments(layout_shards("1437:3"), 0, 0, 0, 1)) == 360


def test_a_subset_has_no_more_segments_than_its_kept_samples_need(digits_shards):
    manifest = load_manifest(digits_shards)
    keep = np.arange(0, manifest["splits"]["train"]["num_samples"], 3)
    shards = split_shards(digits_shards, manifest, "train", keep)
    for world in (1, 2):
        per_rank = [rank_segments(shards, 7, 1, r, world) for r in range(world)]
        assert sum(len(lines) for segs in per_rank for _, lines in segs) == len(keep)
        assert all(a[0] != b[0] for segs in per_rank for a, b in zip(segs, segs[1:]))
        assert sum(map(len, per_rank)) <= _chunks(shards, world) + world - 1


def test_the_loader_writes_one_index_file_per_segment_in_place_every_epoch(digits_shards):
    """The same files every epoch, overwritten and cut to length (no file made or removed per segment and
    epoch: on ext4 that was most of a digits epoch), and DALI reads exactly the order from them."""
    loader = ViewLoader(digits_shards, "train", batch_size=64, rank=0, world_size=2)
    shards = loader._order_shards()
    counts = []
    for epoch in range(3):
        segs = rank_segments(shards, loader.seed, epoch, 0, 2)
        if epoch:
            held = loader._segments.dir / "held"
            os.link(loader._segments.dir / "000000.idx", held)  # the file as it is now, by inode
        tars, idxs = loader.epoch_files(epoch, segs)
        if epoch:
            assert os.path.samefile(held, idxs[0])  # rewritten, not replaced
            held.unlink()
        assert len(tars) == len(idxs) == len(segs) and idxs[0].endswith("000000.idx")
        for (s, lines), tar, idx in zip(segs, tars, idxs):
            text = Path(idx).read_bytes().splitlines()
            assert tar == shards[s].tar and text[0] == b"v1.2 %d" % len(lines) and len(text) == len(lines) + 1
        counts.append(len(segs))
        assert loader_ids(loader, epoch) == rank_ids(shards, loader.seed, epoch, 0, 2).tolist()
    assert loader._segments.created == max(counts) == len(list(loader._segments.dir.iterdir()))


def test_rewriting_the_index_files_does_not_change_an_epoch_being_read(digits_shards):
    """DALI parses its index files when the pipeline is built: the next epoch's files may be written while
    an epoch is still being read (the loader checks every batch's ids against the order)."""
    loader = ViewLoader(digits_shards, "train", batch_size=64)
    batches = loader.epoch(0)
    ids = next(batches)["id"].tolist()
    loader.epoch_files(1)
    ids += [i for b in batches for i in b["id"].tolist()]
    assert ids == rank_ids(loader._order_shards(), loader.seed, 0, 0, 1).tolist()


def test_the_next_epoch_opened_ahead_is_the_epoch_asked_for_or_dropped(digits_shards):
    """A training epoch opens the next one before its own end (pipelines.loader): that epoch's batches are
    a fresh loader's, and asking for another epoch (or resuming from a checkpoint) drops it."""
    loader = ViewLoader(digits_shards, "train", batch_size=64, views="rotation", rank=1, world_size=2)
    shards = loader._order_shards()
    for epoch in (0, 1, 3, 2, 2):
        assert loader_ids(loader, epoch) == rank_ids(shards, loader.seed, epoch, 1, 2).tolist()
        assert loader._ahead is not None and loader._ahead.epoch == epoch + 1
    fresh = ViewLoader(digits_shards, "train", batch_size=64, views="rotation", rank=1, world_size=2)
    for a, b in zip(loader.epoch(3), fresh.epoch(3)):  # epoch 3 opened ahead by epoch 2, and not
        assert torch.equal(a["id"], b["id"]) and torch.equal(a["views"], b["views"])
    batches = loader.epoch(0)
    next(batches)
    state = loader.state()
    batches.close()
    loader._open_ahead(0)  # from its first batch: of no use to a resume from a checkpoint
    tail = [i for b in loader.epoch(0, start_batch=1, resume_state=state) for i in b["id"].tolist()]
    assert tail == rank_ids(shards, loader.seed, 0, 1, 2).tolist()[64:] and loader.replayed == 0


def test_the_epoch_opened_ahead_is_the_one_the_caller_reads_next_and_none_after_the_last(digits_shards):
    """A cached run's augmentation epochs wrap around (e mod E) and a run's last epoch is followed by
    none: the caller names the next epoch, and no pipeline is built that nobody reads."""
    loader = ViewLoader(digits_shards, "train", batch_size=256, views="rotation")
    shards = loader._order_shards()
    assert [i for b in loader.epoch(1, next_epoch=None) for i in b["id"].tolist()] == rank_ids(
        shards, loader.seed, 1, 0, 1
    ).tolist()
    assert loader._ahead is None
    list(loader.epoch(1, next_epoch=0))
    assert loader._ahead is not None and loader._ahead.epoch == 0
    fresh = ViewLoader(digits_shards, "train", batch_size=256, views="rotation")
    for a, b in zip(loader.epoch(0, next_epoch=None), fresh.epoch(0)):  # the wrapped epoch, opened ahead
        assert torch.equal(a["id"], b["id"]) and torch.equal(a["views"], b["views"])


def test_a_training_run_opens_ahead_only_the_epochs_it_trains(digits_shards, tmp_path, monkeypatch):
    from sskd.cli import main as sskd_main

    opened = []
    real = ViewLoader._open_ahead
    monkeypatch.setattr(ViewLoader, "_open_ahead", lambda self, e: opened.append(e) or real(self, e))
    argv = ["distill", "--method", "ce", "--student", "resnet8", "--shards", str(digits_shards)]
    argv += ["--out", str(tmp_path / "ce"), "--epochs", "3", "--batch-size", "64", "--no-progress"]
    assert sskd_main([*argv, "--set", "data.subset_fraction=0.1", "--set", "data.eval_batch_size=360"]) == 0
    assert opened == [1, 2]  # after epochs 0 and 1; none after the last
