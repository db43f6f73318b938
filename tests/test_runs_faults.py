"""Faults around run folders, the training loop, checkpoints and the teacher cache (issue 19: items 2, 3, 5, 6,
11 and 12, their run part): each test makes the fault (a bad command over a finished run, a kill, a symbolic
link, an exploding loss, a flipped bit, a full disk, a missing chunk) and checks the one-line error and that
nothing was lost or written outside."""

import errno
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sskd import runs
from sskd.cli import main as sskd_main
from sskd.core import atomic
from sskd.core.errors import SSKDError

REPO = Path(__file__).resolve().parents[1]
FAST = [
    "--no-progress",
    "--batch-size",
    "32",
    "--set",
    "run.log_every=1",
    "--set",
    "data.eval_batch_size=128",
]
KEPT = (
    "model.safetensors",
    "model.json",
    "config.yaml",
    "metrics.jsonl",
    "checkpoints/last.pt",
    "checkpoints/best.pt",
)


def run(*args) -> int:
    return sskd_main([str(a) for a in args])


def last_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no error line"
    assert "Traceback" not in "\n".join(err), err
    assert err[-1].startswith("sskd: error: "), err
    return err[-1]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in KEPT if (folder / name).is_file()}


def no_leftovers(folder: Path) -> None:
    assert not list(folder.glob(".replaced-*")), list(folder.iterdir())
    assert not (folder / runs.START_MARKER).exists()
    assert not [p for p in folder.rglob(f"*{atomic.TMP_SUFFIX}")]


@pytest.fixture(scope="module")
def finished(digits_shards, tmp_path_factory):
    """A finished teacher ``t`` (with best.pt) and a finished KD student ``s`` of it."""
    root = tmp_path_factory.mktemp("faults_runs")
    assert (
        run(
            "train-teacher",
            "--shards",
            digits_shards,
            "--arch",
            "resnet8",
            "--out",
            root / "t",
            "--max-steps",
            2,
            *FAST,
        )
        == 0
    )
    assert (
        run(
            "distill",
            "--teacher",
            root / "t",
            "--student",
            "resnet8",
            "--method",
            "kd",
            "--shards",
            digits_shards,
            "--out",
            root / "s",
            "--max-steps",
            2,
            *FAST,
        )
        == 0
    )
    return root


def distill_args(teacher, shards, out, *extra):
    return [
        "distill",
        "--teacher",
        teacher,
        "--student",
        "resnet8",
        "--method",
        "kd",
        "--shards",
        shards,
        "--out",
        out,
        "--max-steps",
        2,
        *FAST,
        *extra,
    ]


# ---- item 2: --overwrite checks everything before the earlier run is touched ----------------------------


def test_overwrite_with_a_bad_command_keeps_the_earlier_run(finished, digits_shards, tmp_path, capsys):
    out = tmp_path / "s"
    shutil.copytree(finished / "s", out)
    before = snapshot(out)
    assert {"model.safetensors", "model.json", "checkpoints/last.pt"} <= before.keys()
    cases = [
        (
            distill_args(finished / "t", digits_shards, out, "--overwrite", "--student", "resnet9000"),
            "resnet9000",
        ),
        (distill_args(tmp_path / "no-teacher", digits_shards, out, "--overwrite"), "run folder not found"),
        (distill_args(finished / "t", tmp_path / "no-shards", out, "--overwrite"), "no shard manifest"),
        # passes every check, then its loss explodes before its first checkpoint: the earlier run comes back
        (
            distill_args(
                finished / "t",
                digits_shards,
                out,
                "--overwrite",
                "--lr",
                "1e8",
                "--max-steps",
                8,
                "--set",
                "run.ckpt_every=0",
            ),
            "the loss became non-finite at step",
        ),
    ]
    for args, needle in cases:
        assert run(*args) == 2, args
        err = last_error(capsys)
        assert needle in err, (args, err)
        assert snapshot(out) == before, args  # model.safetensors, model.json, config, checkpoints intact
        no_leftovers(out)
    assert "the run it was to replace is put back" in err
    assert run(*distill_args(finished / "t", digits_shards, out, "--overwrite", "--max-steps", 1)) == 0
    assert runs.load_model_info(out)["steps"] == 1  # replaced, and the earlier run deleted once checkpointed
    no_leftovers(out)


