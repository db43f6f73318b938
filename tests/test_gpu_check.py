"""``launch/gpu-check.sh`` as a bare GPU node runs it, ``launch/wheels.sh --dry-run`` and ``sskd bench distill
--device``, on a machine without CUDA: the node's own Python from a checkout with no ``.venv`` (nothing
downloaded, nothing made outside ``--out``), wheels carried in and installed offline into the check's target
folder, the report of missing packages, and the step-time bench on the CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the script runs every check")


def _checkout(tmp_path: Path) -> Path:
    """A copy of the checkout without .venv, caches or build output (what a user carries to the node)."""
    dst = tmp_path / "checkout"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".venv", ".git", "site", "gpu-check")
    for name in ("sskd", "pipelines", "shards", "launch", "tests"):
        shutil.copytree(REPO / name, dst / name, ignore=skip)
    shutil.copy(REPO / "pyproject.toml", dst / "pyproject.toml")
    return dst


def _tree(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


def _node_env(tmp_path: Path, **extra) -> dict:
    """The environment of a bare node whose ``python3`` is this test's Python (torch, no CUDA): an empty
    HOME, no SSKD_VENV, and package indexes that cannot be reached (a download would fail loudly)."""
    bin_dir, home = tmp_path / "bin", tmp_path / "home"
    bin_dir.mkdir(exist_ok=True)
    home.mkdir(exist_ok=True)
    shim = bin_dir / "python3"  # a wrapper, not a link: a venv's python finds its pyvenv.cfg by its own path
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    shim.chmod(0o755)
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "SSKD_", "PYTHON", "VIRTUAL_ENV"))
    }
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        HOME=str(home),
        PIP_INDEX_URL="http://127.0.0.1:9/simple",
        PIP_NO_INDEX="1",
        CUDA_VISIBLE_DEVICES="",
        **extra,
    )
    return env


def _gpu_check(checkout: Path, cwd: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(checkout / "launch" / "gpu-check.sh"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _wheel(folder: Path, dist: str, module: str, version: str = "0.1") -> Path:
    """A tiny pure-Python wheel: ``module`` with ``__version__``, its dist-info (METADATA, WHEEL, RECORD)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{dist.replace('-', '_')}-{version}-py3-none-any.whl"
    info = f"{dist.replace('-', '_')}-{version}.dist-info"
    files = {
        f"{module}/__init__.py": f'__version__ = "{version}"\n',
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{n},,\n" for n in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


@no_cuda
def test_bare_checkout_with_the_node_python_creates_and_downloads_nothing(tmp_path):
    """No .venv, no SSKD_VENV: the python3 on the PATH runs the check from the checkout (not an installed
    sskd); "cuda": false, exit 0, one line; the checkout, HOME and the working folder unchanged."""
    checkout, cwd = _checkout(tmp_path), tmp_path / "cwd"
    cwd.mkdir()
    env = _node_env(tmp_path)
    before = _tree(checkout)
    proc = _gpu_check(checkout, cwd, env, "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0], proc.stdout
    report = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    assert report["cuda"] is False and report["ok"] is True and report["missing"] == []
    assert report["sskd_from"] == str(checkout) and report["python"] == sys.executable
    assert report["machine"]["torch"]["version"] == torch.__version__
    assert {s["check"] for s in report["skipped"]} == {
        "pytest_gpu",
        "bench_pipeline",
        "bench_distill",
        "bench_train",
    }
    assert _tree(checkout) == before and not (checkout / ".venv").exists()
    assert list((tmp_path / "home").iterdir()) == [] and list(cwd.iterdir()) == []


@no_cuda
def test_missing_packages_are_named_and_their_checks_skipped(tmp_path):
    """A node whose Python cannot import webdataset or scikit-learn: the report names both, and each check that
    needs one says so in its skip reason (the GPU tests need neither)."""
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(  # found (torch's find_spec scans stay quiet), fails to import
        "import importlib.abc, importlib.util, sys\n"
        "class _Block(importlib.abc.MetaPathFinder, importlib.abc.Loader):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('webdataset', 'sklearn'):\n"
        "            return importlib.util.spec_from_loader(name, self)\n"
        "    def create_module(self, spec):\n"
        "        raise ModuleNotFoundError(f'{spec.name} is blocked for this test', name=spec.name)\n"
        "    def exec_module(self, module):\n"
        "        pass\n"
        "sys.meta_path.insert(0, _Block())\n"
    )
    checkout = _checkout(tmp_path)
    env = _node_env(tmp_path, PYTHONPATH=str(block))
    proc = _gpu_check(checkout, tmp_path, env, "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    missing = {m["import"]: m for m in report["missing"]}
    assert missing.keys() == {"webdataset", "sklearn"}, report["missing"]
    assert missing["sklearn"]["package"] == "scikit-learn" and "blocked" in missing["sklearn"]["error"]
    reasons = {s["check"]: s["reason"] for s in report["skipped"]}
    assert "webdataset" in reasons["bench_pipeline"] and "scikit-learn" in reasons["bench_pipeline"]
    assert "scikit-learn" in reasons["bench_distill"] and "webdataset" not in reasons["bench_distill"]
    assert reasons["pytest_gpu"] == "no CUDA device"


@no_cuda
@pytest.mark.slow
def test_carried_wheels_are_installed_offline_into_the_target(tmp_path):
    """--wheels DIR: a fabricated wheel installed with pip --no-index into OUT/site-packages and importable
    from there by the checks; of DIR/cuda12 and DIR/cuda13 only torch's CUDA major is taken; a wheel of a
    distribution the node has (einops) is left out; a second run finds them installed."""
    wheels = tmp_path / "wheels"
    _wheel(wheels / "common", "sskd-tiny-probe", "sskd_tiny_probe")
    _wheel(wheels / "common", "einops", "einops", "0.0.1")
    _wheel(wheels / "cuda12", "sskd-tiny-codec-cu12", "sskd_tiny_codec_cu12")
    _wheel(wheels / "cuda13", "sskd-tiny-codec-cu13", "sskd_tiny_codec_cu13")
    checkout, out = _checkout(tmp_path), tmp_path / "out"
    env = _node_env(tmp_path)
    proc = _gpu_check(checkout, tmp_path, env, "--out", str(out), "--wheels", str(wheels))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    report = json.loads((out / "gpu-check.json").read_text())
    w = report["wheels"]
    major = torch.version.cuda.split(".")[0] if torch.version.cuda else None
    chosen = [f"sskd_tiny_codec_cu{major}-0.1-py3-none-any.whl"] if major in ("12", "13") else []
    assert w["ok"] and "--no-index" in w["command"] and "--no-deps" in w["command"], w
    assert sorted(w["installed"]) == sorted(["sskd_tiny_probe-0.1-py3-none-any.whl", *chosen])
    assert w["present_on_node"] == ["einops-0.0.1-py3-none-any.whl"]
    assert w["imports"]["sskd_tiny_probe"]["from"] == str(out / "site-packages" / "sskd_tiny_probe")
    assert (out / "site-packages" / "sskd_tiny_probe" / "__init__.py").is_file()
    assert not (out / "site-packages" / "einops").exists()
    assert report["packages"]["einops"]["version"] != "0.0.1"  # the node's own einops is untouched
    again = _gpu_check(checkout, tmp_path, env, "--out", str(out), "--wheels", str(wheels))
    assert again.returncode == 0
    assert "earlier run" in json.loads((out / "gpu-check.json").read_text())["wheels"]["note"]


def test_choose_wheels_follows_torch_cuda_major(tmp_path):
    from sskd.bench.gpu_check import choose_wheels

    for sub, dist in (
        ("common", "webdataset"),
        ("cuda12", "nvidia-dali-cuda120"),
        ("cuda13", "nvidia-dali-cuda130"),
    ):
        _wheel(tmp_path / sub, dist, dist.replace("-", "_"), "2.4.0")
    plan = choose_wheels(tmp_path, "12.4", set())
    assert [w.name for w in plan["install"]] == [
        "webdataset-2.4.0-py3-none-any.whl",
        "nvidia_dali_cuda120-2.4.0-py3-none-any.whl",
    ]
    assert plan["other_cuda"] == ["cuda13"] and "torch.version.cuda is 12.4" in plan["dali_build"]
    plan = choose_wheels(tmp_path, "13.0", {"webdataset"})
    assert [w.name for w in plan["install"]] == ["nvidia_dali_cuda130-2.4.0-py3-none-any.whl"]
    assert plan["present"] == ["webdataset-2.4.0-py3-none-any.whl"]
    shutil.rmtree(tmp_path / "cuda13")
    assert "--cuda 13" in choose_wheels(tmp_path, "13.0", set())["dali_build"]


def test_an_installed_dali_build_is_checked_against_torch_cuda():
    from sskd.bench.gpu_check import dali_build

    assert dali_build(["torch"], "12.4") is None
    wrong = dali_build(["nvidia-dali-cuda120", "torch"], "13.0")
    assert not wrong["matches"] and "nvidia-dali-cuda130" in wrong["note"]
    assert dali_build(["nvidia-dali-cuda120"], "12.8")["matches"]


def test_report_stays_under_a_megabyte_and_every_figure_names_device_precision_batch(tmp_path):
    from sskd.bench.gpu_check import MAX_REPORT, _write, figures

    result = {
        "method": "kd",
        "device": "cuda (test)",
        "precision": "bf16",
        "batch_size": 64,
        "size": 224,
        "views": ["normal"],
        **{f"{v}_images_per_s": 10.0 for v in ("ce", "live", "cached")},
        **{f"{v}_step_s": 0.1 for v in ("ce", "live", "cached")},
    }
    train = {
        "loader_images_per_s": 5.0,
        "preloaded_images_per_s": 6.0,
        "time_split": {"data_wait_s": 1.0, "step_s": 3.0, "logging_s": 0.0},
        "machine": {"training_device": "cuda:0"},
        "config": {
            "method": "sskd",
            "dali_device": "gpu",
            "mixed_precision": "no",
            "batch_size": 64,
            "size": 32,
            "views": ["a"] * 4,
        },
    }
    report = {
        "bench_distill": {"x": {"command": "c", "json": {"results": [result]}, "output_tail": "y" * 900_000}},
        "bench_train": {"digits": {"command": "c", "json": train, "output_tail": "z" * 900_000}},
    }
    figs = figures(report)
    assert len(figs) == 5 and all({"device", "precision", "batch_size"} <= f.keys() for f in figs)
    assert figs[3]["data_wait_fraction"] == 0.25
    _write(tmp_path / "r.json", {**report, "figures": figs})
    text = (tmp_path / "r.json").read_text()
    assert len(text) < MAX_REPORT and json.loads(text)["figures"] == figs


def test_wheels_dry_run_lists_both_cuda_builds_and_downloads_nothing(tmp_path):
    env = dict(os.environ, PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_NO_INDEX="1")
    run = lambda *a: subprocess.run(  # noqa: E731
        ["bash", str(REPO / "launch" / "wheels.sh"), str(tmp_path / "w"), *a],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    proc = run("--dry-run", "--python", "3.12")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for name in (
        "nvidia-dali-cuda120==",
        "nvidia-nvimgcodec-cu12==",
        "nvidia-nvjpeg-cu12==",
        "nvidia-libnvcomp-cu12==",
        "nvidia-dali-cuda130==",
        "nvidia-nvimgcodec-cu13==",
        "nvidia-nvjpeg==",
        "nvidia-libnvcomp-cu13==",
        "webdataset==",
        "accelerate==",
        "pytest-timeout==",
    ):
        assert f"  {name}" in out, name
    assert "torch" not in out.replace("pytest", "")  # the node has torch; torchvision must match it
    assert not (tmp_path / "w").exists()
    one = run("--dry-run", "--cuda", "12", "--python", "3.10")
    assert one.returncode == 0 and "cuda120" in one.stdout and "cuda130" not in one.stdout
    assert "  numpy==2.2.6" in one.stdout and "  tomli==" in one.stdout  # Python 3.10's own releases
    bad = run("--dry-run", "--cuda", "11")
    assert bad.returncode == 2 and "CUDA 12 or 13" in bad.stderr


def _bench(digits_shards, tmp_path, *extra):
    from sskd.cli import main

    out = tmp_path / "b.json"
    args = [
        "bench",
        "distill",
        "--shards",
        str(digits_shards),
        "--teacher-arch",
        "resnet8",
        "--student-arch",
        "resnet8",
        "--batch-size",
        "8",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--json",
        str(out),
        *extra,
    ]
    return main(args), out


@no_cuda
def test_bench_distill_device_cpu_and_auto_on_the_cpu(digits_shards, tmp_path, capsys):
    """--device cpu, and auto (the CPU here), synthetic views, two precisions: every result names its device,
    precision and batch size and has positive step times and images/s; --device cuda is one line."""
    code, out = _bench(
        digits_shards,
        tmp_path,
        "--device",
        "cpu",
        "--method",
        "kd",
        "--data",
        "synthetic",
        "--mixed-precision",
        "no,bf16",
    )
    assert code == 0
    res = json.loads(out.read_text())
    assert [(r["method"], r["precision"]) for r in res["results"]] == [("kd", "no"), ("kd", "bf16")]
    for r in res["results"]:
        assert r["device"].startswith("cpu") and r["batch_size"] == 8 and r["size"] == 32
        assert r["cached_images_per_s"] > 0 and r["live_step_s"] > 0 and r["ce_step_s"] > 0
    code, out = _bench(digits_shards, tmp_path, "--device", "auto", "--method", "kd")  # the DALI loader
    res = json.loads(out.read_text())
    assert code == 0 and res["device"].startswith("cpu") and res["precision"] == "no"
    assert res["config"]["data"] == "loader" and res["views"] == ["normal"] and len(res["results"]) == 1
    assert (
        res["live_step_s"] == res["results"][0]["live_step_s"]
    )  # one method: its keys at the top, as before
    capsys.readouterr()
    assert _bench(digits_shards, tmp_path, "--device", "cuda")[0] == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert _bench(digits_shards, tmp_path, "--device", "cpu", "--mixed-precision", "fp16")[0] == 2
    assert _bench(digits_shards, tmp_path, "--method", "kd,nope")[0] == 2


@pytest.mark.slow
def test_bench_distill_every_family_on_the_cpu(digits_shards, tmp_path):
    """--method all: one method of each family (SSKD, HSSAKD, KD, DKD, CRD, FitNet) timed on synthetic views."""
    code, out = _bench(digits_shards, tmp_path, "--device", "cpu", "--method", "all", "--data", "synthetic")
    assert code == 0
    res = json.loads(out.read_text())
    assert [r["method"] for r in res["results"]] == ["sskd", "hssakd", "kd", "dkd", "crd", "fitnet"]
    assert res["config"]["method"] == "all" and "cache_refused_by_sskd_cache" in res["results"][-1]


@no_cuda
@pytest.mark.slow
def test_every_check_runs_and_is_recorded_when_cuda_is_reported(tmp_path, monkeypatch, capsys):
    """The GPU node's path on this CPU machine, the probe told that CUDA is there: the shards are made, every
    check runs in its own process and is recorded (command, exit status, log); the GPU benches fail in one
    line (no CUDA device), the GPU tests all skip (not a pass), so the exit status is 1."""
    from sskd.bench import gpu_check

    real = gpu_check.probe

    def probe(env, extra=(), timeout=120):
        found = real(env, extra, timeout)
        found["torch"]["available"] = True
        return found

    monkeypatch.setattr(gpu_check, "probe", probe)
    out = tmp_path / "out"
    assert gpu_check.main(["--out", str(out), "--budget", "600"]) == 1
    report = json.loads((out / "gpu-check.json").read_text())
    assert report["cuda"] is True and report["ok"] is False and report["skipped"] == []
    assert report["shards"]["digits"]["ok"] and report["shards"]["photos"]["ok"]
    recs = [
        report["pytest_gpu"],
        report["bench_pipeline"],
        *report["bench_distill"].values(),
        *report["bench_train"].values(),
    ]
    assert len(recs) == 6 and all(Path(r["log"]).is_file() and not r["ok"] for r in recs)
    assert set(report["bench_distill"]) == {"families_32px", "kd_resnet18_224px"}
    assert "--device cuda" in report["bench_distill"]["families_32px"]["command"]
    assert "no CUDA device" in report["bench_distill"]["families_32px"]["output_tail"]
    assert report["pytest_gpu"]["passed"] == 0 and "no GPU test passed" in report["pytest_gpu"]["note"]
    assert report["figures"] == [] and "FAILED" in capsys.readouterr().out
