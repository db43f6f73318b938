"""FitNet, AT, VID, AB, FT: every loss against the formula written out again here (float64, loops), the
connectors' shapes, two steps of each method through the CLI, the pre-training phases, the one-line shape
error and the cache decisions."""

import math

import pytest
import torch

from sskd.cli import main as sskd_main
from sskd.core.errors import SSKDError
from sskd.losses.feature import (
    ab_loss,
    at_loss,
    at_loss_from_attention,
    attention_map,
    ft_factor,
    ft_loss,
    hint_loss,
    vid_loss,
    vid_variance,
)
from sskd.methods import create_method
from sskd.models import create_model
from sskd.models.connectors import Connector, ConvReg, Paraphraser, ShapeError, Translator, VIDRegressor
from sskd.runs import read_metrics

FAST = [
    "--no-progress",
    "--batch-size",
    "16",
    "--set",
    "run.log_every=1",
    "--set",
    "data.eval_batch_size=256",
]


def run(*args) -> int:
    return sskd_main([str(a) for a in args])


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- the losses, from the formulas -------------------------------------------------------------------------


def avg_pool(
    f, out
):  # non-overlapping average pooling by an integer factor (what adaptive pooling does here)
    k = f.shape[2] // out
    b, c = f.shape[:2]
    return f.reshape(b, c, out, k, out, k).mean(dim=(3, 5))


def attention_by_hand(f, p=2):
    b, c, h, w = f.shape
    rows = []
    for i in range(b):
        q = [sum(float(f[i, ch, y, x]) ** p for ch in range(c)) / c for y in range(h) for x in range(w)]
        norm = math.sqrt(sum(v * v for v in q))
        rows.append([v / norm for v in q])
    return torch.tensor(rows, dtype=torch.float64)


def test_hint_loss_is_the_mean_of_squared_differences():
    s, t = rand(2, 3, 4, 4, seed=1), rand(2, 3, 4, 4, seed=2)
    want = sum(float(a - b) ** 2 for a, b in zip(s.flatten(), t.flatten())) / s.numel()
    assert hint_loss(s, t).item() == pytest.approx(want, rel=1e-6)


def test_at_loss_pools_the_larger_map_and_sums_the_layers_whatever_the_channels():
    s_maps = [
        rand(2, 3, 8, 8, seed=1),
        rand(2, 5, 2, 2, seed=2),
    ]  # layer 0 larger than the teacher's, layer 1 smaller
    t_maps = [rand(2, 7, 4, 4, seed=3), rand(2, 4, 4, 4, seed=4)]
    pairs = [(avg_pool(s_maps[0], 4), t_maps[0]), (s_maps[1], avg_pool(t_maps[1], 2))]
    want = sum(((attention_by_hand(s) - attention_by_hand(t)) ** 2).mean().item() for s, t in pairs)
    assert at_loss(s_maps, t_maps).item() == pytest.approx(want, rel=1e-5)
    assert attention_map(s_maps[0], 3).norm(dim=1).tolist() == pytest.approx([1.0, 1.0])
    assert attention_map(s_maps[1], 3)[0].tolist() == pytest.approx(
        attention_by_hand(s_maps[1], 3)[0].tolist(), rel=1e-5
    )
    # against the teacher's attention maps (a cache's form): the same while only student maps are pooled
    t_att = [attention_map(t_maps[0])]
    assert at_loss_from_attention(s_maps[:1], t_att, [(4, 4)]).item() == pytest.approx(
        at_loss(s_maps[:1], t_maps[:1]).item(), rel=1e-6
    )
    with pytest.raises(ValueError, match="smaller than the teacher"):
        at_loss_from_attention(s_maps[1:], [attention_map(t_maps[1])], [(4, 4)])
    with pytest.raises(ValueError, match="2 student maps but 1 teacher"):
        at_loss(s_maps, t_maps[:1])


