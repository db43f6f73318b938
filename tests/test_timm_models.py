"""timm architectures as ``timm:NAME``: the model interface against timm's own forward, HSSAKD's branches on
a timm CNN and a ViT, every shipped student method two steps through `sskd distill` with a timm teacher and a
timm student of another family (live on both pairs, and from `sskd cache` on one of them where the method can
be cached), the `sskd
models` command and the one-line refusals. timm's tiny ``test_*`` models build in milliseconds."""

import subprocess
import sys

import pytest
import torch

from sskd.cli import main as sskd_main
from sskd.core.errors import SSKDError
from sskd.methods import METHODS
from sskd.methods.base import part_makers
from sskd.models import create_model
from sskd.models.branches import BranchedModel
from sskd.runs import load_model_info, read_metrics

FAST = [
    "--no-progress",
    "--batch-size",
    "16",
    "--set",
    "run.log_every=1",
    "--set",
    "data.eval_batch_size=128",
]
SMALL_DATA = {
    "crd": ["--set", "crd.nce_k=64"]
}  # CRD draws 16,384 negatives by default; digits has 1,437 images
PAIRS = {
    "convnext-efficientnet": ("timm:test_convnext", "timm:test_efficientnet"),
    "vit-resnet": ("timm:test_vit", "timm:test_resnet"),
}
TEST_MODELS = ["test_convnext", "test_efficientnet", "test_vit", "test_resnet"]


def run(*args) -> int:
    return sskd_main([str(a) for a in args])


def shipped() -> list[str]:
    """The student methods sskd ships (not ones another test file registers)."""
    return [
        n
        for n in METHODS["student"].names()
        if METHODS["student"].get(n).__module__.startswith("sskd.methods.")
    ]


# From the cache, each cacheable method runs on one of the pairs (alternately), to keep the file short; AT
# on the pair whose maps have equal sizes (a ViT teacher's 2x2 map pooled to a ResNet's 1x1 is refused by a cache).
CACHED_PAIR = {name: list(PAIRS)[i % 2] for i, name in enumerate(shipped())} | {"at": "convnext-efficientnet"}


def cacheable(name: str) -> bool:
    cls = METHODS["student"].get(name)
    return bool(cls.outputs) and not cls.cache_refusal


