"""DALI view pipelines: reproducible per sample, rank-sharded, equal to the torchvision reference."""

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import ViewLoader, rank_counts
from pipelines.reference import reference_views
from pipelines.views import render_views
from shards.format import load_manifest
from sskd.core.errors import SSKDError


def collect(loader, epoch=0, start_batch=0):
    out = {}
    batches = list(loader.epoch(epoch, start_batch))
    for b in batches:
        for i, sid in enumerate(b["id"].tolist()):
            assert sid not in out, f"sample {sid} twice in one epoch"
            out[sid] = b["views"][i]
    return out, batches


def decoded_images(folder, split="train"):
    import webdataset as wds

    m = load_manifest(folder)
    imgs = {}
    for s in wds.WebDataset(
        [str(folder / e["file"]) for e in m["splits"][split]["shards"]], shardshuffle=False
    ):
        ext = "png" if "png" in s else "jpg"
        arr = np.array(Image.open(io.BytesIO(s[ext])).convert("RGB"))
        imgs[int.from_bytes(s["sid"], "little")] = torch.from_numpy(arr).permute(2, 0, 1)
    return imgs, m


def test_batches_shapes_and_coverage(digits_shards):
    loader = ViewLoader(digits_shards, "train", batch_size=100, views="paper")
    views, batches = collect(loader)
    assert loader.view_names == ("normal", "color_drop", "rotation", "crop_resize", "color_distort")
    assert sorted(views) == list(range(loader.num_samples))  # every sample exactly once
    assert len(batches) == len(loader) == -(-loader.num_samples // 100)
    b = batches[0]
    assert b["views"].shape == (100, 5, 3, 32, 32) and b["views"].dtype == torch.float32
    assert b["label"].dtype == torch.int64 and b["id"].dtype == torch.int64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_views_are_the_float_views_rounded(digits_shards, dtype):
    for train in (True, False):
        full = next(iter(ViewLoader(digits_shards, "train", batch_size=16, views="paper", train=train)))
        half = next(
            iter(ViewLoader(digits_shards, "train", batch_size=16, views="paper", train=train, dtype=dtype))
        )
        assert half["views"].dtype == dtype and torch.equal(half["id"], full["id"])
        assert torch.equal(half["views"], full["views"].to(dtype)), (dtype, train)


def test_same_views_whatever_batch_size_threads_and_run(digits_shards):
    a, _ = collect(ViewLoader(digits_shards, "train", batch_size=64, views="paper", threads=1), epoch=1)
    b, _ = collect(ViewLoader(digits_shards, "train", batch_size=100, views="paper", threads=2), epoch=1)
    c, _ = collect(ViewLoader(digits_shards, "train", batch_size=64, views="paper", threads=1), epoch=1)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)


def test_two_ranks_are_disjoint_cover_all_and_match_one_rank(digits_shards):
    one, _ = collect(ViewLoader(digits_shards, "train", batch_size=50, views="paper"), epoch=2)
    ranks = [
        ViewLoader(digits_shards, "train", batch_size=37, views="paper", rank=r, world_size=2) for r in (0, 1)
    ]
    parts = [collect(r, epoch=2) for r in ranks]
    assert len(ranks[0]) == len(ranks[1])  # equal batch counts: DDP never waits on a rank
    assert [len(p[1]) for p in parts] == [len(ranks[0])] * 2
    ids0, ids1 = set(parts[0][0]), set(parts[1][0])
    assert not ids0 & ids1 and ids0 | ids1 == set(one)
    for views, _ in parts:
        assert all(torch.equal(views[k], one[k]) for k in views)  # same pixels whatever the rank layout


def test_uneven_ranks_merge_the_tail_instead_of_an_extra_batch():
    assert rank_counts(1437, 2) == [718, 719] and rank_counts(10, 3) == [3, 3, 4]