def test_a_start_killed_before_its_first_checkpoint_is_undone_by_the_next_command(finished, tmp_path):
    out = tmp_path / "s"
    shutil.copytree(finished / "s", out)
    before = snapshot(out)
    start = runs.NewRun(out)  # an --overwrite start, killed after it set the run aside and began writing
    start.begin()
    (out / "config.yaml").write_text("the new run's config\n")
    (out / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "lo')
    assert not (out / "model.safetensors").exists()
    runs.claim_run(out, resume=True, overwrite=False).release()  # the next command: the earlier run is back
    assert snapshot(out) == before
    no_leftovers(out)

    fresh = tmp_path / "fresh"  # a new run killed before its first checkpoint: the folder is empty again
    fresh.mkdir()
    start = runs.NewRun(fresh)
    start.begin()
    (fresh / "config.yaml").write_text("x\n")
    runs.claim_run(fresh, resume=False, overwrite=False).release()  # no "holds an earlier run"
    assert runs.earlier_work(fresh) == []

    (out / ".replaced-20250101-000000-1").mkdir()  # its new run committed, then died before deleting it
    (out / ".replaced-20250101-000000-1" / "model.json").write_text("{}")
    runs.claim_run(out, resume=True, overwrite=False).release()
    assert snapshot(out) == before
    no_leftovers(out)


def test_a_marker_that_names_paths_outside_the_run_is_refused(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("keep")
    out = tmp_path / "r"
    out.mkdir()
    (out / runs.START_MARKER).write_text(json.dumps({"replaced": "../victim", "entries": []}))
    with pytest.raises(SSKDError, match=r"\.new-run\.json: not written by sskd"):
        runs.claim_run(out, resume=False, overwrite=False)
    assert (victim / "keep").read_text() == "keep"


# ---- item 12 (run part): a start that fails on bad data leaves no run behind ------------------------------


def test_a_start_that_fails_on_its_data_leaves_no_run_and_the_rerun_needs_no_overwrite(
    digits_shards, tmp_path, monkeypatch, capsys
):
    from pipelines.loader import ViewLoader

    def damaged(self, epoch, start_batch=0, resume_state=None, next_epoch="default"):
        raise SSKDError(f"{digits_shards}/train-000000.tar: sample 000003: damaged image")
        yield  # a generator, as the real one

    out = tmp_path / "t"
    args = [
        "train-teacher",
        "--shards",
        digits_shards,
        "--arch",
        "resnet8",
        "--out",
        out,
        "--max-steps",
        1,
        *FAST,
    ]
    monkeypatch.setattr(ViewLoader, "epoch", damaged)
    assert run(*args) == 2
    assert "damaged image" in last_error(capsys)
    assert runs.earlier_work(out) == []  # no config.yaml, metrics.jsonl or checkpoints
    no_leftovers(out)
    monkeypatch.undo()
    assert run(*args) == 0  # the corrected rerun: no --overwrite needed


# ---- item 3 (run part): no write through a symbolic link ----------------------------------------------------


def test_symbolic_links_in_a_run_folder_are_never_written_through(finished, digits_shards, tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    # .lock as a link: refused naming it, its target never created
    out = tmp_path / "a"
    out.mkdir()
    (out / ".lock").symlink_to(outside / "lock-target")
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
            1,
            *FAST,
        )
        == 2
    )
    err = last_error(capsys)
    assert f"{out / '.lock'}: is a symbolic link" in err
    assert not (outside / "lock-target").exists()
    # metrics.jsonl and last.pt of a run to resume: refused naming the link, the targets untouched
    for name in ("metrics.jsonl", "checkpoints/last.pt"):
        out = tmp_path / name.replace("/", "_")
        shutil.copytree(finished / "t", out)
        target = outside / f"{out.name}.target"
        target.write_bytes((out / name).read_bytes())
        (out / name).unlink()
        (out / name).symlink_to(target)
        before = target.read_bytes()
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
                3,
                "--resume",
                *FAST,
            )
            == 2
        )
        assert f"{out / name}: is a symbolic link (to {target})" in last_error(capsys)
        assert target.read_bytes() == before
    # a dangling metrics.jsonl link counts as an earlier run; --overwrite replaces the link, never its target
    out = tmp_path / "dangling"
    out.mkdir()
    (out / "metrics.jsonl").symlink_to(outside / "created-by-a-write")
    args = [
        "train-teacher",
        "--shards",
        digits_shards,
        "--arch",
        "resnet8",
        "--out",
        out,
        "--max-steps",
        1,
        *FAST,
    ]
    assert run(*args) == 2
    assert "holds an earlier run (metrics.jsonl)" in last_error(capsys)
    assert run(*args, "--overwrite") == 0
    assert not (outside / "created-by-a-write").exists()
    assert not (out / "metrics.jsonl").is_symlink() and runs.read_metrics(out)


