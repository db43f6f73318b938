"""``sskd bench train``: images/s of real training steps fed by the DALI ViewLoader, against the same steps
on batches loaded into memory beforehand (the compute bound), in one run.

The step is the training loop's own: :func:`sskd.engine.loop.train_step` on a method made by the method's class
(a freshly initialised teacher of ``--teacher-arch``, as ``sskd bench distill`` does; the step cost does
not depend on the weights), with the SGD optimizer, lr schedule and Accelerate set-up of
:class:`sskd.engine.loop.Run`; every ``--log-every`` steps (and at the last step of every run) the loop's own
metrics line (:meth:`sskd.engine.loop.Run.log_interval`: the reduction of the summed terms, one device sync,
a JSON line) is written to a temporary ``metrics.jsonl``.

Variants: *loader* reads a fresh epoch of :class:`pipelines.ViewLoader` as the loop does (``reuse_buffers``,
the training device as ``torch_device``, the method's views); *preloaded* replays the same batches, made
beforehand and held in memory on the training device. Each variant runs twice, in the order
loader, preloaded, preloaded, loader (the mean cancels a linear drift of the machine), each run after
``--warmup`` untimed steps. For the loader variant the time of every timed step is split into waiting
for data (``next(batches)``), the step (with ``--cache`` the cache lookup as well, as the loop's batch
hook does it) and logging. On CUDA each step ends with ``torch.cuda.synchronize()`` in both variants, so
the GPU's work is counted in the step and not in whatever waits for it next.

``--cache``: the teacher's outputs on exactly these batches are computed once (not timed) and stored as
a cache chunk in a temporary folder (the format ``sskd cache`` writes); both variants then train the
method without a teacher and read the outputs through :class:`sskd.cache.CacheReader`, as
``distill --cache`` does.
"""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
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