def test_epochs_reshuffle_and_give_new_ss_params(digits_shards):
    loader = ViewLoader(digits_shards, "train", batch_size=100, views="paper")
    e0, b0 = collect(loader, epoch=0)
    e1, b1 = collect(loader, epoch=1)
    assert b0[0]["id"].tolist() != b1[0]["id"].tolist()  # the epoch's order is seeded per epoch
    changed = np.mean([not torch.equal(e0[k][1:], e1[k][1:]) for k in e0])
    assert changed > 0.95


def test_views_equal_the_torchvision_reference(digits_shards):
    """Exact for the CIFAR layout: crops, flip, rotations, colour drop, crop+resize and colour distortion."""
    imgs, m = decoded_images(digits_shards)
    for views in ("paper", "rotation"):
        loader = ViewLoader(digits_shards, "train", batch_size=32, views=views)
        batch = next(iter(loader.epoch(3)))
        for i, sid in enumerate(batch["id"].tolist()[:16]):
            ref = reference_views(
                imgs[sid],
                sid,
                names=loader.view_names,
                seed=0,
                epoch=3,
                size=32,
                layout="cifar",
                mean=m["mean"],
                std=m["std"],
            )
            err = (batch["views"][i] - ref).abs().amax(dim=(1, 2, 3)) * 255 * min(m["std"])
            assert err.max() <= 1e-3, (views, sid, err.tolist())


def test_colour_drop_is_dalis_luma_bit_for_bit():
    """The reference's fixed-point luma equals DALI's colour drop on every one of 262,144 random pixels."""
    from nvidia.dali import fn, pipeline_def

    from pipelines.colors import gray_u8
    from pipelines.dali import make_view

    rgb = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        img = fn.external_source(source=lambda: [rgb], batch=True, layout="HWC")
        return make_view(img, {"v1.start": np.zeros(2, np.int32)}, name="color_drop", view=1, size=512)

    p = pipe()
    p.build()
    np.testing.assert_array_equal(p.run()[0].as_array()[0], gray_u8(rgb)[..., :1])


def test_rotation_views_are_exact_rotations_of_the_normal_geometry(digits_shards):
    loader = ViewLoader(digits_shards, "train", batch_size=64, views="rotation")
    b = next(iter(loader.epoch(0)))
    v = b["views"]
    # With the official rotation set every view shares the flip; crops are independent per view as in
    # the official code, so compare through the reference geometry of view 0 rotated.
    imgs, m = decoded_images(digits_shards)
    for i, sid in enumerate(b["id"].tolist()[:8]):
        ref = reference_views(
            imgs[sid],
            sid,
            names=("normal", "rot90", "rot180", "rot270"),
            seed=0,
            epoch=0,
            size=32,
            layout="cifar",
            mean=m["mean"],
            std=m["std"],
        )
        assert torch.allclose(v[i], ref, atol=1e-5)
    assert v.shape[1] == 4


def test_photo_views_close_to_reference(photo_shards):
    """ImageNet layout (JPEG, random-resized-crop with antialiasing): within a tolerance."""
    imgs, m = decoded_images(photo_shards)
    loader = ViewLoader(photo_shards, "train", batch_size=8, views="paper", size=64)
    batch = next(iter(loader.epoch(0)))
    assert batch["views"].shape == (8, 5, 3, 64, 64)
    for i, sid in enumerate(batch["id"].tolist()):
        ref = reference_views(
            imgs[sid],
            sid,
            names=loader.view_names,
            seed=0,
            epoch=0,
            size=64,
            layout="imagenet",
            mean=m["mean"],
            std=m["std"],
        )
        # mean absolute error in 0-255 levels: the integer-rounded window (<= 0.5 px) and a different
        # antialiasing kernel move edges by a fraction of a pixel; a wrong window or flip gives > 30
        err = ((batch["views"][i] - ref).abs() * 255 * torch.tensor(m["std"]).view(1, 3, 1, 1)).mean(
            dim=(1, 2, 3)
        )
        assert err.max() < 8, err.tolist()


