"""Writing the teacher cache (``sskd cache``): the frozen teacher of a prepared student run
(:class:`sskd.engine.prepare.RunSpec`) over the run's training views, epoch by epoch."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sskd.cache import (
    FORMAT,
    MANIFEST,
    VERSION,
    CacheReader,
    bytes_per_sample,
    check_binding,
    chunk_meta,
    chunk_path,
    rank_chunks,
    read_manifest,
    teacher_arrays,
    verify_chunk,
    write_chunk,
)
from sskd.core import atomic
from sskd.core.errors import SSKDError
from sskd.engine.prepare import RunSpec, check_cacheable

log = logging.getLogger(__name__)


def dry_run(spec: RunSpec, epochs: int, topk: int | None = None, split: str = "train") -> dict[str, Any]:
    """What a cache for this run would hold and weigh, without writing anything; printed by ``--dry-run``."""
    from pipelines import ViewLoader
    from sskd.runs.models import freeze

    cls = spec.method
    check_cacheable(cls, refuse=False)
    # One sample of the views as the cache would see them (on the CPU: only their count and size matter).
    loader = ViewLoader.for_run(spec, split, train=True, batch_size=1, device="cpu", skip_bad=False)
    outputs = output_specs(cls, freeze(spec.teacher.load()), loader)
    per = bytes_per_sample(loader.num_views, outputs, topk)
    report = {
        "method": cls.name,
        "views": list(loader.view_names),
        "outputs": outputs,
        "topk": topk,
        "bytes_per_sample_epoch": per,
        "num_samples": loader.num_samples,
        "gb_per_epoch": round(per * loader.num_samples / 1e9, 3),
        "epochs": epochs,
        "gb_total": round(per * loader.num_samples * epochs / 1e9, 3),
        "refused": cls.cache_refusal,
    }
    shapes = ", ".join(
        f"{o['name']} {'x'.join(map(str, o['shape']))}{' (top-K)' if topk and o['topk'] else ''}"
        for o in outputs
    )
    print(
        f"--method {cls.name}: per sample and view {shapes}; {loader.num_views} views: {per:,} bytes per sample "
        f"per epoch; {report['gb_per_epoch']} GB per epoch of {loader.num_samples:,} samples, "
        f"{report['gb_total']} GB for {epochs} epochs"
    )
    if cls.cache_refusal:
        print(f"not cached: {cls.cache_refusal}")
    return report


def resume_point(cache: Path, epoch: int, rank: int) -> int:
    """Batches of this rank's epoch already cached: the intact chunks that follow on from batch 0.

    A damaged chunk, or one that does not start where the previous one ended, is removed with every
    chunk after it (they are made again).
    """
    done = 0
    files = rank_chunks(cache, epoch, rank)
    for i, path in enumerate(files):
        try:
            meta = chunk_meta(path)
            if meta["first_batch"] != done:
                raise SSKDError(f"{path}: starts at batch {meta['first_batch']}, expected {done}")
            verify_chunk(path)
        except SSKDError as exc:
            log.warning("%s; writing it and the %d chunk(s) after it again", exc, len(files) - i - 1)
            for later in files[i:]:
                later.unlink(missing_ok=True)
            break
        done += meta["batches"]
    return done


def build_cache(
    spec: RunSpec,
    out: str | Path,
    epochs: int,
    *,
    topk: int | None = None,
    split: str = "train",
    batch_size: int = 256,
    chunk_batches: int = 20,
    resume: bool = False,
    progress: bool = True,
) -> Path:
    """Run the frozen teacher of ``spec`` (a student run's) over epochs 0..E-1 of its training views and store
    the outputs its method reads.

    The main process holds the cache folder's lock for the build. On SIGTERM or SIGINT each rank
    writes what it has made as a chunk and stops (:class:`sskd.core.stop.Interrupted`); ``resume=True``
    continues after the last intact chunk of every rank and epoch.
    """
    from sskd.core.lock import FolderLock
    from sskd.engine.dist import make_accelerator

    out = Path(out)
    for name, value in (
        ("--epochs", epochs),
        ("--batch-size", batch_size),
        ("--chunk-batches", chunk_batches),
    ):
        if value < 1:
            raise SSKDError(f"{name} must be >= 1, not {value}")
    accelerator = make_accelerator(spec.cfg.run.mixed_precision, 1, spec.cfg.data.device)
    lock, error = None, None
    if accelerator.is_main_process:
        try:
            lock = FolderLock(out, "cache folder").acquire()
        except (SSKDError, OSError) as exc:
            error = (
                str(exc)
                if isinstance(exc, SSKDError)
                else f"{out}: cannot write the cache here ({exc.strerror})"
            )
    from sskd.engine.dist import agree_on_error

    error = agree_on_error(accelerator, error)
    if error:
        raise SSKDError(error)
    try:
        return _build(
            spec, out, epochs, topk, split, batch_size, chunk_batches, resume, progress, accelerator
        )
    finally:
        if lock is not None:
            lock.release()


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    try:
        atomic.write_json(out / MANIFEST, manifest)
    except OSError as exc:
        raise SSKDError(
            atomic.write_error(
                out / MANIFEST,
                exc,
                "cache manifest",
                kept="the chunks written so far "
                "are kept: free space, then rerun the same command with --resume",
            )
        ) from None


def output_specs(cls, model, loader) -> list[dict[str, Any]]:
    """Name, per-view shape and top-K allowance of each output, read off the teacher on one blank image."""
    param = next(model.parameters())
    views = torch.zeros(1, loader.num_views, 3, loader.size, loader.size, device=param.device)
    with torch.inference_mode():
        outs = cls.teacher_outputs(model, views)
    return [{"name": n, "shape": list(outs[n].shape[2:]), "topk": n in cls.topk_outputs} for n in cls.outputs]


def _build(spec, out, epochs, topk, split, batch_size, chunk_batches, resume, progress, accelerator) -> Path:
    from pipelines import PIPELINE_VERSION, ViewLoader
    from sskd import __version__
    from sskd.core.stop import Interrupted, StopRequest
    from sskd.runs.models import freeze

    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    cls = spec.method
    check_cacheable(cls)
    model = freeze(spec.teacher.load()).to(accelerator.device)
    # The training views of ``split``; the teacher reads no label, and every sample is cached (a student
    # with --skip-bad reads the ones it keeps).
    loader = ViewLoader.for_run(
        spec,
        split,
        train=True,
        rank=rank,
        world_size=world,
        torch_device=accelerator.device,
        batch_size=batch_size,
        reuse_buffers=True,
        label_noise=0.0,
        skip_bad=False,
    )
    outputs = output_specs(cls, model, loader)
    if topk is not None:
        sizes = [o["shape"][-1] for o in outputs if o["topk"]]
        if not sizes:
            raise SSKDError(f"--topk: method {cls.name} stores no output as top-K (leave --topk out)")
        if not 0 < topk < min(sizes):
            raise SSKDError(
                f"--topk {topk}: must be between 1 and {min(sizes) - 1} (or leave it out for all logits)"
            )
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "complete": False,
        "binding": spec.cache_binding(split),
        "method": cls.name,
        "outputs": outputs,
        "epochs": epochs,
        "num_samples": loader.num_samples,
        "views": list(loader.view_names),
        "num_views": loader.num_views,
        "num_classes": spec.num_classes,
        "topk": topk,
        "world_size": world,
        "chunk_batches": chunk_batches,
        "batch_size": batch_size,
        "teacher": str(spec.teacher.source),
        "created_by": f"sskd {__version__}",
        "pipeline_version": PIPELINE_VERSION,
    }
    per = bytes_per_sample(loader.num_views, outputs, topk)
    need = per * loader.num_samples * epochs
    existing = (out / MANIFEST).is_file()
    accelerator.wait_for_everyone()  # every rank looks before the main one writes the manifest
    if existing:
        old = read_manifest(out)
        if not resume:
            raise SSKDError(f"{out}: a cache is already here (use --resume to finish an interrupted one)")
        check_binding(old, manifest["binding"], str(out))
        for field in ("epochs", "topk", "world_size", "batch_size"):
            if old.get(field) != manifest[field]:
                raise SSKDError(
                    f"{out}: the cache was started with {field}={old.get(field)!r}, not {manifest[field]!r}; "
                    "resume with the same settings"
                )
        if old.get("complete"):
            try:
                CacheReader(out)  # every epoch's chunk list: a chunk deleted or copied since is made again
            except SSKDError as exc:
                log.warning("%s; making what is missing again", exc)
                accelerator.wait_for_everyone()  # every rank has looked before the manifest says incomplete
                if main:
                    _write_manifest(out, manifest)
            else:
                log.info("%s: already complete", out)
                return out
    elif main:
        free = shutil.disk_usage(out.parent if out.parent.exists() else Path(".")).free
        log.info(
            "cache: %d samples x %d epochs x %d views, %d bytes per sample per epoch: %.2f GB needed, "
            "%.1f GB free",
            loader.num_samples,
            epochs,
            loader.num_views,
            per,
            need / 1e9,
            free / 1e9,
        )
        if need > free:
            raise SSKDError(
                f"{out}: the cache needs {need / 1e9:.2f} GB but only {free / 1e9:.2f} GB are free"
            )
        _write_manifest(out, manifest)
    if main:  # under the lock: partial files of a killed writer are garbage
        atomic.remove_stale_partials(out, recursive=True)
    accelerator.wait_for_everyone()
    n_batches = len(loader)
    from tqdm.auto import tqdm

    bar = tqdm(
        total=epochs * n_batches,
        desc="cache",
        unit="batch",
        disable=not (main and progress),
        dynamic_ncols=True,
    )
    with StopRequest() as request:
        for epoch in range(epochs):
            first = resume_point(out, epoch, rank)
            bar.update(min(first, n_batches))
            if first >= n_batches:
                continue
            pending: list = []  # (ids, {output: (b, V, ...)}) of the batches since the last chunk

            def flush(start: int) -> None:
                ids = np.concatenate([p[0] for p in pending])
                outs = {n: torch.cat([p[1][n] for p in pending]) for n in cls.outputs}
                write_chunk(
                    chunk_path(out, epoch, rank, start),
                    teacher_arrays(ids, outs, topk, cls.topk_outputs),
                    start,
                    len(pending),
                )
                pending.clear()

            start = first
            for i, batch in enumerate(loader.epoch(epoch, start_batch=first), start=first):
                with torch.inference_mode(), accelerator.autocast():
                    o = cls.teacher_outputs(model, batch["views"])
                pending.append((batch["id"].cpu().numpy(), {n: o[n].float().cpu() for n in cls.outputs}))
                bar.update(1)
                signum = request.poll()
                if len(pending) == chunk_batches or i == n_batches - 1 or signum:
                    flush(start)
                    start = i + 1
                if signum and (i < n_batches - 1 or epoch < epochs - 1):
                    bar.close()
                    raise Interrupted(
                        f"stopped by {request.describe(signum)} in epoch {epoch} after batch {i} "
                        f"(rank {rank}); the batches made so far are saved: rerun the same command with "
                        "--resume to finish the cache",
                        signum,
                        quiet=not main,
                    )
    bar.close()
    accelerator.wait_for_everyone()
    if main:
        reader = CacheReader(out, require_complete=False)
        for epoch in range(epochs):  # every id exactly once per epoch, or an error naming what is missing
            reader._epoch(epoch)
        manifest["complete"] = True
        _write_manifest(out, manifest)
        log.info("%s: %d epochs cached and checked", out, epochs)
    accelerator.wait_for_everyone()
    return out
