"""``sskd bench cache``: what each storage level of the teacher cache costs, measured against the exact
teacher on real batches of the training views (loss terms, similarity entries, the selective-transfer
mask, top-1), and how fast a chunk reads beside the pipeline's decode of the same samples."""

from __future__ import annotations

import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def bench_spec(args):
    """The student run the benchmark compares on: ``--method`` on ``--shards`` with ``--teacher``, views made
    on the CPU by one DALI thread (the decode rate is single-threaded, like the cache's read rate)."""
    from sskd.engine.config import load_config
    from sskd.engine.prepare import prepare

    sets = [
        f"data.shards={args.shards}",
        "data.device=cpu",
        "data.threads=1",
        f"student.method={args.method}",
        f"student.batch_size={args.batch_size}",
        "run.progress=false",
    ]
    if args.student_arch:
        sets.append(f"student.arch={args.student_arch}")
    return prepare(load_config(args.config, sets + list(args.set)), "student", teacher=args.teacher)


def _terms(method, batch: dict[str, Any], outs: dict[str, torch.Tensor]) -> dict[str, float]:
    """The method's teacher-dependent loss terms on ``batch`` with the teacher outputs ``outs``."""
    with torch.no_grad():
        res = method({**batch, **{f"t_{n}": v for n, v in outs.items()}})
    return {
        k: float(v)
        for k, v in res.items()
        if k not in ("logits", "ce") and torch.is_tensor(v) and v.dim() == 0
    }


def _grad(method, batch: dict[str, Any], outs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The gradient of the method's loss on ``batch`` with the teacher outputs ``outs`` with respect to the
    fixed student's parameters, flattened: what a training step sees (a loss term's value also holds parts
    no gradient sees, such as the teacher's own entropy in a KL)."""
    params = [p for p in method.parameters() if p.requires_grad]
    loss = method({**batch, **{f"t_{n}": v for n, v in outs.items()}})["loss"]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])


def _similarity(embed: torch.Tensor) -> torch.Tensor:
    """SSKD's teacher similarity matrix of a batch (Eq. 4): transformed views' rows against normal views."""
    from einops import rearrange

    from sskd.losses import similarity_matrix

    return similarity_matrix(rearrange(embed[:, 1:], "b v d -> (b v) d"), embed[:, 0])


def _write_cache(folder: Path, outputs, storage, bases, ids_outs, n: int) -> Path:
    """A one-chunk cache of the benchmark's samples (ids 0..n-1) at ``storage``, as `sskd cache` writes one."""
    from sskd.cache import FORMAT, VERSION, chunk_path, teacher_arrays, write_chunk
    from sskd.cache.build import write_projections
    from sskd.cache.levels import level_name
    from sskd.core.atomic import write_json

    folder.mkdir(parents=True)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "complete": True,
        "binding": {"level": level_name(storage)},
        "epochs": 1,
        "num_samples": n,
        "outputs": [{**o, "storage": storage[o["name"]].to_json()} for o in outputs],
        "topk": None,
    }
    if bases:
        manifest["projections_sha256"] = write_projections(folder, bases)
    arrays = teacher_arrays(np.arange(n), ids_outs, storage=storage, bases=bases)
    write_chunk(chunk_path(folder, 0, 0, 0), arrays, 0, 1)
    write_json(folder / "manifest.json", manifest)
    return folder


