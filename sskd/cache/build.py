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
    PROJECTIONS,
    VERSION,
    CacheReader,
    bytes_per_sample,
    check_binding,
    chunk_meta,
    chunk_path,
    rank_chunks,
    read_manifest,
    read_projections,
    teacher_arrays,
    verify_chunk,
    write_chunk,
)
from sskd.cache.levels import (
    IMAGENET,
    at_temperatures,
    bytes_per_image,
    cosine_outputs,
    default,
    fit_basis,
    imagenet_outputs,
    imagenet_views,
    level_name,
    pareto,
    parse_level,
    requested,
)
from sskd.core import atomic
from sskd.core.errors import SSKDError
from sskd.engine.prepare import RunSpec, check_cacheable

log = logging.getLogger(__name__)


def _level_rows(num_views: int, outputs, n: int, epochs: int, marks: dict[str, str]) -> list[dict[str, Any]]:
    """The dry run's table: every level on the size/faithfulness front, plus the marked ones."""
    front = pareto(num_views, outputs)
    names = [level_name(s) for s in front]
    for name in marks:
        if name not in names:
            front.append(parse_level(name, [o["name"] for o in outputs]))
            names.append(name)
    rows = []
    for storage, name in sorted(
        zip(front, names, strict=True), key=lambda x: -bytes_per_image(num_views, outputs, x[0])
    ):
        per = bytes_per_image(num_views, outputs, storage)
        rows.append(
            {
                "level": name,
                "bytes_per_image_epoch": per,
                "gb_per_epoch": round(per * n / 1e9, 3),
                "gb_total": round(per * n * epochs / 1e9, 3),
                "mark": marks.get(name, ""),
            }
        )
    return rows


def _print_rows(title: str, rows: list[dict[str, Any]]) -> None:
    print(title)
    width = max(len(r["level"]) for r in rows)
    print(f"  {'level':<{width}} {'B/image-epoch':>14} {'GB/epoch':>9} {'GB total':>9}")
    for r in rows:
        print(
            f"  {r['level']:<{width}} {r['bytes_per_image_epoch']:>14,} {r['gb_per_epoch']:>9.3f} "
            f"{r['gb_total']:>9.3f}  {r['mark']}".rstrip()
        )


def storage_plan(spec: RunSpec, split: str, request: dict[str, Any]):
    """``(outputs, loader, storage, why)`` of a cache for ``spec`` with the storage flags ``request``, from
    the teacher's outputs on one blank sample (on the CPU: only their shapes matter); a bad request is
    one line (:func:`sskd.cache.levels.check_request`)."""
    from pipelines import ViewLoader
    from sskd.runs.models import freeze

    loader = ViewLoader.for_run(spec, split, train=True, batch_size=1, device="cpu", skip_bad=False)
    outputs = output_specs(spec.method, freeze(spec.teacher.load()), loader, spec.teacher.info)
    storage, why = run_storage(spec, outputs, loader.num_views, request)
    return outputs, loader, storage, why


def report_tails(arrays: dict[str, np.ndarray], storage: dict) -> None:
    """Log how much probability each top-K output's left-out classes hold at the method's temperature on
    one chunk (:func:`sskd.cache.levels.tail_mass`); a warning above 1 %, where the method's terms will
    not be within 1 % of exact (docs/cache.md, "100 classes" and "1,000 classes")."""
    from sskd.cache.levels import tail_mass

    for name, s in storage.items():
        if s.kind != "topk" or s.dim:  # a top-K over a code keeps the tail
            continue
        mass = tail_mass(arrays, name, s)
        line = (
            f"{name} stored as its top {s.k}: the other classes hold {100 * mass:.1f} % of the probability at "
            f"T = {s.t or 1:g} (mean over the first chunk's rows)"
        )
        if mass > 0.01:
            log.warning(
                "%s; the terms reading it will be off by several %% at 100 classes and tens of %% at 1,000 "
                '(docs/cache.md, "100 classes", "1,000 classes"): q8 or a top-K over a code (top10-d64) keep '
                "every class, a larger K a little more (`sskd bench cache --level NAME` measures a level)",
                line,
            )
        else:
            log.info("%s", line)


