"""The whole family through the seam: every registered method trains two steps through `sskd distill`
with the teacher run its declaration asks for, and every method with a head or teacher stage makes its part."""

import pytest

from sskd.cli import main as sskd_main
from sskd.methods import METHODS
from sskd.methods.base import part_makers
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
# Settings a 1,437-image dataset needs (CRD draws 16,384 negatives by default).
SMALL_DATA = {"crd": ["--set", "crd.nce_k=64"]}


def shipped(role: str) -> list[str]:
    """The methods sskd ships (not ones a test file registers)."""
    return [n for n in METHODS[role].names() if METHODS[role].get(n).__module__.startswith("sskd.methods.")]


def run(*args) -> int:
    return sskd_main([str(a) for a in args])


@pytest.fixture(scope="module")
def teacher_runs(digits_shards, tmp_path_factory):
    """A plain teacher and, for every part a student method may need, a head run that makes it."""
    root = tmp_path_factory.mktemp("family")
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
    runs = {None: root / "plain"}
    for part in {METHODS["student"].get(n).teacher_part for n in shipped("student")} - {None}:
        maker = next(m for m in part_makers(part) if m.startswith("train-ss-head"))
        name = maker.split()[-1]
        assert (
            run(
                "train-ss-head",
                "--method",
                name,
                "--teacher",
                root / "plain",
                "--shards",
                digits_shards,
                "--out",
                root / part,
                "--max-steps",
                2,
                *FAST,
            )
            == 0
        )
        runs[part] = root / part
    return runs


@pytest.mark.parametrize("name", shipped("student"))
def test_every_method_trains_two_steps_through_distill(name, teacher_runs, digits_shards, tmp_path):
    cls = METHODS["student"].get(name)
    teacher = ["--teacher", teacher_runs[cls.teacher_part]] if cls.needs_teacher else []
    out = tmp_path / name
    assert (
        run(
            "distill",
            "--method",
            name,
            *teacher,
            "--student",
            "resnet8",
            "--shards",
            digits_shards,
            "--out",
            out,
            "--max-steps",
            2,
            *SMALL_DATA.get(name, []),
            *FAST,
        )
        == 0
    )
    info = load_model_info(out)
    assert info["method"] == name and info["steps"] == 2
    rec = [r for r in read_metrics(out) if r["kind"] == "train"][-1]
    assert "loss" in rec and len(rec) > 8  # every named term is logged beside the loss


@pytest.mark.parametrize("role, name", [(r, n) for r in ("teacher", "head") for n in shipped(r)])
def test_every_teacher_and_head_stage_makes_its_part(role, name, teacher_runs, digits_shards, tmp_path):
    cls = METHODS[role].get(name)
    args = (
        ["train-teacher", "--arch", "resnet8"]
        if role == "teacher"
        else ["train-ss-head", "--teacher", teacher_runs[None]]
    )
    assert (
        run(
            *args,
            "--method",
            name,
            "--shards",
            digits_shards,
            "--out",
            tmp_path / "t",
            "--max-steps",
            1,
            *FAST,
        )
        == 0
    )
    assert load_model_info(tmp_path / "t").get("wrapper") == cls.produces