def test_appends_and_atomic_writes_do_not_follow_links(tmp_path):
    target = tmp_path / "target"
    target.write_text("precious\n")
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").symlink_to(target)  # made while the run runs (after its start-up checks)
    log = runs.MetricsLog.__new__(runs.MetricsLog)
    log.path, log.enabled, log.accelerator, log._phase_end = run_dir / "metrics.jsonl", True, None, {}
    with pytest.raises(SSKDError, match=r"metrics\.jsonl: is a symbolic link"):
        log.write({"kind": "train", "step": 1})
    planted = atomic.tmp_name(run_dir / "config.yaml")  # a link planted at the temporary name
    planted.symlink_to(target)
    atomic.write_bytes(run_dir / "config.yaml", b"run: {}\n")
    assert target.read_text() == "precious\n"
    assert (run_dir / "config.yaml").read_bytes() == b"run: {}\n" and not (
        run_dir / "config.yaml"
    ).is_symlink()


# ---- item 5 (loop part): a non-finite loss stops the run, or its steps are skipped ----------------------------


def test_an_exploding_loss_stops_the_run_and_keeps_the_last_good_checkpoint(digits_shards, tmp_path, capsys):
    out = tmp_path / "t"
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
            10,
            "--lr",
            "1e8",
            *FAST,
            "--set",
            "run.log_every=4",
            "--set",
            "run.ckpt_every=1",
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    found = re.match(
        rf"sskd: error: {re.escape(str(out))}: the loss became non-finite at step (\d+) \(epoch 0\): "
        r"(.*); stopped; .*last\.pt \(step (\d+)\) holds the last good state",
        err[0],
    )
    assert found, err[0]
    assert "nan" in found.group(2) or "inf" in found.group(2)
    ckpt = runs.load_checkpoint(out, "last")
    assert ckpt["step"] == int(found.group(3)) == int(found.group(1)) - 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not (out / "model.safetensors").exists() and not (out / "model.json").exists()


def _nan_batch(monkeypatch, at: int):
    """The training batch number ``at`` (from 0) of the run has NaN images."""
    from pipelines.loader import ViewLoader

    real = ViewLoader.epoch

    def epoch(self, epoch, start_batch=0, resume_state=None, next_epoch="default"):
        for i, batch in enumerate(
            real(self, epoch, start_batch, resume_state, next_epoch), start=start_batch
        ):
            if self.train and i == at:
                batch = dict(batch, views=torch.full_like(batch["views"], float("nan")))
            yield batch

    monkeypatch.setattr(ViewLoader, "epoch", epoch)


