"""SSKD's pretext tasks (the paper's Table 2) through the method seam: each trains the teacher's head and a
student two steps, the student refuses a head of another task, and the teacher's predictions cache."""

import json

import pytest
import torch
from einops import rearrange

from sskd.cli import main as sskd_main
from sskd.losses import similarity_matrix
from sskd.losses.pretext import PRETEXTS, get_pretext
from sskd.losses.sskd import PRETEXT_TASKS
from sskd.runs import load_model_info, read_metrics

FAST = [
    "--no-progress",
    "--batch-size",
    "32",
    "--set",
    "run.log_every=1",
    "--set",
    "data.eval_batch_size=128",
]
AUTO_VIEWS = {
    "contrastive": "rot90,rot180,rot270",
    "exemplar": "color_drop,rotation,crop_resize,color_distort",
    "rotation": "rot90,rot180,rot270",
    "jigsaw": "jigsaw,jigsaw,jigsaw",
}


def run(*args) -> int:
    return sskd_main([str(a) for a in args])


@pytest.fixture(scope="module")
def runs(digits_shards, tmp_path_factory):
    """A plain teacher and, per pretext task, its SS head trained two steps."""
    root = tmp_path_factory.mktemp("pretext")
    assert (
        run(
            "train-teacher",
            "--shards",
            digits_shards,
            "--arch",
            "resnet8",
            "--out",
            root / "plain",
            "--max-steps",
            2,
            *FAST,
        )
        == 0
    )
    heads = {}
    for task in PRETEXT_TASKS:
        heads[task] = root / f"head-{task}"
        assert (
            run(
                "train-ss-head",
                "--method",
                "sskd",
                "--teacher",
                root / "plain",
                "--shards",
                digits_shards,
                "--out",
                heads[task],
                "--max-steps",
                2,
                "--set",
                f"sskd.pretext={task}",
                *FAST,
            )
            == 0
        )
    return root, heads


def test_the_config_choices_are_the_registered_tasks():
    assert tuple(PRETEXTS.names()) == PRETEXT_TASKS
    assert {t: get_pretext(t).views for t in PRETEXT_TASKS} == {
        "contrastive": "rotation",
        "exemplar": "paper",
        "rotation": "rotation",
        "jigsaw": "jigsaw",
    }


@pytest.mark.parametrize("task", PRETEXT_TASKS)
def test_each_task_trains_the_head_and_a_student_two_steps(task, runs, digits_shards, tmp_path):
    _, heads = runs
    info = load_model_info(heads[task])
    assert info["wrapper"] == "ss_head" and info["views"] == AUTO_VIEWS[task]
    assert info["wrapper_args"] == (
        {} if task == "contrastive" else {"pretext": task}
    )  # contrastive: as before
    head = [r for r in read_metrics(heads[task]) if r["kind"] == "train"]
    assert [r["step"] for r in head] == [1, 2] and {"ss", "ss_acc"} <= head[-1].keys()
    out = tmp_path / "s"
    assert (
        run(
            "distill",
            "--method",
            "sskd",
            "--teacher",
            heads[task],
            "--student",
            "resnet8",
            "--shards",
            digits_shards,
            "--out",
            out,
            "--max-steps",
            2,
            "--set",
            f"sskd.pretext={task}",
            *FAST,
        )
        == 0
    )
    rec = [r for r in read_metrics(out) if r["kind"] == "train"]
    assert [r["step"] for r in rec] == [1, 2] and {"ce", "kd", "tf", "ss"} <= rec[-1].keys()
    assert rec[0]["ss"] > 0  # the student's fresh head disagrees with the teacher's predictions
    student = load_model_info(out)
    assert student["views"] == AUTO_VIEWS[task] and student["wrapper_args"] == info["wrapper_args"]


def test_head_widths_follow_the_task(runs):
    from sskd.runs.models import load_run_model

    _, heads = runs
    widths = {t: load_run_model(heads[t])[0].head.net[-1].out_features for t in PRETEXT_TASKS}
    assert widths == {"contrastive": 64, "exemplar": 64, "rotation": 4, "jigsaw": 24}  # resnet8: d = 64


