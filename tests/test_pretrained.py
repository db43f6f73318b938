"""Weights from outside a run (#21 items 2-4): timm's pretrained weights from a fabricated local Hugging Face
cache (and the offline refusal), weights files for any architecture (new head, key and shape refusals, a
pickle that is not weights-only), the per-network re-normalisation against a hand computation, and a user's
own architecture by import path, each through `sskd distill` where it matters."""

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import sskd
from sskd.cli import main as sskd_main
from sskd.core.errors import SSKDError
from sskd.models import create_model
from sskd.runs import load_model_info

FAST = ["--no-progress", "--batch-size", "16", "--max-steps", "2", "--epochs", "1"]
TIMM_NAME = "test_resnet.r160_in1k"  # timm's tiny test model, with a pretrained tag (mean = std = 0.5)


def run(*args) -> int:
    return sskd_main([str(a) for a in args])


def fabricate_hf_cache(home, name: str = TIMM_NAME, seed: int = 1) -> dict[str, torch.Tensor]:
    """timm's hub layout under ``home/hub`` holding seeded weights for ``name`` (1,000 classes): what
    ``timm.create_model(name, pretrained=True)`` leaves behind on a machine with network."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    state = {k: v.contiguous() for k, v in timm.create_model(name, pretrained=False).state_dict().items()}
    repo = home / "hub" / f"models--timm--{name}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file(state, str(repo / "snapshots" / commit / "model.safetensors"))
    return state


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("SSKD_ALLOW_DOWNLOAD", raising=False)
    return home


@pytest.fixture
def no_network(monkeypatch):
    """Any download attempt fails the test."""
    import huggingface_hub

    def refuse(*a, **k):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)


# -- pretrained timm weights ---------------------------------------------------------------------------------


def test_pretrained_timm_weights_come_from_the_local_hf_cache_with_a_new_head(hf_home, no_network):
    state = fabricate_hf_cache(hf_home)
    model = create_model(f"timm:{TIMM_NAME}", 10, pretrained=True)
    own = model.net.state_dict()
    body = [k for k in state if not k.startswith("fc.")]
    assert body and all(torch.equal(own[k], state[k]) for k in body)
    assert own["fc.weight"].shape == (10, state["fc.weight"].shape[1])  # a new head for 10 classes
    assert model.input_norm[:2] == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert str(model.pretrained_file).startswith(str(hf_home / "hub"))


def test_missing_pretrained_weights_are_one_line_naming_where_and_how_to_fetch(hf_home, no_network):
    with pytest.raises(SSKDError) as err:
        create_model(f"timm:{TIMM_NAME}", 10, pretrained=True)
    msg = str(err.value)
    assert "\n" not in msg
    assert str(hf_home / "hub" / f"models--timm--{TIMM_NAME}") in msg
    assert "--allow-download" in msg and "timm.create_model('test_resnet.r160_in1k', pretrained=True)" in msg


def test_a_download_happens_only_with_allow_download(hf_home, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_download(repo, filename, revision=None, cache_dir=None):
        calls.append((repo, filename))
        fabricate_hf_cache(hf_home)
        return str(next((hf_home / "hub").rglob("model.safetensors")))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    with pytest.raises(SSKDError, match="--allow-download"):
        create_model(f"timm:{TIMM_NAME}", 10, pretrained=True)
    assert calls == []
    monkeypatch.setenv("SSKD_ALLOW_DOWNLOAD", "1")
    create_model(f"timm:{TIMM_NAME}", 10, pretrained=True)
    assert calls == [("timm/test_resnet.r160_in1k", "model.safetensors")]


def test_unknown_pretrained_tags_and_builtins_without_weights_are_one_line(hf_home):
    with pytest.raises(SSKDError, match=r"timm:test_resnet.nope: timm has no pretrained weights.*r160_in1k"):
        create_model("timm:test_resnet.nope", 10, pretrained=True)
    with pytest.raises(SSKDError, match="resnet8x4 has no pretrained weights.*--weights FILE"):
        create_model("resnet8x4", 10, pretrained=True)


def test_a_pretrained_timm_teacher_is_checked_and_renormalised(hf_home, no_network):
    from sskd.runs.models import teacher_info, teacher_model

    state = fabricate_hf_cache(hf_home)
    manifest = {"num_classes": 1000, "dataset": "x", "mean": [0.1, 0.2, 0.3], "std": [0.2, 0.25, 0.3]}
    info = teacher_info(f"timm:{TIMM_NAME}", manifest)
    assert info["arch"] == f"timm:{TIMM_NAME}" and info["stage"] == "timm-pretrained"
    assert len(info["weights_sha256"]) == 64
    assert info["normalization"]["network"]["mean"] == [0.5, 0.5, 0.5]
    teacher = teacher_model(f"timm:{TIMM_NAME}", info)
    assert all(torch.equal(teacher.net.state_dict()[k], v) for k, v in state.items())
    # the teacher's classes must be the shards': 1,000 against 10 is refused before anything is built
    with pytest.raises(SSKDError, match=r"teacher has 1000 classes but the shards \(x\) have 10"):
        teacher_info(f"timm:{TIMM_NAME}", {**manifest, "num_classes": 10})


def test_a_pretrained_timm_student_distils_with_its_own_normalisation(
    hf_home, no_network, tmp_path, digits_shards
):
    fabricate_hf_cache(hf_home)
    out = tmp_path / "s"
    assert run("distill", "--method", "ce", "--student", f"timm:{TIMM_NAME}", "--pretrained",
               "--shards", digits_shards, "--out", out, *FAST) == 0  # fmt: skip
    info = load_model_info(out)
    manifest = json.loads((digits_shards / "manifest.json").read_text())
    assert info["start"]["pretrained"].startswith(f"timm:{TIMM_NAME}")
    assert info["normalization"]["data"] == {"mean": manifest["mean"], "std": manifest["std"]}
    assert info["normalization"]["network"]["mean"] == [0.5, 0.5, 0.5]
    assert info["normalization"]["network"]["input_size"] == [3, 160, 160]  # what timm's config says
    # the rebuilt model (evaluate, export) re-normalises the same way
    from sskd.runs.models import load_run_model

    model, _ = load_run_model(out)
    assert model._forward_pre_hooks
    # exported: a graph holds the re-normalisation (it takes the shards' normalisation), bare weights do not
    for fmt, suffix, mean in (("onnx", "onnx", manifest["mean"]), ("safetensors", "safetensors", [0.5] * 3)):
        path = tmp_path / f"s.{suffix}"
        assert run("export", out, "--format", fmt, "--out", path, "--shards", digits_shards) == 0
        described = json.loads(path.with_name(path.name + ".json").read_text())
        assert described["input"]["mean"] == mean
        assert described["input"]["normalization"]["network"]["std"] == [0.5] * 3
        assert described["check"]["top1_agreement"] == 100.0


# -- the re-normalisation ------------------------------------------------------------------------------------


def test_renormalisation_matches_a_hand_computation():
    from sskd.models.weights import attach_input_norm

    torch.manual_seed(0)
    model = create_model("resnet8", 10).eval()
    plain = create_model("resnet8", 10).eval()
    plain.load_state_dict(model.state_dict())
    model.input_norm = ((0.5, 0.4, 0.3), (0.2, 0.3, 0.4), "hand")
    d_mean, d_std = [0.1, 0.2, 0.3], [0.25, 0.25, 0.5]
    record = attach_input_norm(model, d_mean, d_std)
    assert record["network"]["source"] == "hand"
    x = torch.randn(2, 3, 32, 32)
    pixels = x * torch.tensor(d_std).view(1, 3, 1, 1) + torch.tensor(d_mean).view(
        1, 3, 1, 1
    )  # undo the data's
    by_hand = (pixels - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.3, 0.4]).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(by_hand), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model(x), plain(x), atol=1e-3)  # the hook did something
    assert set(model.state_dict()) == set(plain.state_dict())  # no new state


# -- weights files -------------------------------------------------------------------------------------------


def test_a_weights_file_starts_a_student_with_a_new_head(tmp_path, digits_shards):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    src = create_model("resnet8x4", 100)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    out = tmp_path / "s"
    assert run("distill", "--method", "ce", "--student", "resnet8x4", "--weights", path,
               "--shards", digits_shards, "--out", out, "--set", "student.lr=0", *FAST) == 0  # fmt: skip
    info = load_model_info(out)
    assert info["start"]["weights"] == str(path) and len(info["start"]["weights_sha256"]) == 64
    from safetensors.torch import load_file

    trained = load_file(str(out / "model.safetensors"))
    body = [
        k
        for k in src.state_dict()
        if not k.startswith("fc.") and "running" not in k and "num_batches" not in k
    ]
    assert all(torch.equal(trained[k], src.state_dict()[k]) for k in body)  # lr 0: the loaded body, unchanged
    assert trained["fc.weight"].shape[0] == 10


def test_a_pth_weights_file_for_a_timm_model_loads_its_bare_keys(tmp_path):
    from sskd.models.weights import load_weights_file

    torch.manual_seed(4)
    src = create_model("timm:test_efficientnet", 10)
    path = tmp_path / "w.pth"
    torch.save(src.net.state_dict(), path)  # timm's own keys, no "net." prefix
    dst = create_model("timm:test_efficientnet", 10)
    load_weights_file(dst, path, 10, new_head=False)
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))


class Payload:
    """A pickle that would create a file when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_bad_weights_files_are_one_line_each(tmp_path):
    from sskd.models.weights import load_weights_file

    model = create_model("resnet8x4", 10)
    wrong = tmp_path / "wrong.pth"
    torch.save(create_model("resnet14", 10).state_dict(), wrong)
    with pytest.raises(SSKDError, match=r"wrong.pth: key '.*' (is not in resnet8x4|has shape)"):
        load_weights_file(model, wrong, 10, new_head=True, arch="resnet8x4")
    narrow = tmp_path / "narrow.pth"
    state = create_model("resnet8x4", 10).state_dict()
    key = next(k for k in state if k.endswith("conv1.weight"))
    state[key] = torch.zeros(1, *state[key].shape[1:])
    torch.save(state, narrow)
    with pytest.raises(SSKDError, match=rf"key '{key}' has shape \(1, .*\) but resnet8x4 expects"):
        load_weights_file(model, narrow, 10, new_head=True, arch="resnet8x4")
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "x": Payload(marker)}, evil)
    with pytest.raises(SSKDError, match="refused to load: not a weights-only file.*nothing in it was run"):
        load_weights_file(model, evil, 10, new_head=True)
    assert not marker.exists()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(b"\x10\x00\x00")
    with pytest.raises(SSKDError, match="cut.safetensors: not a readable safetensors file"):
        load_weights_file(model, cut, 10, new_head=True)
    with pytest.raises(SSKDError, match="no such weights file"):
        load_weights_file(model, tmp_path / "absent.pth", 10, new_head=True)
    head = tmp_path / "head.pth"
    torch.save(create_model("resnet8x4", 100).state_dict(), head)
    with pytest.raises(SSKDError, match="its classifier fc.weight has 100 classes but the shards have 10"):
        load_weights_file(model, head, 10, new_head=False)


