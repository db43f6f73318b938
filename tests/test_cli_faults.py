"""Faults met at the CLI's edges (issue 19): a sweep label leading out of --out, a truncated model.json
under `sskd report`, an OSError or a file-size limit escaping a command, Ctrl-C of `accelerate launch`,
a SIGKILLed sweep leaving its run as an orphan, a command dying by a signal."""

import errno
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sskd.cli import main as sskd_main
from sskd.core.errors import SSKDError

REPO = Path(__file__).resolve().parents[1]


def write_spec(path: Path, **spec) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


def one_line_error(err: str) -> str:
    """The command's stderr holds no traceback and ends in one `sskd: error:` line; returns that line."""
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("sskd: error: "), err[-3000:]
    return last


def _lock_free(folder: Path) -> bool:
    from sskd.core.lock import FolderLock

    try:
        FolderLock(folder).acquire().release()
    except SSKDError:
        return False
    return True


def _kill_holder(folder: Path) -> None:
    """SIGKILL whatever process still holds ``folder``'s lock (a test's leftover)."""
    if (folder / ".lock").is_file() and not _lock_free(folder):
        pid = json.loads((folder / ".lock").read_text()).get("pid")
        if isinstance(pid, int) and pid != os.getpid():
            os.kill(pid, signal.SIGKILL)


# ---- item 3: a sweep label (or architecture) may not lead out of --out ------------------------------------


@pytest.mark.parametrize(
    "method, pair, field",
    [
        ({"name": "ce", "label": "../../escaped"}, {"student": "resnet8"}, "methods[0].label"),
        ({"name": "ce", "label": "a/b"}, {"student": "resnet8"}, "methods[0].label"),
        ({"name": "ce", "label": "/tmp/abs"}, {"student": "resnet8"}, "methods[0].label"),
        ({"name": "ce", "label": ".."}, {"student": "resnet8"}, "methods[0].label"),
        ("kd", {"teacher": "../../../t", "student": "resnet8"}, "pairs[0].teacher"),
    ],
)
def test_a_sweep_label_leading_out_of_out_is_refused_naming_the_spec_and_label(
    tmp_path, digits_shards, capsys, method, pair, field
):
    spec = write_spec(tmp_path / "spec.yaml", shards=str(digits_shards), pairs=[pair], methods=[method])
    out = tmp_path / "deep" / "sw"
    assert sskd_main(["sweep", str(spec), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"sskd: error: {spec}: {field}: ") and "\n" not in err
    bad = method["label"] if isinstance(method, dict) else pair["teacher"]
    assert repr(bad) in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["spec.yaml"]  # nothing written anywhere


def test_every_planned_run_folder_lies_inside_out(tmp_path):
    from sskd.experiments.sweep import inside

    out = tmp_path / "sw"
    assert inside(out / "runs" / "full" / "kd" / "seed0", out)
    assert not inside(out / "runs" / ".." / ".." / ".." / "x", out)
    assert not inside(Path("/etc/x"), out) and not inside(out, out)
    assert not inside(tmp_path / "sw2" / "x", out)  # a sibling that shares the prefix


# ---- item 12: SIGKILL of the sweep leaves no orphan holding the run's lock ------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("launcher, how", [(None, "sigkill"), ("accelerate", "sigkill"), (None, "ctrl-c")])
def test_a_sigkilled_sweep_stops_its_running_command_which_checkpoints_and_frees_the_lock(
    tmp_path, digits_shards, request, launcher, how
):
    """The command (or its launcher, which passes SIGTERM on to its ranks) gets SIGTERM when the sweep dies.
    A Ctrl-C (SIGINT to the sweep's process group) reaches the command once, through the sweep: twice (the
    terminal's and the sweep's) meant "stop now", without the checkpoint of the step in flight."""
    import torch

    spec = write_spec(
        tmp_path / "s.yaml",
        shards=str(digits_shards),
        pairs=[{"student": "resnet8"}],
        methods=["ce"],
        set={
            "student.max_steps": 100000,
            "student.batch_size": 16,
            "run.log_every": 1,
            "run.ckpt_every": 2,
            "run.eval_every": 0,
        },
    )
    out = tmp_path / "sw"
    cmd = [sys.executable, "-m", "sskd", "sweep", str(spec), "--out", str(out), "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    if launcher:
        cmd += [
            "--launcher",
            f"{sys.executable} -m accelerate.commands.launch --config_file "
            f"{REPO / 'launch/accelerate/cpu.yaml'} --main_process_port 29673",
        ]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    run_dir = out / "runs/full/ce/none-resnet8/seed0"
    request.addfinalizer(lambda: _kill_holder(run_dir))  # no orphan outlives a failed test
    deadline = time.time() + 300
    while time.time() < deadline and not (run_dir / "checkpoints" / "last.pt").is_file():
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.3)
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    assert not _lock_free(run_dir)  # the command is training
    if how == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)  # the terminal signals the sweep's process group
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err[-3000:]
    else:
        os.killpg(
            proc.pid, signal.SIGKILL
        )  # the sweep's group: the sweep alone (its command has a group of its own)
        proc.communicate(timeout=60)
    t0 = time.time()
    while not _lock_free(run_dir):  # the command noticed, wrote its checkpoint and exited
        assert time.time() - t0 < 60, "the sweep's command still holds the run folder"
        time.sleep(0.3)
    log = (run_dir / "sweep.log").read_text()
    name = "SIGINT" if how == "ctrl-c" else "SIGTERM"
    assert f"sskd: stopped by {name} after step" in log and "Traceback" not in log, log[-2000:]
    if how == "ctrl-c":  # a second SIGINT means "stop now" (no checkpoint): the Ctrl-C must arrive once
        assert log.count(f"{name} received") == 1, log[-2000:]
    else:  # a repeated SIGTERM is harmless (torch's launcher itself sends its ranks two; seen here under load)
        assert log.count(f"{name} received") >= 1, log[-2000:]
    step = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["step"]
    logged = [
        json.loads(ln)["step"]
        for ln in (run_dir / "metrics.jsonl").read_text().splitlines()
        if '"train"' in ln
    ]
    assert step >= 2 and logged[-1] == step  # stopped right after a checkpointed step


