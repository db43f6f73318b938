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
    RUN/data.json              the few-shot subset / flipped labels a run trained on (pipelines.settings)

Checkpoints are written under a temporary name and renamed, so the last good one survives any
interruption; torch's zip format stores a CRC-32 of every record of a checkpoint, checked here before a
checkpoint is loaded (torch itself never checks them). ``model.json`` records the sha256 of
``model.safetensors``, checked whenever the weights are loaded. A run folder has one writer at a time
(:func:`claim_run` holds ``RUN/.lock`` for the run's life) and earlier work in it is never overwritten
unless asked (``--resume``, ``--overwrite``). A new run (not a resume) starts as a :class:`NewRun`:
until its first checkpoint an earlier run it replaces is only set aside, and a start that fails (or is
killed) before then is undone, so the folder is as it was. Files of a run are never written through a
symbolic link: a link where one should be is refused, naming it.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from sskd.core import atomic
from sskd.core.errors import SSKDError
from sskd.core.lock import FolderLock

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
DATA_RECORD = "data.json"  # pipelines.settings.RECORD (not imported: this module stays light)
# what a run writes ("tb": the hand-made TensorBoard writer's folder of older runs)
RUN_ENTRIES = (
    CONFIG,
    METRICS,
    MODEL_WEIGHTS,
    MODEL_INFO,
    CHECKPOINTS,
    DATA_RECORD,
    "tb",
    *TRACKER_FOLDERS.values(),
)
START_MARKER = ".new-run.json"  # a new run's start, until its first checkpoint (NewRun)
REPLACED_PREFIX = ".replaced-"  # RUN/.replaced-<time>-<pid>/: the run an --overwrite replaces, until then
_REPLACED_NAME = re.compile(r"\.replaced-[\w.-]+")


def earlier_work(run: Path) -> list[str]:
    """The entries of an earlier run in ``run`` (empty for a new or empty folder); a symbolic link counts,
    even one whose target is missing (writing the file would create the target)."""
    return [name for name in RUN_ENTRIES if os.path.lexists(run / name)]


def linked_files(run: Path) -> list[Path]:
    """Symbolic links where the run's own files are (its writes would go through them to their targets)."""
    candidates = [run / name for name in RUN_ENTRIES]
    checkpoints = run / CHECKPOINTS
    if checkpoints.is_dir() and not checkpoints.is_symlink():
        candidates += sorted(checkpoints.iterdir())
    return [p for p in candidates if p.is_symlink()]


def refuse_link(path: Path, what: str = "file") -> SSKDError:
    """The error for a symbolic link found where a file of the run should be."""
    try:
        target = f" (to {os.readlink(path)})"
    except OSError:
        target = ""
    return SSKDError(
        f"{path}: is a symbolic link{target}; sskd writes its {what} itself, never through a link: "
        "remove the link"
    )


def _remove(path: Path) -> None:
    """Delete a file, a folder or a symbolic link (a link itself, never what it points to)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


def claim_run(run: Path, *, resume: bool, overwrite: bool) -> FolderLock:
    """Lock ``run`` for this process and check it may be written; returns the held lock.

    A folder that holds an earlier run is refused unless ``resume`` (continue it) or ``overwrite``
    (replace it: nothing is removed here; :class:`NewRun` sets the earlier run aside when the new one
    starts writing, after every check). A start that died before its first checkpoint is undone first,
    and temporary files a killed writer left are removed (safe: we hold the lock). A symbolic link where
    a file of the run to be continued is refused, naming it.
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
        NewRun.recover(run)
        found = earlier_work(run)
        if found and not (resume or overwrite):
            raise SSKDError(
                f"{run}: holds an earlier run ({', '.join(found)}); pass --resume to continue it or "
                "--overwrite to replace it (or choose another --out)"
            )
        if resume:
            links = linked_files(run)
            if links:
                raise refuse_link(links[0], "run files")
        if found and overwrite:
            log.info(
                "%s: --overwrite: the earlier run (%s) is replaced once this run's checks pass (set aside "
                "until its first checkpoint)",
                run,
                ", ".join(found),
            )
        n = atomic.remove_stale_partials(run, recursive=True)
        if n:
            log.info("%s: removed %d temporary file(s) left by an interrupted writer", run, n)
    except BaseException:
        lock.release()
        raise
    return lock


class NewRun:
    """The start of a run that is not a resume, undoable until its first checkpoint.

    :meth:`begin` (just before the run writes its first file, every check passed) writes
    ``RUN/.new-run.json`` and moves an earlier run (``--overwrite``) to ``RUN/.replaced-<time>-<pid>/``;
    :meth:`commit` (its first ``checkpoints/last.pt`` written) removes the marker, then the earlier run;
    :meth:`rollback` (it failed before that) removes what this start wrote and moves the earlier run back.
    A start killed in between is undone by the next :func:`claim_run` (:meth:`recover`), so a failed
    start never leaves a folder that looks like a run, and never loses the run it was to replace.
    """

    def __init__(self, run: Path):
        self.run = Path(run)
        self.active = False  # begun, neither committed nor rolled back
        self.replaced: Path | None = None

    def begin(self) -> None:
        found = earlier_work(self.run)
        name = f"{REPLACED_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}" if found else None
        try:
            atomic.write_json(
                self.run / START_MARKER,
                {"replaced": name, "entries": found, "pid": os.getpid(), "time": round(time.time(), 1)},
            )
        except OSError as exc:
            raise SSKDError(
                atomic.write_error(
                    self.run / START_MARKER,
                    exc,
                    "run's start marker",
                    kept="nothing in the folder was changed",
                )
            ) from None
        self.active = True
        if found:
            self.replaced = self.run / name
            try:
                self.replaced.mkdir()
                for entry in found:  # renames in one folder: the earlier run's files are moved, never copied
                    os.replace(self.run / entry, self.replaced / entry)
            except OSError as exc:  # the caller's rollback moves back what was moved
                raise SSKDError(
                    f"{self.run}: cannot set the earlier run aside ({exc.strerror or exc})"
                ) from None
            log.info(
                "%s: the earlier run (%s) is set aside in %s until this run's first checkpoint",
                self.run,
                ", ".join(found),
                name,
            )

    def commit(self) -> None:
        if not self.active:
            return
        (self.run / START_MARKER).unlink(missing_ok=True)  # first: from here on the new run is the run
        self.active = False
        if self.replaced is not None:
            _remove(self.replaced)
            log.info("%s: first checkpoint written; the earlier run it replaces is deleted", self.run)

    def rollback(self) -> None:
        if not self.active:
            return
        self.active = False
        _undo_start(self.run, _read_marker(self.run))

    @staticmethod
    def recover(run: Path) -> None:
        """Undo a start that died before its first checkpoint; drop a replaced run whose successor committed."""
        if os.path.lexists(run / START_MARKER):
            marker = _read_marker(run)
            log.warning(
                "%s: an earlier start of a run here stopped before its first checkpoint: removing what it "
                "wrote%s",
                run,
                " and putting back the run it was replacing" if marker.get("replaced") else "",
            )
            _undo_start(run, marker)
        for stray in run.glob(f"{REPLACED_PREFIX}*"):  # its new run committed, then died before deleting it
            if _REPLACED_NAME.fullmatch(stray.name):
                _remove(stray)


def _read_marker(run: Path) -> dict[str, Any]:
    path = run / START_MARKER
    if path.is_symlink():
        raise refuse_link(path, "run files")
    try:
        marker = json.loads(path.read_text())
        replaced = marker.get("replaced")
        entries = marker.get("entries") or []
    except (OSError, ValueError, AttributeError) as exc:
        raise SSKDError(
            f"{path}: unreadable ({exc}); it records an unfinished start of a run: look at the folder, "
            "then delete it"
        ) from None
    if (
        replaced is not None and not (isinstance(replaced, str) and _REPLACED_NAME.fullmatch(replaced))
    ) or not all(isinstance(e, str) and e in RUN_ENTRIES for e in entries):
        raise SSKDError(f"{path}: not written by sskd (names outside the run folder's own); delete it")
    return {"replaced": replaced, "entries": entries}


def _undo_start(run: Path, marker: dict[str, Any]) -> None:
    """Remove what a start wrote and put the run it was replacing back (see :class:`NewRun`)."""
    replaced = run / marker["replaced"] if marker.get("replaced") else None
    old = set(marker.get("entries") or [])
    for name in RUN_ENTRIES:
        here = run / name
        if not os.path.lexists(here):
            continue
        if name in old and not (replaced is not None and os.path.lexists(replaced / name)):
            continue  # not moved aside yet (the start died while moving): the earlier run's own
        _remove(here)
    if replaced is not None and replaced.is_dir() and not replaced.is_symlink():
        for name in old:
            if os.path.lexists(replaced / name):
                os.replace(replaced / name, run / name)
        _remove(replaced)
    (run / START_MARKER).unlink(missing_ok=True)


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file (see :func:`sskd.core.atomic.sha256_file`)."""
    return atomic.sha256_file(path)


def save_model(run: Path, module: torch.nn.Module, info: dict[str, Any]) -> None:
    """Export ``module``'s weights as safetensors plus a JSON description with their sha256 (both atomic).

    An earlier ``model.json`` is removed first and written again last: a writer stopped in between (or
    a full disk) leaves no finished-looking model whose description is not its own."""
    import hashlib

    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    data = save(state)  # the bytes save_file writes; written here so a full disk is an OSError with its errno
    kept = (
        f"{run / CHECKPOINTS / 'last.pt'} holds the trained state: free space, then rerun the command with "
        "--resume to export it"
    )
    (run / MODEL_INFO).unlink(missing_ok=True)
    for path, payload in ((run / MODEL_WEIGHTS, data), (run / MODEL_INFO, None)):
        try:
            if payload is None:
                atomic.write_json(path, dict(info, weights_sha256=hashlib.sha256(data).hexdigest()))
            else:
                atomic.write_bytes(path, payload)
        except OSError as exc:
            raise SSKDError(atomic.write_error(path, exc, "model", kept=kept)) from None


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
    """Load ``RUN/model.safetensors`` into ``module`` strictly, naming the run on a mismatch.

    The file's sha256 must be the ``weights_sha256`` that ``model.json`` records (a damaged or edited
    file is refused, naming it); the hash is taken of the very bytes that are then loaded."""
    import hashlib

    from safetensors.torch import load

    path = Path(run) / MODEL_WEIGHTS
    try:
        want = json.loads((Path(run) / MODEL_INFO).read_text()).get("weights_sha256")
    except (OSError, ValueError, AttributeError):
        want = None  # no (readable) model.json: load_model_info names that where it matters
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SSKDError(f"{path}: cannot read weights ({exc.strerror or exc})") from None
    have = hashlib.sha256(data).hexdigest()
    if isinstance(want, str) and have != want:
        raise SSKDError(
            f"{path}: sha256 {have[:16]}... is not the {want[:16]}... that {MODEL_INFO} records: the "
            "weights were changed or damaged after the run wrote them; restore the file (or retrain)"
        )
    try:
        state = load(data)
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise SSKDError(f"{path}: cannot read weights ({exc})") from exc
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise SSKDError(
            f"{path}: weights do not fit the model ({str(exc).splitlines()[-1].strip()})"
        ) from exc
    if missing or unexpected:
        raise SSKDError(
            f"{path}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


# What ``torch.load(weights_only=True)`` admits, and so all a checkpoint may hold (numpy values and paths
# are converted when saved; anything else is a bug caught at the first checkpoint, not at the resume).
# Exact types: an IntEnum or a str subclass would be pickled as its own class, and refused.
_CKPT_LEAVES = (
    str,
    bytes,
    bytearray,
    bool,
    int,
    float,
    complex,
    type(None),
    torch.Size,
    torch.device,
    torch.dtype,
)


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
    raise TypeError(
        f"checkpoint entry {where} is a {type(value).__module__}.{type(value).__qualname__}, "
        "which torch.load(weights_only=True) refuses: store tensors, containers and plain values"
    )


def save_checkpoint(run: Path, name: str, state: dict[str, Any]) -> Path:
    """Atomically write a training state to ``RUN/checkpoints/<name>.pt`` (loadable with weights_only).

    Serialised in memory, then written: a full disk or the file-size limit is one line naming the file,
    with the earlier checkpoint of that name left as it was."""
    import io

    path = run / CHECKPOINTS / f"{name}.pt"
    state = _loadable(state, "state")
    buf = io.BytesIO()
    torch.save(state, buf)  # torch's zip records each carry a CRC-32 (checked by load_checkpoint)
    try:  # (a symbolic link at ``path`` is replaced by the rename, never written through)
        atomic.write_bytes(path, buf.getbuffer())
    except OSError as exc:
        kept = f"the previous {path.name} is kept" if path.is_file() else f"no earlier {path.name} existed"
        raise SSKDError(atomic.write_error(path, exc, "checkpoint", kept=kept)) from None
    return path


def checkpoint_damage(path: Path) -> str | None:
    """Why the checkpoint file at ``path`` is damaged, or None when every record is intact.

    ``torch.save`` writes a zip whose records (the pickle and every tensor's bytes) each carry a CRC-32,
    which ``torch.load`` never checks: a flipped bit in a tensor loads silently. Here every record is
    read and checked, and the records must follow each other as torch writes them (a damaged offset in
    the zip's directory would make torch read other bytes). Files that are not zips are left to
    ``torch.load`` (which refuses them in its own words)."""
    import struct
    import zipfile

    try:
        if not zipfile.is_zipfile(path):
            return None
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
            if bad is not None:
                return f"record {bad} fails its CRC-32 check"
            infos = sorted(zf.infolist(), key=lambda i: i.header_offset)
            with open(path, "rb") as fh:
                expect = 0
                for info in infos:
                    if info.header_offset != expect:
                        return f"the zip directory's offset of record {info.filename} is wrong"
                    fh.seek(info.header_offset + 26)
                    n_name, n_extra = struct.unpack("<HH", fh.read(4))
                    end = info.header_offset + 30 + n_name + n_extra + info.compress_size
                    if (
                        info.flag_bits & 0x08
                    ):  # a data descriptor follows: signature, crc, sizes (4 or 8 bytes)
                        fh.seek(end)
                        head = fh.read(4)
                        end += (
                            (4 if head == b"PK\x07\x08" else 0)
                            + 4
                            + (16 if info.file_size >= 0xFFFFFFFF or info.compress_size >= 0xFFFFFFFF else 8)
                        )
                    expect = end
                if expect != zf.start_dir:
                    return "the zip directory does not start where the last record ends"
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        OSError,
        EOFError,
        ValueError,
        struct.error,
        NotImplementedError,
    ) as exc:
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    return None


def load_checkpoint(run: Path, name: str = "last") -> dict[str, Any] | None:
    """The checkpoint ``name`` of ``run``, or None when there is none; a damaged file is an error.

    Every record's CRC-32 is checked first (:func:`checkpoint_damage`): a damaged file is one line naming
    it, and saying whether ``best.pt`` is intact (never used in its place without being asked).
    Loaded with ``weights_only=True``: tensors, containers and plain values only, so a checkpoint that
    references anything else (a crafted pickle, or objects an older sskd stored) is refused, never run."""
    import pickle

    path = run / CHECKPOINTS / f"{name}.pt"
    if path.is_symlink():
        raise refuse_link(path, "checkpoints")
    if not path.is_file():
        return None
    damage = checkpoint_damage(path)
    if damage:
        other = ""
        best = run / CHECKPOINTS / "best.pt"
        if name != "best" and best.is_file() and not best.is_symlink():
            other = (
                f"; {best} is intact (copy it over {path.name} to resume from that earlier state)"
                if checkpoint_damage(best) is None
                else f"; {best} is damaged too"
            )
        raise SSKDError(
            f"{path}: damaged checkpoint ({damage}: its bytes changed on disk after it was written); "
            f"not used{other}; or delete it to start over"
        ) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = re.search(r"GLOBAL ([\w.]*\w)", str(exc))
        if refused:
            raise SSKDError(
                f"{path}: refused to load: it references {refused.group(1)}, which weights_only "
                "loading does not admit (written by an older sskd, or not by sskd); nothing in it "
                "was run: delete it, or --overwrite the run, to start over"
            ) from None
        reason = re.search(r"Unsupported operand \d+", str(exc))
        raise SSKDError(
            f"{path}: damaged checkpoint (not a pickle torch can read: "
            f"{reason.group(0) if reason else 'UnpicklingError'}); delete it to start over"
        ) from None
    except Exception as exc:
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
        reason = (
            f"{type(exc).__name__}: {first[:200]}" if first else f"{type(exc).__name__}: empty or cut short"
        )
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


def start_trackers(
    accelerator, run: Path, config: dict[str, Any], wanted: list[str] = (), resume_step: int | None = None
) -> None:
    """``accelerator.init_trackers`` with the flattened run config, everything written under ``run``.

    Services that want a server stay local: W&B runs offline (``WANDB_MODE`` unless set) in ``RUN/wandb``
    (``WANDB_DIR`` unless set), MLflow uses a file store ``RUN/mlruns`` (unless ``MLFLOW_TRACKING_URI``).
    ``resume_step``: TensorBoard hides the earlier run's events after it (they are logged again).
    """
    names = [str(t) for t in accelerator.log_with]
    dropped = [n for n in wanted if n not in names]  # Accelerate skips a tracker it finds no package for
    if dropped:
        raise SSKDError(
            f"--log-with {dropped[0]}: Accelerate does not find the {dropped[0]} package "
            f"(pip install {dropped[0]})"
        )
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
        raise SSKDError(
            f"--log-with {','.join(names)}: cannot start the tracker ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})"
        ) from exc
    if accelerator.is_main_process:
        where = ", ".join(
            f"{n} -> {run / TRACKER_FOLDERS[n]}"
            for n in names
            if not (n == "mlflow" and "MLFLOW_TRACKING_URI" in os.environ)
        )
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

    def __init__(
        self, run: Path, enabled: bool = True, keep_until: tuple[int, int] | None = None, accelerator=None
    ):
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
                try:
                    atomic.write_bytes(self.path, text.encode())
                except OSError as exc:
                    raise SSKDError(
                        atomic.write_error(self.path, exc, "metrics log", kept="the log is left as it was")
                    ) from None
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
        append_line(self.path, json.dumps(record) + "\n", "metrics log")
        self._note(record)
        if self.accelerator is not None:
            kind = record.get("kind", "train")
            values = {
                f"{kind}/{k}": v
                for k, v in record.items()
                if isinstance(v, (int, float))
                and not isinstance(v, bool)
                and k not in ("step", "time", "phase")
            }
            self.accelerator.log(
                values, step=self.tracker_step(record.get("phase", 0), record.get("step", 0))
            )

    def close(self) -> None:
        finish_trackers(self.accelerator)
        self.accelerator = None


def append_line(path: Path, line: str, what: str = "file") -> None:
    """Append ``line`` to ``path`` (created 0666 less the umask), never through a symbolic link (O_NOFOLLOW).

    A link is refused naming it; a full disk or the file-size limit is one line (a torn last line is what
    :func:`read_metrics` already skips)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP or path.is_symlink():
            raise refuse_link(path, what) from None
        raise SSKDError(atomic.write_error(path, exc, what)) from None
    try:
        view = memoryview(line.encode())
        while view:
            view = view[os.write(fd, view) :]
    except OSError as exc:
        raise SSKDError(atomic.write_error(path, exc, what)) from None
    finally:
        os.close(fd)


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