def test_vid_starts_at_variance_5_and_is_the_gaussian_nll_mean():
    reg = VIDRegressor(3, 4, 4)
    assert vid_variance(reg.log_scale, reg.eps).tolist() == pytest.approx([5.0] * 4, abs=1e-6)
    assert reg.log_scale.shape == (4,) and not any(
        m.bias is not None for m in reg.regressor if hasattr(m, "bias")
    )
    mu, t, log_scale = rand(2, 3, 2, 2, seed=1), rand(2, 3, 2, 2, seed=2), rand(3, seed=3)
    total = 0.0
    for n in range(2):
        for c in range(3):
            var = math.log(1 + math.exp(float(log_scale[c]))) + 1e-5
            for y in range(2):
                for x in range(2):
                    total += 0.5 * ((float(mu[n, c, y, x] - t[n, c, y, x])) ** 2 / var + math.log(var))
    assert vid_loss(mu, t, log_scale).item() == pytest.approx(total / mu.numel(), rel=1e-6)
    # the student's map is pooled to the teacher's size before the regressor
    mean, target = reg(torch.randn(2, 3, 8, 8), torch.randn(2, 4, 4, 4))
    assert mean.shape == target.shape == (2, 4, 4, 4)


def test_ab_loss_margin_cases_layer_weights_and_scale():
    m = 1.0
    # (s, t): off-teacher pushes s below -m, on-teacher pushes s above m; t = 0 counts as off
    cases = [
        (0.5, -1.0, (0.5 + m) ** 2),
        (-1.5, -1.0, 0.0),
        (-m, -1.0, 0.0),
        (0.2, 0.0, (0.2 + m) ** 2),
        (0.3, 2.0, (0.3 - m) ** 2),
        (1.5, 2.0, 0.0),
        (-2.0, 0.5, (-2.0 - m) ** 2),
    ]
    s = torch.tensor([c[0] for c in cases], dtype=torch.float64).view(1, len(cases), 1, 1)
    t = torch.tensor([c[1] for c in cases], dtype=torch.float64).view(1, len(cases), 1, 1)
    per = sum(c[2] for c in cases)
    assert ab_loss([s], [t], margin=m).item() == pytest.approx(per * 3 / 1000)
    # two layers, batch 2: weights 2^(i - n + 1) = 1/2, 1; divided by the batch size
    s2, t2 = torch.cat([s, s]), torch.cat([t, t])
    assert ab_loss([s2, s2], [t2, t2], margin=m).item() == pytest.approx((0.5 + 1.0) * 2 * per / 2 * 3 / 1000)
    assert ab_loss([s], [t], margin=0.0).item() == pytest.approx(
        sum(c0**2 * ((c0 > 0) and (c1 <= 0) or (c0 <= 0) and (c1 > 0)) for c0, c1, _ in cases) * 3 / 1000
    )


def test_ft_factor_is_normalised_and_the_loss_is_l1_after_pooling():
    x = rand(2, 4, 4, 4, seed=1)
    f = ft_factor(x)
    assert f.shape == (2, 16) and f.norm(dim=1).tolist() == pytest.approx([1.0, 1.0])
    assert f.flatten().tolist() == pytest.approx(attention_by_hand(x).flatten().tolist(), rel=1e-6)
    s, t = rand(2, 3, 8, 8, seed=2), rand(2, 3, 4, 4, seed=3)
    diff = attention_by_hand(avg_pool(s, 4)) - attention_by_hand(t)
    assert ft_loss(s, t).item() == pytest.approx(diff.abs().mean().item(), rel=1e-5)
    assert ft_loss(s, t, p2=2).item() == pytest.approx((diff**2).mean().item(), rel=1e-5)


# -- the helper modules' shapes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "s, t, kind",
    [
        ((64, 32, 32), (32, 16, 16), "Conv2d"),
        ((480, 8, 8), (128, 16, 16), "ConvTranspose2d"),
        ((16, 8, 8), (256, 8, 8), "Conv2d"),
        ((8, 10, 10), (4, 8, 8), "Conv2d"),
    ],
)
def test_convreg_bridges_twice_half_and_larger_sizes(s, t, kind):
    reg = ConvReg(s, t).eval()
    assert type(reg.conv).__name__ == kind and reg(torch.randn(2, *s)).shape == (2, *t)


