"""``sskd bench train``: images/s of real training steps fed by the DALI ViewLoader, against the same steps
on batches loaded into memory beforehand (the compute bound), in one run.

The step is the training loop's own: :func:`sskd.engine.loop.train_step` in a :class:`sskd.engine.loop.Run`
of a prepared student run (the method made by its class's build, with a freshly initialised teacher of
``--teacher-arch``, as ``sskd bench distill`` does; the step cost does not depend on the weights), its SGD
optimizer, lr schedule and Accelerate set-up; every ``--log-every`` steps (and at the last step of every run) the loop's own
metrics line (:meth:`sskd.engine.loop.Run.log_interval`: the reduction of the summed terms, one device sync,
a JSON line) is written to a temporary ``metrics.jsonl``.

Variants: *loader* reads a fresh epoch of :class:`pipelines.ViewLoader` as the loop does (``reuse_buffers``,
the training device as ``torch_device``, the method's views); *preloaded* replays the same batches, made
beforehand and held in memory on the training device. Each variant runs twice, in the order
loader, preloaded, preloaded, loader (the mean cancels a linear drift of the machine), each run after
``--warmup`` untimed steps. For the loader variant the time of every timed step is split into waiting
for data (``next(batches)``), the step (with ``--cache`` the cache lookup as well, as the loop asks its
teacher source for it) and logging. On CUDA each step ends with ``torch.cuda.synchronize()`` in both variants, so
the GPU's work is counted in the step and not in whatever waits for it next.

``--cache``: the teacher's outputs on exactly these batches are computed once (not timed) and stored as
a cache chunk in a temporary folder (the format ``sskd cache`` writes); both variants then train the
method without a teacher and read the outputs through :class:`sskd.cache.CachedTeacher`, as
``distill --cache`` does.
"""

from __future__ import annotations

import math
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from sskd.core.atomic import write_json


def _machine(accelerator) -> dict:
    info = {
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "training_device": str(accelerator.device),
    }
    if hasattr(os, "getloadavg"):  # other work on the machine shares its cores (the figures move with it)
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(
            accelerator.device if accelerator.device.type == "cuda" else 0
        )
    try:
        from nvidia import dali

        info["dali"] = dali.__version__
    except ImportError:  # pragma: no cover - DALI is a dependency of the loader
        info["dali"] = None
    return info


def bench_spec(args, out: Path):
    """The student run the benchmark times (:func:`sskd.engine.prepare.prepare`): ``--method`` from
    ``--student-arch`` on ``--shards`` with the benchmark's views, size, batch, devices and precision, and a
    teacher of ``--teacher-arch`` with fresh weights (a step's cost does not depend on them)."""
    from sskd.engine.config import load_config
    from sskd.engine.prepare import FreshTeacher, prepare

    sets = [
        f"data.shards={args.shards}",
        f"data.views={args.views}",
        f"student.method={args.method}",
        f"student.arch={args.student_arch}",
        f"student.batch_size={args.batch_size}",
        f"data.device={args.device}",
    ]
    if args.size:
        sets.append(f"data.size={args.size}")
    if args.mixed_precision != "no":  # (YAML reads a bare ``no`` as false)
        sets.append(f"run.mixed_precision={args.mixed_precision}")
    if args.threads:
        sets.append(f"data.threads={args.threads}")
    if args.log_every:
        sets.append(f"run.log_every={args.log_every}")
    return prepare(load_config(None, sets), "student", teacher=FreshTeacher(args.teacher_arch), out=out)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _steps(run, batches, warmup: int, timed: int, hook, log_every: int) -> dict:
    from sskd.engine.loop import train_step

    device = run.accelerator.device
    split = {"data_wait_s": 0.0, "step_s": 0.0, "logging_s": 0.0}
    images = 0
    run.reset_interval()
    it = iter(batches)
    try:
        for i in range(warmup + timed):
            t0 = time.perf_counter()
            batch = next(it)
            t1 = time.perf_counter()
            if hook is not None:  # distill --cache: the batch's cached teacher outputs
                batch = hook(batch)
            train_step(run, batch)
            run.scheduler.step()
            run.state["step"] += 1
            _sync(device)
            t2 = time.perf_counter()
            if run.state["step"] % log_every == 0 or i == warmup + timed - 1:
                run.log_interval(0)
            t3 = time.perf_counter()
            if i >= warmup:
                split["data_wait_s"] += t1 - t0
                split["step_s"] += t2 - t1
                split["logging_s"] += t3 - t2
                images += int(batch["label"].shape[0])
    finally:
        close = getattr(it, "close", None)
        if close is not None:  # a loader epoch: stop its DALI pipeline before the next run
            close()
    return {"images": images, **split}


