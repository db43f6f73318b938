"""``--log-with``: Accelerate's trackers beside metrics.jsonl (which stays the record of the run)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import yaml

from sskd import runs
from sskd.cli import build_parser
from sskd.cli import main as sskd_main
from sskd.cli.train import resolve_config
from sskd.engine.config import Config
from sskd.runs import TRACKER_FOLDERS, read_metrics

FAST = [
    "--no-progress",
    "--batch-size",
    "32",
    "--set",
    "run.log_every=1",
    "--set",
    "data.eval_batch_size=128",
]


def run(*args) -> int:
    return sskd_main([str(a) for a in args])


def teacher(shards, out, *extra) -> list:
    return ["train-teacher", "--shards", shards, "--arch", "resnet8", "--out", out, *FAST, *extra]


def tb_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_scalars_are_the_metrics_log(digits_shards, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "t"
    assert run(*teacher(digits_shards, out, "--max-steps", 3, "--log-with", "tensorboard")) == 0
    records = read_metrics(out)
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    scalars = tb_scalars(out / TRACKER_FOLDERS["tensorboard"])
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3]
    for (_step, value), rec in zip(scalars["train/loss"], train):
        assert value == pytest.approx(rec["loss"], rel=1e-6)
    assert [s for s, _ in scalars["train/lr"]] == [1, 2, 3]
    evals = [r for r in records if r["kind"] == "eval"]
    assert scalars["eval/top1"] == [(evals[-1]["step"], pytest.approx(evals[-1]["top1"], rel=1e-6))]
    assert not any(tag.endswith(("/step", "/time")) for tag in scalars)
    # the config went in flat (section.key, lists as strings), and the run's config says which trackers
    hparams = yaml.safe_load(next((out / TRACKER_FOLDERS["tensorboard"]).glob("*/hparams.yml")).read_text())
    assert hparams["run.log_with"] == "[tensorboard]" and hparams["teacher.arch"] == "resnet8"
    assert hparams["teacher.milestones"] == "[150, 180, 210]"
    assert yaml.safe_load((out / "config.yaml").read_text())["run"]["log_with"] == ["tensorboard"]


def test_without_log_with_no_tracker_writes_and_a_resume_may_add_one(digits_shards, tmp_path, caplog):
    out = tmp_path / "plain"
    assert run(*teacher(digits_shards, out, "--max-steps", 2, "--set", "run.eval_every=0")) == 0
    assert not [
        name for name in (*TRACKER_FOLDERS.values(), "tb", "wandb", "mlruns") if (out / name).exists()
    ]
    before = read_metrics(out)
    # metrics.jsonl's records are what they were before trackers existed
    assert set(before[0]) == {
        "time",
        "ce",
        "loss",
        "train_top1",
        "kind",
        "step",
        "epoch",
        "lr",
        "images_per_s",
        "world_size",
    }
    if not runs._installed("tensorboard"):
        return  # the rest needs a tracker
    with caplog.at_level(logging.INFO, logger="sskd"):
        assert (
            run(
                *teacher(
                    digits_shards,
                    out,
                    "--max-steps",
                    3,
                    "--set",
                    "run.eval_every=0",
                    "--log-with",
                    "tensorboard",
                    "--resume",
                )
            )
            == 0
        )
    assert "run.log_with" not in " ".join(
        r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
    )
    after = read_metrics(out)
    train = [r for r in after if r["kind"] == "train"]
    assert after[: len(before)] == before and [r["step"] for r in train] == [1, 2, 3]
    scalars = tb_scalars(out / TRACKER_FOLDERS["tensorboard"])  # the tracker starts with the resumed steps
    assert scalars["train/loss"] == [(3, pytest.approx(train[-1]["loss"], rel=1e-6))]


def test_a_resume_replaces_the_tensorboard_steps_after_its_checkpoint(digits_shards, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "t"
    common = teacher(digits_shards, out, "--set", "run.eval_every=0", "--log-with", "tensorboard")
    assert run(*common, "--max-steps", 3) == 0
    import torch

    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    ckpt["step"], ckpt["batch"], ckpt["data_state"] = 2, 2, [None]  # as if killed after logging step 3
    torch.save(ckpt, out / "checkpoints" / "last.pt")
    assert run(*common, "--max-steps", 5, "--resume") == 0
    train = [r for r in read_metrics(out) if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5]
    loss = tb_scalars(out / TRACKER_FOLDERS["tensorboard"])["train/loss"]
    assert [s for s, _ in loss] == [1, 2, 3, 4, 5]  # step 3 of the first run is purged, not shown twice
    assert [v for _, v in loss] == pytest.approx([r["loss"] for r in train], rel=1e-6)


@pytest.mark.parametrize("name", ["wandb", "tensorboard", "mlflow", "aim"])
def test_a_missing_tracker_package_is_one_line_before_training(
    name, digits_shards, tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, runs.TRACKER_MODULES[name], None)  # the package "is not installed"
    out = tmp_path / "r"
    assert run(*teacher(digits_shards, out, "--max-steps", 1, "--log-with", name)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(f"--log-with {name} needs the {name} package (pip install {name})")
    assert len(err) == 1 and not out.exists()


def test_flat_config():
    flat = runs.flat_config(
        {"a": {"b": 1, "c": {"d": [1, 2]}, "e": None}, "f": True, "g": [], "h": "x", "p": Path("/x")}
    )
    assert flat == {"a.b": 1, "a.c.d": "[1, 2]", "a.e": None, "f": True, "g": "[]", "h": "x", "p": "/x"}
    full = runs.flat_config(Config().to_dict())
    assert full["student.lr"] == 0.05 and full["run.log_with"] == "[]" and full["teacher.milestones"]
    assert all(v is None or isinstance(v, (bool, int, float, str)) for v in full.values())
    assert all("." in k for k in full)


def _config(*argv):
    args = build_parser().parse_args(["train-teacher", "--shards", "s", "--out", "o", *argv])
    return resolve_config(args, "teacher")


def test_log_with_flag_list_and_set():
    assert _config().run.log_with == []
    assert _config("--log-with", "tensorboard").run.log_with == ["tensorboard"]
    assert _config("--log-with", "wandb,mlflow", "--log-with", "aim", "--log-with", "wandb").run.log_with == [
        "wandb",
        "mlflow",
        "aim",
    ]
    assert _config("--set", "run.log_with=[tensorboard]").run.log_with == ["tensorboard"]
    assert _config("--set", "run.log_with=[aim]", "--log-with", "none").run.log_with == ["aim"]  # --set last
    assert _config("--log-with", "none").run.log_with == []
    with pytest.raises(SystemExit):
        _config("--log-with", "tensorbored")
    from sskd.core.errors import SSKDError

    with pytest.raises(SSKDError, match="run.log_with must be one of"):
        _config("--set", "run.log_with=[comet]")


class _FakeAccelerator:
    def __init__(self):
        self.log_with, self.logged, self.trackers = ["tensorboard"], [], []

    def log(self, values, step=None):
        self.logged.append((step, values))


def test_tracker_steps_never_go_back_across_phases(tmp_path):
    acc = _FakeAccelerator()
    m = runs.MetricsLog(tmp_path, accelerator=acc)
    for phase, step in ((0, 1), (0, 2), (1, 1), (1, 2)):
        m.write({"kind": "train", "step": step, "loss": 1.0, "phase": phase, "phase_name": "x"})
    m.write({"kind": "eval", "step": 2, "top1": 50.0, "phase": 1, "phase_name": "main"})
    assert [s for s, _ in acc.logged] == [1, 2, 3, 4, 4]
    assert acc.logged[0][1] == {"train/loss": 1.0}  # numbers only; step, time and phase are not values
    assert acc.logged[-1][1] == {"eval/top1": 50.0}
    # a resumed log keeps the earlier phases' lengths
    again = runs.MetricsLog(tmp_path, accelerator=_FakeAccelerator(), keep_until=(1, 1))
    assert again.tracker_step(1, 1) == 3 and len(read_metrics(tmp_path)) == 3


@pytest.mark.parametrize("name", ["wandb", "mlflow", "aim"])
def test_service_trackers_write_in_the_run_folder(name, digits_shards, tmp_path, monkeypatch):
    pytest.importorskip(runs.TRACKER_MODULES[name])
    for var in ("WANDB_MODE", "WANDB_DIR", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "r"
    assert (
        run(*teacher(digits_shards, out, "--max-steps", 2, "--set", "run.eval_every=0", "--log-with", name))
        == 0
    )
    assert (out / TRACKER_FOLDERS[name]).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # nothing written beside the run folder