def test_connectors_shapes_and_what_they_refuse():
    with pytest.raises(ShapeError, match="8x8 map to a larger 32x32"):
        ConvReg((16, 8, 8), (16, 32, 32))
    conn = Connector([(64, 32, 32), (128, 16, 16)], [(64, 32, 32), (256, 8, 8)]).eval()
    assert type(conn.connectors[0]).__name__ == "Identity" and not list(conn.connectors[0].parameters())
    assert not isinstance(conn.connectors[1].relu, torch.nn.ReLU)  # AB's connector has no ReLU
    assert [o.shape for o in conn([torch.randn(1, 64, 32, 32), torch.randn(1, 128, 16, 16)])][1] == (
        1,
        256,
        8,
        8,
    )
    factor_t, rec = Paraphraser(256)(torch.randn(2, 256, 8, 8))
    assert factor_t.shape == (2, 128, 8, 8) and rec.shape == (2, 256, 8, 8)
    assert Translator(464, 256)(torch.randn(2, 464, 4, 4)).shape == (2, 128, 4, 4)


@pytest.mark.parametrize("t_arch, s_arch", [("resnet32x4", "ShuffleV1"), ("vgg13", "MobileNetV2")])
def test_each_method_sizes_its_modules_for_a_cross_architecture_pair(t_arch, s_arch):
    teacher, x = create_model(t_arch, 100).eval(), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        t_maps = teacher(x, features=True).maps

    def ids(params):
        return {id(p) for p in params}

    for name in ("fitnet", "vid", "ab", "ft", "at"):
        method = create_method(name, student=create_model(s_arch, 100), teacher=teacher).eval()
        student = ids(method.student.parameters())
        if name in (
            "fitnet",
            "ab",
            "ft",
        ):  # who trains in the pre-training phase, and who in the main training
            helper = ids(
                getattr(
                    method, {"fitnet": "regressor", "ab": "connector", "ft": "paraphraser"}[name]
                ).parameters()
            )
            phase = ids(method.phase_parameters(method.phases()[0].name))
            main = ids(method.phase_parameters(None))
            assert helper and helper <= phase and (helper <= main) == (name == "fitnet")
            # a part of the student (not its classifier, nor what runs after the map), or none of it (FT)
            assert (phase & student < student) if name != "ft" else not phase & student
            assert student <= main and (name != "ft" or ids(method.translator.parameters()) <= main)
        with torch.no_grad():
            s_maps = method.student(x, features=True).maps
            if name == "fitnet":
                assert method.regressor(s_maps[1]).shape == t_maps[1].shape
            elif name == "ab":
                assert [o.shape for o in method.connector(s_maps)] == [m.shape for m in t_maps]
            elif name == "vid":
                assert [r(s, t)[0].shape[1] for r, s, t in zip(method.regressors, s_maps, t_maps)] == [
                    m.shape[1] for m in t_maps
                ]
            elif name == "ft":
                assert method.translator(s_maps[-1]).shape[1] == method.paraphraser(t_maps[-1])[0].shape[1]
            else:  # a student map smaller than the teacher's: the teacher's map is pooled, so not from a cache
                assert not method.from_attention


def test_the_feature_methods_share_the_family_base_and_its_config_fields():
    from dataclasses import fields

    from sskd.methods import METHODS
    from sskd.methods.families import CEKDConfig, FeatureMethod

    for name in ("at", "fitnet", "vid", "ab", "ft"):
        cls = METHODS["student"].get(name)
        assert issubclass(cls, FeatureMethod) and issubclass(cls.Config, CEKDConfig), name
        assert [f.name for f in fields(cls.Config)][:4] == ["ce_weight", "kd_weight", "T", "weight"], name


def test_a_shape_error_while_connecting_is_the_one_line_pair_error():
    from sskd.core.errors import SSKDError
    from sskd.methods.families import CEKDConfig, FeatureMethod

    class Unbridgeable(FeatureMethod):
        name, Config = "unbridgeable", CEKDConfig

        def connect(self, pair):
            raise ShapeError("no module bridges these")

    with pytest.raises(
        SSKDError, match=r"^--method unbridgeable: student \(maps 16x32x32, .* at 32x32: no module"
    ):
        Unbridgeable(create_model("resnet8", 10), create_model("resnet20", 10))


