"""Two "machines" on one host: ``sskd distill`` as two ``accelerate launch`` processes, one rank each.

What launch/slurm.sh does on a cluster (one launcher per node, ``--num_machines 2 --machine_rank 0|1``,
a shared rendezvous at the first node), here on 127.0.0.1 with gloo on the CPU. Each launcher starts
tests/scripts/cli_rank_probe.py, which runs the real ``sskd distill`` command line (sskd.cli.main) and
records, per rank, the torchrun environment, the ids it trained on, the ids of each evaluation pass and
a digest of its final weights.
"""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sskd.cli import main as sskd_main
from sskd.runs import load_model_info, read_metrics

REPO = Path(__file__).resolve().parents[2]
PROBE = REPO / "tests" / "scripts" / "cli_rank_probe.py"
TIMEOUT = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launcher(
    machine_rank: int, port: int, probe_dir: Path, sskd_args: list[str], log: Path
) -> subprocess.Popen:
    # cpu.yaml declares MULTI_GPU (accelerate#2741: --cpu starts one process); the flags make it 2 machines
    # x 1 process: torchrun --nnodes 2 --node_rank R --nproc_per_node 1 with a static rendezvous.
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "launch/accelerate/cpu.yaml"),
        "--num_machines",
        "2",
        "--machine_rank",
        str(machine_rank),
        "--num_processes",
        "2",
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(port),
        str(PROBE),
        str(probe_dir),
        *sskd_args,
    ]
    # CPU ranks even where a GPU is visible: both "machines" are local rank 0 and would share cuda:0 (NCCL refuses)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    with log.open(
        "w"
    ) as f:  # files, not pipes: nobody has to drain them while waiting for the other launcher
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=f, start_new_session=True)


def _wait_all(procs: list[subprocess.Popen], timeout: float, grace: float = 60) -> str | None:
    """Wait for every launcher; once one fails the others get ``grace`` s (a peer left waiting in the
    rendezvous or a collective would otherwise hold the test for torch's own timeouts). Returns why the
    wait was cut short, or None."""
    deadline, why = time.monotonic() + timeout, None
    while any(p.poll() is None for p in procs):
        if why is None and any(p.returncode not in (None, 0) for p in procs):
            deadline, why = min(deadline, time.monotonic() + grace), "a launcher failed"
        if time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)  # the launcher's session: it and the rank it started
                    p.wait()
            return why or f"not finished in {timeout} s"
        time.sleep(0.5)
    return why


@pytest.fixture(scope="module")
def tiny_teacher(digits_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("mn") / "t"
    assert (
        sskd_main(
            [
                "train-teacher",
                "--shards",
                str(digits_shards),
                "--arch",
                "resnet8",
                "--out",
                str(out),
                "--max-steps",
                "3",
                "--no-progress",
                "--batch-size",
                "32",
            ]
        )
        == 0
    )
    return out


@pytest.mark.slow
def test_distill_on_two_machines_of_one_host(digits_shards, tiny_teacher, tmp_path):
    out, probes = tmp_path / "s", tmp_path / "probes"  # one run folder for both "machines", as on a shared FS
    args = [
        "distill",
        "--method",
        "kd",
        "--teacher",
        str(tiny_teacher),
        "--student",
        "resnet8",
        "--shards",
        str(digits_shards),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--no-progress",
        "--set",
        "run.log_every=1",
        "--set",
        "data.eval_batch_size=128",
    ]
    port = _free_port()
    logs = [tmp_path / f"machine{r}.stderr" for r in (0, 1)]
    procs = [_launcher(r, port, probes, args, logs[r]) for r in (0, 1)]
    why = _wait_all(procs, TIMEOUT)
    errs = [log.read_text() for log in logs]
    tails = "\n".join(
        f"--- machine_rank {r} (exit {p.returncode}) stderr tail:\n{err[-3000:]}"
        for r, (p, err) in enumerate(zip(procs, errs))
    )
    assert why is None and [p.returncode for p in procs] == [0, 0], f"{why}\n{tails}"

    ranks = [json.loads((probes / f"rank{r}.json").read_text()) for r in (0, 1)]
    # two machines of one process each: node rank = machine rank, one local process, global rank = node rank
    for r, probe in enumerate(ranks):
        env = probe["env"]
        assert (
            env["GROUP_RANK"],
            env["LOCAL_RANK"],
            env["LOCAL_WORLD_SIZE"],
            env["RANK"],
            env["WORLD_SIZE"],
        ) == (str(r), "0", "1", str(r), "2"), env
        assert env["MASTER_ADDR"] == "127.0.0.1" and env["MASTER_PORT"] == str(port)
        assert probe["calls"] == 1 and probe["exit"] == 0
        assert probe["result"]["world_size"] == 2 and probe["result"]["rank"] == r
    assert ranks[0]["pid"] != ranks[1]["pid"]

    # every training sample exactly once in the epoch, split disjointly over the two ranks
    manifest = json.loads((Path(digits_shards) / "manifest.json").read_text())
    n_train, n_val = (manifest["splits"][s]["num_samples"] for s in ("train", "val"))
    trained = [[i for b in probe["train"] for i in b["ids"]] for probe in ranks]
    assert all(b["epoch"] == 0 for probe in ranks for b in probe["train"])
    assert all(len(ids) == len(set(ids)) for ids in trained)
    assert not set(trained[0]) & set(trained[1])
    assert sorted(trained[0] + trained[1]) == list(range(n_train))
    assert len(ranks[0]["train"]) == len(
        ranks[1]["train"]
    )  # equal batch counts: no rank waits in a collective

    # each evaluation pass reads the validation set exactly once across the two ranks
    passes = [probe["eval_passes"] for probe in ranks]
    assert len(passes[0]) == len(passes[1]) >= 1
    for a, b in zip(*passes):
        assert not set(a) & set(b) and sorted(a + b) == list(range(n_val))
    assert ranks[0]["result"]["count"] == ranks[1]["result"]["count"] == n_val

    # DDP kept the replicas identical, and rank 1's weights are the file rank 0 wrote
    assert ranks[0]["rank_weights_sha256"] == ranks[1]["rank_weights_sha256"]
    assert ranks[0]["exported_sha256"] == ranks[1]["exported_sha256"]
    from safetensors.torch import load_file

    spec = importlib.util.spec_from_file_location("cli_rank_probe", PROBE)
    probe_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe_mod)
    assert probe_mod.state_digest(load_file(str(out / "model.safetensors"))) == ranks[1]["exported_sha256"]

    # only the main process wrote the run's files: every step logged once, with world size 2
    steps_per_epoch = len(ranks[0]["train"])
    recs = read_metrics(out)
    train_recs = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train_recs] == list(range(1, steps_per_epoch + 1))
    assert {r["world_size"] for r in train_recs} == {2}
    assert [r["count"] for r in recs if r["kind"] == "eval"] == [n_val] * len(passes[0])
    info = load_model_info(out)
    assert info["steps"] == steps_per_epoch and info["epochs_done"] == 1
    assert ["top-1" in err for err in errs] == [True, False]  # the final line once, from machine 0
