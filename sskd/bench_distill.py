"""``sskd bench distill``: the step time of CE, SSKD with the live teacher and SSKD from the cache, side by side."""

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

from sskd.atomic import write_json


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


def run_bench(args) -> dict:
    from pipelines import ViewLoader
    from sskd.cache import (
        FORMAT,
        VERSION,
        CacheReader,
        bytes_per_sample,
        chunk_path,
        teacher_arrays,
        write_chunk,
    )
    from sskd.heads import SSModel
    from sskd.methods import create_method
    from sskd.models import create_model

    torch.manual_seed(0)
    loader = ViewLoader(args.shards, "train", batch_size=args.batch_size, views=args.views)
    k = loader.manifest["num_classes"]
    need = args.steps + args.warmup
    batches = []
    for b in loader.epoch(0):
        batches.append(b)
        if len(batches) == need:
            break
    if len(batches) < need:
        raise SystemExit(f"sskd: error: {args.shards}: only {len(batches)} batches of {args.batch_size}; lower --steps")
    teacher = SSModel(create_model(args.teacher_arch, k)).eval().requires_grad_(False)
    student = SSModel(create_model(args.student_arch, k))

    def make_step(method):
        opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
        method.train()

        def step(batch):
            out = method(batch)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
        return step

    class CEAllViews(torch.nn.Module):  # the student alone, same forward work as in SSKD (every view)
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, batch):
            v = batch["views"]
            logits = self.model(v.flatten(0, 1)).logits
            return {"loss": F.cross_entropy(logits, batch["label"].repeat_interleave(v.shape[1]))}

    live = create_method("sskd", student=SSModel(create_model(args.student_arch, k)), teacher=teacher, num_classes=k)
    with tempfile.TemporaryDirectory(prefix="sskd-bench-cache-") as tmp:
        cache = Path(tmp)
        with torch.inference_mode():  # build the cache of exactly these batches once (not timed)
            outs = [teacher(b["views"].flatten(0, 1)) for b in batches]
        ids = np.concatenate([b["id"].numpy() for b in batches])
        shape = lambda b, t: t.view(b["views"].shape[0], b["views"].shape[1], -1)
        arrays = teacher_arrays(ids, torch.cat([shape(b, o.logits) for b, o in zip(batches, outs)]),
                                torch.cat([shape(b, o.embed) for b, o in zip(batches, outs)]), None)
        write_chunk(chunk_path(cache, 0, 0, 0), arrays, 0, len(batches))
        manifest = {"format": FORMAT, "version": VERSION, "complete": True, "binding": {}, "epochs": 1,
                    "num_samples": loader.num_samples, "num_classes": k, "topk": None}
        (cache / "manifest.json").write_text(json.dumps(manifest))
        reader = CacheReader(cache)
        reader._index[0] = _partial_index(reader, loader.num_samples)
        cached = make_step(create_method("sskd", student=SSModel(create_model(args.student_arch, k)), teacher=None,
                                         num_classes=k))
        times = _interleaved({"ce_step_s": make_step(CEAllViews(student)), "sskd_live_step_s": make_step(live),
                              "sskd_cached_step_s": lambda b: cached({**b, **reader.lookup(b["id"], 0)})},
                             batches, args.warmup)
    res = dict(times)
    res = {key: round(v, 5) for key, v in res.items()}
    res["live_over_cached"] = round(res["sskd_live_step_s"] / res["sskd_cached_step_s"], 2)
    res["cached_over_ce"] = round(res["sskd_cached_step_s"] / res["ce_step_s"], 3)
    res["live_over_ce"] = round(res["sskd_live_step_s"] / res["ce_step_s"], 2)
    res["disk_bytes_per_sample_epoch"] = bytes_per_sample(loader.num_views, k, teacher.feat_dim, None)
    res["config"] = {"teacher": args.teacher_arch, "student": args.student_arch, "views": list(loader.view_names),
                     "batch_size": args.batch_size, "steps": args.steps, "threads": torch.get_num_threads()}
    res["machine"] = {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()}
    print(f"{args.teacher_arch} -> {args.student_arch}, {loader.num_views} views, batch {args.batch_size}, "
          f"{args.steps} steps each")
    print(f"{'variant':<14} {'step (s)':>9} {'vs CE':>7}")
    for name, key in (("ce", "ce_step_s"), ("sskd live", "sskd_live_step_s"), ("sskd cached", "sskd_cached_step_s")):
        print(f"{name:<14} {res[key]:>9.4f} {res[key] / res['ce_step_s']:>7.2f}")
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