def test_a_student_refuses_a_head_trained_for_another_task(runs, digits_shards, tmp_path, capsys):
    _, heads = runs
    args = [
        "distill",
        "--method",
        "sskd",
        "--student",
        "resnet8",
        "--shards",
        digits_shards,
        "--max-steps",
        1,
        *FAST,
    ]
    assert (
        run(*args, "--teacher", heads["rotation"], "--out", tmp_path / "a", "--set", "sskd.pretext=jigsaw")
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "rotation pretext task" in err and "sskd.pretext jigsaw" in err
    assert run(*args, "--teacher", heads["jigsaw"], "--out", tmp_path / "b") == 2  # default: contrastive
    err = capsys.readouterr().err
    assert "jigsaw pretext task" in err and "sskd.pretext contrastive" in err
    # and `sskd cache` refuses to store predictions a student of another task could not use
    assert (
        run(
            "cache",
            "--method",
            "sskd",
            "--teacher",
            heads["exemplar"],
            "--shards",
            digits_shards,
            "--epochs",
            1,
            "--out",
            tmp_path / "c",
            "--no-progress",
            "--set",
            "sskd.pretext=rotation",
        )
        == 2
    )
    assert "exemplar pretext task" in capsys.readouterr().err


def test_label_tasks_refuse_views_without_their_label(runs, digits_shards, tmp_path, capsys):
    root, _ = runs
    assert (
        run(
            "train-ss-head",
            "--method",
            "sskd",
            "--teacher",
            root / "plain",
            "--shards",
            digits_shards,
            "--out",
            tmp_path / "h",
            "--max-steps",
            1,
            "--set",
            "sskd.pretext=jigsaw",
            "--views",
            "rotation",
            *FAST,
        )
        == 2
    )
    assert "sskd.pretext jigsaw: view rot90 carries no jigsaw label" in capsys.readouterr().err
    assert (
        run(
            "train-ss-head",
            "--method",
            "sskd",
            "--teacher",
            root / "plain",
            "--shards",
            digits_shards,
            "--out",
            tmp_path / "h2",
            "--max-steps",
            1,
            "--set",
            "sskd.pretext=rotation",
            "--views",
            "paper",
            *FAST,
        )
        == 2
    )
    assert "view color_drop carries no rotation label" in capsys.readouterr().err
    # the paper's random rotation view carries its k: rotation prediction over normal + rotation + shared turns
    assert (
        run(
            "train-ss-head",
            "--method",
            "sskd",
            "--teacher",
            root / "plain",
            "--shards",
            digits_shards,
            "--out",
            tmp_path / "h3",
            "--max-steps",
            1,
            "--set",
            "sskd.pretext=rotation",
            "--views",
            "rotation,rot180",
            *FAST,
        )
        == 0
    )


@pytest.mark.parametrize("task", ["jigsaw", "exemplar"])
def test_the_teachers_predictions_cache(task, runs, digits_shards, tmp_path):
    _, heads = runs
    common = [
        "distill",
        "--method",
        "sskd",
        "--teacher",
        heads[task],
        "--student",
        "resnet8",
        "--shards",
        digits_shards,
        "--max-steps",
        2,
        "--set",
        f"sskd.pretext={task}",
        *FAST,
    ]
    assert run(*common, "--out", tmp_path / "live") == 0
    assert (
        run(
            "cache",
            "--method",
            "sskd",
            "--teacher",
            heads[task],
            "--shards",
            digits_shards,
            "--epochs",
            1,
            "--out",
            tmp_path / "c",
            "--batch-size",
            256,
            "--no-progress",
            "--set",
            f"sskd.pretext={task}",
        )
        == 0
    )
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    width = {"jigsaw": 24, "exemplar": 64}[task]
    assert {"name": "embed", "shape": [width], "topk": False} in declared(manifest)
    assert manifest["views"] == ["normal", *AUTO_VIEWS[task].split(",")]
    assert run(*common, "--out", tmp_path / "cached", "--cache", tmp_path / "c") == 0
    live, cached = (
        [r for r in read_metrics(tmp_path / d) if r["kind"] == "train"] for d in ("live", "cached")
    )
    assert cached[0]["ce"] == live[0]["ce"]  # same student, same batch
    assert cached[0]["ss"] == pytest.approx(live[0]["ss"], rel=2e-2, abs=1e-3)  # fp16 teacher outputs


def test_predictions_per_task_on_a_toy_batch():
    b, v, e = 3, 4, 8
    z = torch.randn(b, v, e)
    scores, target = get_pretext("contrastive").predictions(z, {})
    assert torch.equal(scores, similarity_matrix(rearrange(z[:, 1:], "b v d -> (b v) d"), z[:, 0]))
    assert target.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    ex, ex_target = get_pretext("exemplar").predictions(z, {})
    assert torch.allclose(ex, rearrange(z[:, 1:], "b v d -> (b v) d") @ z[:, 0].t() / e**0.5)
    assert torch.equal(ex_target, target)
    rot = torch.randn(b, v, 4)
    labels = torch.tensor([[0, 1, 2, 3]] * b)
    s, t = get_pretext("rotation").predictions(rot, {"rotation_label": labels})
    assert s.shape == (b * v, 4) and t.tolist() == [0, 1, 2, 3] * b
    jig = torch.randn(b, v, 24)
    jl = torch.tensor([[-1, 5, 23, 0]] * b)
    s, t = get_pretext("jigsaw").predictions(jig, {"jigsaw_label": jl})
    assert s.shape == (b * 3, 24) and t.tolist() == [5, 23, 0] * b and torch.equal(s[0], jig[0, 1])
    from sskd.core.errors import SSKDError

    with pytest.raises(SSKDError, match="carries no jigsaw_label"):
        get_pretext("jigsaw").predictions(jig, {})


def declared(manifest: dict) -> list[dict]:
    """A cache manifest's outputs as the method declares them (name, shape, whether top-K may store them),
    each checked to be stored exactly (fp16): the digits' 10 classes never get a compact default."""
    assert all(o["storage"]["kind"] == "fp16" and o["storage"]["dim"] is None for o in manifest["outputs"])
    return [{k: o[k] for k in ("name", "shape", "topk")} for o in manifest["outputs"]]
