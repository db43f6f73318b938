"""The method seam itself: a method defined in this file only — no other file touched — trains through
`sskd distill`, live and from `sskd cache`, with its own config section and its own teacher output."""

import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from sskd.cli import main as sskd_main
from sskd.core.fields import bound
from sskd.methods import Method, register
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


@dataclass
class ToyConfig:
    weight: float = bound(0.5, ge=0)


@register("student", "toy_match")
class ToyMatch(Method):
    """CE + ``weight`` · MSE to the teacher's logits of the first SS view (a made-up method)."""

    summary = "a test's toy: CE plus matching the teacher's logits on the first SS view"
    paper = "-"
    section, Config = "toy_match", ToyConfig
    views = "ss"
    needs_teacher = True
    outputs = ("view1_logits",)

    @staticmethod
    def teacher_outputs(teacher, views):
        return {"view1_logits": teacher(views[:, 1])[:, None]}  # (b, 1, K)

    def forward(self, batch):
        views = batch["views"]
        logits = self.student(views[:, 0])
        match = F.mse_loss(self.student(views[:, 1]), self.teacher_batch(batch)["view1_logits"][:, 0])
        ce = F.cross_entropy(logits, batch["label"])
        return {"loss": ce + self.cfg.weight * match, "logits": logits, "ce": ce, "match": match}


def run(*args) -> int:
    return sskd_main([str(a) for a in args])


