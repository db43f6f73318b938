"""Launchers under the faults a cluster user meets: SLURM's copy of the script, SIGTERM to the launcher,
a launcher SIGKILLed with its ranks still running."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sskd.runs import file_sha256, load_model_info, read_metrics

REPO = Path(__file__).resolve().parents[1]


def _fake_slurm(tmp_path: Path, nodes: int) -> tuple[dict, Path]:
    """``scontrol`` and ``srun`` stand-ins on PATH, and an ``accelerate`` that records its arguments."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    record = tmp_path / "launches.jsonl"
    (bin_ / "scontrol").write_text("#!/bin/sh\nfor n in node0 node1; do echo $n; done\n")
    # srun runs its command once per node, as SLURM does, with that node's SLURM_NODEID
    (bin_ / "srun").write_text("#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\n"
                               f"for id in $(seq 0 {nodes - 1}); do SLURM_NODEID=$id \"$@\" || exit $?; done\n")
    (bin_ / "accelerate").write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"open({str(record)!r}, 'a').write(json.dumps({{'argv': sys.argv[1:], 'cwd': os.getcwd()}}) + '\\n')\n")
    for f in bin_.iterdir():
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node[0-1]",
               SLURM_NNODES=str(nodes), SLURM_NODEID="0", SLURM_SUBMIT_DIR=str(REPO), GPUS_PER_NODE="8")
    return env, record


def test_slurm_script_as_sbatch_runs_it(tmp_path):
    """sbatch runs a copy from its spool folder: the config path must not come from the script's own path,
    and every argument (spaces included) must reach sskd as it was given."""
    spool = tmp_path / "spool" / "job123"
    spool.mkdir(parents=True)
    shutil.copy(REPO / "launch" / "slurm.sh", spool / "slurm_script")
    env, record = _fake_slurm(tmp_path, nodes=2)
    args = ["distill", "--out", "runs/with space", "--set", "student.milestones=[30, 60]"]
    proc = subprocess.run(["bash", str(spool / "slurm_script"), *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    launches = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(launches) == 2
    for rank, launch in enumerate(launches):
        argv = launch["argv"]
        assert argv[0] == "launch" and argv[argv.index("-m") + 1:] == ["sskd", *args]
        config = argv[argv.index("--config_file") + 1]
        assert config == str(REPO / "launch/accelerate/multi_node.yaml") and Path(config).is_file()
        flags = {k: argv[argv.index(k) + 1] for k in ("--num_machines", "--num_processes", "--machine_rank",
                                                       "--main_process_ip")}
        assert flags == {"--num_machines": "2", "--num_processes": "16", "--machine_rank": str(rank),
                         "--main_process_ip": "node0"}
        assert launch["cwd"] == str(REPO)
    # submitted from elsewhere without SSKD_ROOT: a clear line, not a missing-file traceback later
    env["SLURM_SUBMIT_DIR"] = str(tmp_path)
    proc = subprocess.run(["bash", str(spool / "slurm_script"), *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "submit from the sskd checkout or set SSKD_ROOT" in proc.stderr


def test_slurm_script_header_names_a_shipped_recipe():
    text = (REPO / "launch" / "slurm.sh").read_text()
    recipes = [w for w in text.split() if w.startswith("sskd/configs/")]
    assert recipes and all((REPO / r).is_file() for r in recipes)


def _launch(shards, out, port, *extra, popen=False):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch/accelerate/cpu.yaml"),
           "--main_process_port", str(port), "-m", "sskd", "train-teacher", "--shards", str(shards), "--arch", "resnet8",
           "--out", str(out), "--no-progress", "--batch-size", "16", "--set", "run.log_every=1",
           "--set", "run.eval_every=0", "--set", "run.ckpt_every=0", *map(str, extra)]
    if popen:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _wait_for_steps(out: Path, n: int, proc, timeout=300) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if len([r for r in read_metrics(out) if r.get("kind") == "train"]) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.stderr.read()[-2000:]}")
        time.sleep(0.2)
    raise AssertionError("no training steps logged in time")


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_both_ranks_at_one_step_and_resume_is_exact(digits_shards, tmp_path):
    full = _launch(digits_shards, tmp_path / "full", 29611, "--max-steps", 30)
    assert full.returncode == 0, full.stderr[-3000:]
    proc = _launch(digits_shards, tmp_path / "cut", 29612, "--max-steps", 30, popen=True)
    _wait_for_steps(tmp_path / "cut", 3, proc)
    proc.send_signal(signal.SIGTERM)  # what SLURM sends the job step; torchrun forwards it to each rank
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "sskd: stopped by SIGTERM after step" in err and "--resume" in err, err[-3000:]
    import torch

    step = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=False)["step"]
    assert 3 <= step < 30 and not (tmp_path / "cut" / "model.safetensors").exists()
    resumed = _launch(digits_shards, tmp_path / "cut", 29613, "--max-steps", 30, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert load_model_info(tmp_path / "cut")["steps"] == 30
    assert resumed.stderr.count("top-1") == 1  # the final line once, not once per rank
    assert file_sha256(tmp_path / "cut" / "model.safetensors") == file_sha256(tmp_path / "full" / "model.safetensors")


@pytest.mark.slow
def test_ranks_of_a_sigkilled_launcher_stop_and_release_the_folder(digits_shards, tmp_path):
    """Ranks left running after the launcher was SIGKILLed went on writing into the run folder."""
    from sskd.errors import SSKDError
    from sskd.lock import FolderLock

    out = tmp_path / "t"
    proc = _launch(digits_shards, out, 29614, "--set", "teacher.epochs=50", popen=True)
    _wait_for_steps(out, 3, proc)
    with pytest.raises(SSKDError, match="in use by pid"):
        FolderLock(out).acquire()  # the run holds its folder
    proc.kill()  # the launcher only; its ranks are orphaned
    proc.wait()
    t0 = time.time()
    while True:  # the orphans notice, checkpoint and exit, releasing the lock
        try:
            FolderLock(out).acquire().release()
            break
        except SSKDError:
            assert time.time() - t0 < 120, "orphaned ranks still hold the run folder"
            time.sleep(0.5)
    import torch

    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    logged = [r["step"] for r in read_metrics(out) if r["kind"] == "train"]
    assert ckpt["step"] >= 3 and logged[-1] == ckpt["step"]  # stopped after the checkpointed step
    time.sleep(2)
    assert [r["step"] for r in read_metrics(out) if r["kind"] == "train"] == logged  # nobody writes any more
