"""Launchers under the faults a cluster user meets: SLURM's copy of the script, SIGTERM to the launcher,
a launcher SIGKILLed with its ranks still running."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sskd.runs import file_sha256, load_model_info, read_metrics

REPO = Path(__file__).resolve().parents[2]


def _fake_slurm(tmp_path: Path, hosts: list[str], nodelist: str) -> tuple[dict, Path, Path]:
    """What sbatch gives the batch script: its environment, and ``scontrol`` / ``srun`` stand-ins on PATH,
    with an ``accelerate`` that records its arguments instead of launching."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    launches, sruns = tmp_path / "launches.jsonl", tmp_path / "srun.jsonl"
    # scontrol expands exactly the job's node list (the script must ask for `show hostnames $SLURM_JOB_NODELIST`)
    (bin_ / "scontrol").write_text(
        f'#!/bin/sh\n[ "$*" = {shlex.quote("show hostnames " + nodelist)} ] || '
        '{ echo "scontrol stand-in: unexpected: $*" >&2; exit 1; }\n' + "".join(f"echo {h}\n" for h in hosts)
    )
    # srun runs its command once per node of the allocation, as SLURM does, each with that node's SLURM_NODEID
    # (the batch script itself runs on node 0 with SLURM_NODEID=0)
    (bin_ / "srun").write_text(
        f"#!{sys.executable}\nimport json, os, subprocess, sys\n"
        "argv = sys.argv[1:]\nopts = []\n"
        "while argv[0].startswith('-'):\n    opts.append(argv.pop(0))\n"
        f"open({str(sruns)!r}, 'a').write(json.dumps({{'opts': opts, 'cmd': argv, 'cwd': os.getcwd(), "
        "'SRUN_CPUS_PER_TASK': os.environ.get('SRUN_CPUS_PER_TASK')}) + '\\n')\n"
        f"for i, host in enumerate({hosts!r}):\n"
        "    rc = subprocess.call(argv, env=dict(os.environ, SLURM_NODEID=str(i), SLURMD_NODENAME=host))\n"
        "    if rc:\n        sys.exit(rc)\n"
    )
    for launcher in ("accelerate", "sskd"):  # `sskd launch` is `accelerate launch` ending in one line
        (bin_ / launcher).write_text(
            f"#!{sys.executable}\nimport json, os, sys\n"
            f"open({str(launches)!r}, 'a').write(json.dumps({{'argv': sys.argv[1:], 'cwd': os.getcwd(), "
            "'node': os.environ['SLURM_NODEID']}) + '\\n')\n"
        )
    for f in bin_.iterdir():
        f.chmod(0o755)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("GPUS_PER_NODE", "SSKD_ROOT", "MASTER_PORT") and not k.startswith(("SLURM_", "SRUN_"))
    }
    env.update(
        PATH=f"{bin_}:{os.environ['PATH']}",
        SLURM_JOB_NODELIST=nodelist,
        SLURM_NNODES=str(len(hosts)),
        SLURM_JOB_NUM_NODES=str(len(hosts)),
        SLURM_NODEID="0",
        SLURM_SUBMIT_DIR=str(REPO),
        SLURM_GPUS_PER_NODE="8",
        SLURM_CPUS_PER_TASK="64",
        SLURM_JOB_ID="123",
    )  # the #SBATCH lines' values
    return env, launches, sruns


def _sbatch(tmp_path: Path, args: list[str], env: dict) -> subprocess.CompletedProcess:
    """Run the script as slurmd does: a copy in a spool folder, executed itself (its #! line), in another
    folder than the checkout."""
    spool = tmp_path / "spool" / "job123"
    spool.mkdir(parents=True, exist_ok=True)
    script = spool / "slurm_script"
    shutil.copy(REPO / "launch" / "slurm.sh", script)
    script.chmod(0o700)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    return subprocess.run(
        [str(script), *args], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60, check=False
    )


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# A user's arguments as the shell gave them to sbatch: spaces, quotes, $, globs, ;, a newline
ARGS = [
    "distill",
    "--out",
    "runs/with space",
    "--set",
    "student.milestones=[30, 60]",
    "--set",
    'run.name=it\'s "$HOME" *; echo pwned',
    "--set",
    "run.note=two\nlines",
]


def _check_launches(
    launches: list[dict], *, hosts: list[str], gpus: int, root: Path, args: list[str], port: str = "29500"
) -> None:
    assert [launch["node"] for launch in launches] == [str(i) for i in range(len(hosts))]
    for rank, launch in enumerate(launches):
        argv = launch["argv"]
        assert argv[0] == "launch" and argv[argv.index("-m") + 1 :] == ["sskd", *args]
        config = argv[argv.index("--config_file") + 1]
        assert config == str(root / "launch/accelerate/multi_node.yaml") and Path(config).is_file()
        flags = {
            k: argv[argv.index(k) + 1]
            for k in (
                "--num_machines",
                "--num_processes",
                "--machine_rank",
                "--main_process_ip",
                "--main_process_port",
            )
        }
        assert flags == {
            "--num_machines": str(len(hosts)),
            "--num_processes": str(len(hosts) * gpus),
            "--machine_rank": str(rank),
            "--main_process_ip": hosts[0],
            "--main_process_port": port,
        }
        assert launch["cwd"] == str(root)  # relative --out / --shards resolve in the checkout on every node


