"""``bash launch/gpu-check.sh [--out DIR] [--wheels DIR] [--budget S]``: the first thing to run on a GPU node.

Written for the node a cluster lends for a few minutes, often with no route to a package index: it runs
under whatever Python the script picked (``$SSKD_VENV``, ``.venv``, or the ``python3`` on the PATH), with the
project taken from the checkout, and imports nothing beyond the standard library itself, so a node without
torch still gets a report saying what is missing. Every check runs as its own process with its own
timeout, cut to what is left of one overall ``--budget`` (default 360 s, wheel installation and shards
included); the report is rewritten after each, so a check that fails or hangs never loses it.

In order (the ones that need no DALI first, so a short lease still measures the GPU side of the loop):

- ``wheels`` (``--wheels DIR``): the wheels ``launch/wheels.sh`` fetched, installed offline into a private
  target folder under ``--out`` (``pip install --no-index --no-deps --target``), which then goes on the
  checks' ``PYTHONPATH``. Wheels of distributions the node already has are left out; of ``DIR/cuda12`` and
  ``DIR/cuda13`` only the one matching ``torch.version.cuda`` is installed (DALI's build follows the CUDA
  major version torch was built with).
- ``packages``: what each check needs, imported in a separate process; a missing one is named, and each
  check that needs it is listed under ``skipped`` with that reason.
- ``shards``: the embedded digits (32 px), and with DALI the bundled photographs (224 px), sharded on the spot.
- ``bench_distill``: ``sskd bench distill --device cuda --data synthetic`` over one method of each family
  (no, fp16 and bf16), and KD torchvision ResNet-34 -> ResNet-18 at 224 px: the compute-bound images/s a
  data pipeline on this GPU has to supply (SSKD's student step at 32 px among them).
- ``pytest_gpu``: ``pytest -m gpu``: ``tests/test_gpu.py`` without DALI (fp16 with loss scaling, bf16, NCCL;
  its DALI tests skip themselves), every GPU test with it.
- ``bench_pipeline`` (DALI): ``sskd bench pipeline --device gpu`` at 224 px with the paper's 4 SS views,
  against the torchvision DataLoader with every CPU core as workers; DALI's GPU pipeline alone in source
  images/s.
- ``bench_train`` (DALI): ``sskd bench train --device gpu`` at 32 and 224 px, with the fraction of the
  loop's time spent waiting for data.

``DIR/gpu-check.json`` holds ``"cuda": true|false``, ``machine``, ``packages``, ``missing``, each check's record
(command, exit status, wall time, timeout, the JSON it wrote, the end of its output; the full output in
``DIR/logs/``), ``skipped`` (``[{"check", "reason"}]``) and ``figures``: every measured number with its device,
precision and batch size. It is kept under 1 MB. Without a CUDA device: one line, ``"cuda": false``, exit
0. Exit status otherwise: 0 when every check that ran passed, 1 if one failed, 2 when torch is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the checkout: sskd/bench/gpu_check.py -> the repository root
TAIL = 3000  # characters of a step's output kept in the JSON
MAX_REPORT = 1_000_000  # bytes: the report is trimmed below this (the logs keep everything)

# What the checks import: import name -> the distribution that provides it.
PACKAGES = {
    "torch": "torch",
    "numpy": "numpy",
    "yaml": "pyyaml",
    "einops": "einops",
    "safetensors": "safetensors",
    "PIL": "pillow",
    "sklearn": "scikit-learn",
    "tqdm": "tqdm",
    "accelerate": "accelerate",
    "pytest": "pytest",
    "pytest_timeout": "pytest-timeout",
    "webdataset": "webdataset",
    "torchvision": "torchvision",
    "nvidia.dali": "nvidia-dali-cuda120 or nvidia-dali-cuda130",
}
_CORE = ["torch", "numpy", "yaml"]
NEEDS = {  # check -> the imports it needs
    "shards": [*_CORE, "PIL", "sklearn", "tqdm"],
    "bench_distill": [*_CORE, "einops", "safetensors", "PIL", "sklearn", "tqdm"],
    "bench_distill (kd_resnet18_224px)": [*_CORE, "einops", "safetensors", "torchvision"],
    "pytest_gpu": [*_CORE, "pytest", "pytest_timeout", "accelerate", "einops", "safetensors"],
    "bench_pipeline": [*_CORE, "nvidia.dali", "webdataset", "torchvision", "PIL", "sklearn", "tqdm"],
    "bench_train": [*_CORE, "nvidia.dali", "accelerate", "einops", "safetensors", "PIL", "sklearn", "tqdm"],
}
CHECKS = ("pytest_gpu", "bench_pipeline", "bench_distill", "bench_train")  # the report's sections

# Run in a fresh process with the checks' environment: what is importable there, and torch's view of CUDA.
PROBE = r"""
import importlib, importlib.metadata as md, json, os, platform, sys
names = json.loads(sys.argv[1])
out = {"python": platform.python_version(), "executable": sys.executable, "packages": {}}
for name in names:
    try:
        mod = importlib.import_module(name)
        out["packages"][name] = {"version": str(getattr(mod, "__version__", "?")),
                                 "from": os.path.dirname(getattr(mod, "__file__", None) or "?")}
    except BaseException as exc:
        out["packages"][name] = {"error": (type(exc).__name__ + ": " + str(exc))[:300]}