# ---- item 11: `sskd report` over a torn model.json / metrics.jsonl -----------------------------------------


def fabricate(root: Path, seeds=(0, 1)) -> Path:
    """A finished sweep folder (as `sskd sweep` leaves it) with two CE and two KD students."""
    runs = []
    for method in ("ce", "kd"):
        for seed in seeds:
            folder = f"runs/full/{method}/resnet20-resnet8/seed{seed}"
            (root / folder).mkdir(parents=True)
            (root / folder / "model.json").write_text(
                json.dumps({"top1": 90.0 + seed, "top5": 99.0, "best_top1": 91.0})
            )
            (root / folder / "sweep.json").write_text(json.dumps({"status": "done", "wall_s": 1.0}))
            (root / folder / "metrics.jsonl").write_text(
                json.dumps({"kind": "eval", "epoch": 0, "top1": 80.0}) + "\n"
            )
            runs.append(
                {
                    "kind": "student",
                    "folder": folder,
                    "setting": "full",
                    "method": method,
                    "label": method,
                    "teacher": "resnet20",
                    "student": "resnet8",
                    "seed": seed,
                    "pair": "resnet20-resnet8",
                }
            )
    (root / "plan.json").write_text(json.dumps({"runs": runs}))
    return root


@pytest.mark.parametrize(
    "name, damage",
    [
        ("model.json", lambda b: b[: len(b) // 2]),  # torn mid-write
        ("model.json", lambda b: b""),
        ("model.json", lambda b: b"\xff\xfe\x00garbage"),  # not text at all
        ("model.json", lambda b: b"[1, 2]"),  # JSON, but not a record
        ("model.json", lambda b: b'{"top1": "ninety", "top5": 99}'),
        ("sweep.json", lambda b: b[:7]),
    ],
)
def test_report_over_a_damaged_run_record_is_one_line_naming_the_file(tmp_path, capsys, name, damage):
    sweep = fabricate(tmp_path / "sw")
    bad = sweep / "runs/full/kd/resnet20-resnet8/seed1" / name
    bad.write_bytes(damage(bad.read_bytes()))
    assert sskd_main(["report", str(sweep), "--out", str(tmp_path / "r.md"), "--no-plots"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"sskd: error: {bad}: ") and "\n" not in err, err
    assert not (tmp_path / "r.md").exists()


def test_report_over_a_torn_plan_is_one_line_naming_it(tmp_path, capsys):
    sweep = fabricate(tmp_path / "sw")
    (sweep / "plan.json").write_bytes((sweep / "plan.json").read_bytes()[:40])
    assert sskd_main(["report", str(sweep), "--out", str(tmp_path / "r.md"), "--no-plots"]) == 2
    assert capsys.readouterr().err.strip().startswith(f"sskd: error: {sweep / 'plan.json'}: ")


def test_report_skips_a_torn_or_foreign_metrics_line(tmp_path):
    sweep = fabricate(tmp_path / "sw")
    metrics = sweep / "runs/full/kd/resnet20-resnet8/seed1" / "metrics.jsonl"
    metrics.write_bytes(
        metrics.read_bytes()
        + b'3\n"text"\n{"kind": "eval", "epoch": "x", "top1": 1}\n\xff\xfe\n'
        + json.dumps({"kind": "eval", "epoch": 1, "top1": 85.0}).encode()
        + b'\n{"kind": "ev'
    )
    assert (
        sskd_main(
            [
                "report",
                str(sweep),
                "--out",
                str(tmp_path / "r.md"),
                "--no-plots",
                "--json",
                str(tmp_path / "r.json"),
            ]
        )
        == 0
    )
    kd = next(r for r in json.loads((tmp_path / "r.json").read_text())["rows"] if r["method"] == "kd")
    assert kd["curve"] == {"0": 80.0, "1": 85.0}  # epoch 1 from seed 1 only; the torn lines skipped


# ---- item 11: an OSError escaping a command, a file-size limit ---------------------------------------------


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EFBIG])
def test_an_oserror_escaping_a_command_is_one_line_naming_the_file_and_reason(
    tmp_path, capsys, monkeypatch, code
):
    import sskd.experiments.report

    sweep = fabricate(tmp_path / "sw")
    target = tmp_path / "r.md"

    def fail(path, data):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(sskd.experiments.report.atomic, "write_bytes", fail)
    assert sskd_main(["report", str(sweep), "--out", str(target), "--no-plots"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"sskd: error: {target}: {os.strerror(code)}") and "\n" not in err, err


def test_a_file_size_limit_fails_the_write_with_one_line_instead_of_killing_the_process(tmp_path):
    """Under `ulimit -f` a write past the limit raises SIGXFSZ, whose default action kills a process without a
    word; the CLI ignores it (as CPython's own start-up does), so the write fails with EFBIG, the file is named
    in one line and no partial file is left."""
    sweep = fabricate(tmp_path / "sw")
    limit = 8192  # the report's markdown fits; its bar chart does not

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", MPLCONFIGDIR=str(tmp_path / "mpl"))
    proc = subprocess.run(
        [sys.executable, "-m", "sskd", "report", str(sweep), "--out", str(tmp_path / "r.md")],
        cwd=REPO,
        env=env,
        preexec_fn=small_files,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    line = one_line_error(proc.stderr)
    assert str(tmp_path / "r-bars.png") in line and os.strerror(errno.EFBIG) in line, line
    assert not (tmp_path / "r-bars.png").exists() and not list(tmp_path.glob(".*.partial"))


# ---- item 11: Ctrl-C of the launcher ------------------------------------------------------------------------


def _launch(shards, out, port, *extra):
    env = dict(
        os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""
    )  # CPU ranks (gloo) even on a GPU node
    cmd = [
        sys.executable,
        "-m",
        "sskd",
        "launch",
        "--config_file",
        str(REPO / "launch/accelerate/cpu.yaml"),
        "--main_process_port",
        str(port),
        "train-teacher",
        "--shards",
        str(shards),
        "--arch",
        "resnet8",
        "--out",
        str(out),
        "--no-progress",
        "--batch-size",
        "16",
        "--set",
        "run.log_every=1",
        "--set",
        "run.eval_every=0",
        "--set",
        "run.ckpt_every=0",
        *map(str, extra),
    ]
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ctrl_c_of_sskd_launch_is_one_line_with_the_checkpoint_kept(tmp_path, digits_shards):
    """`accelerate launch` itself ends a Ctrl-C with its SignalException's traceback (exit 1); `sskd launch`
    runs the same launcher: the ranks checkpoint, the launcher says so in one line, exit 130."""
    import torch

    out = tmp_path / "t"
    proc = _launch(digits_shards, out, 29671, "--max-steps", 100000)
    t0 = time.time()
    while not (out / "metrics.jsonl").is_file() or (out / "metrics.jsonl").read_text().count('"train"') < 3:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - t0 < 300, "no training steps logged in time"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the launcher's process group
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "SignalException" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("sskd: ")]
    assert lines[-1].startswith("sskd: the launcher got SIGINT") and "--resume" in lines[-1], err[-3000:]
    assert any(ln.startswith("sskd: stopped by SIGINT after step") for ln in lines), err[-3000:]
    step = torch.load(out / "checkpoints" / "last.pt", weights_only=False)["step"]
    assert step >= 3 and not (out / "model.safetensors").exists() and _lock_free(out)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_failing_rank_under_sskd_launch_is_its_line_and_its_status(tmp_path):
    proc = _launch(tmp_path / "no-shards", tmp_path / "t", 29672)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err and "ChildFailedError" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("sskd: ")]
    assert lines[0].startswith("sskd: error: ") and str(tmp_path / "no-shards") in lines[0], err[-3000:]
    assert re.fullmatch(
        r"sskd: rank [01] exited with status 2 \(its own message is above\); the launcher stopped "
        r"the other ranks",
        lines[-1],
    ), err[-3000:]


# ---- item 4: a command that dies by a signal does not vanish silently ------------------------------------------


def _train(shards, out, *extra, env=None):
    """`sskd train-teacher` as a user starts it (the console entry: supervised), in a session of its own."""
    cmd = [
        sys.executable,
        "-m",
        "sskd",
        "train-teacher",
        "--shards",
        str(shards),
        "--arch",
        "resnet8",
        "--out",
        str(out),
        "--no-progress",
        "--batch-size",
        "16",
        "--set",
        "run.log_every=1",
        "--set",
        "run.eval_every=0",
        "--set",
        "run.ckpt_every=2",
        "--max-steps",
        "100000",
        *map(str, extra),
    ]
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _wait_for_checkpoint(out: Path, proc) -> int:
    """The pid of the process training into ``out`` (its lock's holder) once it has written a checkpoint."""
    t0 = time.time()
    while not (out / "checkpoints" / "last.pt").is_file():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - t0 < 300, "no checkpoint in time"
        time.sleep(0.2)
    return json.loads((out / ".lock").read_text())["pid"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_command_dying_by_sigsegv_is_one_line_naming_the_signal_and_command(
    tmp_path, digits_shards, request
):
    """The supervisor names the signal and the command, then checks the shards for the sample it may come from:
    here a validation image whose bytes were flipped (training never reads it: eval_every=0)."""
    import shutil
    import tarfile

    shards = tmp_path / "shards"
    shutil.copytree(digits_shards, shards, ignore=shutil.ignore_patterns(".lock"))
    with tarfile.open(shards / "val-000001.tar") as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".png"))
    with open(shards / "val-000001.tar", "r+b") as fh:  # bytes flipped inside the image data
        fh.seek(member.offset_data + member.size // 2)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0xFF]))
    out = tmp_path / "t"
    proc = _train(shards, out)
    request.addfinalizer(lambda: _kill_holder(out))
    worker = _wait_for_checkpoint(out, proc)
    assert worker != proc.pid  # the training runs in a child of the `sskd` process
    os.kill(worker, signal.SIGSEGV)  # as a crash in DALI's decoder would end it
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGSEGV, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    line = next(ln for ln in err.splitlines() if ln.startswith("sskd: error: "))
    assert line.startswith("sskd: error: `sskd train-teacher` died by SIGSEGV") and "--resume" in line, err[
        -3000:
    ]
    after = err.split(line, 1)[
        1
    ]  # the shards are checked (or, without shards.verify.check_samples, the check named)
    from shards import verify

    if hasattr(verify, "check_samples"):
        key = member.name.split(".")[0]
        assert any(str(shards / "val-000001.tar") in ln and key in ln for ln in after.splitlines()), err[
            -3000:
        ]
        assert "--skip-bad" in after
    else:
        assert f"sskd shard verify {shards}" in after
    assert (out / "checkpoints" / "last.pt").is_file() and _lock_free(out)


@pytest.mark.parametrize("command", ["distill", "cache"])
def test_after_a_crash_the_shards_check_says_how_each_command_leaves_bad_samples_out(
    tmp_path, digits_shards, capsys, command
):
    """A cache's batches (and so its chunks) follow the samples it keeps: it cannot resume with --skip-bad
    when begun without it, so after a crash it is told to start a new cache, not to --resume."""
    from test_loader_faults import corrupt

    from sskd.cli.supervisor import _check_shards_after_crash

    case = corrupt(Path(digits_shards), tmp_path / "bad", "magic", seed=0)
    _check_shards_after_crash([command, "--shards", case["folder"]], command)
    err = capsys.readouterr().err
    assert f"{case['bad'][0]:09d}" in err
    advice = err.strip().splitlines()[-1]
    if command == "cache":
        assert "--skip-bad and a new --out" in advice and "--resume" not in advice.split("(")[0]
    else:
        assert "rerun with --resume --skip-bad" in advice


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["ctrl-c", "sigkill"])
def test_a_supervised_command_stops_cleanly_on_ctrl_c_or_when_its_supervisor_is_killed(
    tmp_path, digits_shards, request, how
):
    """Ctrl-C reaches the training process once (a second SIGINT would mean "stop now", without the checkpoint);
    a SIGKILLed `sskd` process leaves no orphan holding the run folder."""
    import torch

    out = tmp_path / "t"
    proc = _train(digits_shards, out)
    request.addfinalizer(lambda: _kill_holder(out))
    _wait_for_checkpoint(out, proc)
    if how == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)  # the terminal signals the foreground process group
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err[-3000:]
        assert "Traceback" not in err and err.count("SIGINT received") == 1, err[-3000:]
        assert err.strip().splitlines()[-1].startswith("sskd: stopped by SIGINT after step"), err[-3000:]
    else:
        proc.kill()
        proc.communicate(timeout=60)
        t0 = time.time()
        while not _lock_free(out):
            assert time.time() - t0 < 60, "the training process still holds the run folder"
            time.sleep(0.3)
    step = torch.load(out / "checkpoints" / "last.pt", weights_only=False)["step"]
    logged = [
        json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in ln
    ]
    assert step >= 2 and logged[-1] == step  # it stopped right after writing its checkpoint
    assert _lock_free(out)


def test_the_supervisor_is_only_for_the_console_entry_of_training_commands(monkeypatch):
    from sskd.cli.supervisor import supervised_command as _supervised_command

    for k in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "SSKD_SUPERVISED"):
        monkeypatch.delenv(k, raising=False)
    assert _supervised_command(["-v", "distill", "--shards", "x"]) == "distill"
    assert _supervised_command(["report", "x"]) is None and _supervised_command(["--help"]) is None
    monkeypatch.setenv("LOCAL_RANK", "0")  # a rank of a launcher: the launcher reports its signals
    assert _supervised_command(["distill"]) is None
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setenv("SSKD_SUPERVISED", "0")  # switched off by the user
    assert _supervised_command(["distill"]) is None