def _bench_run(args, tmp: Path):
    """A :class:`sskd.engine.loop.Run` holding only what a training step and a metrics line need (no loaders,
    no run folder): the method prepared by Accelerate, its SGD optimizer and lr schedule, the counters."""
    from sskd.core.errors import SSKDError
    from sskd.engine.config import load_config
    from sskd.engine.dist import make_accelerator
    from sskd.engine.loop import Run
    from sskd.methods import method_class, resolve_views
    from sskd.models import create_model
    from sskd.runs import MetricsLog
    from sskd.runs.models import new_model

    cls = method_class("student", args.method)
    if args.cache:
        if not cls.outputs:
            raise SSKDError(f"--cache: method {cls.name} uses no teacher outputs: there is nothing to cache")
        if cls.cache_refusal:
            raise SSKDError(f"--cache: method {cls.name} does not use the cache: {cls.cache_refusal}")
    sets = [
        f"data.views={args.views}",
        f"student.method={cls.name}",
        f"student.batch_size={args.batch_size}",
        f"data.device={args.device}",
    ]
    if args.mixed_precision != "no":  # (YAML reads a bare ``no`` as false)
        sets.append(f"run.mixed_precision={args.mixed_precision}")
    if args.threads:
        sets.append(f"data.threads={args.threads}")
    if args.log_every:
        sets.append(f"run.log_every={args.log_every}")
    cfg = load_config(None, sets)
    views = resolve_views(cfg, cls)
    accelerator = make_accelerator(cfg.run.mixed_precision, 1, cfg.data.device)
    from shards.format import load_manifest

    k = int(load_manifest(args.shards)["num_classes"])
    torch.manual_seed(0)  # the student first, from the seed (as sskd.runs.models.builder builds it)
    student = cls.student_model(create_model(args.student_arch, k), k)
    teacher = None
    if cls.needs_teacher or (args.cache and cls.outputs):
        teacher = new_model(args.teacher_arch, k, wrapper=cls.teacher_part).eval().requires_grad_(False)
    method = cls(student, None if args.cache else teacher, num_classes=k)
    run = Run.__new__(Run)  # the loop's own object, without what a benchmark does not use
    run.cfg, run.st, run.out = cfg, cfg.student, tmp
    run.accelerator, run.main, run.world = accelerator, True, 1
    run.phases, run.bar, run.state = (
        [],
        None,
        {"step": 0, "epoch": 0, "batch": 0, "best_top1": -1.0, "phase": 0, "skipped": 0},
    )
    run.init_step_state()
    run.method_cls = cls
    st = cfg.student
    params = method.phase_parameters(None)
    active = {id(p) for p in params}
    for p in method.parameters():  # as Run.enter_phase does for the main training
        p.requires_grad_(id(p) in active)
    method.set_phase(None)
    optimizer = torch.optim.SGD(
        params, lr=st.lr, momentum=st.momentum, weight_decay=st.weight_decay, nesterov=st.nesterov
    )
    run.params = params
    run.method, run.optimizer = accelerator.prepare(method, optimizer)
    run.core = accelerator.unwrap_model(run.method)
    run.metrics = MetricsLog(tmp, enabled=True, accelerator=accelerator)
    run._sums, run._seen, run._micro, run._t0 = {}, 0, 0, time.perf_counter()
    if teacher is not None:
        teacher.to(accelerator.device)
    return run, cls, views, teacher


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _steps(run, batches, warmup: int, timed: int, hook, log_every: int) -> dict:
    from sskd.engine.loop import train_step

    device = run.accelerator.device
    split = {"data_wait_s": 0.0, "step_s": 0.0, "logging_s": 0.0}
    images = 0
    run._sums, run._seen, run._micro, run._t0 = {}, 0, 0, time.perf_counter()
    it = iter(batches)
    try:
        for i in range(warmup + timed):
            t0 = time.perf_counter()
            batch = next(it)
            t1 = time.perf_counter()
            if hook is not None:  # the loop's batch hook (distill --cache): cached teacher outputs
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
    from pipelines import ViewLoader
    from sskd.core.errors import SSKDError
    from sskd.engine.dist import pipeline_device
    from sskd.engine.loop import lr_factor

    for flag in ("steps", "batch_size"):
        if getattr(args, flag) < 1:
            raise SSKDError(f"--{flag.replace('_', '-')} must be >= 1, not {getattr(args, flag)}")
    if args.warmup < 0:
        raise SSKDError(f"--warmup must be >= 0, not {args.warmup}")
    load_before = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    with tempfile.TemporaryDirectory(prefix="sskd-bench-train-") as tmp_name:
        tmp = Path(tmp_name)
        run, cls, views, teacher = _bench_run(args, tmp)
        cfg, accelerator = run.cfg, run.accelerator
        device = accelerator.device
        loader_kw = {
            "batch_size": args.batch_size,
            "views": views,
            "train": True,
            "seed": cfg.run.seed,
            "device": pipeline_device(cfg.data.device),
            "threads": cfg.data.threads,
            "size": args.size,
            "torch_device": device,
        }
        loader = ViewLoader(
            args.shards, "train", reuse_buffers=True, **loader_kw
        )  # as sskd.engine.loop._loaders
        run.train_loader = loader
        run.steps_per_epoch = max(1, len(loader))
        run.scheduler = torch.optim.lr_scheduler.LambdaLR(
            run.optimizer.optimizer, lr_factor(run.st, len(loader))
        )
        first = math.ceil(args.steps / 2)
        runs_timed = [first, args.steps - first]  # loader, preloaded, preloaded, loader
        need = args.warmup + first
        if need > len(loader):
            raise SSKDError(
                f"{args.shards}: an epoch has only {len(loader)} batches of {args.batch_size}; "
                f"--warmup + half of --steps ({need}) must fit in one: lower --steps or --batch-size"
            )
        # The same batches the loader variant gets (an epoch is a pure function of its seed), owned copies
        # on the training device: the compute bound.
        preloaded = []
        for b in ViewLoader(args.shards, "train", reuse_buffers=False, **loader_kw).epoch(0):
            preloaded.append({key: v.clone() for key, v in b.items()})
            if len(preloaded) == need:
                break
        hook = None
        if args.cache:
            hook = _cache_hook(cls, teacher, preloaded, loader, accelerator, tmp / "cache")
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
            source = loader.epoch(0) if name == "loader" else preloaded
            got = _steps(run, source, args.warmup, timed, hook, log_every)
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


def _cache_hook(cls, teacher, batches, loader, accelerator, cache: Path):
    """Teacher outputs of exactly ``batches`` as a one-chunk cache (untimed); the loop's batch hook
    (:func:`sskd.cache.build.attach_cache`) reading it."""
    from sskd.bench.distill import _partial_index
    from sskd.cache import FORMAT, VERSION, CacheReader, chunk_path, teacher_arrays, write_chunk
    from sskd.cache.build import output_specs

    with torch.inference_mode(), accelerator.autocast():
        outs = [cls.teacher_outputs(teacher, b["views"]) for b in batches]
    ids = np.concatenate([b["id"].cpu().numpy() for b in batches])
    arrays = teacher_arrays(
        ids, {n: torch.cat([o[n].float().cpu() for o in outs]) for n in cls.outputs}, None
    )
    write_chunk(chunk_path(cache, 0, 0, 0), arrays, 0, len(batches))
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "complete": True,
        "binding": {},
        "epochs": 1,
        "num_samples": loader.num_samples,
        "num_classes": loader.num_classes,
        "topk": None,
        "outputs": output_specs(cls, teacher, loader),
    }
    (cache / "manifest.json").write_text(json.dumps(manifest))
    reader = CacheReader(cache, require_complete=False)  # a chunk of a few batches: its own index below
    reader._index[0] = _partial_index(reader, loader.num_samples)

    def hook(batch):
        out = reader.lookup(batch["id"], 0)
        return {**batch, **{k: v.to(batch["views"].device) for k, v in out.items()}}

    return hook


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
