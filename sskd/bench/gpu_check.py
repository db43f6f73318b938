"""``bash launch/gpu-check.sh [--out DIR]``: the first thing to run on a cluster GPU node.

Runs, each as its own process with its own timeout under one overall budget (default 450 s, so the
whole stays under 8 minutes on one GPU), and needs nothing from the internet:

- ``pytest_gpu``: ``pytest -m gpu`` (passed / failed / skipped counts and the failing tests' names);
- ``shards``: small digits shards (32 px) and ImageNet-layout shards of the bundled sample photographs
  (224 px), made on the spot with ``sskd shard``;
- ``bench_pipeline``: ``sskd bench pipeline --device gpu`` at 224 px against the torchvision DataLoader
  with every CPU core of the machine as workers;
- ``bench_distill``: ``sskd bench distill`` (CE-only / live teacher / cached step times);
- ``bench_train``: ``sskd bench train --device gpu`` on the 32 px and the 224 px shards.

Every section records its command, exit status, wall time, whether it timed out, the JSON the command
wrote and the end of its output (the full output is in ``DIR/logs/``). One JSON, ``DIR/gpu-check.json``,
holds it all with ``"cuda": true|false`` and ``"skipped": [{"check", "reason"}]``. Without a CUDA device
it says so in one line, writes the JSON with ``"cuda": false`` and exits 0; without DALI it runs the
torch-only GPU tests and lists the DALI checks it skipped. The exit status is 0 when every check that
ran passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the checkout: sskd/bench/gpu_check.py -> the repository root
TAIL = 3000  # characters of a step's output kept in the JSON


def _write(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def run_step(
    name: str,
    cmd: list[str],
    *,
    timeout: float,
    logs: Path,
    json_path: Path | None = None,
    env: dict | None = None,
) -> dict:
    """Run ``cmd`` (no shell) under ``timeout`` seconds; its record for the report. A command that runs
    past its time is killed with its process group, and the record says so."""
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    if json_path is not None and json_path.exists():
        json_path.unlink()
    rec = {"command": " ".join(cmd), "timeout_s": round(timeout, 1)}
    t0 = time.perf_counter()
    with open(log, "wb") as fh:
        try:
            proc = subprocess.Popen(
                cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True
            )
        except OSError as exc:
            rec.update(
                returncode=None, timed_out=False, wall_s=0.0, error=str(exc), json=None, output_tail=""
            )
            return rec
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            rc = proc.wait()
    rec.update(returncode=rc, timed_out=timed_out, wall_s=round(time.perf_counter() - t0, 2))
    rec["json"] = _read_json(json_path) if json_path is not None else None
    text = log.read_text(errors="replace")
    rec["output_tail"] = text[-TAIL:]
    rec["log"] = str(log)
    rec["ok"] = rc == 0 and not timed_out
    return rec


def _kill_group(proc: subprocess.Popen) -> None:
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def _read_json(path: Path | None):
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return {"unreadable": str(exc)}


def pytest_counts(junit: Path) -> dict:
    """passed / failed / skipped / errors and the failing tests' ids from a JUnit XML report."""
    out = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0, "failing": []}
    if not junit.is_file():
        return out
    try:
        root = ET.parse(junit).getroot()
    except ET.ParseError:
        return out
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None:
            out["failed"] += 1
            out["failing"].append(name)
        elif case.find("error") is not None:
            out["errors"] += 1
            out["failing"].append(name)
        elif case.find("skipped") is not None:
            out["skipped"] += 1
        else:
            out["passed"] += 1
    return out


