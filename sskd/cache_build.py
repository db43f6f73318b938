"""Writing the teacher cache (``sskd cache``) and attaching it to a student run (``distill --cache``)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sskd import atomic
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
from sskd.config import Config
from sskd.errors import SSKDError

log = logging.getLogger(__name__)


def binding_for(cfg: Config, teacher: dict[str, Any], split: str = "train") -> dict[str, Any]:
    """What a cache must have been made from to serve this run: teacher, shards, plan, views, device."""
    from pipelines import PIPELINE_VERSION, ViewConfig
    from pipelines.loader import DEFAULT_SIZE
    from shards.format import load_manifest
    from sskd.dist import pipeline_device
    from sskd.stages import manifest_sha256

    layout = load_manifest(cfg.data.shards)["layout"]
    return {"teacher_weights_sha256": teacher.get("weights_sha256"),
            "shards_manifest_sha256": manifest_sha256(cfg.data.shards), "seed": cfg.run.seed,
            "views": list(ViewConfig.parse(cfg.data.views).names), "size": cfg.data.size or DEFAULT_SIZE[layout],
            "pipeline_version": PIPELINE_VERSION, "device_type": pipeline_device(cfg.data.device), "split": split}


def attach_cache(job, cache: str | Path, teacher: str) -> CacheReader:
    """Feed a student job the cached teacher outputs; epochs beyond E reuse augmentation epoch e mod E."""
    from shards.format import load_manifest
    from sskd.stages import teacher_info

    if teacher is None:
        raise SSKDError("--cache needs --teacher RUN (the run the cache was made from, to check it)")
    info = teacher_info(teacher, load_manifest(job.cfg.data.shards), need_head=job.cfg.student.method == "sskd")
    reader = CacheReader(cache, expected=binding_for(job.cfg, info))

    def hook(batch, epoch):
        out = reader.lookup(batch["id"], epoch)
        return {**batch, **{k: v.to(batch["views"].device) for k, v in out.items()}}

    job.batch_hook = hook
    job.data_epoch = lambda e: e % reader.epochs
    job.info["cache"] = str(cache)
    return reader


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


def build_cache(cfg: Config, teacher: str, out: str | Path, epochs: int, *, topk: int | None = None,
                split: str = "train", batch_size: int = 256, chunk_batches: int = 20, resume: bool = False,
                progress: bool = True) -> Path:
    """Run the frozen teacher over epochs 0..E-1 of the training views and store its outputs.

    The main process holds the cache folder's lock for the build. On SIGTERM or SIGINT each rank
    writes what it has made as a chunk and stops (:class:`sskd.stop.Interrupted`); ``resume=True``
    continues after the last intact chunk of every rank and epoch.
    """
    from sskd.dist import make_accelerator
    from sskd.lock import FolderLock

    out = Path(out)
    for name, value in (("--epochs", epochs), ("--batch-size", batch_size), ("--chunk-batches", chunk_batches)):
        if value < 1:
            raise SSKDError(f"{name} must be >= 1, not {value}")
    accelerator = make_accelerator(cfg.run.mixed_precision, 1, cfg.data.device)
    lock, error = None, None
    if accelerator.is_main_process:
        try:
            lock = FolderLock(out, "cache folder").acquire()
        except (SSKDError, OSError) as exc:
            error = str(exc) if isinstance(exc, SSKDError) else f"{out}: cannot write the cache here ({exc.strerror})"
    from sskd.dist import agree_on_error

    error = agree_on_error(accelerator, error)
    if error:
        raise SSKDError(error)
    try:
        return _build(cfg, teacher, out, epochs, topk, split, batch_size, chunk_batches, resume, progress, accelerator)
    finally:
        if lock is not None:
            lock.release()


def _build(cfg, teacher, out, epochs, topk, split, batch_size, chunk_batches, resume, progress, accelerator) -> Path:
    from pipelines import PIPELINE_VERSION, ViewConfig, ViewLoader
    from shards.format import load_manifest
    from sskd import __version__
    from sskd.dist import pipeline_device
    from sskd.stages import freeze, load_teacher
    from sskd.stop import Interrupted, StopRequest

    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    shards_manifest = load_manifest(cfg.data.shards)
    model, info = load_teacher(teacher, shards_manifest, need_head=True)
    model = freeze(model).to(accelerator.device)
    loader = ViewLoader(cfg.data.shards, split, batch_size=batch_size, views=ViewConfig.parse(cfg.data.views),
                        seed=cfg.run.seed, rank=rank, world_size=world, device=pipeline_device(cfg.data.device),
                        threads=cfg.data.threads, size=cfg.data.size, torch_device=accelerator.device,
                        reuse_buffers=True)
    k = shards_manifest["num_classes"]
    if topk is not None and not 0 < topk < k:
        raise SSKDError(f"--topk {topk}: must be between 1 and {k - 1} (or leave it out for all logits)")
    manifest = {"format": FORMAT, "version": VERSION, "complete": False, "binding": binding_for(cfg, info, split),
                "epochs": epochs, "num_samples": loader.num_samples, "views": list(loader.view_names),
                "num_views": loader.num_views, "num_classes": k, "embed_dim": model.feat_dim, "topk": topk,
                "world_size": world, "chunk_batches": chunk_batches, "batch_size": batch_size,
                "teacher": str(teacher), "created_by": f"sskd {__version__}", "pipeline_version": PIPELINE_VERSION}
    per = bytes_per_sample(loader.num_views, k, model.feat_dim, topk)
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
                raise SSKDError(f"{out}: the cache was started with {field}={old.get(field)!r}, not {manifest[field]!r}; "
                                "resume with the same settings")
        if old.get("complete"):
            log.info("%s: already complete", out)
            return out
    elif main:
        free = shutil.disk_usage(out.parent if out.parent.exists() else Path(".")).free
        log.info("cache: %d samples x %d epochs x %d views, %d bytes per sample per epoch: %.2f GB needed, "
                 "%.1f GB free", loader.num_samples, epochs, loader.num_views, per, need / 1e9, free / 1e9)
        if need > free:
            raise SSKDError(f"{out}: the cache needs {need / 1e9:.2f} GB but only {free / 1e9:.2f} GB are free")
        atomic.write_json(out / MANIFEST, manifest)
    if main:  # under the lock: partial files of a killed writer are garbage
        atomic.remove_stale_partials(out, recursive=True)
    accelerator.wait_for_everyone()
    n_batches = len(loader)
    from tqdm.auto import tqdm

    bar = tqdm(total=epochs * n_batches, desc="cache", unit="batch", disable=not (main and progress), dynamic_ncols=True)
    with StopRequest() as request:
        for epoch in range(epochs):
            first = resume_point(out, epoch, rank)
            bar.update(min(first, n_batches))
            if first >= n_batches:
                continue
            pending: list = []  # (ids, logits, embed) of the batches since the last chunk

            def flush(start: int) -> None:
                ids, logits, embeds = zip(*pending)
                write_chunk(chunk_path(out, epoch, rank, start), teacher_arrays(
                    np.concatenate(ids), torch.cat(logits), torch.cat(embeds), topk), start, len(pending))
                pending.clear()

            start = first
            for i, batch in enumerate(loader.epoch(epoch, start_batch=first), start=first):
                views = batch["views"]
                with torch.inference_mode(), accelerator.autocast():
                    o = model(views.flatten(0, 1))
                b, v = views.shape[:2]
                pending.append((batch["id"].cpu().numpy(), o.logits.float().view(b, v, -1).cpu(),
                                o.embed.float().view(b, v, -1).cpu()))
                bar.update(1)
                signum = request.poll()
                if len(pending) == chunk_batches or i == n_batches - 1 or signum:
                    flush(start)
                    start = i + 1
                if signum and (i < n_batches - 1 or epoch < epochs - 1):
                    bar.close()
                    raise Interrupted(f"stopped by {request.describe(signum)} in epoch {epoch} after batch {i} "
                                      f"(rank {rank}); the batches made so far are saved: rerun the same command with "
                                      "--resume to finish the cache", signum, quiet=not main)
    bar.close()
    accelerator.wait_for_everyone()
    if main:
        reader = CacheReader(out, require_complete=False)
        for epoch in range(epochs):  # every id exactly once per epoch, or an error naming what is missing
            reader._epoch(epoch)
        manifest["complete"] = True
        atomic.write_json(out / MANIFEST, manifest)
        log.info("%s: %d epochs cached and checked", out, epochs)
    accelerator.wait_for_everyone()
    return out
