"""``sskd bench distill``: the step time of a CE-only student, a method with its live teacher and from the
cache, side by side on the same batches, on a chosen device and precision, for one method or a
representative of each family.

Batches are made before anything is timed and held on the training device, so what is timed is the
compute bound of a step (what a data pipeline on that device has to keep up with), not the pipeline.
``--data loader`` makes them with the DALI ViewLoader from ``--shards`` (views on the CPU); ``--data
synthetic`` makes random views of the same shape instead, since these models' step cost does not depend
on the pixels: that measures the GPU side of the loop where DALI cannot be had. The shards still give the
classes, the sample count and the labels (CRD's memory bank reads them).

On CUDA every step ends with ``torch.cuda.synchronize()``, so the GPU's work is counted in its own step and
not in whichever variant runs next. ``--mixed-precision`` runs the step under ``torch.autocast`` (fp16 with
a ``GradScaler``, the way Accelerate runs the training loop; bf16 autocast only). Every result names its
device, precision and batch size; images/s counts source images (each carrying all its views).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from sskd.core.atomic import write_json
from sskd.core.errors import SSKDError

# One representative per family: self-supervised (SSKD), hierarchical self-supervised (HSSAKD), logit (KD),
# decoupled logit (DKD), contrastive (CRD), feature hint (FitNet). ``--method all`` times these.
FAMILIES = ("sskd", "hssakd", "kd", "dkd", "crd", "fitnet")
PRECISIONS = ("no", "fp16", "bf16")


def method_names(text: str) -> list[str]:
    """``--method``: one name, a comma list or ``all`` (:data:`FAMILIES`); methods with teacher outputs only."""
    from sskd.methods import METHODS

    reg = METHODS["student"]
    known = [n for n in reg.names() if reg.get(n).outputs]
    names = list(FAMILIES) if text.strip() == "all" else [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise SSKDError(
            f"--method {text!r}: {', '.join(bad) or 'no name'} is not a method with teacher outputs "
            f"(all, or a comma list of: {', '.join(known)})"
        )
    return list(dict.fromkeys(names))


def precision_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in PRECISIONS]
    if bad or not names:
        raise SSKDError(f"--mixed-precision {text!r}: expected no, fp16, bf16 or a comma list of them")
    return list(dict.fromkeys(names))


def training_device(name: str) -> torch.device:
    """``--device``: ``auto`` is CUDA when a device is visible, else the CPU; ``cuda`` without one is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise SSKDError("--device cuda: no CUDA device is visible here; use --device cpu or auto")
        return torch.device("cuda")
    if name == "cpu":
        return torch.device("cpu")
    raise SSKDError(f"--device {name!r}: expected cuda, cpu or auto")