@pytest.fixture(scope="module")
def teacher(digits_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "t"
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


def test_a_method_defined_in_a_test_file_trains_live_and_from_the_cache(
    teacher, digits_shards, tmp_path, capsys
):
    common = [
        "distill",
        "--method",
        "toy_match",
        "--teacher",
        teacher,
        "--student",
        "resnet8",
        "--shards",
        digits_shards,
        "--max-steps",
        2,
        "--set",
        "toy_match.weight=2.0",
        *FAST,
    ]
    assert run(*common, "--out", tmp_path / "live") == 0
    assert (
        run(
            "cache",
            "--method",
            "toy_match",
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
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert declared(manifest) == [{"name": "view1_logits", "shape": [10], "topk": False}]
    assert run(*common, "--out", tmp_path / "cached", "--cache", tmp_path / "c") == 0
    live, cached = (
        [r for r in read_metrics(tmp_path / d) if r["kind"] == "train"] for d in ("live", "cached")
    )
    assert [r["step"] for r in live] == [r["step"] for r in cached] == [1, 2]
    assert {"ce", "match"} <= live[0].keys()
    assert cached[0]["ce"] == live[0]["ce"]  # same student, same batch: the first CE is identical
    assert cached[0]["match"] == pytest.approx(live[0]["match"], rel=1e-2)  # fp16 teacher outputs
    assert cached[0]["loss"] == pytest.approx(live[0]["ce"] + 2.0 * live[0]["match"], rel=1e-2)
    assert load_model_info(tmp_path / "cached")["method"] == "toy_match"
    saved = (tmp_path / "live" / "config.yaml").read_text()
    assert "toy_match:\n  weight: 2.0" in saved
    assert run("methods") == 0 and "toy_match" in capsys.readouterr().out
    assert run(*common[:-2], "--out", tmp_path / "bad", "--set", "toy_match.weigth=1") == 2
    assert "unknown config key 'toy_match.weigth' (did you mean 'weight'?)" in capsys.readouterr().err


def test_the_toy_terms_are_what_its_forward_says(teacher):
    from sskd.runs.models import load_run_model

    t, _ = load_run_model(teacher)
    torch.manual_seed(0)
    from sskd.models import create_model

    method = ToyMatch(create_model("resnet8", 10), t)
    g = torch.Generator().manual_seed(0)
    batch = {
        "views": torch.randn(3, 2, 3, 32, 32, generator=g),
        "label": torch.tensor([1, 2, 3]),
        "id": torch.arange(3),
    }
    out = method(batch)
    with torch.no_grad():
        want = F.mse_loss(method.student(batch["views"][:, 1]), t(batch["views"][:, 1]))
    assert out["match"].item() == pytest.approx(want.item(), rel=1e-5)


def test_a_users_module_named_in_SSKD_METHODS_is_a_method_of_every_command(tmp_path):
    import os
    import subprocess
    import sys

    (tmp_path / "my_methods.py").write_text(
        "from sskd.methods import register\nfrom sskd.methods.ce import StudentCE\n\n"
        "@register('student', 'my_ce')\nclass MyCE(StudentCE):\n    summary = 'my own CE'\n"
    )
    env = dict(os.environ, SSKD_METHODS="my_methods", PYTHONPATH=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-m", "sskd", "methods"], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "my_ce" in proc.stdout and "my own CE" in proc.stdout
    env["SSKD_METHODS"] = "not_a_module"
    proc = subprocess.run(
        [sys.executable, "-m", "sskd", "methods"], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0 and "SSKD_METHODS=not_a_module: cannot import 'not_a_module'" in proc.stderr


@register("student", "toy_phased")
class ToyPhased(Method):
    """A made-up method with a pre-training phase in which only the classifier trains, on the MSE to the
    teacher's logits; then CE on everything."""

    summary = "a test's toy: a classifier-only pre-training phase, then CE"
    section, Config = "toy_match", ToyConfig  # shares the toy's section: the weight is the phase's epochs
    needs_teacher = True
    has_phases = True

    def phases(self):
        from sskd.methods.base import Phase

        return [Phase("warm", epochs=int(self.cfg.weight * 2), lr=0.5)]

    def phase_parameters(self, name):
        return list(self.student.fc.parameters()) if name == "warm" else super().phase_parameters(name)

    def forward(self, batch):
        logits = self.student(batch["views"][:, 0])
        if self.phase == "warm":
            with torch.no_grad():
                target = self.teacher(batch["views"][:, 0])
            loss = F.mse_loss(logits, target)
            return {"loss": loss, "logits": logits, "match": loss}
        ce = F.cross_entropy(logits, batch["label"])
        return {"loss": ce, "logits": logits, "ce": ce}


def test_a_pre_training_phase_runs_first_trains_only_its_parameters_and_resumes_exactly(
    teacher, digits_shards, tmp_path, monkeypatch
):
    import signal

    import sskd.engine.loop as tr

    common = [
        "distill",
        "--method",
        "toy_phased",
        "--teacher",
        teacher,
        "--student",
        "resnet8",
        "--shards",
        digits_shards,
        "--set",
        "toy_match.weight=0.5",
        "--set",
        "student.epochs=1",
        "--set",
        "run.eval_every=0",
        "--batch-size",
        "256",
        "--no-progress",
        "--set",
        "run.log_every=1",
    ]
    assert run(*common, "--out", tmp_path / "full") == 0
    recs = [r for r in read_metrics(tmp_path / "full") if r["kind"] == "train"]
    # 1437 images / 256 = 6 steps of the 1-epoch phase, then 6 of the main training, each from step 1
    assert [(r["phase_name"], r["step"]) for r in recs] == [("warm", i) for i in range(1, 7)] + [
        ("main", i) for i in range(1, 7)
    ]
    assert {"match"} <= recs[0].keys() and {"ce"} <= recs[-1].keys() and recs[0]["lr"] == 0.5
    real, seen = tr.train_step, {"n": 0}

    def step_then_signal(run_, batch):  # SIGTERM in the phase, and again in the main training
        real(run_, batch)
        seen["n"] += 1
        if seen["n"] == 3:
            import os

            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(tr, "train_step", step_then_signal)
    assert run(*common, "--out", tmp_path / "cut") == 128 + signal.SIGTERM
    ckpt = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=False)
    assert (ckpt["phase"], ckpt["step"]) == (0, 3)
    # three steps into the phase only the classifier's parameters have moved from their initial values
    from sskd.models import create_model

    torch.manual_seed(0)  # the run seed: the student's initial weights
    init = dict(create_model("resnet8", 10).named_parameters())
    moved = {k for k, v in init.items() if not torch.equal(ckpt["model"]["student." + k], v)}
    assert moved == {"fc.weight", "fc.bias"}
    seen["n"] = -100
    assert run(*common, "--out", tmp_path / "cut", "--resume") == 0
    from sskd.runs import file_sha256

    assert file_sha256(tmp_path / "cut" / "model.safetensors") == file_sha256(
        tmp_path / "full" / "model.safetensors"
    )
    recs = [r for r in read_metrics(tmp_path / "cut") if r["kind"] == "train"]
    assert [(r["phase_name"], r["step"]) for r in recs] == [("warm", i) for i in range(1, 7)] + [
        ("main", i) for i in range(1, 7)
    ]


def declared(manifest: dict) -> list[dict]:
    """A cache manifest's outputs as the method declares them (name, shape, whether top-K may store them),
    each checked to be stored exactly (fp16): the digits' 10 classes never get a compact default."""
    assert all(o["storage"]["kind"] == "fp16" and o["storage"]["dim"] is None for o in manifest["outputs"])
    return [{k: o[k] for k in ("name", "shape", "topk")} for o in manifest["outputs"]]
