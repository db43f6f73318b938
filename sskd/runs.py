"""Run folders: the exported model, checkpoints, the saved config and the metrics log.

A run folder ``RUN/`` holds::

    RUN/config.yaml            the resolved config of the run
    RUN/model.safetensors      the trained model's weights (written at the end, atomically)
    RUN/model.json             what the weights are: arch, num_classes, has_head, classes, shard hash, accuracy
    RUN/checkpoints/last.pt    latest training state (model, optimizer, step, epoch, config); resumable
    RUN/checkpoints/best.pt    the state with the best validation top-1 so far
    RUN/metrics.jsonl          one JSON object per logged interval and per evaluation (the source of truth)
    RUN/sskd/                  TensorBoard event files (``--log-with tensorboard``; Accelerate's layout:
                               <project_dir>/<project name>; hparams in RUN/sskd/<time>/)
    RUN/wandb/                 W&B's files (``--log-with wandb``; offline unless WANDB_MODE is set)
    RUN/mlruns/                MLflow's file store (``--log-with mlflow``; unless MLFLOW_TRACKING_URI is set)
    RUN/.aim/                  the Aim repository (``--log-with aim``)

Checkpoints are written under a temporary name and renamed, so the last good one survives any
interruption. A run folder has one writer at a time (:func:`claim_run` holds ``RUN/.lock`` for the
run's life) and earlier work in it is never overwritten unless asked (``--resume``, ``--overwrite``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
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
# The trackers `--log-with` (run.log_with) may name: the module each needs and where it writes in RUN/.
# Accelerate's own trackers do the writing; metrics.jsonl stays the record the project itself reads.
TRACKER_PROJECT = "sskd"  # Accelerate's project name: W&B project, MLflow experiment, TensorBoard subfolder
TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "aim": "aim"}
TRACKER_FOLDERS = {"tensorboard": TRACKER_PROJECT, "wandb": "wandb", "mlflow": "mlruns", "aim": ".aim"}
# what a run writes ("tb": the hand-made TensorBoard writer's folder of older runs)
RUN_ENTRIES = (CONFIG, METRICS, MODEL_WEIGHTS, MODEL_INFO, CHECKPOINTS, "tb", *TRACKER_FOLDERS.values())


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


# What ``torch.load(weights_only=True)`` admits, and so all a checkpoint may hold (numpy values and paths
# are converted when saved; anything else is a bug caught at the first checkpoint, not at the resume).
# Exact types: an IntEnum or a str subclass would be pickled as its own class, and refused.
_CKPT_LEAVES = (str, bytes, bytearray, bool, int, float, complex, type(None), torch.Size, torch.device, torch.dtype)


def _loadable(value: Any, where: str) -> Any:
    """``value`` with numpy arrays as tensors, numpy scalars as Python numbers and paths as strings."""
    import collections

    import numpy as np

    if type(value) in _CKPT_LEAVES or isinstance(value, torch.Tensor):  # before tuples: torch.Size is one
        return value
    if isinstance(value, dict):
        out = {k: _loadable(v, f"{where}.{k}") for k, v in value.items()}
        return type(value)(out) if type(value) in (collections.OrderedDict, collections.Counter) else out
    if isinstance(value, (list, tuple, set)):  # a namedtuple becomes a plain tuple
        items = [_loadable(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else set(items) if isinstance(value, set) else tuple(items)
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value).copy())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"checkpoint entry {where} is a {type(value).__module__}.{type(value).__qualname__}, "
                    "which torch.load(weights_only=True) refuses: store tensors, containers and plain values")


def save_checkpoint(run: Path, name: str, state: dict[str, Any]) -> Path:
    """Atomically write a training state to ``RUN/checkpoints/<name>.pt`` (loadable with weights_only)."""
    path = run / CHECKPOINTS / f"{name}.pt"
    state = _loadable(state, "state")
    with atomic.atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_checkpoint(run: Path, name: str = "last") -> dict[str, Any] | None:
    """The checkpoint ``name`` of ``run``, or None when there is none; a damaged file is an error.

    Loaded with ``weights_only=True``: tensors, containers and plain values only, so a checkpoint that
    references anything else (a crafted pickle, or objects an older sskd stored) is refused, never run."""
    import pickle
    import re

    path = run / CHECKPOINTS / f"{name}.pt"
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = re.search(r"GLOBAL ([\w.]*\w)", str(exc))
        if refused:
            raise SSKDError(f"{path}: refused to load: it references {refused.group(1)}, which weights_only "
                            "loading does not admit (written by an older sskd, or not by sskd); nothing in it "
                            "was run: delete it, or --overwrite the run, to start over") from None
        reason = re.search(r"Unsupported operand \d+", str(exc))
        raise SSKDError(f"{path}: damaged checkpoint (not a pickle torch can read: "
                        f"{reason.group(0) if reason else 'UnpicklingError'}); delete it to start over") from None
    except Exception as exc:
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
        reason = f"{type(exc).__name__}: {first[:200]}" if first else f"{type(exc).__name__}: empty or cut short"
        raise SSKDError(f"{path}: damaged checkpoint ({reason}); delete it to start over") from exc


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: sys.modules[module] is None (blocked)
        return False


def check_trackers(names: list[str]) -> None:
    """One line per missing package, before anything is set up: Accelerate itself would skip it silently."""
    for name in names:
        if name not in TRACKER_MODULES:
            raise SSKDError(f"--log-with {name}: unknown tracker (choose from {', '.join(TRACKER_MODULES)})")
        if not _installed(TRACKER_MODULES[name]):
            raise SSKDError(f"--log-with {name} needs the {name} package (pip install {name})")


def flat_config(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"student": {"lr": 0.05}}`` -> ``{"student.lr": 0.05}``; lists become ``"[a, b]"`` strings.

    Trackers take flat scalars only (TensorBoard's hparams and MLflow's params reject nested values)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            out[name] = "[" + ", ".join(str(v) for v in value) + "]"
        elif value is None or isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def accelerator_trackers(names: list[str], run: Path) -> dict[str, Any]:
    """The :class:`accelerate.Accelerator` arguments for ``names`` (none when empty): checked first."""
    names = list(dict.fromkeys(names))
    if not names:
        return {}
    check_trackers(names)
    return {"log_with": names, "project_dir": str(run)}


def start_trackers(accelerator, run: Path, config: dict[str, Any], wanted: list[str] = (),
                   resume_step: int | None = None) -> None:
    """``accelerator.init_trackers`` with the flattened run config, everything written under ``run``.

    Services that want a server stay local: W&B runs offline (``WANDB_MODE`` unless set) in ``RUN/wandb``
    (``WANDB_DIR`` unless set), MLflow uses a file store ``RUN/mlruns`` (unless ``MLFLOW_TRACKING_URI``).
    ``resume_step``: TensorBoard hides the earlier run's events after it (they are logged again).
    """
    names = [str(t) for t in accelerator.log_with]
    dropped = [n for n in wanted if n not in names]  # Accelerate skips a tracker it finds no package for
    if dropped:
        raise SSKDError(f"--log-with {dropped[0]}: Accelerate does not find the {dropped[0]} package "
                        f"(pip install {dropped[0]})")
    if not names:
        return
    kwargs: dict[str, dict[str, Any]] = {}
    if "wandb" in names:
        kwargs["wandb"] = {"name": run.resolve().name}
        if "WANDB_MODE" not in os.environ:
            kwargs["wandb"]["mode"] = "offline"
        if "WANDB_DIR" not in os.environ:
            kwargs["wandb"]["dir"] = str(run)
    if "mlflow" in names:
        kwargs["mlflow"] = {"run_name": run.resolve().name}
        if accelerator.is_main_process and "MLFLOW_TRACKING_URI" not in os.environ:
            import mlflow

            mlflow.set_tracking_uri((run / TRACKER_FOLDERS["mlflow"]).resolve().as_uri())
    if "tensorboard" in names and resume_step is not None:
        kwargs["tensorboard"] = {"purge_step": resume_step + 1}
    try:
        accelerator.init_trackers(TRACKER_PROJECT, config=flat_config(config), init_kwargs=kwargs)
    except Exception as exc:  # a tracker's own failure, in one line
        for tracker in accelerator.trackers:  # close those that started; the others cannot finish
            with contextlib.suppress(Exception):
                tracker.finish()
        accelerator.trackers = []
        raise SSKDError(f"--log-with {','.join(names)}: cannot start the tracker ({type(exc).__name__}: "
                        f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from exc
    if accelerator.is_main_process:
        where = ", ".join(f"{n} -> {run / TRACKER_FOLDERS[n]}" for n in names
                          if not (n == "mlflow" and "MLFLOW_TRACKING_URI" in os.environ))
        log.info("%s: logging to %s", run, where or ", ".join(names))


def finish_trackers(accelerator) -> None:
    """Close the trackers: what ``accelerator.end_training()`` does, less destroying the process group
    (a caller may go on with collectives, or another stage in the same process)."""
    if accelerator is None:
        return
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers = []


class MetricsLog:
    """Appends one JSON line per record to ``RUN/metrics.jsonl``; the same numbers go to the Accelerate
    trackers of ``accelerator`` when it has any (``--log-with``).

    ``keep_until``: on resume, the checkpoint's (phase, step); records past it are dropped first (they
    are made again), so no step is logged twice; a torn last line of a killed writer is dropped too.

    Trackers get each record's numbers as ``<kind>/<key>`` (``train/loss``, ``eval/top1``) at its step;
    in a run with pre-training phases the steps of the earlier phases are added, so the trackers' step
    never goes back (W&B drops records whose step does).
    """

    def __init__(self, run: Path, enabled: bool = True, keep_until: tuple[int, int] | None = None,
                 accelerator=None):
        self.path = run / METRICS
        self.enabled = enabled
        self.accelerator = accelerator if accelerator is not None and accelerator.log_with else None
        self._phase_end: dict[int, int] = {}  # phase -> its last logged step
        if not enabled:
            return
        if self.path.is_file():
            records = read_metrics(run)
            if keep_until is not None:
                records = [r for r in records if (r.get("phase", 0), r.get("step", 0)) <= tuple(keep_until)]
            text = "".join(json.dumps(r) + "\n" for r in records)
            if text.encode() != self.path.read_bytes():
                atomic.write_bytes(self.path, text.encode())
            for r in records:
                self._note(r)

    def _note(self, record: dict[str, Any]) -> None:
        phase = record.get("phase", 0)
        self._phase_end[phase] = max(self._phase_end.get(phase, 0), record.get("step", 0))

    def tracker_step(self, phase: int, step: int) -> int:
        """The trackers' step of ``step`` in ``phase``: the steps of the earlier phases added."""
        return step + sum(end for p, end in self._phase_end.items() if p < phase)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        self._note(record)
        if self.accelerator is not None:
            kind = record.get("kind", "train")
            values = {f"{kind}/{k}": v for k, v in record.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "time", "phase")}
            self.accelerator.log(values, step=self.tracker_step(record.get("phase", 0), record.get("step", 0)))

    def close(self) -> None:
        finish_trackers(self.accelerator)
        self.accelerator = None


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