def run_bench(args) -> dict:
    from dataclasses import replace

    from pipelines import ViewLoader
    from sskd.core.errors import SSKDError
    from sskd.engine.dist import make_accelerator
    from sskd.engine.loop import Run
    from sskd.engine.prepare import check_cacheable
    from sskd.methods import method_class
    from sskd.runs import MetricsLog
    from sskd.runs.models import freeze

    for flag in ("steps", "batch_size"):
        if getattr(args, flag) < 1:
            raise SSKDError(f"--{flag.replace('_', '-')} must be >= 1, not {getattr(args, flag)}")
    if args.warmup < 0:
        raise SSKDError(f"--warmup must be >= 0, not {args.warmup}")
    if args.cache:
        check_cacheable(method_class("student", args.method))
    load_before = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    with tempfile.TemporaryDirectory(prefix="sskd-bench-train-") as tmp_name:
        tmp = Path(tmp_name)
        spec = bench_spec(args, tmp)
        cls, cfg = spec.method, spec.cfg
        accelerator = make_accelerator(cfg.run.mixed_precision, 1, cfg.data.device)
        device = accelerator.device
        # The same batches the loader variant gets (an epoch is a pure function of its seed), owned copies
        # on the training device: the compute bound.
        fresh = ViewLoader.for_run(spec, "train", torch_device=device)
        first = math.ceil(args.steps / 2)
        runs_timed = [first, args.steps - first]  # loader, preloaded, preloaded, loader
        need = args.warmup + first
        if need > len(fresh):
            raise SSKDError(
                f"{args.shards}: an epoch has only {len(fresh)} batches of {args.batch_size}; "
                f"--warmup + half of --steps ({need}) must fit in one: lower --steps or --batch-size"
            )
        preloaded = []
        for b in fresh.epoch(0):
            preloaded.append({key: v.clone() for key, v in b.items()})
            if len(preloaded) == need:
                break
        hook = None
        if args.cache:
            teacher = freeze(spec.teacher.load()).to(device)
            source = _cache_source(spec, teacher, preloaded, fresh, accelerator, tmp / "cache")
            spec = replace(spec, teacher=source)

            def hook(batch):  # the loop's lookup of a batch's cached teacher outputs
                return source.batch(batch, 0)

        # The loop's own run: the method as its build makes it, prepared by Accelerate, its SGD optimizer and
        # lr schedule, its training loader (reused buffers, the training device) and its counters.
        run = Run(spec, accelerator)
        run.enter_phase()
        run.metrics = MetricsLog(tmp, enabled=True, accelerator=accelerator)
        loader = run.train_loader
        run.method.train()
        log_every = cfg.run.log_every
        order = [
            ("loader", runs_timed[0]),
            ("preloaded", runs_timed[0]),
            ("preloaded", runs_timed[1]),
            ("loader", runs_timed[1]),
        ]
        totals = {
            name: {"images": 0, "data_wait_s": 0.0, "step_s": 0.0, "logging_s": 0.0}
            for name in ("loader", "preloaded")
        }
        for name, timed in order:
            if timed == 0:
                continue
            batches = loader.epoch(0) if name == "loader" else preloaded
            got = _steps(run, batches, args.warmup, timed, hook, log_every)
            for key, v in got.items():
                totals[name][key] += v
        metrics = tmp / "metrics.jsonl"
        logged = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
        run.metrics.close()
    rates = {
        name: t["images"] / (t["data_wait_s"] + t["step_s"] + t["logging_s"]) for name, t in totals.items()
    }
    lt = totals["loader"]
    res = {
        "loader_images_per_s": round(rates["loader"], 2),
        "preloaded_images_per_s": round(rates["preloaded"], 2),
        "ratio": round(rates["loader"] / rates["preloaded"], 3),
        "time_split": {key: round(lt[key], 4) for key in ("data_wait_s", "step_s", "logging_s")},
        "preloaded_time_split": {
            key: round(totals["preloaded"][key], 4) for key in ("data_wait_s", "step_s", "logging_s")
        },
        "timed_images": {name: t["images"] for name, t in totals.items()},
        "metrics_lines": logged,
    }
    res["config"] = {
        "shards": str(args.shards),
        "method": cls.name,
        "teacher": args.teacher_arch,
        "student": args.student_arch,
        "views": list(loader.view_names),
        "size": loader.size,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "cache": bool(args.cache),
        "device": args.device,
        "dali_device": loader.device,
        "dali_threads": loader.threads,
        "mixed_precision": cfg.run.mixed_precision,
        "log_every": log_every,
        "order": [n for n, t in order if t],
    }
    res["machine"] = _machine(accelerator)
    res["machine"]["load_avg_1m_before"] = load_before
    print(format_table(res))
    if args.json:
        write_json(args.json, res)
        print(f"wrote {args.json}")
    return res


def _cache_source(spec, teacher, batches, loader, accelerator, cache: Path):
    """Teacher outputs of exactly ``batches`` as a one-chunk cache (untimed), as the run's teacher source
    (:class:`sskd.cache.CachedTeacher`, what ``distill --cache`` reads): ``bench distill``'s."""
    from sskd.bench.distill import cached_source

    return cached_source(spec, teacher, batches, loader, cache, accelerator.autocast)[0]


def format_table(res: dict) -> str:
    c = res["config"]
    lines = [
        (
            f"{c['method']}: {c['teacher']} -> {c['student']}, views {', '.join(c['views'])} at {c['size']} px, "
            f"batch {c['batch_size']}, {c['steps']} timed steps per variant, DALI {c['dali_device']} "
            f"({c['dali_threads']} threads), training on {res['machine']['training_device']}"
            f"{', teacher from a cache' if c['cache'] else ''}"
        ),
        f"{'variant':<11} {'images/s':>10}",
        "-" * 22,
        f"{'loader':<11} {res['loader_images_per_s']:>10.2f}",
        f"{'preloaded':<11} {res['preloaded_images_per_s']:>10.2f}",
    ]
    s = res["time_split"]
    total = sum(s.values()) or 1.0
    lines.append(f"loader / preloaded = {res['ratio']:.3f}")
    lines.append(
        "loader-fed time: "
        + ", ".join(f"{k[:-2].replace('_', ' ')} {v:.3f} s ({100 * v / total:.1f} %)" for k, v in s.items())
    )
    return "\n".join(lines)
