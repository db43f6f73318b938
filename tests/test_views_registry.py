"""The view registry: a view is one registered object (plan parameters, DALI graph, torch reference), so a
view defined in this file alone flows through plan -> DALI -> reference; and the jigsaw view."""

import itertools

import numpy as np
import pytest
import torch
from test_dali import collect, decoded_images

from pipelines import ViewLoader, plan
from pipelines.plan import ViewConfig
from pipelines.reference import BaselineViews, reference_views
from pipelines.view_registry import PERMUTATIONS, CropView, get_view, jigsaw_tiles, register_view, view_names
from sskd.core.errors import SSKDError


@register_view("toy_vflip")
class ToyVFlip(CropView):
    """A view of this test only: its own crop turned upside down or not, a coin of its own drawn from plan
    slot 12 (new parameters, a new graph and a new reference need no edit anywhere else)."""

    def more_slots(self):
        return [12]

    def more_names(self):
        return ["vflip"]

    def more_params(self, u):
        return {"vflip": np.floor(u(12) * np.float32(2)).astype(np.int32)}

    def after_dali(self, v, prm, *, view, size):
        from nvidia.dali import fn

        return fn.flip(
            v, horizontal=0, vertical=prm[f"v{view}.vflip"]
        )  # (DALI flips horizontally by default)

    def after_reference(self, v, prm, *, view, size):
        return v.flip(1) if prm[f"v{view}.vflip"][0] else v


def test_a_view_defined_in_a_test_flows_through_plan_dali_and_reference(digits_shards):
    assert "toy_vflip" in view_names()
    names = ("toy_vflip", "rot90")
    assert plan.param_names(("normal", *names), "cifar") == [
        "flip",
        "v0.start",
        "v1.start",
        "v1.vflip",
        "v2.start",
    ]
    loader = ViewLoader(digits_shards, "train", batch_size=32, views=",".join(names))
    assert loader.view_names == ("normal", *names)
    batch = next(iter(loader.epoch(1)))
    imgs, m = decoded_images(digits_shards)
    for i, sid in enumerate(batch["id"].tolist()[:12]):
        ref = reference_views(
            imgs[sid],
            sid,
            names=loader.view_names,
            seed=0,
            epoch=1,
            size=32,
            layout="cifar",
            mean=m["mean"],
            std=m["std"],
        )
        assert torch.allclose(batch["views"][i], ref, atol=1e-5), sid  # bit for bit up to the normalisation
    coins = plan.view_params(
        batch["id"].numpy(), np.full((32, 2), 32), seed=0, epoch=1, views=loader.view_names, layout="cifar"
    )["v1.vflip"]
    assert 0 < coins.sum() < 32  # both sides of the coin occur in the batch


def test_registry_lists_every_view_and_keeps_the_presets():
    assert view_names()[0] == "normal" and {n for p in plan.PRESETS.values() for n in p} <= set(view_names())
    assert "jigsaw" in view_names()
    assert ViewConfig.parse("jigsaw").ss_views == ("jigsaw",) * 3  # the preset: three tiled crops
    assert ViewConfig.parse("jigsaw,rot90").ss_views == ("jigsaw", "rot90")
    with pytest.raises(SSKDError, match="unknown view 'normal'"):
        ViewConfig.parse("normal")  # view 0 is always there, never an SS view
    assert get_view("color_distort").colour and get_view("color_drop").luma
    assert plan.colour_views(("normal", "jigsaw", "color_distort")) == [2]
    assert plan.turn_views(("normal", "rot90", "rotation", "color_distort")) == [2]


