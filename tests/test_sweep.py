"""sskd sweep (spec, plan, dry run, resumable execution) and sskd report (numbers equal the runs')."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from sskd.cli import main as sskd_main
from sskd.core.errors import SSKDError
from sskd.experiments.sweep import load_spec, plan

REPO = Path(__file__).resolve().parents[1]


def write_spec(path, **spec):
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"shards": "x", "methods": ["ce"], "seedz": [0]}, "unknown key 'seedz'"),
        ({"shards": "x", "methods": ["nope"]}, "methods[0]: 'nope' is not a distill method"),
        ({"shards": "x", "methods": ["ce"], "seeds": [-1]}, "seeds: a list of non-negative integers"),
        ({"methods": ["ce"]}, "shards is required"),
        ({"shards": "x", "methods": ["kd", {"name": "kd"}]}, "two entries share a label"),
    ],
)
def test_a_bad_spec_is_one_line_naming_the_file(tmp_path, spec, message):
    path = write_spec(tmp_path / "spec.yaml", **spec)
    with pytest.raises(SSKDError, match=message.replace("[", r"\[").replace("]", r"\]")) as err:
        load_spec(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_the_plan_shares_teachers_and_heads_and_puts_settings_on_students_only(tmp_path, digits_shards):
    spec = load_spec(
        write_spec(
            tmp_path / "s.yaml",
            shards=str(digits_shards),
            pairs=[{"teacher": "resnet20", "student": "resnet8"}],
            methods=[
                "ce",
                "kd",
                "sskd",
                "hssakd",
                {"name": "sskd", "label": "sskd-lr", "set": {"student.lr": 0.1}},
                {"name": "sskd", "label": "sskd-k50", "set": {"sskd.ss_ratio": 0.5}},
            ],
            seeds=[0, 1],
            settings={"full": {}, "few25": {"data.subset_fraction": 0.25}},
            set={"student.epochs": 2},
        )
    )
    runs = plan(spec, tmp_path / "out")
    kinds = [r.kind for r in runs]
    # sskd's SS head and hssakd's branches once each; sskd-lr shares sskd's head (a student-only key), while
    # sskd-k50 sets the section the head stage reads too, so it gets a head of its own
    assert kinds.count("teacher") == 1 and kinds.count("head") == 3
    assert kinds.count("student") == 2 * 6 * 2
    heads = {r.folder.name: r for r in runs if r.kind == "head"}
    k50 = next(name for name in heads if name.startswith("resnet20-sskd-"))
    assert set(heads) == {"resnet20-sskd", "resnet20-hssakd", k50}
    assert "sskd.ss_ratio=0.5" in heads[k50].args
    lr_run = next(r for r in runs if r.meta.get("label") == "sskd-lr")
    assert lr_run.args[lr_run.args.index("--teacher") + 1] == str(heads["resnet20-sskd"].folder)
    teacher = next(r for r in runs if r.kind == "teacher")
    assert not any(
        "data.subset_fraction" in a for a in teacher.args + [a for h in heads.values() for a in h.args]
    )
    few = [r for r in runs if r.meta.get("setting") == "few25"]
    assert all("data.subset_fraction=0.25" in r.args for r in few)
    sskd_run = next(r for r in few if r.meta["label"] == "sskd" and r.meta["seed"] == 1)
    assert sskd_run.args[sskd_run.args.index("--teacher") + 1] == str(heads["resnet20-sskd"].folder)
    assert "--teacher" not in next(r for r in few if r.meta["label"] == "ce").args
    assert sskd_run.folder == tmp_path / "out" / "runs" / "few25" / "sskd" / "resnet20-resnet8" / "seed1"


def test_a_cache_setting_makes_a_cache_before_each_student_that_reads_a_teacher(tmp_path, digits_shards):
    spec = load_spec(
        write_spec(
            tmp_path / "s.yaml",
            shards=str(digits_shards),
            pairs=[{"teacher": "resnet20", "student": "resnet8"}],
            methods=["ce", "sskd", "hssakd"],
            seeds=[0, 1],
            settings={"live": {}, "compact": {"cache": "compact", "data.subset_fraction": 0.5}},
            set={"student.epochs": 2},
        )
    )
    runs = plan(spec, tmp_path / "out")
    caches = [r for r in runs if r.kind == "cache"]
    assert len(caches) == 2 * 2  # sskd and hssakd, two seeds, in the cache setting only
    for cache in caches:
        student = runs[runs.index(cache) + 1]  # made just before the student that reads it
        assert student.kind == "student" and student.meta["setting"] == "compact"
        assert (student.meta["method"], student.meta["seed"]) == (cache.meta["method"], cache.meta["seed"])
        assert cache.folder == tmp_path / "out" / "caches" / "compact" / cache.meta[
            "label"
        ] / "resnet20-resnet8" / (f"seed{cache.meta['seed']}")
        a, b = cache.args, student.args
        assert a[:3] == ["cache", "--method", student.meta["method"]] and a[-2:] == ["--level", "compact"]
        # the cache is made for exactly the student's teacher, seed and data settings (its binding)
        for flag in ("--teacher", "--seed"):
            assert a[a.index(flag) + 1] == b[b.index(flag) + 1]
        assert "data.subset_fraction=0.5" in a and "cache" not in " ".join(x for x in a if "=" in x)
        assert b[b.index("--cache") + 1] == str(cache.folder) and b[b.index("--cache-level") + 1] == "compact"
    ce = [r for r in runs if r.kind == "student" and r.meta["method"] == "ce"]
    assert ce and not any("--cache" in r.args for r in ce)  # no teacher: nothing to cache
    assert not any("--cache" in r.args for r in runs if r.meta.get("setting") == "live")


@pytest.mark.parametrize(
    ("settings", "methods", "message"),
    [
        ({"c": {"cache": "logits"}}, ["sskd"], "settings.c.cache: 'logits' is not a level"),
        ({"c": {"cache": "logits:top0x"}}, ["sskd"], "settings.c.cache: unknown cache storage 'top0x'"),
        ({"c": {"cache": 5}}, ["sskd"], "settings.c.cache: a storage level"),
        (
            {"c": {"cache": "exact"}},
            ["kd", "fitnet"],
            "method fitnet (fitnet) cannot read its teacher from a cache",
        ),
    ],
)
def test_a_bad_cache_setting_is_one_line_naming_it(tmp_path, settings, methods, message):
    path = write_spec(tmp_path / "spec.yaml", shards="x", methods=methods, settings=settings)
    with pytest.raises(SSKDError, match=re.escape(message)) as err:
        load_spec(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_dry_run_prints_every_run_with_its_steps_and_trains_nothing(tmp_path, digits_shards, capsys):
    spec = write_spec(
        tmp_path / "s.yaml",
        shards=str(digits_shards),
        pairs=[{"teacher": "resnet20", "student": "resnet8"}],
        methods=["ce", "kd"],
        seeds=[0],
        settings={"full": {}, "few25": {"data.subset_fraction": 0.25}},
        set={"teacher.epochs": 3, "student.epochs": 2, "student.batch_size": 32},
    )
    assert sskd_main(["sweep", str(spec), "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    from pipelines.settings import subset_ids
    from shards.labels import split_labels

    n_few = len(subset_ids(split_labels(digits_shards, "train"), 0.25))
    assert "runs/few25/kd/resnet20-resnet8/seed0" in out
    row = next(ln for ln in out.splitlines() if "runs/few25/kd" in ln).split()
    assert int(row[2].replace(",", "")) == 2 * math.ceil(n_few / 32)
    row = next(ln for ln in out.splitlines() if ln.startswith("teachers/resnet20 ")).split()
    assert int(row[2].replace(",", "")) == 3 * math.ceil(1437 / 64)
    assert "5 runs (5 to do)" in out and not (tmp_path / "o").exists()
    bad = write_spec(tmp_path / "b.yaml", shards=str(digits_shards), methods=["ce"], set={"student.epoch": 2})
    assert sskd_main(["sweep", str(bad), "--out", str(tmp_path / "o"), "--dry-run"]) == 2
    assert "student.epoch" in capsys.readouterr().err


def fabricate(root: Path, results: dict) -> Path:
    """A sweep folder as `sskd sweep` leaves it, with given final/best top-1 per (setting, method, seed)."""
    runs = []
    for (setting, method, seed), (top1, best, curve) in results.items():
        folder = f"runs/{setting}/{method}/resnet20-resnet8/seed{seed}"
        path = root / folder
        path.mkdir(parents=True)
        (path / "model.json").write_text(
            json.dumps({"top1": top1, "top5": 99.0 + seed / 10, "best_top1": best})
        )
        (path / "sweep.json").write_text(json.dumps({"status": "done", "wall_s": 10.0 + seed}))
        (path / "metrics.jsonl").write_text(
            "".join(json.dumps({"kind": "eval", "epoch": e, "top1": v}) + "\n" for e, v in enumerate(curve))
            + '{"kind": "ev'
        )
        runs.append(
            {
                "kind": "student",
                "folder": folder,
                "setting": setting,
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


def test_report_numbers_equal_the_runs_and_the_paired_interval_is_students_t(tmp_path):
    from scipy.stats import t

    rng = np.random.default_rng(0)
    results = {}
    for setting in ("full", "noisy40"):
        for method in ("ce", "kd", "sskd"):
            for seed in range(3):
                top1 = float(np.round(rng.uniform(80, 95), 3))
                results[(setting, method, seed)] = (top1, top1 + 1, [top1 - 5, top1])
    sweep = fabricate(tmp_path / "sw", results)
    out = tmp_path / "rep" / "report.md"
    assert sskd_main(["report", str(sweep), "--out", str(out), "--json", str(tmp_path / "r.json")]) == 0
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert len(rows) == 6
    for row in rows:
        mine = [results[(row["setting"], row["method"], s)][0] for s in range(3)]
        assert row["n"] == 3 and row["top1_mean"] == pytest.approx(np.mean(mine), abs=1e-12)
        assert row["top1_std"] == pytest.approx(np.std(mine, ddof=1), abs=1e-12)
        assert row["best_top1_mean"] == pytest.approx(np.mean(mine) + 1, abs=1e-12)
        assert row["top5_mean"] == pytest.approx(99.1)
        assert {
            "setting",
            "method",
            "teacher",
            "student",
            "n",
            "top1_mean",
            "top1_std",
            "top5_mean",
            "top5_std",
        } <= set(row)
        if row["method"] == "ce":
            assert row["delta_ce"] is None
            continue
        base = [results[(row["setting"], "ce", s)][0] for s in range(3)]
        d = np.subtract(mine, base)
        half = t.ppf(0.975, 2) * np.std(d, ddof=1) / np.sqrt(3)
        assert row["delta_ce"]["mean"] == pytest.approx(d.mean(), abs=1e-12)
        assert row["delta_ce"]["ci_low"] == pytest.approx(d.mean() - half, abs=1e-9)
        assert row["delta_ce"]["ci_high"] == pytest.approx(d.mean() + half, abs=1e-9)
        assert row["curve"] == {"0": pytest.approx(np.mean(mine) - 5), "1": pytest.approx(np.mean(mine))}
    text = out.read_text()
    assert "## full" in text and "## noisy40" in text
    sskd_full = next(r for r in rows if r["setting"] == "full" and r["method"] == "sskd")
    assert f"{sskd_full['top1_mean']:.2f} ± {sskd_full['top1_std']:.2f}" in text
    for png in ("report-bars.png", "report-curves.png"):
        assert (out.parent / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"({png})" in text
    with pytest.raises(SystemExit):
        sskd_main(["report", "--out", str(out)])
    assert sskd_main(["report", str(tmp_path), "--out", str(out)]) == 2  # not a sweep folder


def test_report_versus_a_setting_gives_the_paired_difference_per_method(tmp_path):
    from scipy.stats import t

    results = {}
    for setting, shift in (("exact", 0.0), ("compact", -0.5)):
        for method in ("ce", "sskd"):
            for seed in range(3):
                top1 = 80.0 + 3 * seed + (shift * (seed + 1) if method == "sskd" else 0.0)
                results[(setting, method, seed)] = (top1, top1, [top1])
    sweep = fabricate(tmp_path / "sw", results)
    out = tmp_path / "report.md"
    argv = ["report", str(sweep), "--out", str(out), "--json", str(tmp_path / "r.json"), "--no-plots"]
    assert sskd_main([*argv, "--versus", "exact"]) == 0
    rows = {(r["setting"], r["method"]): r for r in json.loads((tmp_path / "r.json").read_text())["rows"]}
    assert rows[("exact", "sskd")]["delta_versus"] is None
    d = np.array([-0.5, -1.0, -1.5])  # compact - exact, paired by seed
    half = t.ppf(0.975, 2) * np.std(d, ddof=1) / np.sqrt(3)
    got = rows[("compact", "sskd")]["delta_versus"]
    assert got["n"] == 3 and got["mean"] == pytest.approx(-1.0)
    assert (got["ci_low"], got["ci_high"]) == (pytest.approx(-1.0 - half), pytest.approx(-1.0 + half))
    assert rows[("compact", "ce")]["delta_versus"]["mean"] == 0.0
    text = out.read_text()
    assert "| Δ vs exact |" in text and f"-1.00 [{-1.0 - half:+.2f}, {-1.0 + half:+.2f}]" in text
    assert sskd_main([*argv, "--versus", "fp8"]) == 2  # no such setting: one line, nothing written anew


@pytest.mark.slow
def test_a_sweep_with_cache_settings_makes_the_caches_its_students_read(tmp_path, digits_shards):
    spec = write_spec(
        tmp_path / "s.yaml",
        shards=str(digits_shards),
        pairs=[{"teacher": "resnet8", "student": "resnet8"}],
        methods=["sskd"],
        seeds=[0],
        settings={"exact": {"cache": "exact"}, "small": {"cache": "logits:top3+embed:int8-d16"}},
        set={
            "teacher.max_steps": 3,
            "ss_head.max_steps": 3,
            "student.epochs": 1,
            "student.max_steps": 3,
            "student.batch_size": 32,
            "data.subset_fraction": 0.2,
            "data.eval_batch_size": 360,
        },
    )
    out = tmp_path / "sw"
    cmd = [sys.executable, "-m", "sskd", "sweep", str(spec), "--out", str(out), "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    for setting, level in (("exact", "exact"), ("small", "logits:top3+embed:int8-d16")):
        cache = out / "caches" / setting / "sskd" / "resnet8-resnet8" / "seed0"
        manifest = json.loads((cache / "manifest.json").read_text())
        assert manifest["complete"] and manifest["binding"]["level"] == level
        assert manifest["epochs"] == 1  # the student's epochs, without --epochs
        assert json.loads((cache / "sweep.json").read_text())["status"] == "done"
        student = out / "runs" / setting / "sskd" / "resnet8-resnet8" / "seed0"
        assert json.loads((student / "model.json").read_text())["cache"] == str(cache)
    logs = {p: p.read_text() for p in out.rglob("sweep.log")}
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert all(p.read_text() == text for p, text in logs.items())  # caches and students done: not rerun


@pytest.mark.slow
def test_a_sweep_runs_skips_what_is_done_and_resumes_an_interrupted_run(tmp_path, digits_shards):
    spec = write_spec(
        tmp_path / "s.yaml",
        shards=str(digits_shards),
        pairs=[{"teacher": "resnet8", "student": "resnet8"}],
        methods=["ce", "kd"],
        seeds=[0, 1],
        settings={"full": {}, "few50": {"data.subset_fraction": 0.5}},
        set={
            "teacher.max_steps": 3,
            "student.max_steps": 4,
            "student.batch_size": 32,
            "run.ckpt_every": 2,
            "data.eval_batch_size": 360,
        },
    )
    out = tmp_path / "sw"
    cmd = [sys.executable, "-m", "sskd", "sweep", str(spec), "--out", str(out), "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    plan_ = json.loads((out / "plan.json").read_text())
    assert len(plan_["runs"]) == 1 + 2 * 2 * 2
    for entry in plan_["runs"]:
        rec = json.loads((out / entry["folder"] / "sweep.json").read_text())
        info = json.loads((out / entry["folder"] / "model.json").read_text())
        assert (
            rec["status"] == "done"
            and rec["result"]["top1"] == info["top1"]
            and "sskd distill" in rec["command"]
            or entry["kind"] == "teacher"
        )
    few = out / "runs/few50/kd/resnet8-resnet8/seed1"
    assert json.loads((few / "data.json").read_text())["subset_fraction"] == 0.5
    # As if killed after its step-2 checkpoint: no model.json, the record still says running.
    import torch

    ckpt = torch.load(few / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["step"] == 4
    (few / "model.json").unlink()
    (few / "model.safetensors").unlink()
    rec = json.loads((few / "sweep.json").read_text())
    (few / "sweep.json").write_text(json.dumps({**rec, "status": "running"}))
    logs = {p: p.read_text() for p in out.rglob("sweep.log")}
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    for p, text in logs.items():
        if p.parent == few:
            assert p.read_text().count("\n$ ") == 2 and "--resume" in p.read_text().split("\n$ ")[-1]
        else:
            assert p.read_text() == text, p  # finished runs are not started again
    assert json.loads((few / "sweep.json").read_text())["status"] == "done" and (few / "model.json").is_file()
    assert (
        sskd_main(["report", str(out), "--out", str(tmp_path / "r.md"), "--json", str(tmp_path / "r.json")])
        == 0
    )
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    for row in rows:
        vals = [
            json.loads(
                (
                    out / f"runs/{row['setting']}/{row['method']}/resnet8-resnet8/seed{s}/model.json"
                ).read_text()
            )["top1"]
            for s in (0, 1)
        ]
        assert row["n"] == 2 and row["top1_mean"] == sum(vals) / 2


@pytest.mark.slow
@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_signal_to_the_sweep_stops_its_run_with_a_checkpoint_and_a_rerun_resumes_it(
    tmp_path, digits_shards, signame
):
    import signal
    import time

    spec = write_spec(
        tmp_path / "s.yaml",
        shards=str(digits_shards),
        pairs=[{"student": "resnet8"}],
        methods=["ce"],
        set={
            # long enough that a loaded machine's signal still lands mid-run (60 steps once ran out first)
            "student.max_steps": 200,
            "student.batch_size": 32,
            "run.log_every": 1,
            "run.ckpt_every": 2,
            "run.eval_every": 0,
        },
    )
    out = tmp_path / "sw"
    cmd = [sys.executable, "-m", "sskd", "sweep", str(spec), "--out", str(out), "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = out / "runs/full/ce/none-resnet8/seed0"
    deadline = time.time() + 300
    while time.time() < deadline and not (run_dir / "checkpoints" / "last.pt").is_file():
        time.sleep(0.5)
    assert (run_dir / "checkpoints" / "last.pt").is_file(), proc.communicate(timeout=60)
    proc.send_signal(getattr(signal, signame))  # to the sweep alone, not its process group
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + getattr(signal, signame), err[-2000:]
    rec = json.loads((run_dir / "sweep.json").read_text())
    assert rec["status"] == "interrupted" and not (run_dir / "model.json").exists()
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "--resume" in (run_dir / "sweep.log").read_text().split("\n$ ")[-1]
    assert json.loads((run_dir / "sweep.json").read_text())["status"] == "done"
    assert json.loads((run_dir / "model.json").read_text())["steps"] == 200


@pytest.mark.slow
def test_a_launcher_runs_every_command_under_accelerate(tmp_path, digits_shards):
    import os

    spec = write_spec(
        tmp_path / "s.yaml",
        shards=str(digits_shards),
        pairs=[{"student": "resnet8"}],
        methods=["ce"],
        set={"student.max_steps": 2, "student.batch_size": 32, "run.eval_every": 0},
    )
    out = tmp_path / "sw"
    launcher = (
        f"{sys.executable} -m accelerate.commands.launch --config_file "
        f"{REPO / 'launch/accelerate/cpu.yaml'} --main_process_port 29581"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "sskd",
            "sweep",
            str(spec),
            "--out",
            str(out),
            "--no-progress",
            "--launcher",
            launcher,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    run_dir = out / "runs/full/ce/none-resnet8/seed0"
    rec = json.loads((run_dir / "sweep.json").read_text())
    assert rec["command"].startswith(launcher + " -m sskd distill") and rec["status"] == "done"
    from sskd.runs import read_metrics

    assert {r["world_size"] for r in read_metrics(run_dir) if r["kind"] == "train"} == {2}