def test_a_nan_batch_stops_the_run_naming_its_step_or_is_skipped_when_asked(
    digits_shards, tmp_path, monkeypatch, capsys
):
    _nan_batch(monkeypatch, at=2)
    common = [
        "train-teacher",
        "--shards",
        digits_shards,
        "--arch",
        "resnet8",
        "--max-steps",
        5,
        *FAST,
        "--set",
        "run.ckpt_every=2",
        "--set",
        "run.log_every=5",
    ]
    assert run(*common, "--out", tmp_path / "stop") == 2
    err = last_error(capsys)
    assert ": the loss became non-finite at step 3 (epoch 0): ce=nan, loss=nan; stopped; " in err
    assert runs.load_checkpoint(tmp_path / "stop")["step"] == 2
    assert run(*common, "--out", tmp_path / "skip", "--set", "run.nonfinite=skip") == 0
    info = runs.load_model_info(tmp_path / "skip")
    assert info["skipped_steps"] == 1 and info["steps"] == 5
    rec = [r for r in runs.read_metrics(tmp_path / "skip") if r["kind"] == "train"]
    assert [r["skipped"] for r in rec] == [1] and all(
        v == v for v in (rec[0]["loss"], rec[0]["ce"])
    )  # not NaN
    from safetensors.torch import load_file

    assert all(
        torch.isfinite(v).all()
        for v in load_file(str(tmp_path / "skip" / "model.safetensors")).values()
        if v.is_floating_point()
    )


@pytest.mark.slow
def test_an_exploding_loss_stops_both_ranks_under_ddp(digits_shards, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "launch/accelerate/cpu.yaml"),
        "--main_process_port",
        "29581",
        "-m",
        "sskd",
        "train-teacher",
        "--shards",
        str(digits_shards),
        "--arch",
        "resnet8",
        "--out",
        str(out),
        "--max-steps",
        "10",
        "--lr",
        "1e8",
        "--no-progress",
        "--batch-size",
        "32",
        "--set",
        "run.log_every=4",
        "--set",
        "run.ckpt_every=1",
        "--set",
        "data.eval_batch_size=128",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "the loss became non-finite at step" in line]
    assert lines and len({line.split("sskd: error: ")[-1] for line in lines}) == 1, proc.stderr[
        -3000:
    ]  # ranks agree
    ckpt = runs.load_checkpoint(out, "last")
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not (out / "model.safetensors").exists()


# ---- item 6: checkpoints and models are checked --------------------------------------------------------------


def _flip_in_record(path: Path, record_suffix: str, seed: int = 0) -> None:
    """Flip one bit inside the data of the zip record whose name ends with ``record_suffix``."""
    import zipfile

    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(record_suffix))
    data = bytearray(path.read_bytes())
    n_name, n_extra = (
        int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little"),
        int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little"),
    )
    start = info.header_offset + 30 + n_name + n_extra
    pos = start + random.Random(seed).randrange(info.compress_size)
    data[pos] ^= 1 << random.Random(seed + 1).randrange(8)
    path.write_bytes(bytes(data))


def test_a_bit_flipped_checkpoint_is_refused_naming_it_and_best_pt(finished, digits_shards, tmp_path, capsys):
    out = tmp_path / "t"
    shutil.copytree(finished / "t", out)
    _flip_in_record(out / "checkpoints" / "last.pt", "data/0")  # inside a tensor: torch.load would not notice
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
            3,
            "--resume",
            *FAST,
        )
        == 2
    )
    err = last_error(capsys)
    assert err.startswith(f"sskd: error: {out / 'checkpoints' / 'last.pt'}: damaged checkpoint (record ")
    assert "fails its CRC-32 check" in err and f"{out / 'checkpoints' / 'best.pt'} is intact" in err
    assert "not used" in err


def test_every_flipped_bit_of_a_checkpoint_is_caught_or_harmless(finished, tmp_path):
    src = finished / "t" / "checkpoints" / "last.pt"
    good = torch.load(src, weights_only=True)
    data = src.read_bytes()
    rng = random.Random(19)
    (tmp_path / "r" / "checkpoints").mkdir(parents=True)
    path = tmp_path / "r" / "checkpoints" / "last.pt"
    tail = len(data) - 4096  # the records' headers and the zip directory are at the end: flip there too
    positions = [rng.randrange(len(data)) for _ in range(25)] + [
        rng.randrange(tail, len(data)) for _ in range(25)
    ]
    for pos in positions:
        bad = bytearray(data)
        bad[pos] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(bad))
        try:
            got = runs.load_checkpoint(tmp_path / "r")
        except SSKDError as exc:
            assert str(exc).startswith(f"{path}: ") and "\n" not in str(exc), (pos, exc)
            continue
        assert got.keys() == good.keys() and got["step"] == good["step"], pos  # a flip torch does not read
        for k, v in good["model"].items():
            assert torch.equal(got["model"][k], v), (pos, k)