def run_storage(spec: RunSpec, outputs: list[dict[str, Any]], num_views: int, request: dict[str, Any]):
    """``(storage, why)``: the level the storage flags ``request`` pick for ``spec``'s outputs, top-K tails
    kept at the temperatures its method reads them at (:func:`sskd.cache.levels.at_temperatures`)."""
    cls = spec.method
    storage, why = requested(outputs, num_views, spec.num_classes, **request)
    storage = at_temperatures(storage, cls.topk_temperatures(spec.method_cfg), cls.name)
    tails = [f"{name} at T = {s.t:g}" for name, s in storage.items() if s.kind == "topk" and not s.dim]
    if tails:
        why += f"; the mass outside the top K exact for {', '.join(tails)}, the temperature the method reads"
    return storage, why


def dry_run(
    spec: RunSpec, epochs: int, topk: int | None = None, split: str = "train", **request: Any
) -> dict[str, Any]:
    """What a cache for this run would hold and weigh at every storage level it allows, and at the
    level the flags pick (``request``: ``exact``, ``embed``, ``embed_dim``, ``budget``), for the run's shapes
    and for the ImageNet recipe on paper; writes nothing. Printed by ``--dry-run``."""
    cls = spec.method
    check_cacheable(cls, refuse=False)
    outputs, loader, storage, why = storage_plan(spec, split, {"topk": topk, **request})
    per = bytes_per_image(loader.num_views, outputs, storage)
    chosen = level_name(storage)
    img_outputs = imagenet_outputs(outputs, spec.num_classes)
    img_views = imagenet_views(loader.num_views)
    img_default = level_name(default(img_outputs, IMAGENET["classes"])[0])
    report = {
        "method": cls.name,
        "views": list(loader.view_names),
        "outputs": outputs,
        "topk": topk,
        "level": chosen,
        "levels": _level_rows(
            loader.num_views, outputs, loader.num_samples, epochs, {chosen: "<- this cache"}
        ),
        "imagenet": {
            **IMAGENET,
            "default_level": img_default,
            "levels": _level_rows(
                img_views, img_outputs, IMAGENET["images"], epochs, {img_default: "<- default"}
            ),
        },
        "bytes_per_sample_epoch": per,
        "num_samples": loader.num_samples,
        "gb_per_epoch": round(per * loader.num_samples / 1e9, 3),
        "epochs": epochs,
        "gb_total": round(per * loader.num_samples * epochs / 1e9, 3),
        "refused": cls.cache_refusal,
    }
    shapes = ", ".join(f"{o['name']} {'x'.join(map(str, o['shape']))}" for o in outputs)
    print(
        f"--method {cls.name}: per sample and view {shapes}; {loader.num_views} views: {per:,} bytes per sample "
        f"per epoch at level {chosen} ({why}); {report['gb_per_epoch']} GB per epoch of "
        f"{loader.num_samples:,} samples, {report['gb_total']} GB for {epochs} epochs"
    )
    _print_rows(f"levels for this run ({loader.num_samples:,} images, {epochs} epochs):", report["levels"])
    img_shapes = ", ".join(f"{o['name']} {'x'.join(map(str, o['shape']))}" for o in img_outputs)
    _print_rows(
        f"the ImageNet recipe on paper ({IMAGENET['images']:,} images, {img_views} views, {img_shapes}):",
        report["imagenet"]["levels"],
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
    exact: bool = False,
    embed: str | None = None,
    embed_dim: int | None = None,
    budget: int | None = None,
    level: str | None = None,
) -> Path:
    """Run the frozen teacher of ``spec`` (a student run's) over epochs 0..E-1 of its training views and store
    the outputs its method reads.

    The main process holds the cache folder's lock for the build. On SIGTERM or SIGINT each rank
    writes what it has made as a chunk and stops (:class:`sskd.core.stop.Interrupted`); ``resume=True``
    continues after the last intact chunk of every rank and epoch.

    The storage level (:mod:`sskd.cache.levels`): ``exact`` fp16, or ``topk`` / ``embed`` / ``embed_dim``
    as asked, or the one ``level`` names (``exact``, ``compact``, ``logits:top25+...``), or the most faithful
    within ``budget`` bytes per image-epoch, or else the default (compact
    for >= 100 classes and >= 128-dim embeddings); the flags are checked against the outputs' shapes
    before any batch is made.
    """
    from sskd.core.lock import FolderLock
    from sskd.engine.dist import make_accelerator

    out = Path(out)
    request = {
        "topk": topk,
        "exact": exact,
        "embed": embed,
        "embed_dim": embed_dim,
        "budget": budget,
        "level": level,
    }
    check_cacheable(spec.method)
    storage_plan(spec, split, request)  # a bad storage request is one line before the folder is touched
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
            spec, out, epochs, request, split, batch_size, chunk_batches, resume, progress, accelerator
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