def test_a_teacher_from_a_weights_file_teaches_kd(tmp_path, digits_shards):
    torch.manual_seed(5)
    path = tmp_path / "t.pth"
    torch.save(create_model("timm:test_resnet", 10).net.state_dict(), path)
    out = tmp_path / "s"
    assert run("distill", "--method", "kd", "--teacher", "timm:test_resnet", "--teacher-weights", path,
               "--student", "timm:test_efficientnet", "--shards", digits_shards, "--out", out, *FAST) == 0  # fmt: skip
    info = load_model_info(out)
    assert info["teacher_arch"] == "timm:test_resnet" and len(info["teacher_weights_sha256"]) == 64
    bad = tmp_path / "t100.pth"
    torch.save(create_model("timm:test_resnet", 100).net.state_dict(), bad)
    assert run("distill", "--method", "kd", "--teacher", "timm:test_resnet", "--teacher-weights", bad,
               "--student", "resnet8", "--shards", digits_shards, "--out", tmp_path / "s2", *FAST) == 2  # fmt: skip
    assert not (tmp_path / "s2" / "model.json").exists()


# -- your own architecture by import path --------------------------------------------------------------------

USER_MODULE = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(8, num_classes)

    def forward(self, x):
        return {"logits": self.classifier(self.body(x))}


