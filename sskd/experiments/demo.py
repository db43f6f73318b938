"""``sskd demo``: SSKD and HSSAKD on the bundled digits, through the real code path.

Shards scikit-learn's digits, trains a teacher (stage 1), its SS head and its HSSAKD branches (stage 2,
both on the frozen teacher), distills CE, KD, SSKD and HSSAKD students, evaluates all, prints a table
and writes ``results.json`` and ``curves.png``.
Every stage is a normal run folder; rerunning the demo skips finished stages and resumes an interrupted
one.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from sskd import runs
from sskd.core.atomic import atomic_path, write_json
from sskd.engine.config import Config, load_config
from sskd.engine.loop import train
from sskd.engine.prepare import RunSpec, prepare

log = logging.getLogger(__name__)

DEMO_CONFIG = Path(__file__).parents[1] / "configs" / "demo.yaml"  # sskd/configs/demo.yaml
STUDENT_METHODS = ("ce", "kd", "sskd", "hssakd")
TEACHER_PARTS = {"sskd": "teacher-ss", "hssakd": "teacher-hssakd"}  # train-ss-head --method: run folder
STUDENT_TEACHER = {"ce": None, "kd": "teacher", "sskd": "teacher-ss", "hssakd": "teacher-hssakd"}


def demo_config(
    shards: Path, fast: bool = False, progress: bool = True, overrides: tuple[str, ...] = ()
) -> Config:
    """The demo's recipe; ``overrides`` (``section.key=value``, as ``--set``) come last, after ``fast``."""
    sets = [f"data.shards={shards}", f"run.progress={str(progress).lower()}"]
    if fast:  # half the schedule (tests, smoke runs): every stage still runs through the same code
        import yaml

        recipe = yaml.safe_load(DEMO_CONFIG.read_text())
        sets += [
            f"{stage}.epochs={max(1, int(recipe[stage]['epochs']) // 2)}"
            for stage in ("teacher", "ss_head", "student")
        ]
    return load_config(DEMO_CONFIG, [*sets, *overrides])


def _stage(spec: RunSpec) -> dict[str, Any]:
    """Run a stage unless its run folder already holds a finished model (then reuse it)."""
    if (spec.out / runs.MODEL_INFO).is_file():
        log.info("%s: finished earlier, reusing it", spec.out)
        return runs.load_model_info(spec.out)
    started = time.perf_counter()
    train(spec)
    info = runs.load_model_info(spec.out)
    log.info(
        "%s: done in %.0f s, val top-1 %.2f%%",
        spec.out,
        time.perf_counter() - started,
        info.get("top1", float("nan")),
    )
    return info


def run_demo(
    out: Path, fast: bool = False, progress: bool = True, overrides: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Run the demo into ``out``; returns the results dict also written to ``out/results.json``.

    ``overrides``: config overrides for every stage after ``fast`` (tests shorten the students with them)."""
    from shards import write_digits
    from shards.format import MANIFEST

    t0 = time.perf_counter()
    shards = out / "shards"
    if not (shards / MANIFEST).is_file():
        write_digits(shards, seed=0, progress=progress)
    cfg = demo_config(shards, fast, progress, tuple(overrides))

    def stage(kind: str, name: str, method: str, teacher: str | None = None) -> dict[str, Any]:
        getattr(cfg, kind).method = method
        return _stage(prepare(cfg, kind, out=out / name, teacher=teacher, resume=True))

    teacher = stage("teacher", "teacher", "ce")
    heads = {
        method: stage("ss_head", name, method, str(out / "teacher")) for method, name in TEACHER_PARTS.items()
    }
    students = {}
    for method in STUDENT_METHODS:
        teacher_run = STUDENT_TEACHER[method] and str(out / STUDENT_TEACHER[method])
        students[method] = stage("student", f"student-{method}", method, teacher_run)
    results = {
        "dataset": "sklearn digits (1,797 real 8x8 images as 32x32 RGB)",
        "teacher": {"arch": teacher["arch"], "top1": teacher["top1"], "top5": teacher["top5"]},
        "teacher_ss_head": {"arch": heads["sskd"]["arch"], "top1": heads["sskd"]["top1"]},
        "teacher_branches": {"arch": heads["hssakd"]["arch"], "top1": heads["hssakd"]["top1"]},
        "students": {
            m: {"arch": s["arch"], "top1": s["top1"], "top5": s["top5"]} for m, s in students.items()
        },
        "fast": fast,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_json(out / "results.json", results)
    plot_curves(
        out,
        ["teacher", *TEACHER_PARTS.values(), *[f"student-{m}" for m in STUDENT_METHODS]],
        out / "curves.png",
    )
    print(results_table(results))
    print(f"results: {out / 'results.json'}   curves: {out / 'curves.png'}")
    return results


def results_table(results: dict[str, Any]) -> str:
    rows = [("teacher", results["teacher"]["arch"], results["teacher"]["top1"], results["teacher"]["top5"])]
    rows += [(f"student {m}", s["arch"], s["top1"], s["top5"]) for m, s in results["students"].items()]
    lines = [f"{'run':<14} {'arch':<12} {'top-1':>7} {'top-5':>7}", "-" * 43]
    lines += [f"{r:<14} {a:<12} {t1:>6.2f}% {t5:>6.2f}%" for r, a, t1, t5 in rows]
    return "\n".join(lines)


def plot_curves(out: Path, names: list[str], path: Path) -> None:
    """Training loss per step and validation top-1 per epoch of each run, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for name in names:
        recs = runs.read_metrics(out / name)
        train_recs = [r for r in recs if r.get("kind") == "train"]
        eval_recs = [r for r in recs if r.get("kind") == "eval"]
        if train_recs:
            ax_loss.plot([r["step"] for r in train_recs], [r["loss"] for r in train_recs], label=name)
        if eval_recs:
            ax_acc.plot(
                [r["epoch"] + 1 for r in eval_recs], [r["top1"] for r in eval_recs], marker="o", label=name
            )
    ax_loss.set(xlabel="optimizer step", ylabel="training loss", yscale="log", title="training loss")
    ax_acc.set(xlabel="epoch", ylabel="val top-1 (%)", title="validation accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