def output_specs(cls, model, loader, info: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Name, per-view shape, top-K allowance and cosine-only reading (:func:`sskd.cache.levels.cosine_outputs`,
    from the teacher's ``model.json`` ``info``) of each output, read off the teacher on one blank image."""
    param = next(model.parameters())
    views = torch.zeros(1, loader.num_views, 3, loader.size, loader.size, device=param.device)
    with torch.inference_mode():
        outs = cls.teacher_outputs(model, views)
    cosine = cosine_outputs(cls, info)
    return [
        {"name": n, "shape": list(outs[n].shape[2:]), "topk": n in cls.topk_outputs, "cosine": n in cosine}
        for n in cls.outputs
    ]


FIT_ROWS = 4096  # rows (image x view) a basis is fitted on: the first of epoch 0
HELD_ROWS = 1024  # and the rows after them it is scored on (report_fit)


def fit_bases(
    cls, model, loader, storage, accelerator, temperatures=None
) -> dict[str, dict[str, np.ndarray]]:
    """The basis of each output stored with a reduced dimension (an embedding's projection, the code under a
    top-K), fitted on the teacher's outputs of the first ``FIT_ROWS`` rows of epoch 0 (this rank's: the main
    one's, shared through the cache folder), as ``sskd bench cache`` fits it, and scored on up to
    ``HELD_ROWS`` rows after them (:func:`report_fit`; ``temperatures``: ``Method.topk_temperatures``)."""
    coded = {n: s for n, s in storage.items() if s.dim}
    rows: dict[str, list[np.ndarray]] = {n: [] for n in coded}
    got = 0
    for batch in loader.epoch(0):
        with torch.inference_mode(), accelerator.autocast():
            o = cls.teacher_outputs(model, batch["views"])
        for n in coded:
            rows[n].append(o[n].float().cpu().numpy().reshape(-1, o[n].shape[-1]))
        got += len(rows[next(iter(coded))][-1])
        if got >= FIT_ROWS + HELD_ROWS:
            break
    bases = {}
    for n, s in coded.items():
        x = np.concatenate(rows[n])
        bases[n] = fit_basis(x[:FIT_ROWS], s)
        held = x[FIT_ROWS : FIT_ROWS + HELD_ROWS]
        report_fit(
            n, s, held if len(held) else x, bases[n], (temperatures or {}).get(n, (1.0,)), len(held) > 0
        )
    return bases


def report_fit(name: str, s, rows: np.ndarray, basis, temperatures, held_out: bool) -> None:
    """Log how well a fitted basis keeps ``rows`` (:func:`sskd.cache.levels.held_out_error`): a warning where
    the methods' terms may be off by more than 1 % — a top-K over a code whose read rows' probabilities are
    more than 1 % (total variation) from the teacher's, a projection whose similarity entries are more than
    0.03 off (on the digits' resnet8x4, 256 dims: 0.013 at 64 dims, SSKD's `ss` term 0.47 % off and the
    selective-transfer mask 99.69 % the same; 0.053 at 32, 1.27 % and 99.11 %; docs/cache.md). The default
    code (64 dims) was measured on teachers of low-rank logits; this is where a teacher that needs more
    says so."""
    from sskd.cache.levels import held_out_error

    err = held_out_error(rows, s, basis, temperatures)
    on = (
        f"the {len(rows):,} rows after the {FIT_ROWS:,} it was fitted on"
        if held_out
        else f"the {len(rows):,} rows it was fitted on, all there are"
    )
    if s.kind == "topk":
        what = (
            f"{name} stored as its top {s.k} over a {s.dim}-dimensional code: read back, its probabilities are "
            f"{100 * err:.2f} % from the teacher's (total variation, mean over {on}, at T = "
            f"{', '.join(f'{t:g}' for t in temperatures)})"
        )
        bad = err > 0.01
        fix = f"a larger code (top{s.k}-d{2 * s.dim}"
    else:
        what = (
            f"{name} projected to {s.dim} dims: its cosine similarities read back within {err:.4f} "
            f"(largest error of an entry, over {on})"
        )
        bad = err > 0.03
        fix = f"more dims (--embed-dim {2 * s.dim}"
    if bad:
        log.warning(
            "%s; the terms reading it may be off by more than 1 %%: %s, if the shape allows) or "
            "`sskd bench cache --only --level NAME` measures a level on this teacher",
            what,
            fix,
        )
    else:
        log.info("%s", what)


def write_projections(out: Path, bases: dict[str, dict[str, np.ndarray]]) -> str:
    """The bases into ``CACHE/projections.safetensors`` (atomically); returns its sha256 for the manifest."""
    import hashlib

    from safetensors.numpy import save

    data = save({f"{n}.{k}": np.ascontiguousarray(a) for n, p in bases.items() for k, a in p.items()})
    try:
        atomic.write_bytes(out / PROJECTIONS, data)
    except OSError as exc:
        raise SSKDError(atomic.write_error(out / PROJECTIONS, exc, "cache projections")) from None
    return hashlib.sha256(data).hexdigest()


def _build(
    spec, out, epochs, request, split, batch_size, chunk_batches, resume, progress, accelerator
) -> Path:
    from pipelines import PIPELINE_VERSION, ViewLoader
    from sskd import __version__
    from sskd.core.stop import Interrupted, StopRequest
    from sskd.runs.models import freeze

    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    cls = spec.method
    check_cacheable(cls)
    model = freeze(spec.teacher.load()).to(accelerator.device)
    # The training views of ``split``; the teacher reads no label. Every sample is cached except those
    # --skip-bad (data.skip_bad) leaves out: the same check as the student's, so a student with --skip-bad
    # on the same shards reads exactly what the cache holds.
    skip_bad = bool(spec.cfg.data.skip_bad)
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
        skip_bad=skip_bad,
    )
    outputs = output_specs(cls, model, loader, spec.teacher.info)
    storage, why = run_storage(spec, outputs, loader.num_views, request)
    level = level_name(storage)
    if main:
        log.info("cache level %s: %s", level, why)
    for o in outputs:
        o["storage"] = storage[o["name"]].to_json()
    topk = request["topk"]
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "complete": False,
        "binding": {**spec.cache_binding(split), "level": level},
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
        "skipped": {str(i): why for i, why in sorted(loader.skipped.items())},  # unreadable, left out
    }
    per = bytes_per_sample(loader.num_views, outputs, storage=storage)
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
        if sorted(old.get("skipped", {}), key=int) != sorted(manifest["skipped"], key=int):
            was, now = (
                ", ".join(sorted(m, key=int)[:5]) or "none"
                for m in (old.get("skipped", {}), manifest["skipped"])
            )
            raise SSKDError(
                f"{out}: the cache was started leaving out the samples {was}, this run leaves out {now} "
                f"(--skip-bad{' is off' if not skip_bad else ''}); resume with the same --skip-bad on the same shards"
            )
        bases = read_projections(out, old)  # a resumed cache keeps the bases its chunks were stored with
        manifest["projections_sha256"] = old.get("projections_sha256")
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
        if any(s.dim for s in storage.values()):  # fitted once, by the main process, before any chunk
            out.mkdir(parents=True, exist_ok=True)
            manifest["projections_sha256"] = write_projections(
                out,
                fit_bases(cls, model, loader, storage, accelerator, cls.topk_temperatures(spec.method_cfg)),
            )
        _write_manifest(out, manifest)
    if main:  # under the lock: partial files of a killed writer are garbage
        atomic.remove_stale_partials(out, recursive=True)
    accelerator.wait_for_everyone()
    if not existing:  # every rank stores with the bases the main process fitted
        manifest = {**manifest, "projections_sha256": read_manifest(out).get("projections_sha256")}
        bases = read_projections(out, manifest)
    n_batches = len(loader)
    from tqdm.auto import tqdm

    bar = tqdm(
        total=epochs * n_batches,
        desc="cache",
        unit="batch",
        disable=not (main and progress),
        dynamic_ncols=True,
    )
    told: list = []  # the top-K tails are reported once, from the main process's first chunk
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
                arrays = teacher_arrays(ids, outs, storage=storage, bases=bases)
                if main and not told:
                    report_tails(arrays, storage)
                    told.append(True)
                write_chunk(chunk_path(out, epoch, rank, start), arrays, start, len(pending))
                pending.clear()

            start = first
            following = epoch + 1 if epoch + 1 < epochs else None  # the epoch opened ahead
            for i, batch in enumerate(
                loader.epoch(epoch, start_batch=first, next_epoch=following), start=first
            ):
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
        CacheReader(out, require_complete=False).check_epochs()
        manifest["complete"] = True
        _write_manifest(out, manifest)
        log.info("%s: %d epochs cached and checked", out, epochs)
    accelerator.wait_for_everyone()
    return out