def test_the_finishing_step_turns_each_sample_as_rot90_before_the_rest():
    """A view with per-sample quarter turns (the paper's rotation, :attr:`View.turns`) finished with its
    turns equals the same view turned first and finished without: bit for bit, for a plain, a grey and a
    colour view, every k of 0-3 (and 4: a full turn), fresh and reused buffers."""
    from pipelines.finish import Finisher

    g = torch.Generator().manual_seed(0)
    b, size = 5, 8
    views = [torch.randint(0, 256, (b, size, size, c), dtype=torch.uint8, generator=g) for c in (3, 1, 3)]
    m = torch.eye(3).expand(b, 3, 3) * 0.8 + 0.1 * torch.rand(b, 3, 3, generator=g)
    colour = {2: (m.contiguous(), 5 * torch.rand(b, 3, generator=g))}
    k = torch.tensor([1, 2, 3, 0, 4], dtype=torch.int32)
    turned = [torch.stack([torch.rot90(x[i], int(k[i]), dims=(0, 1)) for i in range(b)]) for x in views]
    finish = Finisher([0.5, 0.4, 0.3], [0.2, 0.25, 0.3])
    want = finish(turned, colour)
    for reuse in (False, True):
        got = finish(views, colour, {0: k, 1: k, 2: k}, reuse=reuse)
        assert torch.equal(got, want)
    assert not torch.equal(finish(views, colour), want)  # the turns are not a no-op on this batch
    one = finish(views, colour, {0: k})  # only the turned view changes
    assert torch.equal(one[:, 0], want[:, 0]) and torch.equal(one[:, 1:], finish(views, colour)[:, 1:])


def test_the_permutation_set_is_the_24_orders_of_four_tiles():
    assert len(PERMUTATIONS) == 24 and len(set(PERMUTATIONS)) == 24
    assert set(PERMUTATIONS) == set(itertools.permutations(range(4))) and PERMUTATIONS[0] == (0, 1, 2, 3)
    x = torch.arange(16).view(1, 4, 4)
    out = jigsaw_tiles(x, (3, 2, 1, 0))  # output tile j = input tile perm[j]
    assert (
        out[0, :2, :2].tolist() == x[0, 2:, 2:].tolist() and out[0, 2:, 2:].tolist() == x[0, :2, :2].tolist()
    )


def test_jigsaw_labels_are_a_pure_function_of_seed_epoch_id_and_view():
    ids = np.arange(5000, dtype=np.int64)
    views = ("normal", "jigsaw", "jigsaw", "rot180")
    a = plan.view_labels(ids, seed=3, epoch=2, views=views)
    assert sorted(a) == ["jigsaw", "rotation"]
    again = plan.view_labels(ids[[17, 4000, 3]], seed=3, epoch=2, views=views)  # other batch, other order
    assert np.array_equal(again["jigsaw"], a["jigsaw"][[17, 4000, 3]])
    j = a["jigsaw"]
    assert (j[:, [0, 3]] == -1).all() and j[:, 1:3].min() == 0 and j[:, 1:3].max() == 23
    assert np.bincount(j[:, 1], minlength=24).min() > 0.7 * len(ids) / 24  # all 24 orders, evenly
    assert np.mean(j[:, 1] == j[:, 2]) < 0.1  # each view draws its own order
    assert np.mean(plan.view_labels(ids, seed=3, epoch=3, views=views)["jigsaw"][:, 1] == j[:, 1]) < 0.1
    assert a["rotation"][:, 0].tolist() == [0] * len(ids) and (a["rotation"][:, 3] == 2).all()
    assert (a["rotation"][:, 1:3] == -1).all()
    prm = plan.view_params(ids, np.full((len(ids), 2), 32), seed=3, epoch=2, views=views, layout="cifar")
    assert np.array_equal(prm["v1.perm"], j[:, 1])  # the label is the permutation the pixels use


