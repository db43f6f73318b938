"""``sskd bench train`` (a tiny CPU run) and ``launch/gpu-check.sh`` on a machine without a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sskd.cli import main as sskd_main
from sskd.core.errors import SSKDError

REPO = Path(__file__).resolve().parents[1]


def test_bench_train_tiny_run_writes_the_json(digits_shards, tmp_path):
    out = tmp_path / "train.json"
    assert (
        sskd_main(
            [
                "bench",
                "train",
                "--shards",
                str(digits_shards),
                "--method",
                "kd",
                "--teacher-arch",
                "resnet8",
                "--student-arch",
                "resnet8",
                "--cache",
                "--steps",
                "3",
                "--warmup",
                "1",
                "--batch-size",
                "16",
                "--log-every",
                "2",
                "--device",
                "cpu",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    for key in ("loader_images_per_s", "preloaded_images_per_s", "ratio", "time_split", "config", "machine"):
        assert key in res, key
    assert set(res["time_split"]) == {"data_wait_s", "step_s", "logging_s"}
    assert res["ratio"] > 0 and res["loader_images_per_s"] > 0 and res["preloaded_images_per_s"] > 0
    assert res["time_split"]["step_s"] > 0 and res["time_split"]["data_wait_s"] >= 0
    # 3 timed steps per variant over two runs each (2 + 1), batch 16
    assert res["timed_images"] == {"loader": 48, "preloaded": 48}
    assert res["config"]["cache"] is True and res["config"]["dali_device"] == "cpu"
    assert res["config"]["order"] == ["loader", "preloaded", "preloaded", "loader"]
    assert res["metrics_lines"] >= 4  # the loop's metrics line: at least at the end of every run


def test_bench_train_refuses_more_steps_than_an_epoch(digits_shards):
    from types import SimpleNamespace

    from sskd.bench.train import run_bench

    args = SimpleNamespace(
        shards=digits_shards,
        method="ce",
        teacher_arch="resnet8",
        student_arch="resnet8",
        cache=False,
        views="auto",
        size=None,
        batch_size=512,
        steps=10,
        warmup=2,
        log_every=5,
        device="cpu",
        threads=1,
        mixed_precision="no",
        json=None,
    )
    with pytest.raises(SSKDError, match="lower --steps"):
        run_bench(args)
    args.method, args.cache, args.batch_size = "ce", True, 16
    with pytest.raises(SSKDError, match="no teacher outputs"):
        run_bench(args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the script runs every check")
def test_gpu_check_without_a_gpu_says_so_in_one_line(tmp_path):
    proc = subprocess.run(
        ["bash", str(REPO / "launch" / "gpu-check.sh"), "--out", "tmp"],
        cwd=tmp_path,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0], proc.stdout
    report = json.loads((tmp_path / "tmp" / "gpu-check.json").read_text())  # --out is relative to the caller
    assert report["cuda"] is False and report["ok"] is True
    assert {s["check"] for s in report["skipped"]} == {
        "pytest_gpu",
        "bench_pipeline",
        "bench_distill",
        "bench_train",
    }


def test_gpu_check_step_records_exit_json_and_timeout(tmp_path):
    from sskd.bench.gpu_check import run_step

    j = tmp_path / "out.json"
    code = f"import json; json.dump({{'x': 1}}, open({str(j)!r}, 'w')); print('hello')"
    rec = run_step("ok", [sys.executable, "-c", code], timeout=60, logs=tmp_path / "logs", json_path=j)
    assert rec["returncode"] == 0 and rec["ok"] and rec["json"] == {"x": 1} and "hello" in rec["output_tail"]
    assert not rec["timed_out"] and rec["wall_s"] >= 0
    rec = run_step(
        "slow", [sys.executable, "-c", "import time; time.sleep(60)"], timeout=1, logs=tmp_path / "logs"
    )
    assert rec["timed_out"] and not rec["ok"] and rec["wall_s"] < 30
    rec = run_step(
        "bad",
        [sys.executable, "-c", "raise SystemExit(3)"],
        timeout=60,
        logs=tmp_path / "logs",
        json_path=tmp_path / "none.json",
    )
    assert rec["returncode"] == 3 and not rec["ok"] and rec["json"] is None


def test_gpu_check_reads_pytest_counts(tmp_path):
    from sskd.bench.gpu_check import pytest_counts

    xml = tmp_path / "junit.xml"
    xml.write_text("""<?xml version="1.0"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_gpu" name="test_a"/>
<testcase classname="tests.test_gpu" name="test_b"><failure message="boom"/></testcase>
<testcase classname="tests.test_gpu" name="test_c"><skipped message="no dali"/></testcase>
<testcase classname="tests.test_x" name="test_d"><error message="fixture"/></testcase>
</testsuite></testsuites>""")
    counts = pytest_counts(xml)
    assert (counts["passed"], counts["failed"], counts["skipped"], counts["errors"]) == (1, 1, 1, 1)
    assert counts["failing"] == ["tests.test_gpu::test_b", "tests.test_x::test_d"]
    assert pytest_counts(tmp_path / "missing.xml")["passed"] == 0
