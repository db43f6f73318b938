"""Typed run configuration: dataclasses hold the defaults, YAML holds values, the CLI overrides.

A config file describes one teacher→student recipe for every stage, so the same file serves
``train-teacher``, ``train-ss-head``, ``cache`` and ``distill``; each command reads its section. The
resolved config is saved in every run folder and inside every checkpoint.

Defaults reproduce the official SSKD code (official-code-facts.md §1): SGD momentum 0.9, wd 5e-4,
batch 64, lr 0.05, x0.1 at epochs 150/180/210 over 240 epochs; SS head 60 epochs, x0.1 at 30/45.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from sskd.errors import SSKDError


@dataclass
class DataConfig:
    """Where the images come from and how the views are made."""

    shards: str = ""  # shard folder written by `sskd shard`
    views: str = "rotation"  # SS views: a preset (`rotation` = official code, `paper` = four transforms) or a comma list
    size: int | None = None  # output size; None = from the shard manifest (32 for CIFAR/digits, 224 ImageNet)
    device: str = "auto"  # DALI device: auto (gpu when CUDA is present) | cpu | gpu
    threads: int = 2  # DALI worker threads per process
    eval_batch_size: int = 256


@dataclass
class StageConfig:
    """Optimisation of one stage (teacher, SS head or student)."""

    arch: str = ""
    method: str = ""
    epochs: int = 240
    max_steps: int | None = None  # stop after this many optimizer steps (smoke runs, benchmarks)
    batch_size: int = 64  # images per process per step (each image carries all its views)
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "step"  # step | cosine
    milestones: list[int] = field(default_factory=lambda: [150, 180, 210])
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    grad_accum: int = 1
    clip_grad: float | None = None  # max gradient norm; None = no clipping


@dataclass
class LossConfig:
    """Eq. 8 weights and temperatures; defaults are the official code's (student.py)."""

    ce_weight: float = 0.1
    kd_weight: float = 0.9
    tf_weight: float = 2.7
    ss_weight: float = 10.0
    kd_T: float = 4.0
    tf_T: float = 4.0
    ss_T: float = 0.5
    ss_ratio: float = 0.75
    tf_ratio: float = 1.0
    head_tau: float = 1.0  # Eq. 5 temperature when training the teacher's SS head (official: raw cosines)


@dataclass
class RunConfig:
    """Everything about running, not about the maths."""

    seed: int = 0
    mixed_precision: str = "no"  # no | bf16 | fp16 (fp16 needs a GPU)
    log_every: int = 50  # optimizer steps between metric lines
    ckpt_every: int = 500  # optimizer steps between mid-epoch checkpoints (0 = only at epoch ends)
    eval_every: int = 1  # epochs between evaluations (0 = only at the end)
    global_ss_batch: bool = False  # all-gather SS embeddings across ranks for one global similarity matrix
    progress: bool = True


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    teacher: StageConfig = field(default_factory=lambda: StageConfig(arch="resnet32x4", method="teacher"))
    ss_head: StageConfig = field(
        default_factory=lambda: StageConfig(method="ss_head", epochs=60, milestones=[30, 45])
    )
    student: StageConfig = field(default_factory=lambda: StageConfig(arch="resnet8x4", method="sskd"))
    loss: LossConfig = field(default_factory=LossConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(options)})"


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Convert a YAML or command-line value to the field's declared type, or raise naming ``where``."""
    text = getattr(hint, "__name__", None) if isinstance(hint, type) else None
    text = text or str(hint)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and "None" in text):
        if "None" in text:
            return None
        raise SSKDError(f"{where}: may not be empty")
    try:
        if text.startswith("list"):
            if isinstance(value, str):
                value = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
            return [int(v) for v in value]
        if hint is bool or text == "bool":
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if "int" in text and "float" not in text:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if "float" in text:
            return float(value)
        return str(value)
    except (TypeError, ValueError) as exc:
        raise SSKDError(f"{where}: {value!r} is not a valid {text}") from exc


def apply_values(cfg: Config, values: dict[str, Any], source: str) -> Config:
    """Set nested ``values`` (``{"student": {"lr": 0.1}}``) on ``cfg``; unknown keys are errors."""
    if not isinstance(values, dict):
        raise SSKDError(f"{source}: expected a mapping of config sections, got {type(values).__name__}")
    for section, body in values.items():
        sections = [f.name for f in fields(cfg)]
        if section not in sections:
            raise SSKDError(f"{source}: unknown config section {section!r}{_suggest(section, sections)}")
        target = getattr(cfg, section)
        if not isinstance(body, dict):
            raise SSKDError(f"{source}: section {section!r} must be a mapping")
        hints = get_type_hints(type(target))
        for key, value in body.items():
            if key not in hints:
                raise SSKDError(f"{source}: unknown config key '{section}.{key}'{_suggest(key, list(hints))}")
            setattr(target, key, _coerce(value, hints[key], f"{source}: {section}.{key}"))
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file at ``path``, then ``section.key=value`` overrides, checked."""
    cfg = Config()
    if path:
        p = Path(path)
        if not p.is_file():
            raise SSKDError(f"{p}: config file not found")
        try:
            values = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise SSKDError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from exc
        apply_values(cfg, values, str(p))
    for item in overrides or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise SSKDError(f"--set {item!r}: expected section.key=value (e.g. student.lr=0.01)")
        dotted, value = item.split("=", 1)
        section, key = dotted.split(".", 1)
        apply_values(cfg, {section: {key: yaml.safe_load(value) if value else value}}, f"--set {item}")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Check values that the types alone cannot (before any work starts)."""
    for name in ("teacher", "ss_head", "student"):
        st: StageConfig = getattr(cfg, name)
        if st.schedule not in ("step", "cosine"):
            raise SSKDError(f"config: {name}.schedule must be 'step' or 'cosine', not {st.schedule!r}")
        if st.batch_size < 1 or st.grad_accum < 1 or st.epochs < 1:
            raise SSKDError(f"config: {name}.batch_size, grad_accum and epochs must be >= 1")
        if st.max_steps is not None and st.max_steps < 1:
            raise SSKDError(f"config: {name}.max_steps must be >= 1")
    if cfg.run.mixed_precision not in ("no", "bf16", "fp16"):
        raise SSKDError(f"config: run.mixed_precision must be no, bf16 or fp16, not {cfg.run.mixed_precision!r}")
    if cfg.data.device not in ("auto", "cpu", "gpu"):
        raise SSKDError(f"config: data.device must be auto, cpu or gpu, not {cfg.data.device!r}")


def from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a :class:`Config` from :meth:`Config.to_dict` output (a saved run or checkpoint)."""
    return apply_values(Config(), values, "saved config")


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)

