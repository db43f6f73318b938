"""``sskd bench distill``: the step time of a CE-only student, a method with its live teacher and from the cache,
side by side on the same batches."""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sskd.core.atomic import write_json


def _interleaved(steps: dict, batches, warmup: int) -> dict[str, float]:
    """Mean seconds per step of each variant, the variants taking turns on every batch so that drift
    of the machine (clock, other load) falls on all of them alike."""
    total = dict.fromkeys(steps, 0.0)
    for i, batch in enumerate(batches):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step(batch)
            if i >= warmup:
                total[name] += time.perf_counter() - t0
    return {name: t / (len(batches) - warmup) for name, t in total.items()}


def _ce_loss(out, labels: torch.Tensor, views: int) -> torch.Tensor:
    """CE only, on every output the student model makes: its logits on every view (and, for a model with
    HSSAKD branches, every branch on the joint labels), so it does all the forward and backward work
    of the method's student except the teacher's part."""
    from sskd.losses import joint_labels

    y = labels.repeat_interleave(views)
    if torch.is_tensor(out):
        return F.cross_entropy(out, y)
    loss = F.cross_entropy(out.logits, y)
    for aux in getattr(out, "aux", []):
        loss = loss + F.cross_entropy(aux, joint_labels(labels, views).reshape(-1))
    return loss


def bench_spec(args):
    """The student run the benchmark times (:func:`sskd.engine.prepare.prepare`): ``--method`` from
    ``--student-arch`` on ``--shards`` with ``--views``, views made on the CPU, and a teacher of
    ``--teacher-arch`` with fresh weights (a step's cost does not depend on them)."""
    from sskd.engine.config import load_config
    from sskd.engine.prepare import FreshTeacher, prepare

    cfg = load_config(
        None,
        [
            f"data.shards={args.shards}",
            f"data.views={args.views}",
            "data.device=cpu",
            f"student.method={args.method}",
            f"student.arch={args.student_arch}",
            f"student.batch_size={args.batch_size}",
        ],
    )
    return prepare(cfg, "student", teacher=FreshTeacher(args.teacher_arch))


def run_bench(args) -> dict:
    from dataclasses import replace

    from pipelines import ViewLoader
    from sskd.cache import (
        FORMAT,
        VERSION,
        CachedTeacher,
        CacheReader,
        bytes_per_sample,
        chunk_path,
        teacher_arrays,
        write_chunk,
    )
    from sskd.cache.build import output_specs
    from sskd.core.errors import SSKDError
    from sskd.engine.prepare import build_method
    from sskd.methods import method_class
    from sskd.models import create_model

    cls = method_class("student", args.method)
    if not cls.outputs:
        raise SSKDError(
            f"--method {cls.name} uses no teacher outputs: nothing to compare live against cached"
        )
    spec = bench_spec(args)
    loader = ViewLoader.for_run(spec, "train")
    k = spec.num_classes
    need = args.steps + args.warmup
    batches = []
    for b in loader.epoch(0):
        batches.append(b)
        if len(batches) == need:
            break
    if len(batches) < need:
        raise SSKDError(f"{args.shards}: only {len(batches)} batches of {args.batch_size}; lower --steps")
    live = build_method(spec)  # the student from the run seed, then the fresh teacher
    teacher = live.teacher

    def student():
        return cls.student_model(create_model(args.student_arch, k), k)

    def make_step(method):
        opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
        method.train()

        def step(batch):
            out = method(batch)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()

        return step

    class CEOnly(torch.nn.Module):  # the method's student model alone, CE on every view (see _ce_loss)
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, batch):
            v = batch["views"]
            return {"loss": _ce_loss(self.model(v.flatten(0, 1)), batch["label"], v.shape[1])}

    with tempfile.TemporaryDirectory(prefix="sskd-bench-cache-") as tmp:
        cache = Path(tmp)
        with torch.inference_mode():  # build the cache of exactly these batches once (not timed)
            outs = [cls.teacher_outputs(teacher, b["views"]) for b in batches]
        ids = np.concatenate([b["id"].numpy() for b in batches])
        arrays = teacher_arrays(ids, {n: torch.cat([o[n] for o in outs]) for n in cls.outputs}, None)
        write_chunk(chunk_path(cache, 0, 0, 0), arrays, 0, len(batches))
        specs = output_specs(cls, teacher, loader)
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "complete": True,
            "binding": {},
            "epochs": 1,
            "num_samples": loader.num_samples,
            "num_classes": k,
            "topk": None,
            "outputs": specs,
        }
        (cache / "manifest.json").write_text(json.dumps(manifest))
        reader = CacheReader(cache, require_complete=False)  # a chunk of a few batches: its own index below
        reader._index[0] = _partial_index(reader, loader.num_samples)
        source = CachedTeacher(spec.teacher.source, spec.teacher.info, reader)
        cached = make_step(build_method(replace(spec, teacher=source)))
        times = _interleaved(
            {
                "ce_step_s": make_step(CEOnly(student())),
                "live_step_s": make_step(live),
                "cached_step_s": lambda b: cached(source.batch(b, 0)),
            },
            batches,
            args.warmup,
        )
    res = {key: round(v, 5) for key, v in times.items()}
    res["method"] = cls.name
    res["live_over_cached"] = round(res["live_step_s"] / res["cached_step_s"], 2)
    res["cached_over_ce"] = round(res["cached_step_s"] / res["ce_step_s"], 3)
    res["live_over_ce"] = round(res["live_step_s"] / res["ce_step_s"], 2)
    if cls.name == "sskd":  # the keys of the first version of this benchmark
        res.update(sskd_live_step_s=res["live_step_s"], sskd_cached_step_s=res["cached_step_s"])
    res["disk_bytes_per_sample_epoch"] = bytes_per_sample(loader.num_views, specs, None)
    res["config"] = {
        "method": cls.name,
        "teacher": args.teacher_arch,
        "student": args.student_arch,
        "views": list(loader.view_names),
        "batch_size": args.batch_size,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
    }
    res["machine"] = {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()}
    print(
        f"{cls.name}: {args.teacher_arch} -> {args.student_arch}, {loader.num_views} views, batch {args.batch_size}, "
        f"{args.steps} steps each"
    )
    print(f"{'variant':<16} {'step (s)':>9} {'vs CE':>7}")
    for name, key in (
        ("student, CE only", "ce_step_s"),
        (f"{cls.name} live", "live_step_s"),
        (f"{cls.name} cached", "cached_step_s"),
    ):
        print(f"{name:<16} {res[key]:>9.4f} {res[key] / res['ce_step_s']:>7.2f}")
    print(f"live / cached = {res['live_over_cached']:.2f}x; cached / CE = {res['cached_over_ce']:.3f}")
    if args.json:
        write_json(args.json, res)
    return res


def _partial_index(reader, n: int):
    """Index of a cache that holds only the benchmark's batches (not every sample of the epoch)."""
    from sskd.cache import epoch_dir, map_chunk

    path = sorted(epoch_dir(reader.path, 0).glob("*.safetensors"))[0]
    arrays = map_chunk(path)
    which, row = np.full(n, -1, np.int64), np.zeros(n, np.int64)
    ids = np.asarray(arrays["ids"])
    which[ids], row[ids] = 0, np.arange(len(ids))
    return [dict(arrays, __path__=path)], which, row