def _read_rate(reader, n: int, batch_size: int, seconds: float = 0.5) -> float:
    """Samples per second of lookups in a shuffled order (one thread, after the first, checksummed, read),
    whole passes over the chunk until ``seconds`` have gone by: the best pass, since other load only
    ever slows a pass down."""
    order = torch.from_numpy(np.random.default_rng(0).permutation(n))
    reader.lookup(order[:batch_size], 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    best, start = 0.0, time.perf_counter()
    try:
        while time.perf_counter() - start < seconds or best == 0.0:
            t0 = time.perf_counter()
            for i in range(0, n, batch_size):
                reader.lookup(order[i : i + batch_size], 0)
            best = max(best, n / (time.perf_counter() - t0))
        return best
    finally:
        torch.set_num_threads(threads)


def run_bench(args) -> dict[str, Any]:
    from pipelines import ViewLoader
    from sskd.cache import CacheReader, manifest_storage
    from sskd.cache.build import FIT_ROWS, output_specs
    from sskd.cache.levels import (
        IMAGENET,
        at_temperatures,
        bytes_per_image,
        compact,
        default,
        fit_basis,
        imagenet_outputs,
        imagenet_views,
        level_name,
        level_storage,
        pareto,
    )
    from sskd.core.atomic import write_json
    from sskd.core.errors import SSKDError
    from sskd.losses import select_rows
    from sskd.losses.pretext import own_image_targets
    from sskd.models import create_model
    from sskd.runs.models import freeze

    for flag in ("batch_size", "batches"):
        if getattr(args, flag) < 1:
            raise SSKDError(f"--{flag.replace('_', '-')} must be >= 1, not {getattr(args, flag)}")
    only = getattr(args, "only", False)
    if only and not getattr(args, "level", []):
        raise SSKDError("--only measures the --level levels: name at least one with --level")
    spec = bench_spec(args)
    cls, k = spec.method, spec.num_classes
    if cls.cache_refusal:
        raise SSKDError(f"--method {cls.name}: not cached ({cls.cache_refusal})")
    loader = ViewLoader.for_run(spec, "train", train=True, label_noise=0.0, skip_bad=False)
    batches, stamps = [], []
    t0 = time.perf_counter()
    for b in loader.epoch(0):
        batches.append(b)
        stamps.append(time.perf_counter())
        if len(batches) == args.batches:
            break
    if len(batches) < 2:
        raise SSKDError(
            f"{args.shards}: {len(batches)} batch of {args.batch_size}; the bench needs 2 or more"
        )
    # The first batch carries DALI's start-up: the decode rate is over the others.
    decode_rate = sum(len(b["id"]) for b in batches[1:]) / (stamps[-1] - stamps[0])
    del t0
    teacher = freeze(spec.teacher.load())
    with torch.inference_mode():
        exact = [{n: v.float() for n, v in cls.teacher_outputs(teacher, b["views"]).items()} for b in batches]
    exact = [{n: v.clone() for n, v in e.items()} for e in exact]  # normal tensors: _grad saves them
    outputs = output_specs(cls, teacher, loader, spec.teacher.info)
    views = loader.num_views
    default_storage, _ = default(outputs, k)
    levels, names = [], set()
    temps = cls.topk_temperatures(spec.method_cfg)  # top-K tails kept where the method reads them, as built
    asked = [level_storage(name, outputs) for name in getattr(args, "level", [])]  # one line when bad
    front = [level_storage("exact", outputs)] if only else [*pareto(views, outputs), compact(outputs)]
    for storage in [*front, default_storage, *asked]:
        storage = at_temperatures(storage, temps, cls.name)
        if level_name(storage) not in names:
            names.add(level_name(storage))
            levels.append(storage)
    levels.sort(key=lambda s: -bytes_per_image(views, outputs, s))

    torch.manual_seed(0)  # the fixed student every level is compared with
    arch = spec.cfg.student.arch
    student = cls.student_model(create_model(arch, k), k)
    method = cls(student, None, cfg=spec.method_cfg).eval()
    ratio = getattr(method.cfg, "ss_ratio", None)
    cosine = [o["name"] for o in outputs if o.get("cosine")]
    n = sum(len(b["id"]) for b in batches)
    ref_terms = [_terms(method, b, e) for b, e in zip(batches, exact, strict=True)]
    ref_grads = [_grad(method, b, e) for b, e in zip(batches, exact, strict=True)]
    joined = {name: torch.cat([e[name] for e in exact]) for name in cls.outputs}
    # Bases (embeddings' projections, codes under a top K) fitted as `sskd cache` fits them: on the first
    # FIT_ROWS rows of epoch 0, here the first batches' (the rows after them are coded, not fitted on).
    fit_rows = {name: joined[name].reshape(-1, joined[name].shape[-1])[:FIT_ROWS].numpy() for name in joined}
    fitted: dict[tuple, dict[str, np.ndarray]] = {}

    def bases_for(storage) -> dict[str, dict[str, np.ndarray]]:
        for name, s in storage.items():
            if s.dim and (name, s.kind, s.dim) not in fitted:
                fitted[name, s.kind, s.dim] = fit_basis(fit_rows[name], s)
        return {name: fitted[name, s.kind, s.dim] for name, s in storage.items() if s.dim}

    rows = []
    with tempfile.TemporaryDirectory(prefix="sskd-bench-cache-") as tmp:
        for i, storage in enumerate(levels):
            folder = _write_cache(Path(tmp) / f"l{i}", outputs, storage, bases_for(storage), joined, n)
            reader = CacheReader(folder)
            assert manifest_storage(reader.manifest) == storage
            rate = _read_rate(reader, n, args.batch_size)
            errs: dict[str, float] = {}
            sim_err, agree, top1, start = 0.0, [], [], 0
            grad_err = 0.0
            for b, e, ref, ref_g in zip(batches, exact, ref_terms, ref_grads, strict=True):
                m = len(b["id"])
                got = {key[2:]: v for key, v in reader.lookup(torch.arange(start, start + m), 0).items()}
                start += m
                for term, value in _terms(method, b, got).items():
                    rel = abs(value - ref[term]) / max(abs(ref[term]), 1e-12)
                    errs[term] = max(errs.get(term, 0.0), rel)
                g = _grad(method, b, got)
                grad_err = max(grad_err, float((g - ref_g).norm() / ref_g.norm().clamp_min(1e-12)))
                for name in cosine[:1]:
                    a, c = _similarity(e[name]), _similarity(got[name])
                    sim_err = max(sim_err, float((a - c).abs().max()))
                    if ratio is not None:
                        target = own_image_targets(m, views, a.device)
                        agree.append(select_rows(a, target, ratio) == select_rows(c, target, ratio))
                if "logits" in got:
                    top1.append(got["logits"].argmax(-1) == e["logits"].argmax(-1))
            rows.append(
                {
                    "name": level_name(storage),
                    "bytes_per_image_epoch": bytes_per_image(views, outputs, storage),
                    "term_rel_err": {t: round(v, 6) for t, v in errs.items()},
                    "grad_rel_err": round(grad_err, 6),
                    "similarity_max_err": round(sim_err, 6) if cosine else None,
                    "mask_agreement": round(float(torch.cat(agree).float().mean()), 6) if agree else None,
                    "top1_agreement": round(float(torch.cat([t.flatten() for t in top1]).float().mean()), 6)
                    if top1
                    else None,
                    "read_samples_per_s": round(rate, 1),
                }
            )
    img_outputs = imagenet_outputs(outputs, k)
    img_default = default(img_outputs, IMAGENET["classes"])[0]
    res = {
        "levels": rows,
        "decode_samples_per_s": round(decode_rate, 1),
        "default_level": level_name(default_storage),
        "imagenet_bytes_per_image_epoch": bytes_per_image(imagenet_views(views), img_outputs, img_default),
    }
    _print(res, cls.name, args, n, views, outputs, level_name(compact(outputs)))
    if args.json:
        write_json(args.json, res)
    return res


def _print(res, method: str, args, n: int, views: int, outputs, compact_name: str) -> None:
    shapes = ", ".join(f"{o['name']} {'x'.join(map(str, o['shape']))}" for o in outputs)
    print(
        f"{method}: teacher {args.teacher}, {n} samples x {views} views ({shapes}), batch {args.batch_size}; "
        f"machine: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"
    )
    terms = sorted({t for r in res["levels"] for t in r["term_rel_err"]})
    width = max(len(r["name"]) for r in res["levels"])
    head = f"{'level':<{width}} {'B/img-ep':>8} " + " ".join(f"{'err ' + t:>9}" for t in terms)
    print(head + f" {'grad err':>9} {'sim err':>8} {'mask':>7} {'top1':>7} {'read/s':>9}")

    def fmt(v, f: str) -> str:
        return f"{'-':>{f.split('.')[0]}}" if v is None else format(v, f)

    for r in res["levels"]:
        mark = " (default)" if r["name"] == res["default_level"] else ""
        mark += " (compact)" if r["name"] == compact_name else ""
        print(
            f"{r['name']:<{width}} {r['bytes_per_image_epoch']:>8,} "
            + " ".join(f"{r['term_rel_err'].get(t, 0.0):>9.2e}" for t in terms)
            + f" {r['grad_rel_err']:>9.2e} {fmt(r['similarity_max_err'], '8.5f')} {fmt(r['mask_agreement'], '7.4f')} "
            f"{fmt(r['top1_agreement'], '7.4f')} {r['read_samples_per_s']:>9,.0f}{mark}"
        )
    fastest = min(r["read_samples_per_s"] for r in res["levels"])
    print(
        f"pipeline decode: {res['decode_samples_per_s']:,.0f} samples/s (one thread); the slowest level reads "
        f"{fastest / res['decode_samples_per_s']:.1f}x that. ImageNet recipe at its default level: "
        f"{res['imagenet_bytes_per_image_epoch']:,} B per image-epoch"
    )
