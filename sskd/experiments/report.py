"""``sskd report DIR... --out report.md``: what a sweep found, with the spread over seeds.

Per data setting and (method, teacher, student): top-1 / top-5 mean ± sample std over the seeds (with
their number), at the final and at the best epoch; the paired difference to CE and to KD over the seeds
both ran (mean and a 95% confidence interval from Student's t with n - 1 degrees of freedom; none for a
single seed), and with ``--versus SETTING`` to the same method and pair in that setting (say, students
from a compact teacher cache against those from the exact one); learning curves (val top-1 per epoch, mean over seeds) and a bar chart with std error
bars as PNGs beside the report. Every number comes from the runs' own ``model.json`` (final ``top1``,
``top5``, ``best_top1``) and ``metrics.jsonl`` (the curves); ``--json`` writes them unrounded.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from sskd.core import atomic
from sskd.core.errors import SSKDError


def _stats(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def paired(a: dict[int, float], b: dict[int, float]) -> dict[str, Any] | None:
    """Mean of a - b over the seeds both have, and its 95% t interval (None without common seeds)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    d = [a[s] - b[s] for s in seeds]
    mean, std = _stats(d)
    out: dict[str, Any] = {"mean": mean, "n": len(d), "ci_low": None, "ci_high": None}
    if len(d) > 1:
        from scipy.stats import t

        half = float(t.ppf(0.975, len(d) - 1)) * std / math.sqrt(len(d))
        out.update(ci_low=mean - half, ci_high=mean + half)
    return out