def test_eval_is_deterministic_exact_once_across_ranks(digits_shards, photo_shards):
    for folder, size in ((digits_shards, 32), (photo_shards, 64)):
        full, _ = collect(ViewLoader(folder, "val", batch_size=7, train=False, size=size))
        again, _ = collect(ViewLoader(folder, "val", batch_size=5, train=False, size=size))
        assert full.keys() == again.keys() and all(torch.equal(full[k], again[k]) for k in full)
        parts = [
            collect(ViewLoader(folder, "val", batch_size=4, train=False, rank=r, world_size=3, size=size))[0]
            for r in range(3)
        ]
        ids = [k for p in parts for k in p]
        assert sorted(ids) == sorted(full)  # each val sample exactly once, no padded duplicates
        assert next(iter(full.values())).shape == (1, 3, size, size)


def test_resume_mid_epoch_gives_the_remaining_batches(digits_shards):
    loader = ViewLoader(digits_shards, "train", batch_size=100, views="paper")
    whole, state = [], None
    for i, b in enumerate(loader.epoch(4)):
        whole.append({k: v.clone() for k, v in b.items()})
        if i == 5:
            state = loader.state()  # after 6 batches, as a training checkpoint takes it
    assert state["batch"] == 6 and isinstance(state["dali"], bytes) and loader.state() is None
    # from DALI's pipeline checkpoint: nothing re-made
    fresh = ViewLoader(digits_shards, "train", batch_size=100, views="paper")
    tail = [{k: v.clone() for k, v in b.items()} for b in fresh.epoch(4, start_batch=6, resume_state=state)]
    assert fresh.replayed == 0 and len(tail) == len(whole) - 6
    # without a checkpoint, or with one that does not fit (another epoch), the first batches are re-made
    for resume in (None, {**state, "epoch": 3}):
        other = ViewLoader(digits_shards, "train", batch_size=100, views="paper")
        again = [
            {k: v.clone() for k, v in b.items()} for b in other.epoch(4, start_batch=6, resume_state=resume)
        ]
        assert other.replayed == 6
        assert all(torch.equal(a["views"], b["views"]) for a, b in zip(tail, again))
    for a, b in zip(whole[6:], tail):
        assert torch.equal(a["id"], b["id"]) and torch.equal(a["views"], b["views"])


def test_views_command_matches_the_training_epoch(digits_shards, tmp_path):
    from sskd.cli import main

    full, _ = collect(ViewLoader(digits_shards, "train", batch_size=100, views="paper"), epoch=5)
    ids, labels, views, _ = render_views(digits_shards, 5, [17, 3, 900], views="paper")
    assert ids.tolist() == [17, 3, 900]
    for i, sid in enumerate(ids):
        assert np.array_equal(views[i], full[int(sid)].numpy())
    assert (
        main(
            [
                "views",
                "--shards",
                str(digits_shards),
                "--epoch",
                "5",
                "--ids",
                "17,3",
                "--out",
                str(tmp_path / "g.png"),
                "--npz",
                str(tmp_path / "v.npz"),
            ]
        )
        == 0
    )
    npz = np.load(tmp_path / "v.npz")
    assert npz["ids"].tolist() == [17, 3] and npz["views"].shape == (2, 5, 3, 32, 32)
    assert npz["views"].dtype == np.float32
    assert Image.open(tmp_path / "g.png").size[0] > 300


@pytest.mark.parametrize("damage", ["missing_tar", "missing_idx", "truncated", "no_id_component"])
def test_bad_shards_name_the_shard(digits_shards, tmp_path, damage):
    folder = tmp_path / "s"
    shutil.copytree(digits_shards, folder)
    tar = folder / "train-000001.tar"
    if damage == "missing_tar":
        tar.unlink()
    elif damage == "missing_idx":
        tar.with_suffix(".idx").unlink()
    elif damage == "truncated":
        tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 3])
    else:  # an index that does not list the sid component of its samples
        idx = tar.with_suffix(".idx")
        lines = idx.read_text().splitlines()
        fixed = [lines[0]] + [
            " ".join(w for j, w in enumerate(ln.split()) if not 8 <= j < 12) for ln in lines[1:]
        ]
        idx.write_text("\n".join(fixed) + "\n")
    with pytest.raises(SSKDError) as err:
        collect(ViewLoader(folder, "train", batch_size=64, views="rotation"))
    assert "train-000001" in str(err.value) and "\n" not in str(err.value)


