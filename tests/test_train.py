"""The training commands end to end on the digits shards: short real runs, resume, 2 ranks, bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sskd.cli import main as sskd_main
from sskd.config import StageConfig
from sskd.runs import file_sha256, load_model_info, read_metrics
from sskd.train import lr_factor

REPO = Path(__file__).resolve().parents[1]
FAST = ["--no-progress", "--batch-size", "32", "--set", "run.log_every=1", "--set", "data.eval_batch_size=128"]


def run(*args: str) -> int:
    return sskd_main([str(a) for a in args])


def test_lr_schedules():
    step = lr_factor(StageConfig(epochs=10, milestones=[4, 8], gamma=0.1), steps_per_epoch=10)
    assert step(0) == 1.0 and step(39) == 1.0
    assert step(40) == pytest.approx(0.1) and step(85) == pytest.approx(0.01)
    cos = lr_factor(StageConfig(epochs=10, schedule="cosine", warmup_epochs=1), steps_per_epoch=10)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)
    assert cos(10) == pytest.approx(1.0) and cos(100) == pytest.approx(0.0, abs=1e-12)
    assert cos(55) == pytest.approx(0.5, abs=1e-9)


@pytest.fixture(scope="module")
def teacher_runs(digits_shards, tmp_path_factory):
    """A tiny teacher and its SS head, trained once for the tests of this module."""
    root = tmp_path_factory.mktemp("runs")
    assert run("train-teacher", "--shards", digits_shards, "--arch", "resnet8", "--out", root / "t",
               "--max-steps", 4, *FAST) == 0
    assert run("train-ss-head", "--teacher", root / "t", "--shards", digits_shards, "--out", root / "t-ss",
               "--max-steps", 3, *FAST) == 0
    return root


def test_teacher_and_ss_head_runs(teacher_runs):
    t, ss = load_model_info(teacher_runs / "t"), load_model_info(teacher_runs / "t-ss")
    assert (t["arch"], t["has_head"], t["steps"]) == ("resnet8", False, 4)
    assert (ss["arch"], ss["has_head"], ss["steps"]) == ("resnet8", True, 3)
    assert 0 <= t["top1"] <= 100 and t["num_classes"] == 10
    recs = read_metrics(teacher_runs / "t")
    train_recs = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train_recs] == [1, 2, 3, 4]
    assert all({"loss", "ce", "lr", "images_per_s", "world_size"} <= r.keys() for r in train_recs)
    assert (teacher_runs / "t" / "config.yaml").is_file()
    assert (teacher_runs / "t" / "checkpoints" / "last.pt").is_file()
    # The SS-head stage leaves the teacher's backbone bit-identical.
    from safetensors.torch import load_file

    a, b = load_file(str(teacher_runs / "t" / "model.safetensors")), load_file(str(teacher_runs / "t-ss" / "model.safetensors"))
    for k, v in a.items():
        assert (b["backbone." + k] == v).all(), k


@pytest.mark.parametrize("method", ["sskd", "kd", "ce"])
def test_distill_methods_and_teacher_untouched(teacher_runs, digits_shards, tmp_path, method):
    before = file_sha256(teacher_runs / "t-ss" / "model.safetensors")
    out = tmp_path / method
    assert run("distill", "--teacher", teacher_runs / "t-ss", "--student", "resnet8", "--method", method,
               "--shards", digits_shards, "--out", out, "--max-steps", 2, *FAST) == 0
    assert file_sha256(teacher_runs / "t-ss" / "model.safetensors") == before
    info = load_model_info(out)
    assert info["method"] == method and info["has_head"] == (method == "sskd")
    terms = {"sskd": {"ce", "kd", "tf", "ss"}, "kd": {"ce", "kd"}, "ce": {"ce"}}[method]
    rec = [r for r in read_metrics(out) if r["kind"] == "train"][-1]
    assert terms <= rec.keys()


def test_evaluate_command(teacher_runs, digits_shards, tmp_path):
    assert run("evaluate", "--model", teacher_runs / "t", "--shards", digits_shards, "--json", tmp_path / "e.json") == 0
    result = json.loads((tmp_path / "e.json").read_text())
    manifest = json.loads((Path(digits_shards) / "manifest.json").read_text())
    assert result["count"] == manifest["splits"]["val"]["num_samples"]
    assert result["top1"] == pytest.approx(load_model_info(teacher_runs / "t")["top1"])


def test_resume_equals_uninterrupted(digits_shards, tmp_path):
    common = ["train-teacher", "--shards", digits_shards, "--arch", "resnet8", *FAST, "--set", "run.eval_every=0"]
    assert run(*common, "--out", tmp_path / "full", "--max-steps", 6) == 0
    assert run(*common, "--out", tmp_path / "cut", "--max-steps", 3) == 0
    import torch

    data = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=False)["data_state"]
    assert len(data) == 1 and data[0]["batch"] == 3 and data[0]["dali"]  # resumes from DALI's checkpoint
    assert run(*common, "--out", tmp_path / "cut", "--max-steps", 6, "--resume") == 0
    assert load_model_info(tmp_path / "cut")["steps"] == 6
    assert file_sha256(tmp_path / "cut" / "model.safetensors") == file_sha256(tmp_path / "full" / "model.safetensors")


def test_bad_inputs_fail_before_training(teacher_runs, digits_shards, tmp_path, capsys):
    cases = [
        (["distill", "--teacher", tmp_path / "nope", "--student", "resnet8", "--method", "kd"], "run folder not found"),
        (["distill", "--teacher", teacher_runs / "t", "--student", "resnet8", "--method", "sskd"], "has no SS head"),
        (["distill", "--teacher", teacher_runs / "t-ss", "--student", "resnet9000", "--method", "sskd"], "resnet9000"),
        (["train-teacher", "--arch", "resnet8", "--set", "student.lrr=1"], "unknown config key 'student.lrr'"),
        (["distill", "--student", "resnet8", "--method", "kd"], "needs --teacher"),
    ]
    for args, needle in cases:
        out = tmp_path / "run"
        assert run(*args, "--shards", digits_shards, "--out", out, "--max-steps", 1, *FAST) == 2, args
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("sskd: error:") and needle in err, (args, err)
        assert not (out / "model.safetensors").exists()


def test_wrong_number_of_classes_is_refused(teacher_runs, digits_shards, tmp_path, capsys):
    fake = tmp_path / "t100"
    shutil.copytree(teacher_runs / "t", fake)
    info = json.loads((fake / "model.json").read_text())
    info["num_classes"] = 100
    (fake / "model.json").write_text(json.dumps(info))
    assert run("distill", "--teacher", fake, "--student", "resnet8", "--method", "kd", "--shards", digits_shards,
               "--out", tmp_path / "s", *FAST) == 2
    assert "teacher has 100 classes but the shards" in capsys.readouterr().err


@pytest.mark.slow
def test_two_cpu_ranks_under_accelerate_launch(digits_shards, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch/accelerate/cpu.yaml"),
           "--main_process_port", "29577", str(REPO / "tests/scripts/ddp_probe.py"), str(digits_shards), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    probes = [json.loads((tmp_path / f"probe-rank{r}.json").read_text()) for r in (0, 1)]
    assert [p["world"] for p in probes] == [2, 2]
    ids0, ids1 = set(probes[0]["ids"]), set(probes[1]["ids"])
    assert len(ids0) == len(probes[0]["ids"]) and ids0 and ids1 and not ids0 & ids1  # disjoint, no repeats
    assert probes[0]["weights"] == probes[1]["weights"]  # DDP kept the replicas identical
    manifest = json.loads((Path(digits_shards) / "manifest.json").read_text())
    assert probes[0]["eval_count"] == probes[1]["eval_count"] == manifest["splits"]["val"]["num_samples"]
    assert [r["world_size"] for r in read_metrics(tmp_path) if r["kind"] == "train"][-1] == 2


@pytest.mark.slow
def test_demo_reduced_budget(tmp_path):
    from sskd.demo import run_demo

    results = run_demo(tmp_path / "demo", fast=True, progress=False)
    assert results["teacher"]["top1"] > 60
    assert set(results["students"]) == {"ce", "kd", "sskd"}
    assert all(s["top1"] > 30 for s in results["students"].values())
    assert (tmp_path / "demo" / "curves.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "demo" / "results.json").read_text())["teacher"]["top1"] == results["teacher"]["top1"]


def test_logged_loss_is_the_mean_over_its_interval_across_epochs(digits_shards, tmp_path):
    """Each logged loss averages exactly the steps since the previous line, epoch ends included."""
    import torch

    from sskd.config import load_config
    from sskd.stages import teacher_builder
    from sskd.train import Job, train

    cfg = load_config(None, [f"data.shards={digits_shards}", "teacher.arch=resnet8", "teacher.epochs=2",
                             "teacher.batch_size=256", "run.log_every=4", "run.eval_every=0", "run.progress=false"])
    losses = []

    class Recorder(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.views_needed = inner, inner.views_needed

        def trainable_module(self):
            return self.inner.trainable_module()

        def forward(self, batch):
            out = self.inner(batch)
            losses.append(out["loss"].item())
            return out

    build = teacher_builder(cfg)
    train(Job(stage="teacher", cfg=cfg, out=tmp_path / "t", build=lambda m: Recorder(build(m)), info={"arch": "resnet8"}))
    recs = [r for r in read_metrics(tmp_path / "t") if r["kind"] == "train"]
    # 1437 images / 256 = 6 batches per epoch, 12 steps; the line at step 8 straddles the epoch end
    assert [r["step"] for r in recs] == [4, 8, 12] and len(losses) == 12
    for r in recs:
        assert r["loss"] == pytest.approx(sum(losses[r["step"] - 4:r["step"]]) / 4, rel=1e-4)


def test_precision_may_change_between_runs_in_one_process():
    """Accelerate's process-wide state refuses a second precision; the demo and notebooks run several stages."""
    from sskd.dist import make_accelerator

    assert make_accelerator("no").mixed_precision == "no"
    assert make_accelerator("bf16", grad_accum=2).mixed_precision == "bf16"
    assert make_accelerator("no").mixed_precision == "no"