def _read_json(path: Path, kind: type = dict) -> Any:
    """``path``'s JSON, of type ``kind``; a torn, binary or edited file is one line naming it."""
    try:
        value = json.loads(path.read_text())
    except (ValueError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        why = exc.strerror if isinstance(exc, OSError) else "not valid JSON (truncated or edited?)"
        raise SSKDError(f"{path}: {why}; rerun that run or move it out of the sweep folder") from None
    if not isinstance(value, kind):
        raise SSKDError(f"{path}: not a JSON {'object' if kind is dict else kind.__name__}")
    return value


def _number(info: dict, key: str, path: Path) -> float:
    try:
        value = float(info[key])
    except (TypeError, ValueError):
        raise SSKDError(f"{path}: {key} is {info[key]!r}, not a number") from None
    return value


def collect(dirs: list[str | Path]) -> list[dict[str, Any]]:
    """Every finished student run of the sweeps in ``dirs``: its plan entry, result and curve."""
    found = []
    for d in map(Path, dirs):
        plan_path = d / "plan.json"
        if not plan_path.is_file():
            raise SSKDError(f"{d}: no plan.json (not a folder written by `sskd sweep`)")
        plan = _read_json(plan_path)
        entries = plan.get("runs")
        keys = {"kind", "folder", "setting", "method", "label", "teacher", "student", "seed"}
        if not isinstance(entries, list) or not all(
            isinstance(e, dict) and (e.get("kind") != "student" or keys <= set(e)) for e in entries
        ):
            raise SSKDError(f"{plan_path}: runs: not the list of runs `sskd sweep` writes")
        for entry in entries:
            folder = d / str(entry.get("folder"))
            rec_path = folder / "sweep.json"
            rec = _read_json(rec_path) if rec_path.is_file() else {}
            if entry["kind"] != "student":
                found.append(
                    {
                        **entry,
                        "path": folder,
                        "status": rec.get("status", "todo"),
                        "wall_s": rec.get("wall_s"),
                    }
                )
                continue
            if rec.get("status") != "done" or not (folder / "model.json").is_file():
                found.append({**entry, "path": folder, "status": rec.get("status", "todo")})
                continue
            model_json = folder / "model.json"
            info = _read_json(model_json)
            for key in ("top1", "top5"):
                if key not in info:
                    raise SSKDError(f"{model_json}: no {key} (trained without a val split?)")
            top1, top5 = _number(info, "top1", model_json), _number(info, "top5", model_json)
            best = _number(info, "best_top1", model_json) if "best_top1" in info else top1
            found.append(
                {
                    **entry,
                    "path": folder,
                    "status": "done",
                    "wall_s": rec.get("wall_s"),
                    "top1": top1,
                    "top5": top5,
                    "best_top1": best,
                    "curve": _curve(folder / "metrics.jsonl"),
                }
            )
    return found


def _curve(metrics: Path) -> dict[int, float]:
    """Val top-1 per epoch from ``metrics.jsonl``; a torn line (a run killed while writing) is skipped."""
    curve: dict[int, float] = {}
    if not metrics.is_file():
        return curve
    try:
        text = metrics.read_bytes().decode("utf-8", errors="replace")
    except OSError as exc:
        raise SSKDError(f"{metrics}: {exc.strerror}") from None
    for line in text.splitlines():
        try:
            row = json.loads(line)
            if isinstance(row, dict) and row.get("kind") == "eval" and "top1" in row:
                curve[int(row["epoch"])] = float(row["top1"])
        except (ValueError, TypeError, KeyError):
            continue  # a torn (last) line or one the curve cannot use
    return curve


def summarise(found: list[dict[str, Any]], versus: str | None = None) -> list[dict[str, Any]]:
    """One row per (setting, method label, teacher, student); with ``versus``, each row of another setting
    also gets ``delta_versus``: its paired difference to the same label and pair in setting ``versus``."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    order: list[tuple] = []
    for r in found:
        if r["kind"] != "student" or r["status"] != "done":
            continue
        key = (r["setting"], r["label"], r["teacher"], r["student"])
        if key not in groups:
            order.append(key)
        groups[key].append(r)
    by_name: dict[tuple, dict[int, float]] = {}
    for (setting, label, teacher, student), runs in groups.items():
        by_name[(setting, runs[0]["method"], label, teacher, student)] = {r["seed"]: r["top1"] for r in runs}
    rows = []
    for key in order:
        setting, label, teacher, student = key
        runs = sorted(groups[key], key=lambda r: r["seed"])
        top1, top5, best = ([r[k] for r in runs] for k in ("top1", "top5", "best_top1"))
        row: dict[str, Any] = {
            "setting": setting,
            "method": label,
            "name": runs[0]["method"],
            "teacher": teacher,
            "student": student,
            "n": len(runs),
            "seeds": [r["seed"] for r in runs],
            "top1_runs": top1,
        }
        for name, values in (("top1", top1), ("top5", top5), ("best_top1", best)):
            row[f"{name}_mean"], row[f"{name}_std"] = _stats(values)
        mine = {r["seed"]: r["top1"] for r in runs}
        for base in ("ce", "kd"):
            ref = next(
                (
                    v
                    for (s, n, lab, t, st), v in by_name.items()
                    if s == setting and n == base and lab == base and t == teacher and st == student
                ),
                None,
            )
            row[f"delta_{base}"] = paired(mine, ref) if ref is not None and label != base else None
        if versus is not None:
            ref = next(
                ({r["seed"]: r["top1"] for r in g} for k, g in groups.items() if k == (versus, *key[1:])),
                None,
            )
            row["delta_versus"] = paired(mine, ref) if ref is not None and setting != versus else None
        walls = [r["wall_s"] for r in runs if r.get("wall_s") is not None]
        row["wall_s_mean"] = sum(walls) / len(walls) if walls else None
        epochs = sorted(set().union(*(r["curve"] for r in runs)))
        row["curve"] = {e: _stats([r["curve"][e] for r in runs if e in r["curve"]])[0] for e in epochs}
        rows.append(row)
    return rows


def _fmt_delta(d: dict | None) -> str:
    if d is None:
        return "—"
    if d["ci_low"] is None:
        return f"{d['mean']:+.2f} (n={d['n']})"
    mark = "" if d["ci_low"] <= 0 <= d["ci_high"] else " *"
    return f"{d['mean']:+.2f} [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]{mark}"


def _plots(rows: list[dict], out_dir: Path, stem: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    pairs = list(dict.fromkeys((r["teacher"], r["student"]) for r in rows))
    for teacher, student in pairs:
        sub = [r for r in rows if (r["teacher"], r["student"]) == (teacher, student)]
        methods = list(dict.fromkeys(r["method"] for r in sub))
        suffix = f"-{teacher}-{student}".replace(":", "-") if len(pairs) > 1 else ""
        # bar chart: settings side by side, one bar per method, std error bars
        fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(settings) * len(methods) / 3), 4))
        width = 0.8 / max(1, len(methods))
        for j, m in enumerate(methods):
            xs, ys, es = [], [], []
            for i, s in enumerate(settings):
                r = next((r for r in sub if r["setting"] == s and r["method"] == m), None)
                if r is not None:
                    xs.append(i + (j - (len(methods) - 1) / 2) * width)
                    ys.append(r["top1_mean"])
                    es.append(r["top1_std"])
            ax.bar(xs, ys, width, yerr=es, capsize=3, label=m)
        ax.set_xticks(range(len(settings)), settings)
        ax.set_ylabel("val top-1 (%), mean ± std over seeds")
        lows = [r["top1_mean"] - r["top1_std"] for r in sub]
        ax.set_ylim(max(0, min(lows) - 5), min(100, max(r["top1_mean"] + r["top1_std"] for r in sub) + 2))
        ax.set_title(f"{teacher} → {student}")
        ax.legend(
            fontsize=8,
            ncol=min(len(methods), 6),
            loc="upper center",
            bbox_to_anchor=(0.5, -0.08),
            frameon=False,
        )
        fig.tight_layout()
        path = out_dir / f"{stem}-bars{suffix}.png"
        _save(fig, path)
        written.append(path)
        # learning curves: one panel per setting
        fig, axes = plt.subplots(
            1, len(settings), figsize=(4.2 * len(settings), 3.4), squeeze=False, sharey=True
        )
        for ax, s in zip(axes[0], settings):
            for r in (r for r in sub if r["setting"] == s):
                if r["curve"]:
                    es = sorted(r["curve"])
                    ax.plot([e + 1 for e in es], [r["curve"][e] for e in es], marker=".", label=r["method"])
            ax.set_title(s)
            ax.set_xlabel("epoch")
        axes[0][0].set_ylabel("val top-1 (%), mean over seeds")
        axes[0][-1].legend(fontsize=8)
        fig.suptitle(f"{teacher} → {student}")
        fig.tight_layout()
        path = out_dir / f"{stem}-curves{suffix}.png"
        _save(fig, path)
        written.append(path)
        plt.close("all")
    return written


def _save(fig, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic.write_bytes(path, buf.getvalue())


def render(
    rows: list[dict],
    found: list[dict],
    dirs: list[str],
    pictures: list[Path],
    out: Path,
    versus: str | None = None,
) -> str:
    lines = [f"# sskd report: {', '.join(map(str, dirs))}", ""]
    done = [r for r in found if r["status"] == "done"]
    missing = [r for r in found if r["kind"] == "student" and r["status"] != "done"]
    walls = [r["wall_s"] for r in found if r.get("wall_s") is not None]
    lines.append(
        f"{len(done)} finished runs ({sum(1 for r in done if r['kind'] == 'student')} students); "
        f"{len(missing)} student runs not finished; wall time of the runs {sum(walls) / 60:.1f} min."
    )
    lines += [
        "",
        "Top-1 / top-5: val accuracy (%) at the last epoch, mean ± sample std over the n seeds; best: "
        "the best epoch's top-1. Δ: the paired difference in final top-1 over the seeds both ran, mean "
        "[95% t interval]; * where the interval excludes 0 (otherwise the difference is within the noise "
        "of these seeds)." + (f" Δ vs {versus}: the same against setting {versus}." if versus else ""),
        "",
    ]
    extra = f" Δ vs {versus} |" if versus else ""
    for setting in dict.fromkeys(r["setting"] for r in rows):
        lines += [
            f"## {setting}",
            "",
            "| method | teacher → student | n | top-1 | top-5 | best top-1 | Δ vs CE | Δ vs KD |"
            + extra
            + " s / run |",
            "|---|---|---|---|---|---|---|---|---|" + ("---|" if versus else ""),
        ]
        for r in (r for r in rows if r["setting"] == setting):
            wall = f"{r['wall_s_mean']:.0f}" if r["wall_s_mean"] is not None else "—"
            lines.append(
                f"| {r['method']} | {r['teacher']} → {r['student']} | {r['n']} | "
                f"{r['top1_mean']:.2f} ± {r['top1_std']:.2f} | {r['top5_mean']:.2f} ± {r['top5_std']:.2f} | "
                f"{r['best_top1_mean']:.2f} ± {r['best_top1_std']:.2f} | {_fmt_delta(r['delta_ce'])} | "
                f"{_fmt_delta(r['delta_kd'])} |"
                + (f" {_fmt_delta(r['delta_versus'])} |" if versus else "")
                + f" {wall} |"
            )
        lines.append("")
    for p in pictures:
        rel = p.relative_to(out.parent) if p.is_relative_to(out.parent) else p
        lines += [f"![{p.stem}]({rel})", ""]
    if missing:
        lines += [
            "Not finished: "
            + ", ".join(str(r["folder"]) for r in missing[:20])
            + (" ..." if len(missing) > 20 else ""),
            "",
        ]
    return "\n".join(lines)