def make_net(num_classes):
    return Net(num_classes)


def not_a_module(num_classes):
    return 42
"""


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "userpkg.models"
    for name in [m for m in sys.modules if m.startswith("userpkg")]:
        del sys.modules[name]


def test_an_import_path_model_distils_and_evaluates(user_package, tmp_path, digits_shards, capsys):
    arch = f"{user_package}:make_net"
    model = create_model(arch, 10)
    f = model(torch.randn(2, 3, 32, 32), features=True)
    assert f.logits.shape == (2, 10) and f.feat.shape == (2, 8) and model.feat_dim == 8
    torch.testing.assert_close(f.logits, model.net.classifier(f.feat))
    teacher = tmp_path / "t"
    assert run("train-teacher", "--arch", "resnet8", "--shards", digits_shards, "--out", teacher, *FAST) == 0
    out = tmp_path / "s"
    assert run("distill", "--method", "kd", "--teacher", teacher, "--student", arch,
               "--shards", digits_shards, "--out", out, *FAST) == 0  # fmt: skip
    assert load_model_info(out)["arch"] == arch
    assert run("evaluate", "--model", out, "--shards", digits_shards, "--json", tmp_path / "e.json") == 0
    # a feature method and HSSAKD say what more they need, before training
    capsys.readouterr()
    for method, why in (("fitnet", "maps none"), ("hssakd_online", "an imported model has no stage layout")):
        assert run("distill", "--method", method, "--teacher", teacher, "--student", arch,
                   "--shards", digits_shards, "--out", tmp_path / method, *FAST) == 2  # fmt: skip
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and why in err[0] and (arch in err[0] or "HSSAKD" in err[0]), err
        assert not (tmp_path / method / "model.json").exists()


def test_bad_import_paths_are_one_line(user_package):
    with pytest.raises(
        SSKDError, match=r"--arch nosuchpkg.x:make: cannot import nosuchpkg.x \(ModuleNotFoundError"
    ):
        create_model("nosuchpkg.x:make", 10)
    with pytest.raises(SSKDError, match=f"{user_package} has no nothing"):
        create_model(f"{user_package}:nothing", 10)
    with pytest.raises(SSKDError, match=r"returned a int, not a torch.nn.Module"):
        create_model(f"{user_package}:not_a_module", 10)


# -- the ImageNet timm recipes -------------------------------------------------------------------------------

RECIPES = sorted((Path(sskd.__file__).parent / "configs" / "imagenet" / "timm").glob("*.yaml"))
STAND_INS = {  # the recipes' pairs, swapped for timm's tiny test models of the same families
    "resnet50-mobilenetv3": ("timm:test_resnet", "timm:test_efficientnet"),
    "deit_small-deit_tiny": ("timm:test_vit2", "timm:test_vit"),
}


def test_the_timm_recipes_name_pretrained_imagenet_teachers_for_every_method():
    import timm

    from sskd.engine.config import load_config
    from sskd.models.weights import pretrained_cfg

    assert {p.stem for p in RECIPES} == {
        f"{pair}-{m}" for pair in STAND_INS for m in ("kd", "dkd", "dist", "sskd", "hssakd")
    }
    for path in RECIPES:
        cfg = load_config(path)
        teacher = cfg.teacher.arch.removeprefix("timm:")
        pc = pretrained_cfg(teacher)
        assert pc.num_classes == 1000 and pc.hf_hub_id and "." in teacher, (
            path
        )  # a tagged, hub-hosted teacher
        assert cfg.teacher.pretrained and timm.is_model(cfg.student.arch.removeprefix("timm:")), path
        assert f"--teacher {cfg.teacher.arch} " in path.read_text(), path  # the command line the header shows
        assert cfg.student.method == path.stem.rsplit("-", 1)[1]


@pytest.mark.slow
@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_each_timm_recipe_trains_two_steps_on_stand_in_models(path, tmp_path, digits_shards):
    """The recipe's settings (method, its section, optimizer, schedule) with the pair swapped for test models
    and the teacher from a weights file: train-ss-head first where the method needs the teacher's part."""
    teacher_arch, student_arch = STAND_INS[path.stem.rsplit("-", 1)[0]]
    torch.manual_seed(0)
    weights = tmp_path / "t.pth"
    torch.save(create_model(teacher_arch, 10).net.state_dict(), weights)
    common = ["--config", path, "--shards", digits_shards, "--mixed-precision", "no", "--threads", "2",
              "--set", "data.eval_batch_size=64", *FAST]  # fmt: skip
    teacher = [teacher_arch, "--teacher-weights", weights]
    method = path.stem.rsplit("-", 1)[1]
    if method in ("sskd", "hssakd"):
        assert run("train-ss-head", "--teacher", *teacher, "--out", tmp_path / "t", *common) == 0
        teacher = [tmp_path / "t"]
    out = tmp_path / "s"
    assert run("distill", "--teacher", *teacher, "--student", student_arch, "--out", out, *common) == 0
    assert load_model_info(out)["method"] == method
