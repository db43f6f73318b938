"""Run folders: the exported model, checkpoints, the saved config and the metrics log.

A run folder ``RUN/`` holds::

    RUN/config.yaml            the resolved config of the run
    RUN/model.safetensors      the trained model's weights (written at the end, atomically)
    RUN/model.json             what the weights are: arch, num_classes, has_head, classes, shard hash, accuracy
    RUN/checkpoints/last.pt    latest training state (model, optimizer, step, epoch, config); resumable
    RUN/checkpoints/best.pt    the state with the best validation top-1 so far
    RUN/metrics.jsonl          one JSON object per logged interval and per evaluation

Checkpoints are written under a temporary name and renamed, so the last good one survives any
interruption.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from sskd import atomic
from sskd.errors import SSKDError

log = logging.getLogger(__name__)

MODEL_WEIGHTS = "model.safetensors"
MODEL_INFO = "model.json"
CHECKPOINTS = "checkpoints"


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
    """Appends one JSON line per record to ``RUN/metrics.jsonl`` (and TensorBoard when installed)."""

    def __init__(self, run: Path, enabled: bool = True, tensorboard: bool = True):
        self.path = run / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if enabled and tensorboard:
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
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
