"""Run folders: the exported model, checkpoints, the saved config and the metrics log.

A run folder ``RUN/`` holds::

    RUN/config.yaml            the resolved config of the run
    RUN/model.safetensors      the trained model's weights (written at the end, atomically)
    RUN/model.json             what the weights are: arch, num_classes, has_head, classes, shard hash, accuracy
    RUN/checkpoints/last.pt    latest training state (model, optimizer, step, epoch, config); resumable
    RUN/checkpoints/best.pt    the state with the best validation top-1 so far
    RUN/metrics.jsonl          one JSON object per logged interval and per evaluation

Checkpoints are written under a temporary name and renamed, so the last good one survives any
interruption. A run folder has one writer at a time (:func:`claim_run` holds ``RUN/.lock`` for the
run's life) and earlier work in it is never overwritten unless asked (``--resume``, ``--overwrite``).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from sskd import atomic
from sskd.errors import SSKDError
from sskd.lock import FolderLock

log = logging.getLogger(__name__)

MODEL_WEIGHTS = "model.safetensors"
MODEL_INFO = "model.json"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
CONFIG = "config.yaml"
RUN_ENTRIES = (CONFIG, METRICS, MODEL_WEIGHTS, MODEL_INFO, CHECKPOINTS, "tb")  # what a run writes


def earlier_work(run: Path) -> list[str]:
    """The entries of an earlier run in ``run`` (empty for a new or empty folder)."""
    return [name for name in RUN_ENTRIES if (run / name).exists()]


def claim_run(run: Path, *, resume: bool, overwrite: bool) -> FolderLock:
    """Lock ``run`` for this process and check it may be written; returns the held lock.

    A folder that holds an earlier run is refused unless ``resume`` (continue it) or ``overwrite``
    (delete that run first). Temporary files a killed writer left are removed (safe: we hold the lock).
    """
    if resume and overwrite:
        raise SSKDError("--resume and --overwrite exclude each other: continue the run, or replace it")
    if run.exists() and not run.is_dir():
        raise SSKDError(f"{run}: exists and is not a folder")
    try:
        lock = FolderLock(run, "run folder").acquire()
    except OSError as exc:
        raise SSKDError(f"{run}: cannot write the run folder here ({exc.strerror or exc})") from None
    try:
        found = earlier_work(run)
        if found and not (resume or overwrite):
            raise SSKDError(f"{run}: holds an earlier run ({', '.join(found)}); pass --resume to continue it or "
                            "--overwrite to replace it (or choose another --out)")
        if found and overwrite:
            log.info("%s: --overwrite: removing the earlier run (%s)", run, ", ".join(found))
            for name in found:
                path = run / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        n = atomic.remove_stale_partials(run, recursive=True)
        if n:
            log.info("%s: removed %d temporary file(s) left by an interrupted writer", run, n)
    except BaseException:
        lock.release()
        raise
    return lock


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file (see :func:`sskd.atomic.sha256_file`)."""
    return atomic.sha256_file(path)


def save_model(run: Path, module: torch.nn.Module, info: dict[str, Any]) -> None:
    """Export ``module``'s weights as safetensors plus a JSON description (both atomic)."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    with atomic.atomic_path(run / MODEL_WEIGHTS) as tmp:
        save_file(state, str(tmp))
    info = dict(info, weights_sha256=file_sha256(run / MODEL_WEIGHTS))
    atomic.write_json(run / MODEL_INFO, info)


def load_model_info(run: str | Path) -> dict[str, Any]:
    """The ``model.json`` of a run folder; raises :class:`SSKDError` if the run is not complete."""
    run = Path(run)
    info_path, weights = run / MODEL_INFO, run / MODEL_WEIGHTS
    if not run.is_dir():
        raise SSKDError(f"{run}: run folder not found")
    if not info_path.is_file() or not weights.is_file():
        raise SSKDError(f"{run}: no finished model in this run (missing {MODEL_INFO} or {MODEL_WEIGHTS})")
    try:
        return json.loads(info_path.read_text())
    except json.JSONDecodeError as exc:
        raise SSKDError(f"{info_path}: unreadable ({exc})") from exc


def load_weights(run: str | Path, module: torch.nn.Module) -> None:
    """Load ``RUN/model.safetensors`` into ``module`` strictly, naming the run on a mismatch."""
    from safetensors.torch import load_file

    path = Path(run) / MODEL_WEIGHTS
    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise SSKDError(f"{path}: cannot read weights ({exc})") from exc
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise SSKDError(f"{path}: weights do not fit the model ({str(exc).splitlines()[-1].strip()})") from exc
    if missing or unexpected:
        raise SSKDError(
            f"{path}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def save_checkpoint(run: Path, name: str, state: dict[str, Any]) -> Path:
    """Atomically write a training state to ``RUN/checkpoints/<name>.pt``."""
    path = run / CHECKPOINTS / f"{name}.pt"
    with atomic.atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_checkpoint(run: Path, name: str = "last") -> dict[str, Any] | None:
    """The checkpoint ``name`` of ``run``, or None when there is none; a damaged file is an error."""
    path = run / CHECKPOINTS / f"{name}.pt"
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise SSKDError(f"{path}: damaged checkpoint ({exc}); delete it to start over") from exc


class MetricsLog:
    """Appends one JSON line per record to ``RUN/metrics.jsonl`` (and TensorBoard when installed).

    ``keep_until``: on resume, the checkpoint's (phase, step); records past it are dropped first (they
    are made again), so no step is logged twice; a torn last line of a killed writer is dropped too.
    """

    def __init__(self, run: Path, enabled: bool = True, tensorboard: bool = True,
                 keep_until: tuple[int, int] | None = None):
        self.path = run / METRICS
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        if self.path.is_file():
            records = read_metrics(run)
            if keep_until is not None:
                records = [r for r in records if (r.get("phase", 0), r.get("step", 0)) <= tuple(keep_until)]
            text = "".join(json.dumps(r) + "\n" for r in records)
            if text.encode() != self.path.read_bytes():
                atomic.write_bytes(self.path, text.encode())
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run / "tb"))
            except (ImportError, ModuleNotFoundError):
                log.debug("tensorboard not installed; metrics go to metrics.jsonl only")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "time"):
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{key}", value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run: str | Path) -> list[dict[str, Any]]:
    """The records of ``RUN/metrics.jsonl``; a torn last line (a writer killed mid-line) is skipped."""
    path = Path(run) / METRICS
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines):
                log.debug("%s: torn last line skipped", path)
                continue
            raise SSKDError(f"{path}:{n}: not a JSON record (damaged metrics log)") from None
    return records
