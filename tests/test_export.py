"""`sskd export` (sskd/runs/export.py, sskd/cli/export.py) and `sskd evaluate` on an exported ONNX file: round
trips within tolerance on the digits shards, the method's parts stripped, and bad input in one line."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sskd.cli import main as sskd_main
from sskd.core.errors import SSKDError
from sskd.models import create_model
from sskd.runs import export as export_lib
from sskd.runs import load_model_info

FAST = ["--no-progress", "--batch-size", "32", "--set", "data.eval_batch_size=128"]
FORMATS = ["onnx", "torchscript", "safetensors"]


def run(*args) -> int:
    return sskd_main([str(a) for a in args])


def train(out: Path, shards: Path, *args) -> Path:
    assert run("train-teacher", "--shards", shards, "--out", out, *args, *FAST) == 0
    return out


@pytest.fixture(scope="module")
def runs(digits_shards, tmp_path_factory):
    """A resnet8 teacher trained far enough to tell the classes apart, its SS head, and an SSKD student (a
    model with the SS head around it)."""
    root = tmp_path_factory.mktemp("export-runs")
    train(root / "t", digits_shards, "--arch", "resnet8", "--max-steps", 20)
    common = ["--shards", digits_shards, "--max-steps", 2, *FAST]
    assert run("train-ss-head", "--teacher", root / "t", "--out", root / "t-ss", *common) == 0
    args = ["--teacher", root / "t-ss", "--student", "resnet8", "--method", "sskd", "--out", root / "s-sskd"]
    assert run("distill", *args, *common) == 0
    return root


def export(run_dir, fmt, out, *more) -> int:
    return run("export", run_dir, "--format", fmt, "--out", out, *more)


def described(out: Path) -> dict:
    return json.loads(Path(str(out) + ".json").read_text())


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_on_the_validation_split(runs, digits_shards, tmp_path, fmt, capsys):
    out = tmp_path / f"student.{fmt}"
    assert export(runs / "t", fmt, out, "--shards", digits_shards) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert "max |Δlogit|" in line and "top-1 agreement 100.00%" in line
    rec, info = described(out), load_model_info(runs / "t")
    manifest = json.loads((digits_shards / "manifest.json").read_text())
    check = rec["check"]
    assert check["max_abs_logit_diff"] <= 1e-4 and check["top1_agreement"] == 100.0
    assert check["count"] == manifest["splits"]["val"]["num_samples"]
    assert check["top1_pytorch"] == check["top1_exported"] == pytest.approx(info["top1"])
    assert (rec["format"], rec["arch"], rec["num_classes"], rec["classes"]) == (
        fmt,
        "resnet8",
        10,
        info["classes"],
    )
    assert rec["weights_sha256"] == info["weights_sha256"] and rec["source_run"] == str(
        (runs / "t").resolve()
    )
    assert rec["input"]["mean"] == manifest["mean"] and rec["input"]["std"] == manifest["std"]
    assert rec["input"]["size"] == 32 and rec["input"]["shape"] == ["batch", 3, 32, 32]
    assert rec["sha256"] == export_lib.atomic.sha256_file(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, out.name + ".json"])  # no partials
    # the file loads as a deployment loads it and gives the run's logits
    reference = create_model("resnet8", num_classes=10)
    reference.load_state_dict(load_file(str(runs / "t" / "model.safetensors")))
    reference.eval()
    x = torch.randn(3, 3, 32, 32)
    if fmt == "onnx":
        got = export_lib.OnnxClassifier(out)(x)
    elif fmt == "torchscript":
        got = torch.jit.load(str(out))(x)
    else:
        plain = create_model("resnet8", num_classes=10)
        plain.load_state_dict(load_file(str(out)))
        got = plain.eval()(x)
    with torch.no_grad():
        assert (got - reference(x)).abs().max() <= 1e-4


def test_without_shards_the_check_uses_random_inputs_and_the_runs_shards_normalisation(
    runs, digits_shards, tmp_path, capsys
):
    out = tmp_path / "s.onnx"
    assert export(runs / "t", "onnx", out) == 0
    assert "random inputs" in capsys.readouterr().out
    rec = described(out)
    assert rec["check"]["count"] == export_lib.RANDOM_INPUTS and "top1_pytorch" not in rec["check"]
    assert rec["input"]["shards"] == str(digits_shards)  # the shards the run's config.yaml names


def test_the_sskd_students_ss_head_is_stripped(runs, digits_shards, tmp_path):
    assert load_model_info(runs / "s-sskd")["wrapper"] == "ss_head"
    assert export(runs / "s-sskd", "safetensors", tmp_path / "s.safetensors") == 0
    keys = set(load_file(str(tmp_path / "s.safetensors")))
    assert keys == set(create_model("resnet8", num_classes=10).state_dict())  # the classifier's, nothing more
    assert export(runs / "s-sskd", "onnx", tmp_path / "s.onnx", "--shards", digits_shards) == 0
    check = described(tmp_path / "s.onnx")["check"]
    assert check["max_abs_logit_diff"] <= 1e-4 and check["top1_agreement"] == 100.0
    assert export_lib.OnnxClassifier(tmp_path / "s.onnx")(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_evaluate_scores_the_onnx_file_as_the_run(runs, digits_shards, tmp_path):
    assert export(runs / "t", "onnx", tmp_path / "s.onnx") == 0
    for model, js in ((runs / "t", "run.json"), (tmp_path / "s.onnx", "onnx.json")):
        assert run("evaluate", "--model", model, "--shards", digits_shards, "--json", tmp_path / js) == 0
    a, b = (json.loads((tmp_path / js).read_text()) for js in ("run.json", "onnx.json"))
    assert (a["top1"], a["top5"], a["count"]) == (b["top1"], b["top5"], b["count"])
    assert a["top1"] > 15  # a model that tells classes apart, so the agreement means something


def test_evaluate_refuses_an_exported_file_it_cannot_score_rightly(runs, digits_shards, tmp_path, capsys):
    assert export(runs / "t", "onnx", tmp_path / "s.onnx") == 0
    rec = described(tmp_path / "s.onnx")
    rec["input"]["mean"] = [0.5, 0.5, 0.5]  # exported for another normalisation than these shards'
    Path(str(tmp_path / "s.onnx") + ".json").write_text(json.dumps(rec))
    capsys.readouterr()
    assert run("evaluate", "--model", tmp_path / "s.onnx", "--shards", digits_shards) == 2
    assert "records mean [0.5, 0.5, 0.5]" in one_error_line(capsys)
    (tmp_path / "s.pt").write_bytes(b"")
    assert run("evaluate", "--model", tmp_path / "s.pt", "--shards", digits_shards) == 2
    assert "not an .onnx one" in one_error_line(capsys)


@pytest.mark.parametrize(
    "arch", ["wrn_16_2", "MobileNetV2", pytest.param("ShuffleV1", marks=pytest.mark.slow)]
)
def test_other_student_architectures(arch, digits_shards, tmp_path):
    src = train(tmp_path / "r", digits_shards, "--arch", arch, "--max-steps", 1)
    for fmt in ("onnx", "torchscript"):
        out = tmp_path / f"s.{fmt}"
        assert export(src, fmt, out, "--shards", digits_shards) == 0
        check = described(out)["check"]
        assert check["max_abs_logit_diff"] <= 1e-4 and check["top1_agreement"] == 100.0, (arch, fmt, check)


@pytest.mark.slow
def test_an_hssakd_students_branches_are_stripped(digits_shards, tmp_path):
    common = ["--shards", digits_shards, "--max-steps", 2, *FAST]
    teacher = train(
        tmp_path / "t", digits_shards, "--method", "hssakd", "--arch", "resnet8", "--max-steps", 2
    )
    args = ["--teacher", teacher, "--student", "resnet8", "--method", "hssakd", "--out", tmp_path / "s"]
    assert run("distill", *args, *common) == 0
    assert load_model_info(tmp_path / "s")["wrapper"] == "branches"
    assert export(tmp_path / "s", "safetensors", tmp_path / "s.safetensors") == 0
    assert set(load_file(str(tmp_path / "s.safetensors"))) == set(create_model("resnet8", 10).state_dict())
    assert export(tmp_path / "s", "onnx", tmp_path / "s.onnx", "--shards", digits_shards) == 0
    assert described(tmp_path / "s.onnx")["check"]["max_abs_logit_diff"] <= 1e-4


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sskd: error: "), err
    return err[0]


def test_bad_input_is_one_line_and_writes_nothing(runs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "s.onnx"
    assert export(tmp_path, "onnx", out) == 2  # a folder that holds no run
    assert "no finished model" in one_error_line(capsys)
    assert export(tmp_path / "missing", "onnx", out) == 2
    assert "run folder not found" in one_error_line(capsys)

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert export(runs / "t", "torchscript", blocker / "s.pt") == 2  # --out under a file: cannot be written
    assert "cannot write the exported model" in one_error_line(capsys)

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the package were not installed
    assert export(runs / "t", "onnx", out) == 2
    line = one_error_line(capsys)
    assert "onnxruntime" in line and "sskd[export]" in line
    monkeypatch.undo()

    def unsupported(*args, **kw):
        raise RuntimeError("Unsupported operator: aten::fancy_op\nmore detail")

    monkeypatch.setattr(torch.onnx, "export", unsupported)
    assert export(runs / "t", "onnx", out) == 2
    line = one_error_line(capsys)
    assert str(out) in line and "onnx export failed" in line and "aten::fancy_op" in line
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == [blocker]  # nothing written, no partial file left


def test_a_file_beyond_the_tolerance_is_not_published(runs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "s.torchscript"
    assert export(runs / "t", "torchscript", out) == 0
    before = out.read_bytes()
    capsys.readouterr()
    load = export_lib._load

    def off_by_a_little(*args):
        loaded = load(*args)
        return lambda x: loaded(x) + 1e-3

    monkeypatch.setattr(export_lib, "_load", off_by_a_little)
    assert export(runs / "t", "torchscript", out) == 2
    line = one_error_line(capsys)
    assert "max |Δlogit| 0.001" in line and "beyond --atol 0.0001 + --rtol 1e-05" in line
    assert "nothing written" in line
    assert out.read_bytes() == before and len(list(tmp_path.iterdir())) == 2  # the earlier export stands
    assert export(runs / "t", "torchscript", out, "--atol", "0.01") == 0  # a stated looser tolerance passes


@pytest.mark.parametrize("wrapper", [None, "ss_head", "branches", "kdss_heads"])
def test_every_method_wrapper_is_peeled_off(wrapper):
    from sskd.runs.models import new_model

    plain = export_lib.plain_classifier(new_model("resnet8", 10, wrapper=wrapper))
    assert set(plain.state_dict()) == set(create_model("resnet8", num_classes=10).state_dict())
    assert export_lib.Logits(plain).eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_imagenet_layout_preprocessing_resizes_then_crops(photo_shards, tmp_path):
    prep = export_lib.preprocessing(tmp_path, {"num_classes": 4}, photo_shards)  # a run without config.yaml
    manifest = json.loads((photo_shards / "manifest.json").read_text())
    assert (prep["layout"], prep["size"], prep["resize_shorter"], prep["center_crop"]) == (
        "imagenet",
        224,
        256,
        224,
    )
    assert (prep["mean"], prep["std"]) == (manifest["mean"], manifest["std"])
    with pytest.raises(SSKDError, match="10 classes but the shards .* have 4"):
        export_lib.preprocessing(tmp_path, {"num_classes": 10}, photo_shards)
    with pytest.raises(SSKDError, match="names no shards; pass --shards"):
        export_lib.preprocessing(tmp_path, {"num_classes": 4})
