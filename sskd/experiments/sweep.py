"""``sskd sweep SPEC.yaml --out DIR``: a grid of methods x teacher/student pairs x seeds x data settings.

Every run is one of the commands a user runs (``sskd train-teacher``, ``train-ss-head``, ``distill``),
started as a child process (or under ``--launcher "accelerate launch ..."``), in a folder of its own:

    DIR/spec.yaml                                  the spec as given
    DIR/plan.json                                  every run: kind, folder, method, pair, seed, setting, command
    DIR/teachers/<arch>                            stage-1 teacher, one per teacher architecture
    DIR/teachers/<arch>-<head method>[-<hash>]     its SS head / branches / KDSS heads, one per kind the methods need
    DIR/runs/<setting>/<label>/<teacher>-<student>/seed<k>   the students
    DIR/caches/<setting>/<label>/<teacher>-<student>/seed<k> their teacher caches, in a setting with ``cache:``

Teachers (and their heads) are trained once, on the full clean data, with ``teacher_seed``, and shared
by every student that needs them; data settings act on the students only (SSKD Sec. 4.3: "the teacher
is trained with clean data and will be shared by all students"). Each run folder gets ``sweep.json``
(its command, status, wall time and result) and ``sweep.log`` (the command's output). A rerun skips
finished runs, resumes an interrupted one (``--resume``) and refuses a finished run whose recorded
command differs from the spec's (the spec changed under it).

A setting may name a teacher-cache storage level, ``cache: exact | compact | LEVEL`` (a level as ``sskd
cache --dry-run`` lists them): its students of methods whose teacher outputs can be cached then read them
from a cache (``sskd cache --level LEVEL``, one per student run: a cache is bound to the run's seed and data
settings) made just before, and ask for that level (``distill --cache-level``), so settings that differ
only in the level compare what the storage costs. Methods without a teacher run as in any setting.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from sskd.core import atomic
from sskd.core.errors import SSKDError
from sskd.core.stop import child_env, die_with_parent, stop_along

if TYPE_CHECKING:
    from sskd.engine.prepare import RunSpec

log = logging.getLogger(__name__)

RECORD = "sweep.json"
OUTPUT = "sweep.log"
SPEC_KEYS = {"shards", "pairs", "methods", "seeds", "settings", "set", "config", "teacher_seed", "name"}


@dataclass
class MethodSpec:
    name: str  # registry name (``--method``)
    label: str  # how the report calls it (default: the name)
    sets: dict[str, Any] = field(default_factory=dict)  # overrides for this method's runs (and its head)


@dataclass
class Spec:
    shards: str
    pairs: list[dict[str, str]]
    methods: list[MethodSpec]
    seeds: list[int]
    settings: dict[str, dict[str, Any]]
    sets: dict[str, Any]
    config: str | None = None
    teacher_seed: int = 0
    name: str = "sweep"


@dataclass
class PlannedRun:
    kind: str  # teacher | head | student
    folder: Path
    args: list[str]  # sskd's own arguments: ["distill", "--method", ...]
    stage: str  # teacher | ss_head | student (the config section whose epochs count)
    meta: dict[str, Any] = field(default_factory=dict)  # setting, method, label, teacher, student, seed
    steps: int | None = None
    images: int | None = None

    def record(self) -> dict[str, Any]:
        path = self.folder / RECORD
        return _read_json(path) if path.is_file() else {}

    def finished(self) -> bool:
        """Whether the run's own output says it finished: a trained model's ``model.json``, a cache's
        complete ``manifest.json``."""
        if self.kind != "cache":
            return (self.folder / "model.json").is_file()
        manifest = self.folder / "manifest.json"
        return manifest.is_file() and _read_json(manifest).get("complete") is True


def _read_json(path: Path) -> dict[str, Any]:
    """A record the sweep or a run wrote; a torn or edited one is one line naming it."""
    try:
        value = json.loads(path.read_text())
    except (ValueError, OSError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not valid JSON (truncated or edited?)"
        raise SSKDError(f"{path}: {why}; move that run folder away to run it again") from None
    if not isinstance(value, dict):
        raise SSKDError(f"{path}: not a JSON object; move that run folder away to run it again")
    return value


def _fail(where: str, text: str) -> SSKDError:
    return SSKDError(f"{where}: {text}")


def _folder_safe(name: str) -> bool:
    """One plain folder name: what a spec puts into a run's path may not lead out of ``--out``."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0") and ".." not in name


