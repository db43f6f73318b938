"""A run is resolved once (:func:`sskd.engine.prepare.prepare`): the shard manifest is read once per process,
the teacher checked once, a bad teacher or cache refused before anything is written, and the result frozen."""

import builtins
import dataclasses
import pathlib
from pathlib import Path

import pytest

from sskd.cli import main as sskd_main
from sskd.core.errors import SSKDError
from sskd.engine.config import load_config
from sskd.engine.prepare import RunSpec, prepare

FAST = ["--no-progress", "--batch-size", "32", "--set", "data.eval_batch_size=128"]


def run(*args):
    return sskd_main([str(a) for a in args])


@pytest.fixture(scope="module")
def teachers(digits_shards, tmp_path_factory):
    """A plain teacher run, its SS head run and a one-epoch cache of the SS head run's outputs."""
    root = tmp_path_factory.mktemp("prepare")
    common = ["--shards", digits_shards, *FAST]
    assert run("train-teacher", "--arch", "resnet8", "--out", root / "t", "--max-steps", 2, *common) == 0
    assert run("train-ss-head", "--teacher", root / "t", "--out", root / "ss", "--max-steps", 1, *common) == 0
    args = ["--shards", digits_shards, "--epochs", 1, "--batch-size", 256, "--no-progress"]
    assert run("cache", "--teacher", root / "ss", "--out", root / "cache", *args) == 0
    return root


def _count_reads(monkeypatch, path: Path) -> list[str]:
    """Every read of ``path`` from now on, by whatever means Python offers (open, read_text, read_bytes)."""
    path, reads = path.resolve(), []
    real_open, real_text, real_bytes = builtins.open, pathlib.Path.read_text, pathlib.Path.read_bytes

    def seen(file) -> None:
        if isinstance(file, (str, Path)) and Path(file).resolve() == path:
            reads.append(str(file))

    def open_(file, *args, **kwargs):
        seen(file)
        return real_open(file, *args, **kwargs)

    def read_text(self, *args, **kwargs):
        seen(self)
        return real_text(self, *args, **kwargs)

    def read_bytes(self):
        seen(self)
        return real_bytes(self)

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(pathlib.Path, "read_text", read_text)
    monkeypatch.setattr(pathlib.Path, "read_bytes", read_bytes)
    return reads


def test_a_cached_distill_run_reads_the_manifest_once_and_checks_its_teacher_once(
    teachers, digits_shards, tmp_path, monkeypatch
):
    import sskd.runs.models as models

    real_info, infos = models.teacher_info, []

    def teacher_info(source, manifest, weights=None):
        infos.append(source)
        return real_info(source, manifest, weights)

    monkeypatch.setattr(models, "teacher_info", teacher_info)
    reads = _count_reads(monkeypatch, Path(digits_shards) / "manifest.json")
    args = ["--method", "sskd", "--teacher", teachers / "ss", "--cache", teachers / "cache"]
    assert (
        run("distill", *args, "--shards", digits_shards, "--out", tmp_path / "s", "--max-steps", 2, *FAST)
        == 0
    )
    assert len(reads) == 1, reads
    assert infos == [str(teachers / "ss")]
    info = models.runs.load_model_info(tmp_path / "s")
    assert info["cache"] == str(teachers / "cache") and info["teacher"] == str(teachers / "ss")


def test_a_bad_teacher_or_cache_is_refused_in_one_line_before_anything_is_written(
    teachers, digits_shards, tmp_path, capsys
):
    common = ["--shards", digits_shards, *FAST]
    cases = [
        (  # a teacher run without the SS head the method reads
            ["--teacher", teachers / "t"],
            f"--teacher {teachers / 't'}: --method sskd needs a teacher with ss head (it is a `teacher` run "
            "without one); make one with `sskd train-ss-head --method sskd",
        ),
        (  # a cache made for another method
            ["--teacher", teachers / "t", "--method", "kd", "--cache", teachers / "cache"],
            f"{teachers / 'cache'}: cache was made with method='sskd' but this run has 'kd'",
        ),
        (["--cache", teachers / "cache"], "--cache needs --teacher RUN"),
        (["--method", "kd"], "--method kd needs --teacher RUN"),
    ]
    for i, (args, message) in enumerate(cases):
        out = tmp_path / f"s{i}"
        assert run("distill", *args, "--out", out, *common) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (args, err)
        assert not out.exists()


def test_prepare_raises_the_same_line_as_the_command(teachers, digits_shards):
    cfg = load_config(None, [f"data.shards={digits_shards}"])
    with pytest.raises(SSKDError, match="needs a teacher with ss head"):
        prepare(cfg, "student", teacher=str(teachers / "t"))
    with pytest.raises(SSKDError, match="train-ss-head needs --teacher RUN"):
        prepare(cfg, "ss_head")
    spec = prepare(cfg, "student", without_teacher=True)  # sskd sweep plans runs before their teachers exist
    assert spec.teacher is None and spec.record["method"] == "sskd"


def test_the_spec_is_frozen_and_records_what_model_json_says(teachers, digits_shards):
    cfg = load_config(None, [f"data.shards={digits_shards}", "student.arch=resnet8"])
    spec = prepare(cfg, "student", teacher=str(teachers / "ss"))
    assert isinstance(spec, RunSpec)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.views = None
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.teacher = None
    teacher_json = models_info(teachers / "ss")
    assert spec.size == 32 and spec.num_classes == 10 and spec.data_device in ("cpu", "gpu")
    assert spec.record == {
        "shards_sha256": spec.shards_sha256,
        "seed": 0,
        "views": "rot90,rot180,rot270",
        "arch": "resnet8",
        "method": "sskd",
        "teacher": str(teachers / "ss"),
        "teacher_arch": "resnet8",
        "teacher_weights_sha256": teacher_json["weights_sha256"],
    }
    import hashlib

    assert (
        spec.shards_sha256 == hashlib.sha256((Path(digits_shards) / "manifest.json").read_bytes()).hexdigest()
    )


def models_info(run_dir):
    from sskd.runs import load_model_info

    return load_model_info(run_dir)