try:
    import torch
    t = {"version": torch.__version__, "cuda": torch.version.cuda, "available": torch.cuda.is_available()}
    if t["available"]:
        t["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        t["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        t["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if torch.distributed.is_nccl_available() else None
    out["torch"] = t
except BaseException as exc:
    out["torch"] = {"error": (type(exc).__name__ + ": " + str(exc))[:300]}
try:
    import sskd
    out["sskd_from"] = os.path.dirname(os.path.dirname(sskd.__file__))
except BaseException as exc:
    out["sskd_from"] = None
out["distributions"] = sorted({(d.metadata["Name"] or "").lower().replace("_", "-") for d in md.distributions()})
print(json.dumps(out))
"""


def _write(path: Path, record: dict) -> None:
    """The report, atomically, trimmed under :data:`MAX_REPORT` (the per-check JSON goes first, then the
    output tails; ``figures`` and every check's status stay)."""
    text = json.dumps(record, indent=1) + "\n"
    if len(text) > MAX_REPORT:
        record = json.loads(text)
        for rec in _records(record):
            rec.pop("json", None)
            rec["json_dropped"] = "the report would pass 1 MB: see the check's own JSON file"
        text = json.dumps(record, indent=1) + "\n"
    if len(text) > MAX_REPORT:
        for rec in _records(record):
            rec["output_tail"] = rec.get("output_tail", "")[-300:]
        text = json.dumps(record, indent=1) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def _records(report: dict):
    for name in ("wheels", *CHECKS, "shards"):
        sec = report.get(name)
        if isinstance(sec, dict) and "command" in sec:
            yield sec
        elif isinstance(sec, dict):
            yield from (v for v in sec.values() if isinstance(v, dict) and "command" in v)


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
                returncode=None,
                timed_out=False,
                wall_s=0.0,
                error=str(exc),
                json=None,
                output_tail="",
                ok=False,
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


def probe(env: dict, extra: list[str] = (), timeout: float = 120) -> dict:
    """What the checks' Python can import (in its own process, so a crashing import loses nothing):
    :data:`PACKAGES` and ``extra`` (the top-level modules of the carried wheels)."""
    try:
        proc = subprocess.run(
            [sys.executable, "-c", PROBE, json.dumps([*PACKAGES, *extra])],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO,
            timeout=timeout,
            check=False,
        )
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, ValueError, IndexError) as exc:
        return {"packages": {}, "torch": {"error": f"the package probe failed: {exc}"}, "distributions": []}


def missing_packages(found: dict) -> dict[str, str]:
    """import name -> why it is unusable, for each package the checks need that did not import."""
    out = {}
    for name in PACKAGES:
        rec = found.get(name) or {"error": "not probed"}
        if "error" in rec:
            out[name] = rec["error"]
    return out


# -- wheels carried in ----------------------------------------------------------------------------------

_WHEEL = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-[^-]+-[^-]+-[^-]+\.whl$")


def _dist(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def choose_wheels(folder: Path, cuda: str | None, present: set[str]) -> dict:
    """The wheels of ``folder`` this node needs: ``folder/*.whl`` and ``folder/common/*.whl``, and of
    ``folder/cuda12`` / ``folder/cuda13`` (``launch/wheels.sh`` keeps DALI and its codec and compression
    wheels there) only the CUDA major version torch was built with; distributions in ``present`` (already
    installed on the node) are left out."""
    major = (cuda or "").split(".")[0]
    plan = {"install": [], "present": [], "other_cuda": [], "dali_build": None}
    dirs = [folder, folder / "common"]
    for sub in sorted(folder.glob("cuda*")):
        if sub.is_dir():
            (dirs.append(sub) if sub.name == f"cuda{major}" else plan["other_cuda"].append(sub.name))
    for d in dirs:
        for whl in sorted(d.glob("*.whl")):
            m = _WHEEL.match(whl.name)
            dist = _dist(m["name"]) if m else whl.name
            if dist in present:
                plan["present"].append(whl.name)
                continue
            plan["install"].append(whl)
            if dist.startswith("nvidia-dali-cuda"):
                plan["dali_build"] = (
                    f"{dist} {m['version']}: torch.version.cuda is {cuda}, so the CUDA {major} build"
                    if cuda
                    else f"{dist}: torch reports no CUDA version"
                )
    if plan["other_cuda"] and not any(d.name == f"cuda{major}" for d in dirs):
        plan["dali_build"] = (
            f"none: torch.version.cuda is {cuda}, and {folder} holds only {', '.join(plan['other_cuda'])}; "
            f"fetch the matching one with: bash launch/wheels.sh DIR --cuda {major}"
            if major
            else f"none: without torch (or a CUDA build of it) no CUDA build of DALI can be chosen among "
            f"{', '.join(plan['other_cuda'])}"
        )
    return plan


def top_level_modules(target: Path) -> list[str]:
    """The importable top-level names a wheel install put in ``target`` (packages and modules)."""
    names = []
    for p in sorted(target.iterdir()) if target.is_dir() else []:
        if p.name.endswith((".dist-info", ".data")) or p.name.startswith(("_", ".")) or p.name == "bin":
            continue
        if p.is_dir() and (p / "__init__.py").is_file():
            names.append(p.name)
        elif p.suffix == ".py":
            names.append(p.stem)
    return names


STAMP = ".sskd-wheels"  # in the target folder: the wheels installed there, so a rerun skips the install


def _listing(wheels: list[Path]) -> str:
    return "".join(f"{w.name} {w.stat().st_size}\n" for w in wheels)


def _stamp(target: Path) -> str | None:
    try:
        return (target / STAMP).read_text()
    except OSError:
        return None


def install_wheels(wheels: list[Path], target: Path, env: dict, timeout: float, logs: Path) -> dict:
    """``pip install --no-index --no-deps --target`` (offline); a Python without pip unpacks the wheels
    instead (a wheel is a zip of its install tree: the same files, without entry-point scripts)."""
    target.mkdir(parents=True, exist_ok=True)
    has_pip = (
        subprocess.run(
            [sys.executable, "-m", "pip", "--version"], capture_output=True, env=env, check=False
        ).returncode
        == 0
    )
    if has_pip:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-index",
            "--no-deps",
            "--no-cache-dir",
            "--disable-pip-version-check",
            "--no-warn-script-location",
            "--upgrade",
            "--target",
            str(target),
        ]
        rec = run_step("wheels", [*cmd, *map(str, wheels)], timeout=timeout, logs=logs, env=env)
        rec["how"] = "pip install --no-index --no-deps --target"
        return rec
    t0 = time.perf_counter()
    rec = {"command": f"unzip {len(wheels)} wheels into {target} (this Python has no pip)", "how": "unzip"}
    try:
        for whl in wheels:
            with zipfile.ZipFile(whl) as z:
                z.extractall(target)
            for data in target.glob("*.data"):  # purelib / platlib parts of a wheel's .data folder
                for part in ("purelib", "platlib"):
                    if (data / part).is_dir():
                        shutil.copytree(data / part, target, dirs_exist_ok=True)
                shutil.rmtree(data)
        rec.update(returncode=0, ok=True)
    except (OSError, zipfile.BadZipFile) as exc:
        rec.update(returncode=1, ok=False, error=f"{whl.name}: {exc}")
    rec.update(timed_out=False, wall_s=round(time.perf_counter() - t0, 2), output_tail="")
    return rec


def dali_build(distributions: list[str], torch_cuda: str | None) -> dict | None:
    """Which CUDA build of DALI the checks' Python has, against the CUDA major version of torch's build
    (``nvidia-dali-cuda120`` with a CUDA 13 torch is the wrong one); None without DALI."""
    builds = [d for d in distributions if re.fullmatch(r"nvidia-dali-cuda\d+", d)]
    if not builds:
        return None
    major = (torch_cuda or "").split(".")[0]
    want = f"nvidia-dali-cuda{major}0" if major else None
    return {
        "installed": builds,
        "torch_cuda": torch_cuda,
        "matches": want in builds,
        "note": f"torch.version.cuda is {torch_cuda}: the matching build is {want}"
        if want
        else "torch reports no CUDA version",
    }


# -- the figures ----------------------------------------------------------------------------------------


def figures(report: dict) -> list[dict]:
    """Every measured number of the report, each with its device, precision and batch size."""
    out = []
    for label, rec in (report.get("bench_distill") or {}).items():
        for r in ((rec or {}).get("json") or {}).get("results", []):
            for variant, what in (
                ("ce", "student alone, CE"),
                ("live", "live teacher"),
                ("cached", "teacher from the cache"),
            ):
                out.append(
                    {
                        "figure": f"{r['method']} training step, {what} ({label})",
                        "images_per_s": r[f"{variant}_images_per_s"],
                        "step_s": r[f"{variant}_step_s"],
                        "device": r["device"],
                        "precision": r["precision"],
                        "batch_size": r["batch_size"],
                        "size": r["size"],
                        "views": len(r["views"]),
                        "compute_bound": True,
                    }
                )
    pipe = (report.get("bench_pipeline") or {}).get("json") or {}
    if pipe.get("config"):
        c = pipe["config"]
        for k, what in (
            ("dali", "DALI's GPU pipeline alone (ViewLoader)"),
            ("torchvision", "torchvision DataLoader"),
            ("decode", "DALI decode only"),
            ("floor", "DALI floor"),
        ):
            if k in pipe:
                out.append(
                    {
                        "figure": f"{what}, {c.get('size')} px, {len(c.get('views', []))} views",
                        "source_images_per_s": pipe[k]["images_per_s"],
                        "device": f"{c.get('device')} ({c.get('threads')} CPU threads/workers)",
                        "precision": "float32 views",
                        "batch_size": c.get("batch_size"),
                    }
                )
    for label, rec in (report.get("bench_train") or {}).items():
        j = (rec or {}).get("json") or {}
        if not j.get("config"):
            continue
        c, split = j["config"], j["time_split"]
        total = sum(split.values()) or 1.0
        common = {
            "device": j["machine"].get("training_device"),
            "precision": c["mixed_precision"],
            "batch_size": c["batch_size"],
            "size": c["size"],
            "views": len(c["views"]),
        }
        out.append(
            {
                "figure": f"{c['method']} training fed by DALI ({c['dali_device']}), {label}",
                "images_per_s": j["loader_images_per_s"],
                "data_wait_fraction": round(split["data_wait_s"] / total, 3),
                **common,
            }
        )
        out.append(
            {
                "figure": f"{c['method']} training on preloaded batches, {label}",
                "images_per_s": j["preloaded_images_per_s"],
                **common,
            }
        )
    return out


# -- the check ------------------------------------------------------------------------------------------


class Budget:
    """One overall deadline; each step gets its own timeout, cut to what is left (minus a reserve)."""

    def __init__(self, seconds: float, reserve: float = 5.0):
        self.end = time.monotonic() + seconds
        self.reserve = reserve

    def left(self) -> float:
        return self.end - time.monotonic() - self.reserve

    def timeout(self, own: float) -> float:
        return min(own, self.left())


def child_env(out: Path, target: Path | None) -> dict:
    """The checks' environment: the checkout (and the carried wheels) first on ``PYTHONPATH``, and every
    cache a check could write (bytecode, matplotlib, torch, CUDA's JIT, triton, temporary files) under
    ``out``, so nothing is created outside it."""
    cache = out / "cache"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # the script's own start set it; the checks cache under out
    path = [str(REPO), *([str(target)] if target else []), *filter(None, [os.environ.get("PYTHONPATH")])]
    env["PYTHONPATH"] = os.pathsep.join(path)
    for var, sub in (
        ("PYTHONPYCACHEPREFIX", "pycache"),
        ("MPLCONFIGDIR", "matplotlib"),
        ("XDG_CACHE_HOME", "xdg"),
        ("TORCH_HOME", "torch"),
        ("CUDA_CACHE_PATH", "nv"),
        ("TRITON_CACHE_DIR", "triton"),
        ("TORCHINDUCTOR_CACHE_DIR", "inductor"),
        ("TMPDIR", "tmp"),
    ):
        env[var] = str(cache / sub)
        (cache / sub).mkdir(parents=True, exist_ok=True)
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="gpu-check",
        description=__doc__.split("\n\n")[0],
        epilog="launch/gpu-check.sh also takes --make-venv: with no $SSKD_VENV and no .venv, make .venv with "
        "launch/venv.sh first (downloads ~6 GB) instead of using the python3 on the PATH",
    )
    p.add_argument(
        "--out", default="gpu-check", help="folder for gpu-check.json, logs, shards, the wheel target"
    )
    p.add_argument(
        "--budget", type=float, default=360.0, help="seconds for everything, wheels and shards included"
    )
    p.add_argument(
        "--wheels", help="folder made by launch/wheels.sh: installed offline into OUT/site-packages"
    )
    args = p.parse_args(argv)
    budget = Budget(args.budget)
    t0 = time.perf_counter()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    report_path, logs, data = out / "gpu-check.json", out / "logs", out / "data"
    target = out / "site-packages" if args.wheels else None
    env = child_env(out, target)
    report: dict = {
        "cuda": False,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "budget_s": args.budget,
        "python": sys.executable,
        "checkout": str(REPO),
        "skipped": [],
    }
    found = probe(child_env(out, None))  # the node's own packages (a target from an earlier run not counted)
    if args.wheels:
        folder = Path(args.wheels).resolve()
        torch_cuda = (found.get("torch") or {}).get("cuda")
        present = set(found.get("distributions", []))
        plan = choose_wheels(folder, torch_cuda, present)
        rec: dict = {
            "folder": str(folder),
            "target": str(target),
            "dali_build": plan["dali_build"],
            "present_on_node": plan["present"],
            "other_cuda_left_out": plan["other_cuda"],
            "installed": [w.name for w in plan["install"]],
        }
        if not folder.is_dir():
            rec.update(ok=False, error=f"{folder}: no such folder of wheels")
        elif plan["install"] and _stamp(target) == _listing(plan["install"]):
            rec.update(ok=True, note=f"installed in {target} by an earlier run (the same wheels)")
        elif plan["install"]:
            rec.update(install_wheels(plan["install"], target, env, budget.timeout(150), logs))
            if rec.get("ok"):
                (target / STAMP).write_text(_listing(plan["install"]))
        else:
            rec.update(ok=True, note="nothing to install: every wheel's distribution is on the node already")
        report["wheels"] = rec
        print(
            f"gpu-check: wheels: {'ok' if rec.get('ok') else 'FAILED'}; DALI: {plan['dali_build']}",
            file=sys.stderr,
        )
        carried = top_level_modules(target)
        found = probe(env, carried)
        rec["imports"] = {n: found.get("packages", {}).get(n) for n in carried}
    torch_info = found.get("torch") or {}
    missing = missing_packages(found.get("packages", {}))
    report.update(
        machine={
            "cpus": os.cpu_count(),
            "python": found.get("python"),
            "torch": torch_info,
            "host": os.uname().nodename,
            "load_avg_1m": round(os.getloadavg()[0], 2),
        },
        packages={k: v for k, v in found.get("packages", {}).items() if k in PACKAGES},
        missing=[{"import": k, "package": PACKAGES[k], "error": v} for k, v in missing.items()],
        sskd_from=found.get("sskd_from"),
    )
    report["dali_build"] = dali_build(found.get("distributions", []), torch_info.get("cuda"))
    cuda = bool(torch_info.get("available"))
    report["cuda"] = cuda
    dali = "nvidia.dali" not in missing

    def needs(check: str) -> list[str]:
        return [n for n in NEEDS[check] if n in missing]

    def skip(check: str, reason: str) -> None:
        report["skipped"].append({"check": check, "reason": reason})

    def lacking(check: str) -> str:
        gone = [PACKAGES[n] if PACKAGES[n] == n else f"{PACKAGES[n]} ({n})" for n in needs(check)]
        return f"missing: {', '.join(gone)}" if gone else ""

    if not cuda:
        why = (
            ("torch is not importable: " + torch_info["error"])
            if "error" in torch_info
            else "torch.cuda.is_available() is False"
        )
        for check in CHECKS:
            skip(check, "; ".join(filter(None, ["no CUDA device", lacking(check)])))
        report.update(
            message=f"no CUDA device visible ({why}): nothing to check on this machine",
            wall_s=round(time.perf_counter() - t0, 2),
            ok="error" not in torch_info,
        )
        report["figures"] = []
        _write(report_path, report)
        print(f'gpu-check: no CUDA device visible ({why}); wrote {report_path} with "cuda": false')
        return 2 if "error" in torch_info else 0
    py = sys.executable
    sskd = [py, "-m", "sskd"]
    cpus = os.cpu_count() or 1

    def step(name, cmd, own, json_path=None):
        left = budget.timeout(own)
        if left < 5:
            skip(name, f"out of time: {budget.left():.0f} s of the {args.budget:.0f} s budget left")
            return None
        print(f"gpu-check: {name} (up to {left:.0f} s) ...", file=sys.stderr, flush=True)
        rec = {"check": name, **run_step(name, cmd, timeout=left, logs=logs, json_path=json_path, env=env)}
        print(
            f"gpu-check: {name}: {'ok' if rec['ok'] else 'FAILED'} in {rec['wall_s']:.0f} s"
            f"{' (timed out)' if rec['timed_out'] else ''}",
            file=sys.stderr,
            flush=True,
        )
        return rec

    def save():  # what is known so far, should the next step hang the node
        report["figures"] = figures(report)
        report["wall_s"] = round(time.perf_counter() - t0, 2)
        _write(report_path, report)

    save()
    # 1. shards: digits always (bench distill reads their classes and labels), photos for the DALI benches
    digits, photos = data / "digits", data / "photos"
    for folder in (digits, photos):  # a folder left by an interrupted check: `sskd shard` refuses it
        if folder.exists() and not (folder / "manifest.json").is_file():
            shutil.rmtree(folder)
    made = {}
    if lacking("shards"):
        skip("shards", lacking("shards"))
    else:
        if not (digits / "manifest.json").is_file():
            made["digits"] = step(
                "shards_digits", [*sskd, "shard", "digits", str(digits), "--no-progress"], 60
            )
        if dali and not (photos / "manifest.json").is_file():
            made["photos"] = step(
                "shards_photos",
                [
                    *sskd,
                    "shard",
                    "photos",
                    str(photos),
                    "--classes",
                    "8",
                    "--per-class",
                    "64",
                    "--workers",
                    str(min(cpus, 16)),
                    "--no-progress",
                ],
                60,
            )
    report["shards"] = {"digits": str(digits), "photos": str(photos), **made}
    have_digits, have_photos = (digits / "manifest.json").is_file(), (photos / "manifest.json").is_file()
    save()
    # 2. the GPU side of the loop, no DALI needed: one method per family, and KD ResNet-18 at 224 px
    distill = {}
    common = [
        "--device",
        "cuda",
        "--data",
        "synthetic",
        "--mixed-precision",
        "no,fp16,bf16",
        "--batch-size",
        "64",
        "--steps",
        "10",
        "--warmup",
        "2",
    ]
    runs = [
        (
            "families_32px",
            "bench_distill",
            ["--method", "all", "--teacher-arch", "resnet32x4", "--student-arch", "resnet8x4"],
            120,
        ),
        (
            "kd_resnet18_224px",
            "bench_distill (kd_resnet18_224px)",
            [
                "--method",
                "kd",
                "--teacher-arch",
                "torchvision:resnet34",
                "--student-arch",
                "torchvision:resnet18",
                "--size",
                "224",
            ],
            90,
        ),
    ]
    for label, check, extra, own in runs:
        if lacking(check) or not have_digits:
            skip(
                check if label == "families_32px" else f"bench_distill ({label})",
                lacking(check) or "the digits shards (classes and labels) were not made",
            )
            continue
        j = out / f"bench-distill-{label}.json"
        rec = step(
            f"bench_distill_{label}",
            [*sskd, "bench", "distill", "--shards", str(digits), *extra, *common, "--json", str(j)],
            own,
            j,
        )
        if rec is not None:
            distill[label] = rec
            report["bench_distill"] = distill
            save()
    # 3. the GPU tests: precision, loss scaling, NCCL (and with DALI every GPU test)
    if lacking("pytest_gpu"):
        skip("pytest_gpu", lacking("pytest_gpu"))
    else:
        junit = out / "pytest-gpu.xml"
        if junit.exists():
            junit.unlink()
        targets = ["tests"] if dali else ["tests/test_gpu.py"]
        if not dali:
            skip(
                "pytest_gpu (DALI tests)",
                "nvidia.dali is not installed: only tests/test_gpu.py runs (its "
                "DALI tests skip themselves); test_dali.py and test_views_registry.py import DALI",
            )
        cmd = [
            py,
            "-m",
            "pytest",
            "-m",
            "gpu",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--junitxml={junit}",
            *targets,
        ]
        rec = step("pytest_gpu", cmd, 150 if dali else 90)
        if rec is not None:
            rec.update(pytest_counts(junit))
            rec["ok"] = rec["ok"] and rec["failed"] == 0 and rec["errors"] == 0 and rec["passed"] > 0
            if rec["passed"] == 0:  # on a GPU node every GPU test skipping means CUDA was not seen there
                rec["note"] = "no GPU test passed: all were skipped or none was collected"
            report["pytest_gpu"] = rec
            save()
    # 4. with DALI: the pipeline on the GPU alone, and the training loop fed by it
    if lacking("bench_pipeline"):
        skip("bench_pipeline", lacking("bench_pipeline"))
    elif not have_photos:
        skip("bench_pipeline", "the 224 px photo shards were not made")
    else:
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
                "1024",
                "--warmup",
                "2",
                "--rounds",
                "1",
                "--no-progress",
                "--json",
                str(j),
            ],
            90,
            j,
        )
        if rec is not None:
            rec["note"] = (
                f"DALI device gpu with {cpus} CPU threads vs the torchvision DataLoader with {cpus} "
                "workers (--threads sets both); 'dali' is the GPU pipeline alone, in source images/s"
            )
            report["bench_pipeline"] = rec
            save()
    train = {}
    for label, folder, have, extra in (
        (
            "digits_32px",
            digits,
            have_digits,
            ["--method", "sskd", "--teacher-arch", "resnet32x4", "--student-arch", "resnet8x4"],
        ),
        (
            "photos_224px",
            photos,
            have_photos,
            [
                "--method",
                "kd",
                "--teacher-arch",
                "torchvision:resnet34",
                "--student-arch",
                "torchvision:resnet18",
            ],
        ),
    ):
        if lacking("bench_train"):
            skip(f"bench_train ({label})", lacking("bench_train"))
            continue
        if not have:
            skip(f"bench_train ({label})", f"the {label.split('_')[0]} shards were not made")
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
                "--batch-size",
                "64",
                "--steps",
                "10",
                "--warmup",
                "2",
                "--threads",
                str(min(cpus, 8)),
                "--json",
                str(j),
            ],
            75,
            j,
        )
        if rec is not None:
            train[label] = rec
            report["bench_train"] = train
            save()
    ran = [
        r
        for r in [
            report.get("wheels"),
            report.get("pytest_gpu"),
            report.get("bench_pipeline"),
            *distill.values(),
            *train.values(),
        ]
        if r
    ]
    report["ok"] = bool(ran) and all(r.get("ok") for r in ran)
    save()
    failed = [r.get("check", "wheels") for r in ran if not r.get("ok")]
    skipped = ", ".join(s["check"] for s in report["skipped"])
    print(
        f"gpu-check: {'all checks passed' if report['ok'] else 'FAILED: ' + '; '.join(failed) if failed else 'no check ran'}"
        f" in {report['wall_s']:.0f} s{'; skipped: ' + skipped if skipped else ''}; wrote {report_path}"
    )
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