# -- through the CLI ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher(digits_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("feature") / "t"
    assert (
        run(
            "train-teacher",
            "--shards",
            digits_shards,
            "--arch",
            "resnet8",
            "--out",
            out,
            "--max-steps",
            2,
            *FAST,
        )
        == 0
    )
    return out


TERMS = {
    "fitnet": {"ce", "kd", "hint"},
    "at": {"ce", "kd", "at"},
    "vid": {"ce", "kd", "vid"},
    "ab": {"ce"},
    "ft": {"ce", "kd", "ft"},
}


@pytest.mark.parametrize("name", sorted(TERMS))
def test_two_steps_through_the_cli(name, teacher, digits_shards, tmp_path):
    phase_off = {"fitnet": "fitnet.hint_epochs=0", "ab": "ab.init_epochs=0", "ft": "ft.init_epochs=0"}.get(
        name
    )
    extra = ["--set", phase_off] if phase_off else []
    assert (
        run(
            "distill",
            "--method",
            name,
            "--teacher",
            teacher,
            "--student",
            "resnet8",
            "--shards",
            digits_shards,
            "--out",
            tmp_path / name,
            "--max-steps",
            2,
            *FAST,
            *extra,
        )
        == 0
    )
    recs = [r for r in read_metrics(tmp_path / name) if r["kind"] == "train"]
    assert [r["step"] for r in recs] == [1, 2] and TERMS[name] <= recs[0].keys()
    assert all(math.isfinite(r["loss"]) for r in recs)


PHASES = {
    "ab": ("ab.init_epochs=1", "init"),
    "ft": ("ft.init_epochs=1", "init"),
    "fitnet": ("fitnet.hint_epochs=1", "hint"),
}


@pytest.mark.parametrize("name", sorted(PHASES))
def test_the_phase_runs_first_and_trains_only_its_parameters(
    name, teacher, digits_shards, tmp_path, monkeypatch
):
    import sskd.engine.loop as tr

    snaps, real = {}, tr.Run.enter_phase

    def spy(self):  # the method's parameters as each phase starts: index 0 (the phase) and 1 (main)
        snaps[self.state["phase"]] = (
            self.core,
            {n: p.detach().clone() for n, p in self.core.named_parameters()},
        )
        real(self)

    monkeypatch.setattr(tr.Run, "enter_phase", spy)
    setting, phase = PHASES[name]
    assert (
        run(
            "distill",
            "--method",
            name,
            "--teacher",
            teacher,
            "--student",
            "resnet8",
            "--shards",
            digits_shards,
            "--out",
            tmp_path / "o",
            "--set",
            setting,
            "--set",
            "student.epochs=1",
            "--batch-size",
            256,
            "--set",
            "run.eval_every=0",
            "--set",
            "run.log_every=1",
            "--no-progress",
        )
        == 0
    )
    recs = [r for r in read_metrics(tmp_path / "o") if r["kind"] == "train"]
    # 1437 images / 256 = 6 steps of the phase, then 6 of the main training, each from step 1
    assert [(r["phase_name"], r["step"]) for r in recs] == [(phase, i) for i in range(1, 7)] + [
        ("main", i) for i in range(1, 7)
    ]
    assert {"ab": "ab", "ft": "rec", "fitnet": "hint"}[name] in recs[0] and "ce" in recs[-1]
    # constant phase lr: the stage's, but RepDistiller's 0.01 for a resnet student's paraphraser; then the schedule
    assert {r["lr"] for r in recs[:6]} == {0.01 if name == "ft" else 0.05} and recs[6]["lr"] == 0.05
    method, before = snaps[0]
    after = snaps[1][1]
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    ids = {id(p) for p in method.phase_parameters(phase)}
    assert moved == {n for n, p in method.named_parameters() if id(p) in ids}
    if name == "ft":  # the paraphraser only; the student did not move and was kept in eval mode
        assert moved and all(n.startswith("paraphraser.") for n in moved)
    elif name == "fitnet":  # up to the hint layer (resnet8: stem, layer1, layer2) and the regressor
        assert {n.split(".")[1] for n in moved if n.startswith("student.")} == {
            "conv1",
            "bn1",
            "layer1",
            "layer2",
        }
        assert any(n.startswith("regressor.") for n in moved)
    else:  # everything but the classifier (resnet8 -> resnet8: identity connectors, nothing to train)
        assert {n for n in moved} == {"student." + n for n, _ in method.student.named_parameters()} - {
            "student.fc.weight",
            "student.fc.bias",
        }


