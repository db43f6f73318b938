"""Typed run configuration: dataclasses hold the defaults, YAML holds values, the CLI overrides.

A config file describes one teacher→student recipe for every stage, so the same file serves
``train-teacher``, ``train-ss-head``, ``cache`` and ``distill``; each command reads its section. The
resolved config is saved in every run folder and inside every checkpoint.

Defaults reproduce the official SSKD code's training script: SGD momentum 0.9, wd 5e-4,
batch 64, lr 0.05, x0.1 at epochs 150/180/210 over 240 epochs; SS head 60 epochs, x0.1 at 30/45.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from sskd.core.errors import SSKDError
from sskd.core.fields import bound


@dataclass
class DataConfig:
    """Where the images come from and how the views are made."""

    shards: str = ""  # shard folder written by `sskd shard`
    # SS views: auto (the method's own: `rotation` for SSKD, `shared_rotation` for HSSAKD), a preset
    # (`rotation` = the official SSKD code, `paper` = the paper's four transforms) or a comma list
    views: str = "auto"
    size: int | None = bound(
        None, ge=8
    )  # output size; None = from the shard manifest (32 CIFAR/digits, 224 ImageNet)
    device: str = bound(
        "auto", choices=("auto", "cpu", "gpu")
    )  # DALI device: auto = gpu when CUDA is present
    threads: int = bound(2, ge=1)  # DALI worker threads per process
    eval_batch_size: int = bound(256, ge=1)
    # Robustness settings (SSKD Sec. 4.3), training split only (pipelines.settings): few-shot keeps this
    # stratified share of each class (random_state 0, the same for every seed and method) ...
    subset_fraction: float = bound(1.0, gt=0, le=1)
    # ... and symmetric label noise flips this share of training labels to another class, per (run.seed, id)
    label_noise: float = bound(0.0, ge=0, le=0.99)
    # samples that fail their checksum, id or label check: stop naming the first (false) or leave them out (true)
    skip_bad: bool = False


@dataclass
class StageConfig:
    """Optimisation of one stage (teacher, SS head or student)."""

    arch: str = ""
    method: str = ""
    pretrained: bool = (
        False  # start the stage's model from its pretrained weights (timm:NAME, torchvision:NAME)
    )
    weights: str | None = None  # start it from this .safetensors / .pth state dict (weights only)
    # a student reading a teacher cache: the storage level it accepts (any | exact | compact | a level name)
    cache_level: str = "any"
    epochs: int = bound(240, ge=1)
    max_steps: int | None = bound(None, ge=1)  # stop after this many optimizer steps (smoke runs, benchmarks)
    batch_size: int = bound(64, ge=1)  # images per process per step (each image carries all its views)
    lr: float = bound(0.05, ge=0)
    optimizer: str = bound("sgd", choices=("sgd", "adamw"))  # adamw: AdamW (torch's betas), for transformers
    momentum: float = bound(0.9, ge=0, le=1)  # SGD only
    weight_decay: float = bound(5e-4, ge=0)
    nesterov: bool = False
    schedule: str = bound("step", choices=("step", "cosine"))
    milestones: list[int] = bound(factory=lambda: [150, 180, 210], ge=0)
    gamma: float = bound(0.1, gt=0)
    warmup_epochs: float = bound(0.0, ge=0)
    grad_accum: int = bound(1, ge=1)
    clip_grad: float | None = bound(None, gt=0)  # max gradient norm; None = no clipping


@dataclass
class RunConfig:
    """Everything about running, not about the maths."""

    seed: int = bound(0, ge=0)
    mixed_precision: str = bound("no", choices=("no", "bf16", "fp16"))  # fp16 needs a GPU
    log_every: int = bound(50, ge=1)  # optimizer steps between metric lines
    ckpt_every: int = bound(
        500, ge=0
    )  # optimizer steps between mid-epoch checkpoints (0 = only at epoch ends)
    eval_every: int = bound(1, ge=0)  # epochs between evaluations (0 = only at the end)
    global_ss_batch: bool = False  # all-gather SS embeddings across ranks for one global similarity matrix
    progress: bool = True
    # a loss that is NaN/inf: stop the run at that step (last good checkpoint kept), or skip such steps
    nonfinite: str = bound("stop", choices=("stop", "skip"))
    # Accelerate trackers beside metrics.jsonl (`--log-with`), each writing under the run folder
    log_with: list[str] = bound(factory=list, choices=("tensorboard", "wandb", "mlflow", "aim"))


@dataclass
class Config:
    """The fixed sections, and one section per method in use (``sskd:``, ``kd:``, ``hssakd:``, ...), whose
    dataclasses the methods declare (:mod:`sskd.methods`)."""

    data: DataConfig = field(default_factory=DataConfig)
    teacher: StageConfig = field(default_factory=lambda: StageConfig(arch="resnet32x4", method="ce"))
    ss_head: StageConfig = field(
        default_factory=lambda: StageConfig(method="sskd", epochs=60, milestones=[30, 45])
    )
    student: StageConfig = field(default_factory=lambda: StageConfig(arch="resnet8x4", method="sskd"))
    run: RunConfig = field(default_factory=RunConfig)
    methods: dict[str, Any] = field(default_factory=dict)  # method section name -> its dataclass instance

    def section(self, name: str) -> Any:
        """A method's config section (its defaults until something sets it)."""
        if name not in self.methods:
            types = method_sections()
            if name not in types:
                raise SSKDError(f"config: no method section {name!r}{_suggest(name, sorted(types))}")
            self.methods[name] = types[name]()
        return self.methods[name]

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: asdict(getattr(self, f.name)) for f in fields(self) if f.name != "methods"}
        return {**out, **{name: asdict(sec) for name, sec in sorted(self.methods.items())}}