def test_slurm_script_as_sbatch_runs_it(tmp_path):
    """sbatch runs a copy from its spool folder: the config path must not come from the script's own path,
    each node gets its machine_rank, all of them the first host as rendezvous, and every argument
    (spaces, quotes, $ included) reaches sskd as it was given."""
    hosts = ["gpu-a07", "gpu-a08"]
    env, launches, sruns = _fake_slurm(tmp_path, hosts, "gpu-a[07-08]")
    proc = _sbatch(tmp_path, ARGS, env)
    assert proc.returncode == 0, proc.stderr
    _check_launches(_read(launches), hosts=hosts, gpus=8, root=REPO, args=ARGS)
    (srun,) = _read(sruns)  # one job step, started from the checkout, killed as a whole if a node fails
    assert "--kill-on-bad-exit=1" in srun["opts"] and srun["cwd"] == str(REPO)
    assert srun["cmd"][:2] == ["bash", "-c"] and srun["cmd"][2].startswith("exec sskd launch")
    assert srun["SRUN_CPUS_PER_TASK"] == "64"  # srun (Slurm >= 22.05) does not read sbatch's --cpus-per-task

    # submitted from elsewhere without SSKD_ROOT: a clear line, not a missing-file traceback later
    env["SLURM_SUBMIT_DIR"] = str(tmp_path)
    proc = _sbatch(tmp_path, ARGS, env)
    assert proc.returncode == 2 and "submit from the sskd checkout or set SSKD_ROOT" in proc.stderr
    env["SSKD_ROOT"] = str(REPO)  # ... or with it
    launches.unlink()
    assert _sbatch(tmp_path, ARGS, env).returncode == 0
    _check_launches(_read(launches), hosts=hosts, gpus=8, root=REPO, args=ARGS)


def test_slurm_script_takes_the_allocation_it_got(tmp_path):
    """`sbatch --nodes=3 --gpus-per-node=a100:4`: 3 launchers of 4 ranks (the #SBATCH 8 would leave the
    rendezvous waiting for 12 ranks that never come); a checkout path with a space; MASTER_PORT honoured."""
    checkout = tmp_path / "my checkout"
    (checkout / "launch" / "accelerate").mkdir(parents=True)
    shutil.copy(REPO / "launch/accelerate/multi_node.yaml", checkout / "launch/accelerate/multi_node.yaml")
    hosts = ["n1", "n2", "n3"]
    env, launches, _ = _fake_slurm(tmp_path, hosts, "n[1-3]")
    env.update(SLURM_SUBMIT_DIR=str(checkout), SLURM_GPUS_PER_NODE="a100:4", MASTER_PORT="29611")
    proc = _sbatch(tmp_path, ARGS, env)
    assert proc.returncode == 0, proc.stderr
    _check_launches(_read(launches), hosts=hosts, gpus=4, root=checkout, args=ARGS, port="29611")
    launches.unlink()
    env["GPUS_PER_NODE"] = "2"  # the user's word wins
    assert _sbatch(tmp_path, ARGS, env).returncode == 0
    _check_launches(_read(launches), hosts=hosts, gpus=2, root=checkout, args=ARGS, port="29611")
    for bad in ("gpu", "a100:4,v100:2", "0"):  # not one count: refused before anything starts
        launches.unlink(missing_ok=True)
        env["GPUS_PER_NODE"] = bad
        proc = _sbatch(tmp_path, ARGS, env)
        assert proc.returncode == 2 and "is not one count" in proc.stderr and not launches.exists()


def test_slurm_script_header_names_a_shipped_recipe():
    text = (REPO / "launch" / "slurm.sh").read_text()
    recipes = [w for w in text.split() if w.startswith("sskd/configs/")]
    assert recipes and all((REPO / r).is_file() for r in recipes)


def _launch(shards, out, port, *extra, popen=False):
    env = dict(
        os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""
    )  # CPU ranks (gloo) even on a GPU node
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "launch/accelerate/cpu.yaml"),
        "--main_process_port",
        str(port),
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
        "run.ckpt_every=0",
        *map(str, extra),
    ]
    if popen:
        return subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
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
    assert file_sha256(tmp_path / "cut" / "model.safetensors") == file_sha256(
        tmp_path / "full" / "model.safetensors"
    )


@pytest.mark.slow
def test_ranks_of_a_sigkilled_launcher_stop_and_release_the_folder(digits_shards, tmp_path):
    """Ranks left running after the launcher was SIGKILLed went on writing into the run folder."""
    from sskd.core.errors import SSKDError
    from sskd.core.lock import FolderLock

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