def test_maps_that_cannot_be_paired_fail_in_one_line(teacher, digits_shards, tmp_path, capsys):
    assert (
        run(
            "distill",
            "--method",
            "at",
            "--teacher",
            teacher,
            "--student",
            "MobileNetV2",
            "--shards",
            digits_shards,
            "--out",
            tmp_path / "o",
            "--max-steps",
            1,
            *FAST,
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert (
        "--method at: student MobileNetV2 (maps 12x16x16, 16x8x8, 48x4x4, 160x2x2) and teacher resnet8 "
        "(maps 16x32x32, 32x16x16, 64x8x8) at 32x32: 4 student maps but 3 teacher maps" in err
    )


def test_at_caches_attention_maps_and_the_others_refuse(teacher, digits_shards, tmp_path, capsys):
    from sskd.methods.vid import VID

    common = [
        "distill",
        "--method",
        "at",
        "--teacher",
        teacher,
        "--student",
        "resnet8",
        "--shards",
        digits_shards,
        "--max-steps",
        2,
        *FAST,
    ]
    assert (
        run(
            "cache",
            "--method",
            "at",
            "--teacher",
            teacher,
            "--shards",
            digits_shards,
            "--epochs",
            1,
            "--out",
            tmp_path / "c",
            "--batch-size",
            256,
            "--no-progress",
        )
        == 0
    )
    assert run(*common, "--out", tmp_path / "live") == 0
    assert run(*common, "--out", tmp_path / "cached", "--cache", tmp_path / "c") == 0
    live, cached = (
        [r for r in read_metrics(tmp_path / d) if r["kind"] == "train"] for d in ("live", "cached")
    )
    assert cached[0]["ce"] == live[0]["ce"]  # same student, same batch
    assert cached[0]["at"] == pytest.approx(live[0]["at"], rel=1e-2)  # fp16 attention maps
    # a student map smaller than the teacher's needs the teacher's feature map: refused from a cache
    assert run(*common[:6], "ShuffleV1", *common[7:], "--out", tmp_path / "s", "--cache", tmp_path / "c") == 2
    assert "a teacher map is larger than the student's" in capsys.readouterr().err
    assert (
        run(
            "cache",
            "--method",
            "vid",
            "--teacher",
            teacher,
            "--shards",
            digits_shards,
            "--epochs",
            1,
            "--out",
            tmp_path / "v",
            "--no-progress",
        )
        == 2
    )
    assert f"--method vid does not use the cache: {VID.cache_refusal}" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["at", "fitnet", "vid", "ft"])
def test_a_model_without_feature_maps_is_refused_in_one_line(method):
    """An architecture that gives no stage maps (a timm model timm cannot split into stages) would make the
    term an empty sum, 0: the method refuses it at construction, naming both architectures."""
    from sskd.methods import METHODS
    from sskd.models.connectors import PairShapes

    student, teacher = create_model("resnet8", num_classes=10), create_model("resnet20", num_classes=10)
    pair = PairShapes([], [(16, 32, 32), (32, 16, 16), (64, 8, 8)], "mystery_net", "resnet20", 32)
    with pytest.raises(SSKDError) as exc:
        METHODS["student"].get(method)(student, teacher, pair=pair)
    msg = str(exc.value)
    assert "\n" not in msg and f"--method {method}" in msg and "mystery_net" in msg
    assert "needs feature maps on both sides" in msg
