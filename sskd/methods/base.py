"""The method seam: what a method declares, so that the loop, the CLI, config and cache never name one.

A method is a class in its own module under ``sskd/methods/``, registered for a *role* and a name:

- ``teacher``: what ``sskd train-teacher --method NAME`` trains (``ce``: the plain classifier; ``hssakd``:
  backbone and branches together);
- ``head``: what ``sskd train-ss-head --method NAME`` trains on a frozen teacher backbone (``sskd``: the SS
  head; ``hssakd``: the branches);
- ``student``: what ``sskd distill --method NAME`` trains.

Beside ``forward(batch) -> {"loss", "logits", <named terms>}`` a method declares (class attributes):
its config section (a dataclass, ``Config``, under the section name ``section``), the views it trains
on (``views``), the teacher part it needs (``teacher_part``) and the teacher outputs it consumes
(``outputs``, computed by :meth:`Method.teacher_outputs`, the one function that serves both a live
teacher and ``sskd cache``). :meth:`Method.build` makes the method from a :class:`BuildContext`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from sskd.core.errors import SSKDError
from sskd.core.registry import Registry

ROLES = {"teacher": "train-teacher", "head": "train-ss-head", "student": "distill"}
STAGE_ROLE = {"teacher": "teacher", "ss_head": "head", "student": "student"}  # config section -> role
METHODS = {role: Registry(f"{command} method") for role, command in ROLES.items()}


def register(role: str, name: str) -> Callable[[type], type]:
    """Class decorator: ``@register("student", "kd")``."""

    def deco(cls: type) -> type:
        cls.name, cls.role = name, role
        return METHODS[role].register(name)(cls)

    return deco


def method_class(role: str, name: str) -> type[Method]:
    return METHODS[role].get(name)


@dataclass
class Phase:
    """A pre-training phase a method runs before its main training, in the same run (RepDistiller's
    init stage of AB and FT, FitNet's hint stage): its own epochs, parameters and constant lr.

    The loop gives the phase a fresh optimizer of the stage's kind (SGD with its momentum and weight decay, or AdamW) over
    :meth:`Method.phase_parameters`, tells the method with :meth:`Method.set_phase`, checkpoints and
    resumes inside it like in the main training, and starts the main training afterwards with the
    stage's own optimizer and schedule from step 0.
    """

    name: str
    epochs: int
    lr: float | None = None  # None: the stage's lr


Gather = Callable[[torch.Tensor], tuple[torch.Tensor, int]]


class BuildContext:
    """What a method may use to build itself, made from the run's :class:`sskd.engine.prepare.RunSpec` for one
    build: the run config and the method's section, the shards, the models of the run's architecture, the
    teacher the spec resolved (already checked against the shards and the method) and the run's collectives.

    ``gather`` and ``all_gather`` are the run's all-gathers of rows across ranks (None on one process), for
    the methods that need them to pass to their constructor: ``gather(z) -> (z_all, offset)``, with
    ``offset`` the row of this rank's first row in ``z_all``, is differentiable (SSKD's
    ``--global-ss-batch``); ``all_gather`` is the same for state every rank must keep identical (CRD's
    memory banks)."""

    def __init__(self, spec: Any, *, gather: Gather | None = None, all_gather: Gather | None = None):
        self.spec = spec
        self.cfg = spec.cfg
        self.stage: str = spec.stage  # teacher | ss_head | student
        self.manifest: dict[str, Any] = spec.manifest
        self.views = spec.views  # the views the run trains on, as resolved (None: the normal view only)
        self.size: int = spec.size  # the input height and width
        # the teacher's run folder or torchvision:NAME; None without a teacher
        self.teacher: str | None = spec.teacher.source if spec.teacher is not None else None
        self.cached: bool = spec.teacher is not None and spec.teacher.cached  # outputs from a cache: no model
        self.gather, self.all_gather = gather, all_gather

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    @property
    def arch(self) -> str:
        return self.spec.arch

    def section(self, cls: type[Method]) -> Any:
        return self.cfg.section(cls.section) if cls.section else None

    def backbone(self, arch: str | None = None) -> nn.Module:
        """A fresh model of ``arch``; without one, the stage's own model: its architecture, started from its
        pretrained weights or weights file when the stage says so, its input re-normalised to what those
        weights were trained with (:mod:`sskd.models.weights`)."""
        from sskd.models import create_model

        if arch is not None:
            return self.fits_size(create_model(arch, num_classes=self.num_classes), arch)
        from sskd.models.weights import attach_input_norm, load_weights_file

        st = getattr(self.cfg, self.stage)
        model = create_model(
            self.arch, num_classes=self.num_classes, **({"pretrained": True} if st.pretrained else {})
        )
        self.fits_size(model, self.arch)
        start = {}
        if st.pretrained:
            start["pretrained"] = getattr(model, "input_norm", (None, None, self.arch))[2]
        if st.weights:
            start["weights"] = str(st.weights)
            start["weights_sha256"] = load_weights_file(
                model, st.weights, self.num_classes, new_head=True, arch=self.arch
            )
        if start:
            model.sskd_start = start
        attach_input_norm(model, self.manifest["mean"], self.manifest["std"])
        return model

    def teacher_model(self, part: str | None, *, method: str) -> tuple[nn.Module | None, dict[str, Any]]:
        """The frozen teacher (None when a cache serves its outputs) and its ``model.json``.

        The one place a student's teacher is built: under a forked RNG, since building it draws initial
        weights (then overwritten) that must not move what the run seed decides for the student (made
        before it) and for whatever the method makes after it, so live and cached runs start alike."""
        from sskd.runs.models import freeze

        if self.spec.teacher is None:
            raise SSKDError(f"--method {method} needs --teacher RUN")
        info = self.spec.teacher.info
        if part != self.spec.method.teacher_part:  # the spec checked the part the method declares
            check_part(info, part, self.teacher, method)
        if self.cached:
            return None, info
        with torch.random.fork_rng(devices=[]):
            model = self.spec.teacher.load()
        return freeze(self.fits_size(model, f"--teacher {self.teacher}")), info

    def fits_size(self, model: nn.Module, what: str) -> nn.Module:
        """``model``, unless it takes only inputs of another size than this run's views (a timm ViT built for
        224 px on 32-px shards): one line before any training, not an assertion at the first step."""
        fixed = getattr(getattr(model, "backbone", model), "fixed_input_size", None)
        if fixed is not None and tuple(fixed) != (self.size, self.size):
            h, w = fixed
            raise SSKDError(
                f"{what} takes {h}x{w} inputs only, and this run's views are {self.size}x{self.size}: "
                f"set data.size={h} (--set data.size={h}), or pick a model that takes {self.size} px"
            )
        return model

    def probe_teacher(self, teacher: nn.Module | None, info: dict[str, Any]) -> nn.Module:
        """The model to probe for the teacher's shapes: ``teacher`` itself, or, when a cache serves its outputs
        (``teacher`` None), a fresh model of its architecture (``info["arch"]``). That stand-in is made under
        a forked RNG: its initial weights must move nothing the run seed decides, so live and cached runs
        start alike."""
        if teacher is not None:
            return teacher
        with torch.random.fork_rng(devices=[]):
            return self.backbone(info["arch"])


def teacher_backbone(ctx: BuildContext) -> torch.nn.Module:
    """For the ``train-ss-head`` stage: the teacher's backbone with its classifier, without the parts of
    any earlier head stage (they are made anew). Loaded from the run seed's RNG, like the parts made after
    it (no fork: the stage trains around it)."""
    model = ctx.spec.teacher.load()
    return getattr(model, "backbone", model)


def part_makers(part: str) -> list[str]:
    """The commands whose runs carry ``part``: ``["train-ss-head --method sskd", ...]`` (from the registry)."""
    return [
        f"{ROLES[role]} --method {name}"
        for role in ("head", "teacher")
        for name in METHODS[role].names()
        if METHODS[role].get(name).produces == part
    ]


def check_part(info: dict[str, Any], part: str | None, source: str, method: str) -> None:
    """A teacher run must carry the part (``ss_head``, ``branches``) the method reads; one line otherwise."""
    have = info.get("wrapper")
    if part is not None and have != part:
        makers = part_makers(part) or ["a method that makes it"]
        how = f"sskd {makers[0]} --teacher {source} ..." + (
            f" (or {', '.join(makers[1:])})" if makers[1:] else ""
        )
        what = f"it is a `{info.get('stage')}` run" + (f" with {have}" if have else " without one")
        raise SSKDError(
            f"--teacher {source}: --method {method} needs a teacher with {part.replace('_', ' ')} ({what}); "
            f"make one with `{how}` and pass that run"
        )


class FrozenTeacher:
    """A method's teacher, held outside the method's module tree: frozen (eval mode, no gradients) and in
    none of the method's ``parameters()``, ``state_dict()``, ``train()`` or ``to()``, so neither the
    optimizer, a checkpoint, Accelerate nor DDP ever sees it. The loop moves it to the training device
    itself (:class:`sskd.engine.loop.Run`); everything else reads it as ``method.teacher``."""

    def __init__(self, module: nn.Module):
        self.module = module.eval().requires_grad_(False)

    def to(self, device: torch.device | str) -> None:
        self.module.to(device)


class Method(nn.Module):
    """The method contract: all that the loop, the CLI, config loading and the cache know of a method.

    **Required** (a subclass registered with :func:`register`):

    - ``forward(batch) -> {"loss", "logits", <terms>}``. ``batch`` holds ``views`` (b, v, c, h, w; view 0
      is the normal view), ``label`` (b,) and, when a cache serves the teacher, its outputs ``t_<name>``.
      ``loss`` is what the optimizer minimises; ``logits`` (b, K) are the class scores of the normal view
      (the logged training accuracy); every other 0-dim tensor is a named term the run logs.
    - What trains: ``self.student``, the model :meth:`build` made (by default a fresh backbone of the
      stage's architecture wrapped by :meth:`student_model`), with any submodules the method adds
      (regressors, heads, projections). :meth:`trainable_module` is the part a run evaluates and exports
      as ``model.safetensors`` (default: ``student``).

    **Optional**, each with its default (class attributes, then hooks):

    - ``summary``, ``paper``: a line and a citation for ``sskd methods`` (empty);
    - ``section`` and ``Config``: the config section the method reads as ``self.cfg`` and its dataclass
      (none);
    - ``views``, ``default_views``, ``min_ss_views``: what the method trains on (the normal view only);
    - ``needs_teacher`` (False), ``teacher_part`` (None: any classifier run), ``outputs`` and
      ``topk_outputs`` (none) with :meth:`topk_temperatures`, ``cache_refusal`` (None: cacheable when it has ``outputs``): the teacher it
      reads, its outputs (:meth:`teacher_outputs`, read in ``forward`` through :meth:`teacher_batch`,
      live or cached) and whether ``sskd cache`` serves them;
    - ``produces`` (None): the part a teacher or head stage's runs carry for later stages;
    - :meth:`build` (a fresh student, then the teacher if ``needs_teacher``), :meth:`student_model`,
      :meth:`auto_views`, :meth:`check_teacher` (the run carries ``teacher_part``); a method that works
      across ranks takes the run's all-gathers from the :class:`BuildContext` in its ``build`` and passes
      them to its constructor (SSKD's ``gather``, CRD's ``all_gather``);
    - the schedule: :meth:`set_epoch`, :meth:`phases` (none; ``has_phases`` False) with :meth:`set_phase`
      and :meth:`phase_parameters` (every parameter that requires a gradient), :meth:`validate` (the
      exported model's top-1 / top-5) and :meth:`export_info` (nothing more in ``model.json``).

    The teacher, ``self.teacher`` (None when a cache serves its outputs), is frozen: eval mode, no gradient,
    run under ``no_grad``, in no ``parameters()`` or ``state_dict()``: it is neither trained nor saved.
    The family bases in :mod:`sskd.methods.families` fill most of this in for the logit, relation and
    feature methods and for the head stages on a frozen backbone.
    """

    name: ClassVar[str] = ""
    role: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line for `sskd methods`
    paper: ClassVar[str] = ""  # short citation: "Xu et al., ECCV 2020"
    section: ClassVar[str | None] = None  # config section name; its dataclass is ``Config``
    Config: ClassVar[type | None] = None
    # None: the normal view only; "ss": the run's data.views (default ``default_views``); a preset name: fixed
    views: ClassVar[str | None] = None
    default_views: ClassVar[str] = "rotation"
    # How many SS views (beside view 0) the method's terms need at least: a view set with fewer is refused at
    # start (:func:`sskd.methods.resolve_views`), so ``--views none`` never trains its SS terms at 0 silently
    min_ss_views: ClassVar[int] = 0
    teacher_part: ClassVar[str | None] = None  # student methods: the part their teacher run must carry
    produces: ClassVar[str | None] = None  # teacher and head methods: the part their runs carry
    needs_teacher: ClassVar[bool] = False
    outputs: ClassVar[tuple[str, ...]] = ()  # teacher outputs consumed (batch keys "t_<name>", (b, v, ...))
    topk_outputs: ClassVar[tuple[str, ...]] = ()  # which of them may be cached as top-K + log-sum-exp
    # Why `sskd cache` does not pay for this method (then it refuses); None: its ``outputs`` may be cached
    cache_refusal: ClassVar[str | None] = None
    has_phases: ClassVar[bool] = False  # True when :meth:`phases` may return pre-training phases

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, *, cfg: Any = None):
        super().__init__()
        self.student = student
        self.cfg = cfg if cfg is not None else (self.Config() if self.Config else None)
        self.frozen_teacher = FrozenTeacher(teacher) if teacher is not None else None
        self.epoch = 0  # the training epoch in progress (set_epoch)
        self.phase: str | None = None  # the pre-training phase in progress, None = the main training

    # -- what the rest of the system asks -------------------------------------------------------------

    @classmethod
    def topk_temperatures(cls, cfg: Any) -> dict[str, tuple[float, ...]]:
        """The temperatures the method's terms read each of ``topk_outputs`` at under its config ``cfg``
        (``self.cfg``): a top-K cache keeps the tail's mass exact at that one. Default: the section's
        ``T`` (KD's, DKD's, CRD's, HSSAKD's, the RepDistiller families'), else 1."""
        t = float(getattr(cfg, "T", 1.0))
        return {name: (t,) for name in cls.topk_outputs}

    @classmethod
    def cosine_outputs(cls, teacher_info: dict[str, Any]) -> tuple[str, ...]:
        """Which of ``outputs`` the method reads only through cosine similarities of rows, for the teacher
        ``teacher_info`` describes: a cache may store those as unit rows in int8 or projected to fewer
        dimensions (:mod:`sskd.cache.levels`). Default: none."""
        return ()

    @classmethod
    def student_model(cls, backbone: nn.Module, num_classes: int) -> nn.Module:
        """How this method wraps a registry backbone into the model it trains (default: as it is)."""
        return backbone

    @classmethod
    def auto_views(cls, cfg: Any) -> str:
        """The views ``data.views: auto`` means for ``views = "ss"`` under the run config ``cfg`` (default
        :attr:`default_views`; SSKD's follow its pretext task)."""
        return cls.default_views

    @classmethod
    def check_teacher(cls, info: dict[str, Any], source: str, cfg: Any) -> None:
        """Refuse, in one line, a teacher run (its ``model.json``) this method cannot use under ``cfg``:
        live, cached and by ``sskd cache`` alike (default: it must carry :attr:`teacher_part`)."""
        check_part(info, cls.teacher_part, source, cls.name)

    @classmethod
    def build(cls, ctx: BuildContext) -> Method:
        """The method for a run: models made or loaded through ``ctx``. Default: a fresh backbone, wrapped;
        then the frozen teacher if the method needs one (after the student: see
        :meth:`BuildContext.teacher_model`)."""
        student = cls.student_model(ctx.backbone(), ctx.num_classes)
        teacher = ctx.teacher_model(cls.teacher_part, method=cls.name)[0] if cls.needs_teacher else None
        return cls(student, teacher, cfg=ctx.section(cls))

    @staticmethod
    def teacher_outputs(teacher: nn.Module, views: torch.Tensor) -> dict[str, torch.Tensor]:
        """The teacher's outputs on ``views`` (b, v, c, h, w): ``{name: (b, v, ...)}`` for ``outputs``."""
        return {}

    def teacher_batch(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``outputs`` for this batch as float32: from the cache when the batch carries them, else live."""
        if self.outputs and all(f"t_{n}" in batch for n in self.outputs):
            return {n: batch[f"t_{n}"].float() for n in self.outputs}
        if self.teacher is None:
            raise SSKDError(f"method {self.name!r}: no teacher and no cached teacher outputs in the batch")
        with torch.no_grad():
            return {k: v.float() for k, v in self.teacher_outputs(self.teacher, batch["views"]).items()}

    def trainable_module(self) -> nn.Module:
        """The model whose weights a run exports (``model.safetensors``)."""
        return self.student

    # -- schedule hooks the loop calls ----------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Called at the start of every training epoch (0-based; also on resume): warm-ups read it."""
        self.epoch = epoch

    def phases(self) -> list[Phase]:
        """Pre-training phases before the main training (default none; see :class:`Phase`)."""
        return []

    def set_phase(self, name: str | None) -> None:
        """Called when a phase starts (None: the main training); ``forward`` follows ``self.phase``."""
        self.phase = name

    def phase_parameters(self, name: str | None) -> list[nn.Parameter]:
        """What the optimizer of phase ``name`` (None: the main training) updates (default: everything
        that requires a gradient)."""
        return [p for p in self.parameters() if p.requires_grad]

    def validate(self, evaluate: Callable[[nn.Module], dict[str, Any]]) -> dict[str, Any]:
        """Validation top-1 / top-5 of the exported model; ``evaluate(module)`` is the loop's evaluation
        (every sample of the val split once across ranks)."""
        return evaluate(self.trainable_module())

    def export_info(self) -> dict[str, Any]:
        """Extra fields for ``model.json``."""
        return {}

    @property
    def teacher(self) -> nn.Module | None:
        """The frozen teacher's model (None without one, or when a cache serves its outputs)."""
        return self.frozen_teacher.module if self.frozen_teacher is not None else None


def normal(batch: dict[str, Any]) -> torch.Tensor:
    """View 0 of every image: (b, c, h, w)."""
    return batch["views"][:, 0]