FIXED_SECTIONS = ("data", "teacher", "ss_head", "student", "run")


def method_sections() -> dict[str, type]:
    from sskd.methods import section_types

    return section_types()


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(options)})"


def _type_error(where: str, value: Any, want: str, hint: str = "") -> SSKDError:
    what = {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
    }.get(type(value), type(value).__name__)
    return SSKDError(f"{where}: expected {want}, got {what} ({value!r}){hint}")


def _integer(value: Any, where: str) -> int:
    """An int from an int, an integral float or the text of one; never from a bool (``True`` is 1 in Python)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _type_error(where, value, "an integer")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise SSKDError(f"{where}: {value!r} is not a finite number")
        if not value.is_integer():
            raise SSKDError(f"{where}: {value!r} is not a whole number")
    try:
        return int(value)
    except ValueError as exc:
        raise SSKDError(f"{where}: {value!r} is not a valid int") from exc


def _coerce(value: Any, hint: Any, where: str, *, cli: bool = False) -> Any:
    """Convert a YAML or command-line value to the field's declared type, or raise naming ``where``.

    Types are checked, not forced: a YAML bool, list or mapping where a number is expected (``batch_size:
    true`` was 1), a number or list where a bool or string is expected and, in a YAML file, a string where a
    list is expected, are errors; so is a number that is not finite (``lr: .nan``). Numbers may come as text
    (``lr: 1e-3`` is a string to YAML 1.1). ``cli``: the value of a ``--set`` (a comma list may be a list)."""
    text = getattr(hint, "__name__", None) if isinstance(hint, type) else None
    text = text or str(hint)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and "None" in text):
        if "None" in text:
            return None
        raise SSKDError(f"{where}: may not be empty")
    if text.startswith("list"):
        if isinstance(value, str) and cli:  # --set student.milestones=30,60 (or [30,60], which YAML reads)
            value = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
        elif cli and type(value) is int:  # --set student.milestones=30
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise _type_error(
                where, value, "a list", " (write it as [a, b])" if isinstance(value, str) else ""
            )
        if "str" in text:  # list[str]: names (run.log_with)
            for v in value:
                if not isinstance(v, str):
                    raise _type_error(where, v, "a list of names")
            return [v.strip() for v in value if v.strip()]
        return [_integer(v, where) for v in value]
    if hint is bool or text == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        if type(value) is int and value in (0, 1):
            return bool(value)
        raise _type_error(where, value, "true or false")
    if "int" in text and "float" not in text:
        return _integer(value, where)
    if "float" in text:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise _type_error(where, value, "a number")
        try:
            number = float(value)
        except ValueError as exc:
            raise SSKDError(f"{where}: {value!r} is not a valid float") from exc
        if not math.isfinite(number):
            raise SSKDError(f"{where}: {value!r} is not a finite number")
        return number
    if isinstance(value, bool):  # YAML 1.1 reads the word no/yes (off/on) as a bool: a str field means the
        return "yes" if value else "no"  # word (`--mixed-precision no` came out as 'False' and was refused)
    if isinstance(value, (int, float, list, tuple, dict)):
        raise _type_error(where, value, "a string", " (quote it)" if isinstance(value, (int, float)) else "")
    return str(value)


def _key_elsewhere(key: str, section: str) -> str:
    """Where an unknown key does exist: the hint for a method's key put in another method's section."""
    owners = [name for name, t in method_sections().items() if name != section and key in get_type_hints(t)]
    return f" ({key!r} is a key of section {', '.join(repr(o) for o in owners)})" if owners else ""


def apply_values(cfg: Config, values: dict[str, Any], source: str, *, cli: bool = False) -> Config:
    """Set nested ``values`` (``{"student": {"lr": 0.1}}``) on ``cfg``; unknown keys are errors.
    ``cli``: the values are those of ``--set`` (see :func:`_coerce`)."""
    if not isinstance(values, dict):
        raise SSKDError(f"{source}: expected a mapping of config sections, got {type(values).__name__}")
    for section, body in values.items():
        known = [*FIXED_SECTIONS, *sorted(method_sections())]
        if section not in known:
            raise SSKDError(f"{source}: unknown config section {section!r}{_suggest(section, known)}")
        target = getattr(cfg, section) if section in FIXED_SECTIONS else cfg.section(section)
        if not isinstance(body, dict):
            raise SSKDError(f"{source}: section {section!r} must be a mapping")
        hints = get_type_hints(type(target))
        for key, value in body.items():
            if key not in hints:
                hint = _key_elsewhere(key, section) or _suggest(key, list(hints))
                raise SSKDError(f"{source}: unknown config key '{section}.{key}'{hint}")
            value = _coerce(value, hints[key], f"{source}: {section}.{key}", cli=cli)
            setattr(target, key, value)
    return cfg


def _field_hint(section: str, key: str) -> Any:
    """The declared type of ``section.key`` (None when there is no such key: :func:`apply_values` says so)."""
    if section in FIXED_SECTIONS:
        owner = type(getattr(Config(), section))
    else:
        owner = method_sections().get(section)
    return get_type_hints(owner).get(key) if owner is not None else None


def _override_value(section: str, key: str, text: str, where: str) -> Any:
    """The value of ``--set section.key=TEXT``: TEXT read as YAML (``[30,60]``, ``0.1``, ``null``), but a
    string field takes the text as typed (``--views ,,``, ``--shards 2024``, ``--mixed-precision no``)."""
    if not text:
        return text
    try:
        value = yaml.safe_load(text)
        error = None
    except yaml.YAMLError as exc:
        value, error = None, exc
    hint = _field_hint(section, key)
    if hint is str:
        if error is not None or not (value is None or isinstance(value, (str, bool, list, dict))):
            return text.strip()  # a number, a date, a slip of YAML: the text itself (a list is a type error)
        if isinstance(value, bool) and text.strip().lower() not in ("true", "false"):
            return text.strip()  # the word typed (no, off, on, yes); true/false keep meaning yes/no
        return value
    if error is not None:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise SSKDError(f"{where}: {section}.{key}: {text!r} is not a valid value ({first})")
    return value


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
        apply_values(
            cfg,
            {section: {key: _override_value(section, key, value, f"--set {item}")}},
            f"--set {item}",
            cli=True,
        )
    validate(cfg)
    return cfg


def _check_bounds(name: str, section: Any) -> None:
    for f in fields(section):
        value, meta = getattr(section, f.name), f.metadata
        where = f"config: {name}.{f.name}"
        for v in value if isinstance(value, list) and "choices" in meta else [value]:
            if "choices" in meta and v not in meta["choices"]:
                raise SSKDError(f"{where} must be one of {', '.join(meta['choices'])}, not {v!r}")
        for v in value if isinstance(value, list) else [value]:
            if v is None or isinstance(v, str):
                continue
            if isinstance(v, float) and not math.isfinite(v):  # NaN passes every comparison
                raise SSKDError(f"{where} must be a finite number, not {v!r}")
            if (
                ("ge" in meta and v < meta["ge"])
                or ("gt" in meta and v <= meta["gt"])
                or ("le" in meta and v > meta["le"])
            ):
                rule = " and ".join(
                    f"{op} {meta[key]:g}"
                    for key, op in (("ge", ">="), ("gt", ">"), ("le", "<="))
                    if key in meta
                )
                raise SSKDError(f"{where} must be {rule}, not {v!r}")


def validate(cfg: Config) -> None:
    """Check values that the types alone cannot (before any work starts): ranges, choices, view names,
    the stages' methods; every method in use gets its section (so the saved config shows its values)."""
    from sskd.methods import STAGE_ROLE, method_class

    for stage, role in STAGE_ROLE.items():
        try:
            cls = method_class(role, getattr(cfg, stage).method)
        except SSKDError as exc:
            raise SSKDError(f"config: {stage}.method: {exc}") from None
        if cls.section:
            cfg.section(cls.section)
    for name in FIXED_SECTIONS:
        _check_bounds(name, getattr(cfg, name))
    for name, section in cfg.methods.items():
        _check_bounds(name, section)
    from pipelines.plan import ViewConfig

    if cfg.data.views == "auto":
        return

    try:  # unknown view names are refused even by the stages that train on view 0 only
        ViewConfig.parse(cfg.data.views)
    except SSKDError as exc:
        raise SSKDError(f"config: data.views: {exc}") from None


def diff_configs(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` for every value that differs between two config dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_configs(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append((f"{prefix}{key}", a, b))
    return out


def from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a :class:`Config` from :meth:`Config.to_dict` output (a saved run or checkpoint)."""
    cfg = apply_values(Config(), values, "saved config")
    validate(cfg)
    return cfg


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