def test_a_tampered_model_is_refused_wherever_it_is_loaded(finished, digits_shards, tmp_path, capsys):
    t = tmp_path / "t"
    shutil.copytree(finished / "t", t)
    data = bytearray((t / "model.safetensors").read_bytes())
    data[-100] ^= 0x10  # inside the last tensor's bytes: a loadable file with other weights
    (t / "model.safetensors").write_bytes(bytes(data))
    needle = f"{t / 'model.safetensors'}: sha256 "
    assert run("evaluate", "--model", t, "--shards", digits_shards) == 2
    err = last_error(capsys)
    assert err.startswith(f"sskd: error: {needle}") and "that model.json records" in err
    assert run(*distill_args(t, digits_shards, tmp_path / "s")) == 2  # as a teacher
    assert last_error(capsys).startswith(f"sskd: error: {needle}")
    assert runs.earlier_work(tmp_path / "s") == []


# ---- item 11 (run part): a full disk or the file-size limit while writing a checkpoint or a chunk -------------


def _fail_writes(monkeypatch, name_part: str, after: int, code: int = errno.ENOSPC):
    """``os.write`` to a file whose name contains ``name_part`` fails with ``code`` from its ``after``+1-th file on."""
    real, files = os.write, [0]

    def write(fd, data):
        if name_part in os.readlink(f"/proc/self/fd/{fd}"):
            if os.lseek(fd, 0, os.SEEK_CUR) == 0:  # the first write to this file
                files[0] += 1
            if files[0] > after:
                raise OSError(code, os.strerror(code))
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(
    digits_shards, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "t"
    _fail_writes(monkeypatch, "last.pt", after=1)  # the second last.pt finds the disk full
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
            4,
            *FAST,
            "--set",
            "run.ckpt_every=1",
        )
        == 2
    )
    err = last_error(capsys)
    assert err == (
        f"sskd: error: {out / 'checkpoints' / 'last.pt'}: cannot write the checkpoint (No space left on "
        "device: the disk is full); the previous last.pt is kept"
    )
    monkeypatch.undo()
    assert runs.load_checkpoint(out)["step"] == 1
    assert not (out / "model.safetensors").exists()
    no_leftovers(out)


@pytest.mark.slow
def test_the_file_size_limit_on_a_first_checkpoint_is_one_line_and_leaves_no_run(digits_shards, tmp_path):
    out = tmp_path / "t"
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))\n"
        "from sskd.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    args = [
        "train-teacher",
        "--shards",
        str(digits_shards),
        "--arch",
        "resnet8",
        "--out",
        str(out),
        "--max-steps",
        "2",
        *FAST,
    ]
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith(
        f"sskd: error: {out / 'checkpoints' / 'last.pt'}: cannot write the checkpoint (File too "
        "large: the file-size limit (ulimit -f) is reached)"
    ), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert runs.earlier_work(out) == []  # the start is undone: a rerun needs no --overwrite
    no_leftovers(out)