def test_jigsaw_view_equals_its_reference_bit_for_bit_and_the_batch_carries_its_labels(digits_shards):
    loader = ViewLoader(digits_shards, "train", batch_size=64, views="jigsaw,rotation,color_drop")
    batch = next(iter(loader.epoch(4)))
    imgs, m = decoded_images(digits_shards)
    for i, sid in enumerate(batch["id"].tolist()[:24]):
        ref = reference_views(
            imgs[sid],
            sid,
            names=loader.view_names,
            seed=0,
            epoch=4,
            size=32,
            layout="cifar",
            mean=m["mean"],
            std=m["std"],
        )
        # one 0-255 level is ~0.015 after normalisation: 1e-5 is the uint8 views equal, bit for bit
        assert torch.allclose(batch["views"][i], ref, atol=1e-5), sid
    want = plan.view_labels(batch["id"].numpy(), seed=0, epoch=4, views=loader.view_names)
    assert torch.equal(batch["jigsaw_label"], torch.from_numpy(want["jigsaw"]))
    assert torch.equal(batch["rotation_label"], torch.from_numpy(want["rotation"]))
    assert batch["rotation_label"][:, 2].min() >= 1 and batch["jigsaw_label"][:, 1].min() >= 0


def test_jigsaw_tiles_undo_to_the_plain_crop(digits_shards):
    """Putting DALI's tiles back in order gives the plain crop a second normal view draws from the same plan
    streams (view 1's crop slots): a jigsaw view is its crop, reordered, and nothing else."""
    loader = ViewLoader(digits_shards, "train", batch_size=32, views="jigsaw,")
    batch = next(iter(loader.epoch(0)))
    imgs, m = decoded_images(digits_shards)
    for i, sid in enumerate(batch["id"].tolist()[:8]):
        perm = PERMUTATIONS[int(batch["jigsaw_label"][i, 1])]
        undone = jigsaw_tiles(batch["views"][i, 1], tuple(perm.index(t) for t in range(4)))
        plain = reference_views(
            imgs[sid],
            sid,
            names=("normal", "normal"),
            seed=0,
            epoch=0,
            size=32,
            layout="cifar",
            mean=m["mean"],
            std=m["std"],
        )[1]
        assert torch.allclose(undone, plain, atol=1e-5), sid
    assert len(set(batch["jigsaw_label"][:, 1].tolist())) > 10


def test_jigsaw_on_photos_close_to_reference_and_same_whatever_the_batch(photo_shards):
    imgs, m = decoded_images(photo_shards)
    a, _ = collect(ViewLoader(photo_shards, "train", batch_size=8, views="jigsaw", size=64), epoch=1)
    b, _ = collect(
        ViewLoader(photo_shards, "train", batch_size=5, views="jigsaw", size=64, threads=1), epoch=1
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for sid in list(a)[:8]:
        ref = reference_views(
            imgs[sid],
            sid,
            names=("normal", "jigsaw", "jigsaw", "jigsaw"),
            seed=0,
            epoch=1,
            size=64,
            layout="imagenet",
            mean=m["mean"],
            std=m["std"],
        )
        # the documented tolerance of the ImageNet-layout views (random-resized crops, antialiasing)
        err = ((a[sid] - ref).abs() * 255 * torch.tensor(m["std"]).view(1, 3, 1, 1)).mean(dim=(1, 2, 3))
        assert err.max() < 8, err.tolist()


def test_jigsaw_needs_an_even_size_and_has_a_torchvision_baseline(digits_shards):
    with pytest.raises(SSKDError, match="must be even"):
        collect(ViewLoader(digits_shards, "train", batch_size=64, views="jigsaw", size=31))
    base = BaselineViews(
        ("normal", "jigsaw", "rot90", "shared_rot90"), size=32, layout="cifar", mean=[0.5] * 3, std=[0.25] * 3
    )
    out = base(torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8))
    assert out.shape == (4, 3, 32, 32) and torch.equal(out[3], torch.rot90(out[0], 1, dims=(-2, -1)))


@pytest.mark.gpu
def test_gpu_jigsaw_matches_cpu(digits_shards):
    cpu, _ = collect(ViewLoader(digits_shards, "train", batch_size=64, views="jigsaw"))
    gpu, _ = collect(
        ViewLoader(digits_shards, "train", batch_size=64, views="jigsaw", device="gpu", torch_device="cpu")
    )
    assert cpu.keys() == gpu.keys()
    assert max((cpu[k] - gpu[k]).abs().max().item() for k in cpu) < 0.05