def device_label(device: torch.device) -> str:
    """The device as figures name it: ``cuda (NVIDIA H100 80GB HBM3)`` or ``cpu (N cores)``."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def bench_spec(args, method: str):
    """The student run the benchmark times (:func:`sskd.engine.prepare.prepare`): ``method`` from
    ``--student-arch`` on ``--shards`` with ``--views`` (and ``--size``), views made on the CPU, and a teacher
    of ``--teacher-arch`` with fresh weights (a step's cost does not depend on them)."""
    from sskd.engine.config import load_config
    from sskd.engine.prepare import FreshTeacher, prepare

    sets = [
        f"data.shards={args.shards}",
        f"data.views={args.views}",
        "data.device=cpu",
        f"student.method={method}",
        f"student.arch={args.student_arch}",
        f"student.batch_size={args.batch_size}",
    ]
    if getattr(args, "size", None):
        sets.append(f"data.size={args.size}")
    return prepare(load_config(None, sets), "student", teacher=FreshTeacher(args.teacher_arch))


def make_batches(spec, data: str, need: int, device: torch.device) -> tuple[list[dict], SimpleNamespace]:
    """``need`` training batches of ``spec`` on ``device`` and the shape they have (views, size, samples).

    ``loader``: the DALI ViewLoader's first batches of epoch 0. ``synthetic``: random views of the same shape
    (a seeded generator), ids drawn from the split without repeats where it is large enough, their labels."""
    bs = spec.cfg.student.batch_size
    if data == "loader":
        if importlib.util.find_spec("nvidia") is None or importlib.util.find_spec("nvidia.dali") is None:
            raise SSKDError(
                "--data loader reads the shards through DALI, which is not installed here; "
                "--data synthetic times the same steps on random views of the same shape"
            )
        from pipelines import ViewLoader

        loader = ViewLoader.for_run(spec, "train")
        batches = []
        for b in loader.epoch(0):
            batches.append({k: v.to(device) for k, v in b.items()})
            if len(batches) == need:
                break
        if len(batches) < need:
            raise SSKDError(f"{spec.cfg.data.shards}: only {len(batches)} batches of {bs}; lower --steps")
        shape = SimpleNamespace(
            num_views=loader.num_views,
            size=loader.size,
            num_samples=loader.num_samples,
            view_names=list(loader.view_names),
        )
        return batches, shape
    from shards.labels import MISSING, split_labels

    labels = torch.from_numpy(split_labels(spec.cfg.data.shards, "train"))
    have = torch.nonzero(labels != MISSING).flatten()
    names = list(spec.views.names) if spec.views is not None else ["normal"]
    g = torch.Generator().manual_seed(spec.cfg.run.seed)
    order = have[torch.randperm(len(have), generator=g)]
    order = order.repeat(-(-need * bs // len(order)))  # a small split: ids repeat across batches
    batches = []
    for i in range(need):
        ids = order[i * bs : (i + 1) * bs]
        views = torch.randn(bs, len(names), 3, spec.size, spec.size, generator=g)
        batches.append({"views": views.to(device), "label": labels[ids].to(device), "id": ids.to(device)})
    shape = SimpleNamespace(num_views=len(names), size=spec.size, num_samples=len(labels), view_names=names)
    return batches, shape


class Precision:
    """``--mixed-precision`` for a hand-made step: autocast, and fp16's loss scaling."""

    def __init__(self, name: str, device: torch.device):
        if name == "fp16" and device.type != "cuda":
            raise SSKDError("--mixed-precision fp16 needs a CUDA device (loss scaling); use bf16 on the CPU")
        self.name, self.device = name, device
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(name)

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def make_step(self, module: torch.nn.Module):
        """One SGD training step of ``module`` (``module(batch)["loss"]``), synchronised on CUDA."""
        opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
        scaler = torch.amp.GradScaler("cuda") if self.name == "fp16" else None
        module.train()

        def step(batch):
            with self.autocast():
                loss = module(batch)["loss"]
            opt.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            _sync(self.device)

        return step


class CEOnly(torch.nn.Module):
    """The method's student model alone, CE on every view (see :func:`_ce_loss`)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch):
        v = batch["views"]
        return {"loss": _ce_loss(self.model(v.flatten(0, 1)), batch["label"], v.shape[1])}


def cached_source(spec, teacher, batches, shape, folder: Path, autocast):
    """The teacher's outputs on exactly ``batches`` as a one-chunk cache in ``folder`` (untimed), as the run's
    teacher source (:class:`sskd.cache.CachedTeacher`, what ``distill --cache`` reads), and the outputs'
    specs. ``shape`` gives ``num_samples``, ``num_views`` and ``size`` (a loader, or the bench's own);
    ``autocast`` makes the precision's autocast context. ``bench train --cache`` uses it too."""
    from sskd.cache import (
        FORMAT,
        VERSION,
        CachedTeacher,
        CacheReader,
        chunk_path,
        teacher_arrays,
        write_chunk,
    )
    from sskd.cache.build import output_specs

    cls = spec.method
    with torch.inference_mode(), autocast():
        outs = [cls.teacher_outputs(teacher, b["views"]) for b in batches]
    ids = np.concatenate([b["id"].cpu().numpy() for b in batches])
    ids, first = np.unique(ids, return_index=True)  # a small split repeats ids: keep each once
    arrays = {n: torch.cat([o[n].float().cpu() for o in outs])[first] for n in cls.outputs}
    write_chunk(chunk_path(folder, 0, 0, 0), teacher_arrays(ids, arrays, None), 0, len(batches))
    specs = output_specs(cls, teacher, shape)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "complete": True,
        "binding": {},
        "epochs": 1,
        "num_samples": shape.num_samples,
        "num_classes": spec.num_classes,
        "topk": None,
        "outputs": specs,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    reader = CacheReader(folder, require_complete=False)  # a chunk of a few batches: its own index below
    reader._index[0] = _partial_index(reader, shape.num_samples)
    return CachedTeacher(spec.teacher.source, spec.teacher.info, reader), specs


def bench_method(args, method: str, precision: str, device: torch.device) -> dict:
    """CE-only, live and cached step times of one method at one precision on ``device``."""
    from dataclasses import replace

    from sskd.cache import bytes_per_sample
    from sskd.engine.prepare import build_method
    from sskd.models import create_model

    spec = bench_spec(args, method)
    cls = spec.method
    prec = Precision(precision, device)
    batches, shape = make_batches(spec, args.data, args.steps + args.warmup, device)
    live = build_method(spec).to(device)  # the student from the run seed, then the fresh teacher
    teacher = live.teacher.to(device)
    with tempfile.TemporaryDirectory(prefix="sskd-bench-cache-") as tmp:
        source, specs = cached_source(spec, teacher, batches, shape, Path(tmp), prec.autocast)
        cached = prec.make_step(build_method(replace(spec, teacher=source)).to(device))
        student = cls.student_model(create_model(args.student_arch, spec.num_classes), spec.num_classes)
        times = _interleaved(
            {
                "ce_step_s": prec.make_step(CEOnly(student).to(device)),
                "live_step_s": prec.make_step(live),
                "cached_step_s": lambda b: cached(source.batch(b, 0)),
            },
            batches,
            args.warmup,
        )
    bs = args.batch_size
    res = {
        "method": cls.name,
        "device": device_label(device),
        "precision": precision,
        "batch_size": bs,
        "views": shape.view_names,
        "size": shape.size,
    }
    res.update({key: round(v, 5) for key, v in times.items()})
    for key in ("ce", "live", "cached"):
        res[f"{key}_images_per_s"] = round(bs / times[f"{key}_step_s"], 1)
    res["live_over_cached"] = round(res["live_step_s"] / res["cached_step_s"], 2)
    res["cached_over_ce"] = round(res["cached_step_s"] / res["ce_step_s"], 3)
    res["live_over_ce"] = round(res["live_step_s"] / res["ce_step_s"], 2)
    if cls.cache_refusal:  # timed all the same: the figure shows what the refusal is about
        res["cache_refused_by_sskd_cache"] = cls.cache_refusal
    res["disk_bytes_per_sample_epoch"] = bytes_per_sample(shape.num_views, specs, None)
    return res


def run_bench(args) -> dict:
    for flag in ("steps", "batch_size"):
        if getattr(args, flag) < 1:
            raise SSKDError(f"--{flag.replace('_', '-')} must be >= 1, not {getattr(args, flag)}")
    if args.warmup < 0:
        raise SSKDError(f"--warmup must be >= 0, not {args.warmup}")
    methods = method_names(args.method)
    precisions = precision_names(args.mixed_precision)
    device = training_device(args.device)
    for p in precisions:
        Precision(p, device)  # fp16 on the CPU: refused before anything runs
    load_before = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    results = [bench_method(args, m, p, device) for m in methods for p in precisions]
    res = dict(results[0]) if len(results) == 1 else {}  # one method: its keys at the top, as before
    if (
        len(results) == 1 and results[0]["method"] == "sskd"
    ):  # the keys of the first version of this benchmark
        res.update(sskd_live_step_s=res["live_step_s"], sskd_cached_step_s=res["cached_step_s"])
    res["results"] = results
    res["config"] = {
        "methods": methods,
        "method": methods[0] if len(methods) == 1 else "all" if methods == list(FAMILIES) else methods,
        "teacher": args.teacher_arch,
        "student": args.student_arch,
        "views": results[0]["views"],
        "size": results[0]["size"],
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "data": args.data,
        "device": device_label(device),
        "precisions": precisions,
        "threads": torch.get_num_threads(),
    }
    res["machine"] = {
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "load_avg_1m_before": load_before,
    }
    print(format_table(res))
    if args.json:
        write_json(args.json, res)
    return res


def format_table(res: dict) -> str:
    c = res["config"]
    lines = [
        f"{c['teacher']} -> {c['student']} on {c['device']}, batch {c['batch_size']}, {c['steps']} timed steps "
        f"per variant ({c['data']} batches held on the device; images/s counts source images)",
        f"{'method':<8} {'views':>5} {'size':>4} {'precision':<9} {'CE s':>8} {'live s':>8} {'cached s':>8} "
        f"{'CE img/s':>9} {'live img/s':>10} {'cached img/s':>12} {'live/cached':>11}",
    ]
    for r in res["results"]:
        lines.append(
            f"{r['method']:<8} {len(r['views']):>5} {r['size']:>4} {r['precision']:<9} {r['ce_step_s']:>8.4f} "
            f"{r['live_step_s']:>8.4f} {r['cached_step_s']:>8.4f} {r['ce_images_per_s']:>9.1f} "
            f"{r['live_images_per_s']:>10.1f} {r['cached_images_per_s']:>12.1f} {r['live_over_cached']:>10.2f}x"
        )
    return "\n".join(lines)


def _partial_index(reader, n: int):
    """Index of a cache that holds only the benchmark's batches (not every sample of the epoch)."""
    from sskd.cache import epoch_dir, map_chunk

    path = sorted(epoch_dir(reader.path, 0).glob("*.safetensors"))[0]
    arrays = map_chunk(path)
    which, row = np.full(n, -1, np.int64), np.zeros(n, np.int64)
    ids = np.asarray(arrays["ids"])
    which[ids], row[ids] = 0, np.arange(len(ids))
    return [dict(arrays, __path__=path)], which, row