@pytest.fixture(scope="module")
def kd_cache(finished, digits_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults_cache") / "c"
    assert (
        run(
            "cache",
            "--method",
            "kd",
            "--teacher",
            finished / "t",
            "--shards",
            digits_shards,
            "--epochs",
            2,
            "--batch-size",
            256,
            "--chunk-batches",
            2,
            "--out",
            out,
            "--no-progress",
        )
        == 0
    )
    return out


def test_a_full_disk_while_caching_keeps_the_chunks_before_and_resume_finishes(
    finished, digits_shards, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "c"
    args = [
        "cache",
        "--method",
        "kd",
        "--teacher",
        finished / "t",
        "--shards",
        digits_shards,
        "--epochs",
        1,
        "--batch-size",
        256,
        "--chunk-batches",
        2,
        "--out",
        out,
        "--no-progress",
    ]
    _fail_writes(monkeypatch, ".safetensors", after=1)  # the second chunk finds the disk full
    assert run(*args) == 2
    err = last_error(capsys)
    second = out / "epoch-0000" / "r000-b000002.safetensors"
    assert err == (
        f"sskd: error: {second}: cannot write the cache chunk (No space left on device: the disk is full); "
        "the chunks written before it are kept: free space, then rerun the same command with --resume"
    )
    monkeypatch.undo()
    assert [p.name for p in (out / "epoch-0000").iterdir()] == ["r000-b000000.safetensors"]  # no partial file
    from sskd.cache import verify_chunk

    verify_chunk(out / "epoch-0000" / "r000-b000000.safetensors")
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    assert run(*args, "--resume") == 0
    assert json.loads((out / "manifest.json").read_text())["complete"]


# ---- item 12: a missing or duplicated chunk of any epoch is found at start ---------------------------------------


def test_a_missing_or_copied_chunk_of_a_later_epoch_is_found_before_training(
    finished, kd_cache, digits_shards, tmp_path, capsys
):
    cache = tmp_path / "c"
    shutil.copytree(kd_cache, cache)
    assert sorted(p.name for p in (cache / "epoch-0001").iterdir()) == [
        "r000-b000000.safetensors",
        "r000-b000002.safetensors",
        "r000-b000004.safetensors",
    ]
    run_args = distill_args(
        finished / "t", digits_shards, tmp_path / "s", "--cache", cache
    )  # 2 steps: epoch 0 only
    (cache / "epoch-0001" / "r000-b000002.safetensors").unlink()
    assert run(*run_args) == 2
    err = last_error(capsys)
    assert f"{cache / 'epoch-0001'}: the chunk of rank 000 for batches 2..3 of epoch 1 is missing" in err
    assert runs.earlier_work(tmp_path / "s") == []  # nothing written: the rerun needs no --overwrite
    shutil.copy(
        cache / "epoch-0001" / "r000-b000000.safetensors", cache / "epoch-0001" / "r000-b000002.safetensors"
    )
    assert run(*run_args) == 2
    assert (
        f"{cache / 'epoch-0001' / 'r000-b000002.safetensors'}: holds the chunk that starts at batch 0"
        in last_error(capsys)
    )
    (cache / "epoch-0001" / "r000-b000002.safetensors").unlink()
    (cache / "epoch-0001" / "r000-b000004.safetensors").unlink()  # the epoch's last chunk: fewer samples
    assert run(*run_args) == 2
    assert (
        "the chunks of epoch 1 hold 512 samples, the cache has 1437 per epoch (a chunk is missing)"
        in last_error(capsys)
    )
    assert (
        run(
            "cache",
            "--method",
            "kd",
            "--teacher",
            finished / "t",
            "--shards",
            digits_shards,
            "--epochs",
            2,
            "--batch-size",
            256,
            "--chunk-batches",
            2,
            "--out",
            cache,
            "--no-progress",
            "--resume",
        )
        == 0
    )
    assert run(*run_args) == 0


def test_private_tempdirs_of_killed_processes_are_removed(tmp_path, monkeypatch):
    """The loader's per-epoch index folders (sskd-order-*) of a SIGKILLed process are removed by the next
    process that makes one; a running process's folder is left alone."""
    import socket
    import subprocess
    import tempfile

    from sskd.core.atomic import private_tempdir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    host = socket.gethostname().replace("-", "_")
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f"sskd-order-{host}-{dead.pid}-abc"
    live = tmp_path / f"sskd-order-{host}-{os.getpid()}-def"
    for d in (stale, live):
        d.mkdir()
        (d / "train-000000.idx").write_text("v1.2 0\n")
    new = private_tempdir("sskd-order-")
    assert (
        new.is_dir() and new.parent == tmp_path and new.name.startswith(f"sskd-order-{host}-{os.getpid()}-")
    )
    assert not stale.exists() and live.exists()