def _randomise_norms(model: torch.nn.Module) -> None:
    """Non-trivial normalisation weights (timm zero-initialises some residual branches' last norm, which makes
    a fresh residual stage's pre-activation equal its input)."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data = torch.rand(m.weight.shape, generator=g) + 0.5
            m.bias.data = torch.randn(m.bias.shape, generator=g)


# -- the interface ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TEST_MODELS)
def test_a_timm_model_answers_the_interface_with_timms_own_logits(name):
    import timm

    torch.manual_seed(0)
    model = create_model(f"timm:{name}", num_classes=10).eval()
    ref = timm.create_model(name, num_classes=10).eval()
    ref.load_state_dict(model.net.state_dict())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        f = model(x, features=True)
        assert torch.equal(model(x), ref(x))
        assert torch.allclose(f.logits, ref(x), atol=1e-6)
        assert torch.allclose(f.feat, ref.forward_head(ref.forward_features(x), pre_logits=True), atol=1e-6)
    assert f.feat.shape == (3, model.feat_dim) and f.preact is None
    assert len(f.maps) == 4 and all(m.dim() == 4 and m.shape[0] == 3 for m in f.stages)  # NCHW, ViT too
    assert [int(m.shape[1]) for m in f.stages] == [i["num_chs"] for i in ref.feature_info]
    assert all(any(m is s for s in f.stages) for m in f.maps)


def test_vit_maps_are_patch_grids_of_evenly_spaced_blocks_and_cnn_maps_skip_the_stem():
    vit = create_model("timm:test_vit", num_classes=10).eval()
    res = create_model("timm:test_resnet", num_classes=10).eval()
    assert vit.map_index == [0, 2, 3, 5]  # 6 blocks at one grid: four evenly spaced, the last one included
    with torch.no_grad():
        f = vit(torch.randn(2, 3, 32, 32), features=True)
        assert [tuple(m.shape[1:]) for m in f.maps] == [(64, 2, 2)] * 4  # 32 px / patch 16
        r = res(torch.randn(2, 3, 32, 32), features=True)
    assert len(r.stages) == 5 and [tuple(m.shape[1:]) for m in r.maps] == [
        (32, 8, 8),
        (48, 4, 4),
        (192, 2, 2),
        (96, 1, 1),
    ]  # the stem's map (stride 2) is a stage but not a map


def test_preact_maps_are_the_relu_inputs_of_a_resnet_and_the_maps_of_residual_sums():
    res = create_model("timm:test_resnet", num_classes=10).eval()
    _randomise_norms(res)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        f = res(x, features="preact")
        assert torch.equal(f.logits, res(x))  # the hooks change nothing
    for pre, m in zip(f.preact, f.maps):
        assert torch.equal(torch.relu(pre), m) and (pre < 0).any()
    for name in ("test_convnext", "test_efficientnet", "test_vit"):
        model = create_model(f"timm:{name}", num_classes=10).eval()
        with torch.no_grad():
            f = model(x, features="preact")
        assert all(p is m for p, m in zip(f.preact, f.maps))  # no activation after the last residual sum
    mnv3 = create_model("timm:mobilenetv3_small_050", num_classes=10)
    assert "blocks.0" in mnv3.preact_refusal
    with pytest.raises(SSKDError, match="no pre-activation map"):
        mnv3(x, features="preact")


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet", "test_convnext", "test_vit"])
def test_hssakd_branches_on_a_timm_cnn_and_a_vit(name):
    torch.manual_seed(0)
    backbone = create_model(f"timm:{name}", num_classes=10)
    spec = backbone.branch_spec()
    model = BranchedModel(backbone, 10).train()
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert model.num_branches == 4 and spec.taps == backbone.map_index
    assert [tuple(a.shape) for a in out.aux] == [(2, 40)] * 4 and out.logits.shape == (2, 10)
    sum(a.sum() for a in out.aux).backward()
    for (
        branch
    ) in model.branches:  # every branch trains its own fresh copy, nothing is shared with the backbone
        assert all(p.grad is not None for p in branch.parameters() if p.requires_grad)
    ids = {id(p) for p in backbone.parameters()}
    assert not any(id(p) in ids for p in model.branches.parameters())


def test_an_architecture_without_a_branch_layout_is_one_line():
    backbone = create_model("timm:test_byobnet", num_classes=10)
    with pytest.raises(
        SSKDError, match=r"HSSAKD's auxiliary branches cannot attach to timm:test_byobnet: no "
    ):
        BranchedModel(backbone, 10)


# -- names and the models command ------------------------------------------------------------------------------


def test_an_unknown_timm_name_is_one_line_with_timms_closest_names():
    with pytest.raises(SSKDError) as exc:
        create_model("timm:convnxt_tiny", num_classes=10)
    msg = str(exc.value)
    assert "\n" not in msg and "unknown timm model 'timm:convnxt_tiny'" in msg and "timm:convnext_tiny" in msg


def test_a_vit_built_for_one_input_size_refuses_another_in_one_line():
    model = create_model("timm:deit_tiny_patch16_224", num_classes=10)
    with pytest.raises(SSKDError, match=r"timm:deit_tiny_patch16_224 on 32x32 inputs: .*set data.size"):
        model(torch.zeros(1, 3, 32, 32), features=True)


def test_a_run_whose_views_a_fixed_size_vit_cannot_take_is_refused_before_training(
    small_digits, tmp_path, capsys
):
    assert create_model("timm:test_vit3", num_classes=10).fixed_input_size == (160, 160)  # strict patch grid
    assert create_model("timm:test_vit", num_classes=10).fixed_input_size is None  # a dynamic one
    out = tmp_path / "s"
    argv = [
        "distill",
        "--method",
        "ce",
        "--student",
        "timm:test_vit3",
        "--shards",
        small_digits,
        "--out",
        out,
    ]
    assert run(*argv, *FAST) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and (
        "timm:test_vit3 takes 160x160 inputs only, and this run's views are 32x32: set data.size=160" in err
    )
    assert not (out / "metrics.jsonl").exists()


def test_importing_the_models_does_not_import_timm():
    code = "import sys, sskd.models; assert 'timm' not in sys.modules, 'timm imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_models_command_prints_a_timm_models_shapes_and_says_how_to_name_any(capsys):
    assert run("models", "timm:test_convnext", "--size", "64", "--classes", "10") == 0
    out = capsys.readouterr().out
    assert out.startswith("timm:test_convnext") and "feat 64" in out
    assert "maps 24x16x16, 32x8x8, 48x4x4, 64x2x2" in out and "branches 4" in out
    assert run("models", "--arch", "timm:test_vit") == 0
    assert "maps 64x2x2, 64x2x2, 64x2x2, 64x2x2" in capsys.readouterr().out
    assert run("models", "--arch", "resnet8") == 0 and "timm:NAME" not in capsys.readouterr().out
    assert run("models", "timm:resnt50") == 2
    assert "closest: timm:resnet50" in capsys.readouterr().err


# -- every method through `sskd distill` --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory):
    """The first 192 training and 64 validation digits as shards: two steps, a one-epoch cache and the final
    evaluation of some eighty runs stay short."""
    from shards import ShardOptions, write_shards
    from shards.sources import ArraySource, digits_source

    full = digits_source(seed=0)
    keep = {"train": 192, "val": 64}
    arrays = {
        k: (full.arrays[k][:n], full.splits[k].labels[:n], full.splits[k].paths[:n]) for k, n in keep.items()
    }
    out = tmp_path_factory.mktemp("small-digits") / "shards"
    source = ArraySource(full.dataset, full.classes, arrays, full.mean, full.std)
    write_shards(source, out, ShardOptions(seed=0, max_count=256, progress=False))
    return out


@pytest.fixture(scope="module")
def timm_teachers(small_digits, tmp_path_factory):
    """For each pair's teacher architecture: a plain teacher run and a head run for every part a method needs."""
    root = tmp_path_factory.mktemp("timm")
    runs = {}
    parts = {METHODS["student"].get(n).teacher_part for n in shipped()} - {None}
    for pair, (t_arch, _) in PAIRS.items():
        plain = root / pair / "plain"
        args = ["--shards", small_digits, "--max-steps", 2, *FAST]
        assert run("train-teacher", "--arch", t_arch, "--out", plain, *args) == 0
        runs[pair, None] = plain
        for part in parts:
            maker = next(m for m in part_makers(part) if m.startswith("train-ss-head"))
            out = root / pair / part
            assert (
                run("train-ss-head", "--method", maker.split()[-1], "--teacher", plain, "--out", out, *args)
                == 0
            )
            runs[pair, part] = out
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("pair", list(PAIRS))
@pytest.mark.parametrize("name", shipped())
def test_every_method_trains_two_steps_with_a_timm_teacher_and_student(
    name, pair, timm_teachers, small_digits, tmp_path
):
    cls = METHODS["student"].get(name)
    student = PAIRS[pair][1]
    teacher = ["--teacher", timm_teachers[pair, cls.teacher_part]] if cls.needs_teacher else []
    common = [
        "distill",
        "--method",
        name,
        *teacher,
        "--student",
        student,
        "--shards",
        small_digits,
        "--max-steps",
        2,
        *SMALL_DATA.get(name, []),
        *FAST,
    ]
    assert run(*common, "--out", tmp_path / "live") == 0
    info = load_model_info(tmp_path / "live")
    assert info["method"] == name and info["steps"] == 2 and info["arch"] == student
    rec = [r for r in read_metrics(tmp_path / "live") if r["kind"] == "train"][-1]
    assert "loss" in rec
    if not cacheable(name) or CACHED_PAIR[name] != pair:
        return
    cache = ["--shards", small_digits, "--epochs", 1, "--batch-size", 256, "--no-progress"]
    assert run("cache", "--method", name, *teacher, "--out", tmp_path / "c", *cache) == 0
    assert run(*common, "--out", tmp_path / "cached", "--cache", tmp_path / "c") == 0
    live, cached = (
        [r for r in read_metrics(tmp_path / d) if r["kind"] == "train"] for d in ("live", "cached")
    )
    assert [r["step"] for r in cached] == [1, 2]
    if "ce" in live[0]:
        assert cached[0]["ce"] == pytest.approx(live[0]["ce"], rel=1e-5)  # same student, same first batch


@pytest.mark.slow
def test_a_map_method_refuses_an_architecture_without_the_maps_it_needs(
    timm_teachers, small_digits, tmp_path, capsys
):
    """AB reads pre-activation maps; a timm MobileNetV3 student has none: one line before any training."""
    code = run(
        "distill",
        "--method",
        "ab",
        "--teacher",
        timm_teachers["vit-resnet", None],
        "--student",
        "timm:mobilenetv3_small_050",
        "--shards",
        small_digits,
        "--out",
        tmp_path / "ab",
        "--max-steps",
        2,
        *FAST,
    )
    err = capsys.readouterr().err
    assert (
        code == 2 and "--method ab" in err and "timm:mobilenetv3_small_050" in err and "pre-activation" in err
    )
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "ab" / "metrics.jsonl").exists()