def test_bf16_gradient_accumulation_and_clipping(digits_shards, tmp_path):
    out = tmp_path / "t"
    assert run("train-teacher", "--shards", digits_shards, "--arch", "resnet8", "--out", out, "--max-steps", 3,
               "--mixed-precision", "bf16", "--set", "teacher.grad_accum=2", "--set", "teacher.clip_grad=1.0",
               *FAST) == 0
    recs = [r for r in read_metrics(out) if r["kind"] == "train"]
    assert [r["step"] for r in recs] == [1, 2, 3]  # an optimizer step every 2 micro-batches
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["run"]["mixed_precision"] == "bf16" and saved["teacher"]["grad_accum"] == 2
    import torch

    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["config"]["teacher"]["clip_grad"] == 1.0 and ckpt["step"] == 3 and ckpt["batch"] == 6


@pytest.mark.slow
def test_global_ss_batch_on_two_ranks(teacher_runs, digits_shards, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch/accelerate/cpu.yaml"),
           "--main_process_port", "29599", "-m", "sskd", "distill", "--teacher", str(teacher_runs / "t-ss"),
           "--student", "resnet8", "--method", "sskd", "--shards", str(digits_shards), "--out", str(tmp_path / "g"),
           "--max-steps", "2", "--global-ss-batch", *map(str, FAST)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [r for r in read_metrics(tmp_path / "g") if r["kind"] == "train"]
    assert recs[-1]["world_size"] == 2 and recs[-1]["ss"] >= 0
    assert load_model_info(tmp_path / "g")["steps"] == 2