def test_empty_split_and_bad_manifest(digits_shards, tmp_path):
    folder = tmp_path / "s"
    shutil.copytree(digits_shards, folder)
    m = json.loads((folder / "manifest.json").read_text())
    m["splits"]["train"]["shards"] = []
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(SSKDError, match="no shards"):
        ViewLoader(folder, "train")
    with pytest.raises(SSKDError, match="no shard manifest"):
        ViewLoader(tmp_path / "nowhere", "train")


@pytest.mark.gpu
def test_gpu_pipeline_matches_cpu(digits_shards):
    cpu, _ = collect(ViewLoader(digits_shards, "train", batch_size=64, views="rotation"))
    gpu, _ = collect(
        ViewLoader(digits_shards, "train", batch_size=64, views="rotation", device="gpu", torch_device="cpu")
    )
    assert cpu.keys() == gpu.keys()
    assert max((cpu[k] - gpu[k]).abs().max().item() for k in cpu) < 0.05


def test_reused_buffers_and_merged_tail_give_the_same_batches(digits_shards):
    """reuse_buffers (the training loop's mode) yields the same data, also when a rank merges its tail."""
    # 1437 samples on 2 ranks = 718 + 719: with batch 359 rank 1 would need a third batch of one sample
    for rank in (0, 1):
        safe = ViewLoader(digits_shards, "train", batch_size=359, views="rotation", rank=rank, world_size=2)
        fast = ViewLoader(
            digits_shards,
            "train",
            batch_size=359,
            views="rotation",
            rank=rank,
            world_size=2,
            reuse_buffers=True,
        )
        a = [(b["id"].clone(), b["views"].sum(dim=(1, 2, 3, 4))) for b in safe.epoch(1)]
        b = [(x["id"].clone(), x["views"].sum(dim=(1, 2, 3, 4))) for x in fast.epoch(1)]
        assert len(a) == len(b) == 2
        assert sum(len(ids) for ids, _ in b) == safe.rank_num_samples
        for (ia, sa), (ib, sb) in zip(a, b):
            assert torch.equal(ia, ib) and torch.equal(sa, sb)


@pytest.mark.parametrize("shards", ["digits_shards", "photo_shards"])
def test_shared_rotations_are_exact_quarter_turns_of_view_0(shards, request):
    """HSSAKD's views: the normal view (one crop and flip) and its rotations by k x 90 deg counter-clockwise,
    out[i, j] = in[j, W-1-i] as np.rot90 — not four crops, and no interpolation."""
    folder = request.getfixturevalue(shards)
    loader = ViewLoader(
        folder, "train", batch_size=8, views="shared_rotation", size=32 if shards == "photo_shards" else None
    )
    assert loader.view_names == ("normal", "shared_rot90", "shared_rot180", "shared_rot270")
    v = next(iter(loader.epoch(2)))["views"].numpy()  # (b, 4, 3, h, w)
    for k in (1, 2, 3):
        np.testing.assert_array_equal(v[:, k], np.rot90(v[:, 0], k, axes=(2, 3)))
    img = v[0, 0, 0]
    assert v[0, 1, 0][0, 0] == img[0, -1] and v[0, 1, 0][-1, 0] == img[0, 0]  # k=1: out[i, j] = in[j, W-1-i]
    if shards == "digits_shards":  # and view 0 is the reference's normal view, bit for bit
        imgs, m = decoded_images(folder)
        batch = next(iter(loader.epoch(2)))
        for i, sid in enumerate(batch["id"].tolist()[:4]):
            ref = reference_views(
                imgs[sid],
                sid,
                names=loader.view_names,
                seed=0,
                epoch=2,
                size=32,
                layout="cifar",
                mean=m["mean"],
                std=m["std"],
            )
            assert torch.allclose(batch["views"][i], ref, atol=1e-5)