def machine_info() -> dict:
    info = {
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "host": platform.node(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            info["nccl"] = (
                ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None
            )
    except Exception as exc:  # noqa: BLE001 - the report says what went wrong instead of crashing
        info["torch_error"] = str(exc)
    info["dali"] = dali_version()
    return info


def dali_version() -> str | None:
    if importlib.util.find_spec("nvidia") is None or importlib.util.find_spec("nvidia.dali") is None:
        return None
    try:
        from nvidia import dali

        return dali.__version__
    except Exception:  # noqa: BLE001 - a broken install counts as absent
        return None


class Budget:
    """One overall deadline; each step gets its own timeout, cut to what is left (minus a reserve)."""

    def __init__(self, seconds: float, reserve: float = 10.0):
        self.end = time.monotonic() + seconds
        self.reserve = reserve

    def left(self) -> float:
        return self.end - time.monotonic() - self.reserve

    def timeout(self, own: float) -> float:
        return min(own, self.left())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu-check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu-check", help="folder for gpu-check.json, logs and the small shards")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for all checks together")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    report_path = out / "gpu-check.json"
    started = time.time()
    t0 = time.perf_counter()
    try:
        import torch

        cuda = bool(torch.cuda.is_available())
    except Exception as exc:  # noqa: BLE001
        cuda, why = False, f"torch could not be imported ({exc})"
    else:
        why = "torch.cuda.is_available() is False"
    report: dict = {
        "cuda": cuda,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "budget_s": args.budget,
        "machine": machine_info(),
        "skipped": [],
    }
    if not cuda:
        report["skipped"] = [
            {"check": name, "reason": "no CUDA device"}
            for name in ("pytest_gpu", "bench_pipeline", "bench_distill", "bench_train")
        ]
        report.update(
            message=f"no CUDA device visible ({why}): nothing to check on this machine",
            wall_s=round(time.perf_counter() - t0, 2),
            ok=True,
        )
        _write(report_path, report)
        print(f'gpu-check: no CUDA device visible ({why}); wrote {report_path} with "cuda": false')
        return 0
    budget = Budget(args.budget)
    dali = report["machine"]["dali"] is not None
    py = sys.executable
    sskd = [py, "-m", "sskd"]
    logs, data = out / "logs", out / "data"
    cpus = os.cpu_count() or 1
    env = dict(os.environ, PYTHONUNBUFFERED="1")

    def step(name, cmd, own, json_path=None):
        left = budget.timeout(own)
        if left < 5:
            report["skipped"].append(
                {
                    "check": name,
                    "reason": f"out of time: {budget.left():.0f} s of the {args.budget:.0f} s budget left",
                }
            )
            report[name] = {"command": " ".join(cmd), "ran": False}
            return None
        print(f"gpu-check: {name} (up to {left:.0f} s) ...", flush=True)
        rec = run_step(name, cmd, timeout=left, logs=logs, json_path=json_path, env=env)
        print(
            f"gpu-check: {name}: {'ok' if rec['ok'] else 'FAILED'} in {rec['wall_s']:.0f} s"
            f"{' (timed out)' if rec['timed_out'] else ''}",
            flush=True,
        )
        _write(report_path, report)  # what is known so far, should the next step hang the node
        return rec

    # 1. the GPU tests
    junit = out / "pytest-gpu.xml"
    if junit.exists():
        junit.unlink()
    targets = ["tests"] if dali else ["tests/test_gpu.py"]
    if not dali:
        report["skipped"].append(
            {
                "check": "pytest_gpu (DALI tests)",
                "reason": "nvidia.dali is not installed: only "
                "tests/test_gpu.py runs (its DALI tests skip themselves); test_dali.py and "
                "test_views_registry.py import DALI",
            }
        )
    cmd = [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *targets]
    rec = step("pytest_gpu", cmd, 200)
    if rec is not None:
        rec.update(pytest_counts(junit))
        rec["ok"] = rec["ok"] and rec["failed"] == 0 and rec["errors"] == 0
        report["pytest_gpu"] = rec
    # 2. shards (the benchmarks' data), 3-5. benchmarks: all read through DALI
    dali_checks = ("bench_pipeline", "bench_distill", "bench_train")
    if not dali:
        for name in dali_checks:
            report["skipped"].append(
                {
                    "check": name,
                    "reason": "nvidia.dali is not installed: it reads the shards through the DALI ViewLoader",
                }
            )
    else:
        digits, photos = data / "digits", data / "photos"
        for folder in (digits, photos):  # a folder left by an interrupted check: `sskd shard` refuses it
            if folder.exists() and not (folder / "manifest.json").is_file():
                import shutil

                shutil.rmtree(folder)
        shard_recs = {}
        if not (digits / "manifest.json").is_file():
            shard_recs["digits"] = step(
                "shards_digits", [*sskd, "shard", "digits", str(digits), "--no-progress"], 60
            )
        if not (photos / "manifest.json").is_file():
            shard_recs["photos"] = step(
                "shards_photos",
                [
                    *sskd,
                    "shard",
                    "photos",
                    str(photos),
                    "--classes",
                    "8",
                    "--per-class",
                    "128",
                    "--workers",
                    str(min(cpus, 16)),
                    "--no-progress",
                ],
                90,
            )
        report["shards"] = {"digits": str(digits), "photos": str(photos), "made": shard_recs}
        have_digits, have_photos = (digits / "manifest.json").is_file(), (photos / "manifest.json").is_file()
        # bench pipeline at 224 px: DALI on the GPU against torchvision with every CPU core as workers
        if have_photos:
            j = out / "bench-pipeline.json"
            rec = step(
                "bench_pipeline",
                [
                    *sskd,
                    "bench",
                    "pipeline",
                    "--shards",
                    str(photos),
                    "--device",
                    "gpu",
                    "--views",
                    "paper",
                    "--size",
                    "224",
                    "--batch-size",
                    "32",
                    "--threads",
                    str(cpus),
                    "--images",
                    "2048",
                    "--warmup",
                    "2",
                    "--rounds",
                    "1",
                    "--no-progress",
                    "--json",
                    str(j),
                ],
                120,
                j,
            )
            if rec is not None:
                rec["note"] = (
                    f"DALI device gpu with {cpus} CPU threads vs the torchvision DataLoader with {cpus} "
                    "workers (--threads sets both)"
                )
                report["bench_pipeline"] = rec
        else:
            report["skipped"].append(
                {"check": "bench_pipeline", "reason": "the 224 px photo shards were not made"}
            )
        if have_digits:
            j = out / "bench-distill.json"
            rec = step(
                "bench_distill",
                [
                    *sskd,
                    "bench",
                    "distill",
                    "--shards",
                    str(digits),
                    "--teacher-arch",
                    "resnet32x4",
                    "--student-arch",
                    "resnet8x4",
                    "--steps",
                    "10",
                    "--warmup",
                    "2",
                    "--json",
                    str(j),
                ],
                90,
                j,
            )
            if rec is not None:
                rec["note"] = (
                    "sskd bench distill has no --device option: its models and batches stay on the CPU, "
                    "so these are CPU step times even on a GPU node"
                )
                report["bench_distill"] = rec
        else:
            report["skipped"].append({"check": "bench_distill", "reason": "the digits shards were not made"})
        train = {}
        runs = [
            (
                "digits",
                digits,
                have_digits,
                [
                    "--method",
                    "sskd",
                    "--teacher-arch",
                    "resnet32x4",
                    "--student-arch",
                    "resnet8x4",
                    "--batch-size",
                    "64",
                ],
            ),
            (
                "photos",
                photos,
                have_photos,
                [
                    "--method",
                    "kd",
                    "--teacher-arch",
                    "torchvision:resnet34",
                    "--student-arch",
                    "torchvision:resnet18",
                    "--batch-size",
                    "64",
                ],
            ),
        ]
        for label, folder, have, extra in runs:
            if not have:
                report["skipped"].append(
                    {"check": f"bench_train ({label})", "reason": f"the {label} shards were not made"}
                )
                continue
            j = out / f"bench-train-{label}.json"
            rec = step(
                f"bench_train_{label}",
                [
                    *sskd,
                    "bench",
                    "train",
                    "--shards",
                    str(folder),
                    "--device",
                    "gpu",
                    *extra,
                    "--steps",
                    "10",
                    "--warmup",
                    "2",
                    "--threads",
                    str(min(cpus, 8)),
                    "--json",
                    str(j),
                ],
                90,
                j,
            )
            if rec is not None:
                train[label] = rec
        if train:
            report["bench_train"] = train
    checks = [
        report.get("pytest_gpu"),
        report.get("bench_pipeline"),
        report.get("bench_distill"),
        *(report.get("bench_train") or {}).values(),
    ]
    ran = [c for c in checks if c and c.get("ran", True)]
    report["ok"] = bool(ran) and all(c.get("ok") for c in ran)
    report["wall_s"] = round(time.perf_counter() - t0, 2)
    _write(report_path, report)
    failed = [
        name
        for name in ("pytest_gpu", "bench_pipeline", "bench_distill")
        if report.get(name) and report[name].get("ran", True) and not report[name].get("ok")
    ]
    failed += [f"bench_train ({k})" for k, v in (report.get("bench_train") or {}).items() if not v.get("ok")]
    skipped = ", ".join(s["check"] for s in report["skipped"])
    print(
        f"gpu-check: {'all checks passed' if report['ok'] else 'FAILED: ' + ', '.join(failed) if failed else 'no check ran'}"
        f" in {report['wall_s']:.0f} s{'; skipped: ' + skipped if skipped else ''}; wrote {report_path}"
    )
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