def inside(folder: Path, out: Path) -> bool:
    """``folder`` lies within ``out`` as written (no ``..`` or absolute part leads elsewhere)."""
    a, b = os.path.normpath(os.path.abspath(folder)), os.path.normpath(os.path.abspath(out))
    return a != b and os.path.commonpath([a, b]) == b


def load_spec(path: str | Path) -> Spec:
    """Read and check a sweep spec; a mistake is one line naming the file and key."""
    from sskd.methods import METHODS

    path = Path(path)
    if not path.is_file():
        raise SSKDError(f"{path}: sweep spec not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SSKDError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(raw, dict):
        raise _fail(str(path), "a sweep spec is a mapping (shards, pairs, methods, seeds, settings, set)")
    unknown = sorted(set(raw) - SPEC_KEYS)
    if unknown:
        raise _fail(str(path), f"unknown key {unknown[0]!r} (keys: {', '.join(sorted(SPEC_KEYS))})")
    for key in ("shards", "methods"):
        if not raw.get(key):
            raise _fail(str(path), f"{key} is required")
    pairs = raw.get("pairs") or [{"teacher": "resnet32x4", "student": "resnet8x4"}]
    if not isinstance(pairs, list) or not all(isinstance(p, dict) and p.get("student") for p in pairs):
        raise _fail(str(path), "pairs: a list of {teacher: ARCH, student: ARCH}")
    for i, p in enumerate(pairs):
        for role in ("teacher", "student"):
            if p.get(role) is not None and not _folder_safe(str(p[role])):
                raise _fail(
                    str(path),
                    f"pairs[{i}].{role}: {str(p[role])!r} is not an architecture name (it names "
                    "the runs' folder under --out: no '/', '\\' or '..')",
                )
    methods = []
    for i, m in enumerate(raw["methods"]):
        entry = {"name": m} if isinstance(m, str) else dict(m or {})
        name = entry.get("name")
        if name not in METHODS["student"].names():
            raise _fail(
                str(path),
                f"methods[{i}]: {name!r} is not a distill method ({', '.join(METHODS['student'].names())})",
            )
        sets = entry.get("set") or {}
        if not isinstance(sets, dict):
            raise _fail(str(path), f"methods[{i}].set: a mapping section.key: value")
        label = str(entry.get("label", name))
        if not _folder_safe(label):
            raise _fail(
                str(path),
                f"methods[{i}].label: {label!r} is not a folder name (no '/', '\\' or '..'; "
                "it names the runs' folder under --out)",
            )
        methods.append(MethodSpec(name=name, label=label, sets=sets))
    labels = [m.label for m in methods]
    if len(set(labels)) != len(labels):
        raise _fail(str(path), "methods: two entries share a label; give one a `label:`")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not all(isinstance(s, int) and s >= 0 for s in seeds) or not seeds:
        raise _fail(str(path), "seeds: a list of non-negative integers")
    settings = raw.get("settings") or {"full": {}}
    if not isinstance(settings, dict) or not all(isinstance(v or {}, dict) for v in settings.values()):
        raise _fail(str(path), "settings: a mapping name -> {section.key: value}")
    for name, overrides in settings.items():
        if not str(name).replace("-", "").replace("_", "").isalnum():
            raise _fail(str(path), f"settings: {name!r} is not a folder-safe name")
        if "cache" in (overrides or {}):
            _check_cache_setting(str(path), str(name), overrides["cache"], methods)
    sets = raw.get("set") or {}
    if not isinstance(sets, dict):
        raise _fail(str(path), "set: a mapping section.key: value")
    return Spec(
        shards=str(raw["shards"]),
        pairs=[{k: str(v) for k, v in p.items()} for p in pairs],
        methods=methods,
        seeds=seeds,
        settings={str(k): dict(v or {}) for k, v in settings.items()},
        sets=sets,
        config=raw.get("config"),
        teacher_seed=int(raw.get("teacher_seed", 0)),
        name=str(raw.get("name", path.stem)),
    )


def _check_cache_setting(where: str, setting: str, level: Any, methods: list[MethodSpec]) -> None:
    """A setting's ``cache:`` names a storage level, and every method of the spec that needs a teacher can
    read its teacher from a cache (the shapes are checked when the cache is made)."""
    from sskd.cache.levels import Storage
    from sskd.methods import METHODS

    if not isinstance(level, str) or not level:
        raise _fail(
            where,
            f"settings.{setting}.cache: a storage level (exact, compact or e.g. logits:top5+embed:int8)",
        )
    if level not in ("exact", "compact"):
        for part in level.split("+"):
            name, colon, how = part.partition(":")
            if not name or not colon:
                raise _fail(
                    where,
                    f"settings.{setting}.cache: {level!r} is not a level (exact, compact or "
                    "OUTPUT:STORAGE joined by '+', e.g. logits:top5+embed:int8-d32)",
                )
            try:
                Storage.parse(how)
            except SSKDError as exc:
                raise _fail(where, f"settings.{setting}.cache: {exc}") from None
    for m in methods:
        cls = METHODS["student"].get(m.name)
        if cls.needs_teacher and (not cls.outputs or cls.cache_refusal):
            raise _fail(
                where,
                f"settings.{setting}.cache: method {m.label} ({m.name}) cannot read its teacher from a cache "
                f"({cls.cache_refusal or 'it declares no teacher outputs'}); sweep it in a setting without "
                "cache",
            )


def _set_args(values: dict[str, Any]) -> list[str]:
    out = []
    for key, value in values.items():
        if "." not in str(key):
            raise SSKDError(f"sweep spec: {key!r} is not section.key")
        text = json.dumps(value) if isinstance(value, (list, dict, bool)) or value is None else str(value)
        out += ["--set", f"{key}={text}"]
    return out


def _head_method(method: str) -> str | None:
    """The head-role method whose run carries the part ``method``'s teacher must have (None: a stage-1
    teacher is enough)."""
    from sskd.methods import METHODS

    part = METHODS["student"].get(method).teacher_part
    if part is None:
        return None
    makers = [n for n in METHODS["head"].names() if METHODS["head"].get(n).produces == part]
    if not makers:
        raise SSKDError(f"--method {method}: no train-ss-head method makes the {part} its teacher needs")
    return makers[0]


def plan(spec: Spec, out: Path) -> list[PlannedRun]:
    """Every run of the grid, teachers first, in the order they run."""
    from sskd.methods import METHODS

    common = (["--config", spec.config] if spec.config else []) + ["--shards", spec.shards]
    runs: list[PlannedRun] = []
    teachers: dict[str, PlannedRun | str] = {}
    heads: dict[tuple, PlannedRun] = {}
    base_sets = _set_args(spec.sets)
    for pair in spec.pairs:
        t_arch, s_arch = pair.get("teacher"), pair["student"]
        pair_common = (["--config", pair["config"]] if pair.get("config") else []) + common
        needs_teacher = any(METHODS["student"].get(m.name).needs_teacher for m in spec.methods)
        if needs_teacher and not t_arch:
            raise SSKDError(f"sweep spec: pair {pair}: its methods need a teacher")
        if t_arch and t_arch not in teachers and needs_teacher:
            if t_arch.startswith("torchvision:"):
                teachers[t_arch] = t_arch
            else:
                run = PlannedRun(
                    "teacher",
                    out / "teachers" / t_arch,
                    [
                        "train-teacher",
                        "--arch",
                        t_arch,
                        *pair_common,
                        "--seed",
                        str(spec.teacher_seed),
                        *base_sets,
                    ],
                    "teacher",
                    {"teacher": t_arch},
                )
                teachers[t_arch] = run
                runs.append(run)
        for m in spec.methods:
            head = _head_method(m.name)
            if head is None or (t_arch, head, json.dumps(m.sets, sort_keys=True)) in heads:
                continue
            # A head run per (teacher, head method, that method's overrides): sskd's pretext, say, shapes it.
            own = {k: v for k, v in m.sets.items() if k.split(".")[0] in (head, "ss_head")}
            suffix = (
                "-" + hashlib.sha1(json.dumps(own, sort_keys=True).encode()).hexdigest()[:6] if own else ""
            )
            key = (t_arch, head, json.dumps(own, sort_keys=True))
            if key in heads:
                heads[(t_arch, head, json.dumps(m.sets, sort_keys=True))] = heads[key]
                continue
            src = teachers[t_arch]
            src_path = src if isinstance(src, str) else str(src.folder)
            run = PlannedRun(
                "head",
                out / "teachers" / f"{t_arch.replace(':', '-')}-{head}{suffix}",
                [
                    "train-ss-head",
                    "--method",
                    head,
                    "--teacher",
                    src_path,
                    *pair_common,
                    "--seed",
                    str(spec.teacher_seed),
                    *base_sets,
                    *_set_args(own),
                ],
                "ss_head",
                {"teacher": t_arch, "method": head},
            )
            heads[key] = heads[(t_arch, head, json.dumps(m.sets, sort_keys=True))] = run
            runs.append(run)
    for setting, given in spec.settings.items():
        overrides = {k: v for k, v in given.items() if k != "cache"}
        level = given.get("cache")
        for pair in spec.pairs:
            t_arch, s_arch = pair.get("teacher"), pair["student"]
            pair_common = (["--config", pair["config"]] if pair.get("config") else []) + common
            for m in spec.methods:
                cls = METHODS["student"].get(m.name)
                teacher_args: list[str] = []
                if cls.needs_teacher:
                    head = _head_method(m.name)
                    src = (
                        heads[(t_arch, head, json.dumps(m.sets, sort_keys=True))]
                        if head
                        else teachers[t_arch]
                    )
                    teacher_args = ["--teacher", src if isinstance(src, str) else str(src.folder)]
                pair_name = f"{(t_arch or 'none').replace(':', '-')}-{s_arch}"
                for seed in spec.seeds:
                    folder = out / "runs" / setting / m.label / pair_name / f"seed{seed}"
                    run_args = [
                        *pair_common,
                        "--seed",
                        str(seed),
                        *base_sets,
                        *_set_args(m.sets),
                        *_set_args(overrides),
                    ]
                    cache_args: list[str] = []
                    if level is not None and cls.needs_teacher:
                        # The student's views, seed and data settings; every epoch it trains (the default).
                        cache_run = PlannedRun(
                            "cache",
                            out / "caches" / setting / m.label / pair_name / f"seed{seed}",
                            ["cache", "--method", m.name, *teacher_args, *run_args, "--level", level],
                            "student",
                            {"setting": setting, "method": m.name, "label": m.label, "seed": seed},
                        )
                        runs.append(cache_run)
                        cache_args = ["--cache", str(cache_run.folder), "--cache-level", level]
                    args = [
                        "distill",
                        "--method",
                        m.name,
                        *teacher_args,
                        *cache_args,
                        "--student",
                        s_arch,
                        *run_args,
                    ]
                    runs.append(
                        PlannedRun(
                            "student",
                            folder,
                            args,
                            "student",
                            {
                                "setting": setting,
                                "method": m.name,
                                "label": m.label,
                                "pair": pair_name,
                                "teacher": t_arch,
                                "student": s_arch,
                                "uses_teacher": cls.needs_teacher,
                                "seed": seed,
                            },
                        )
                    )
    return runs


def estimate(spec: RunSpec, subset_sizes: dict) -> tuple[int, int]:
    """Optimizer steps and images a run (resolved as its command line resolves it, without its teacher:
    :func:`sskd.engine.prepare.prepare`) will train on one process. ``subset_sizes`` keeps the size of each
    few-shot subset already counted (that reads every label of the split)."""
    cfg, st = spec.cfg, spec.st
    n = int(spec.manifest["splits"]["train"]["num_samples"])
    if cfg.data.subset_fraction < 1:
        key = (spec.shards_sha256, cfg.data.subset_fraction)
        if key not in subset_sizes:
            from pipelines.settings import subset_ids
            from shards.labels import split_labels

            subset_sizes[key] = len(
                subset_ids(split_labels(cfg.data.shards, "train"), cfg.data.subset_fraction)
            )
        n = subset_sizes[key]
    per_epoch = max(1, math.ceil(n / st.batch_size) // st.grad_accum)
    steps = st.epochs * per_epoch
    if st.max_steps:
        steps = min(steps, st.max_steps)
    return steps, steps * st.batch_size * st.grad_accum


def _status(run: PlannedRun) -> str:
    rec = run.record()
    if rec.get("status") == "done" and run.finished():
        return "done"
    from sskd.runs import earlier_work

    if run.kind == "cache" and (run.folder / "manifest.json").is_file():
        return "partial"  # `sskd cache --resume` keeps its complete chunks
    if run.folder.is_dir() and earlier_work(run.folder):
        return "partial"
    return "todo"


def _result(folder: Path) -> dict[str, Any]:
    info = _read_json(folder / "model.json")
    return {k: info[k] for k in ("top1", "top5", "best_top1", "epochs_done", "steps", "count") if k in info}


class _Child:
    """One command as a child process; SIGTERM and SIGINT to the sweep are passed on (the run saves and stops).

    The child runs in a process group of its own, so a Ctrl-C reaches it once (through the sweep) rather than
    twice (a second SIGINT means "stop now"), and it gets SIGTERM from the kernel if the sweep dies (even by
    SIGKILL), so no orphan goes on training with the run's lock held.
    """

    def __init__(self, argv: list[str], log_path: Path):
        self.argv, self.log_path = argv, log_path
        self.proc: subprocess.Popen | None = None
        self.interrupted = 0  # the signal the sweep got while this command ran (the sweep stops after it)

    def run(self) -> int:
        old = signal.getsignal(signal.SIGTERM)

        def forward(signum, frame):
            self.interrupted = signum
            if self.proc and self.proc.poll() is None:
                self.proc.send_signal(signum)

        signal.signal(signal.SIGTERM, forward)
        old_tstp = signal.getsignal(signal.SIGTSTP)
        try:
            with open(self.log_path, "ab") as fh:
                fh.write(f"\n$ {shlex.join(self.argv)}\n".encode())
                fh.flush()
                self.proc = subprocess.Popen(
                    self.argv,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    env=child_env(),
                    preexec_fn=die_with_parent(),
                )
                signal.signal(signal.SIGTSTP, stop_along(self.proc))  # Ctrl-Z stops it too; `fg` resumes it
                while True:
                    try:
                        return self.proc.wait()
                    except KeyboardInterrupt:  # Ctrl-C: passed on once per press (the first saves and stops)
                        self.interrupted = signal.SIGINT
                        if self.proc.poll() is None:
                            self.proc.send_signal(signal.SIGINT)
        finally:
            signal.signal(signal.SIGTERM, old)
            signal.signal(signal.SIGTSTP, old_tstp)


def _last_error(log_path: Path) -> str:
    try:
        lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    errs = [ln for ln in lines if ln.startswith("sskd: ")]
    return (errs or lines or [""])[-1][:300]


def execute(
    runs: list[PlannedRun], launcher: str | None, keep_going: bool = False, progress: bool = True
) -> int:
    """Run what is not done yet, in order; returns the exit status (0, or the failing run's)."""
    from tqdm import tqdm

    prefix = shlex.split(launcher) + ["-m", "sskd"] if launcher else [sys.executable, "-m", "sskd"]
    failed: list[PlannedRun] = []
    bar = tqdm(total=len(runs), desc="sweep", unit="run", disable=not progress, dynamic_ncols=True)
    t_start = time.time()
    for i, run in enumerate(runs, 1):
        status = _status(run)
        rec = run.record()
        if rec.get("args") and rec["args"] != run.args and status in ("done", "partial"):
            raise SSKDError(
                f"{run.folder}: was run with another command than the spec gives now "
                f"({shlex.join(rec['args'])}); move it away or sweep into another --out"
            )
        if status == "done":
            bar.update(1)
            continue
        if status == "todo" and run.folder.is_dir() and run.finished():
            status = "done"
        deps = [d for d in failed if str(d.folder) in run.args]
        if deps:
            log.warning("%s: skipped: %s failed", run.folder, deps[0].folder)
            bar.update(1)
            continue
        args = [*run.args, "--out", str(run.folder), "--no-progress"] + (
            ["--resume"] if status == "partial" else []
        )
        run.folder.mkdir(parents=True, exist_ok=True)
        started = time.time()
        base = {"args": run.args, "command": shlex.join(prefix + args), "kind": run.kind, **run.meta}
        atomic.write_json(run.folder / RECORD, {**base, "status": "running", "started": started})
        bar.set_postfix_str(
            f"{run.kind} {run.meta['label'] if run.kind in ('student', 'cache') else run.folder.name}"
        )
        log.info(
            "[%d/%d] %s%s",
            i,
            len(runs),
            shlex.join(["sskd", *args]),
            " (resuming)" if status == "partial" else "",
        )
        child = _Child(prefix + args, run.folder / OUTPUT)
        rc = child.run()
        wall = round(time.time() - started, 1)
        if rc == 0 and run.finished():
            result = _result(run.folder) if run.kind != "cache" else {}
            atomic.write_json(
                run.folder / RECORD, {**base, "status": "done", "wall_s": wall, "result": result}
            )
            if run.kind == "cache":
                log.info("[%d/%d] %s: cached in %.0f s", i, len(runs), run.folder, wall)
            else:
                log.info(
                    "[%d/%d] %s: top-1 %s in %.0f s", i, len(runs), run.folder, result.get("top1", "-"), wall
                )
            if child.interrupted:  # it finished as the signal came: stop here all the same
                bar.close()
                log.warning(
                    "sweep: stopped by signal %d after %s; rerun the same `sskd sweep` to go on",
                    child.interrupted,
                    run.folder,
                )
                return 128 + child.interrupted
        else:
            why = _last_error(run.folder / OUTPUT)
            interrupted = rc < 0 or rc >= 128 or bool(child.interrupted)  # the run saved; a rerun resumes it
            atomic.write_json(
                run.folder / RECORD,
                {
                    **base,
                    "status": "interrupted" if interrupted else "failed",
                    "rc": rc,
                    "wall_s": wall,
                    "error": why,
                },
            )
            if interrupted:
                bar.close()
                log.warning("%s: interrupted; rerun the same `sskd sweep` to resume it", run.folder)
                return rc if rc >= 128 else 128 + (child.interrupted or -rc)
            log.error("%s: failed (exit %d): %s (output: %s)", run.folder, rc, why, run.folder / OUTPUT)
            failed.append(run)
            if not keep_going:
                bar.close()
                return 1
        bar.update(1)
    bar.close()
    log.info("sweep: %d runs, %d failed, %.0f s", len(runs), len(failed), time.time() - t_start)
    return 1 if failed else 0
