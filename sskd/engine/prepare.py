"""A run resolved once: :func:`prepare` turns a config into a :class:`RunSpec`, the frozen description of
one stage's run that the loop, the method's build, the loaders, the cache builder and the tools all read.

Everything a run needs to know about itself is worked out here and nowhere else: the shard manifest (read
once, its hash taken from the same bytes), the method class, its views, the input size, the device DALI
makes the views on, the teacher source (checked once) and what ``model.json`` records. A wrong shard
folder, method, view set, teacher or cache fails here, in one line, before any folder is touched.

The teacher source is one object, whichever way the teacher's outputs arrive:

- :class:`LiveTeacher`: a teacher run (or ``torchvision:NAME``) whose model the method loads and runs;
- a cached teacher (:class:`sskd.cache.CachedTeacher`, opened through the ``cache`` argument): the
  outputs come from ``sskd cache`` and the teacher is never built.

The loop asks the source for each batch's teacher outputs (:meth:`LiveTeacher.batch`) and for the
augmentation epoch of a training epoch (:meth:`LiveTeacher.data_epoch`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sskd.core.errors import SSKDError
from sskd.engine.config import Config

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LiveTeacher:
    """A teacher run (or ``torchvision:NAME``) that the run loads and runs itself.

    ``info`` is its ``model.json`` (a stand-in for torchvision), already checked against the shards and
    the method. ``fresh``: a model of ``info["arch"]`` with fresh weights and the part the method reads,
    for benchmarks (a step's cost does not depend on the weights)."""

    source: str
    info: dict[str, Any]
    fresh: bool = False
    cached = False  # the teacher's outputs are computed live

    def load(self) -> torch.nn.Module:
        """The teacher's model with its weights (not frozen: a ``train-ss-head`` stage trains around it)."""
        from sskd.runs.models import new_model, teacher_model

        if self.fresh:
            return new_model(self.info["arch"], self.info["num_classes"], wrapper=self.info["wrapper"])
        return teacher_model(self.source, self.info)

    def batch(self, batch: dict[str, Any], epoch: int) -> dict[str, Any]:
        """The batch as the method gets it: a live teacher adds nothing (the method runs it)."""
        return batch

    def data_epoch(self, epoch: int) -> int:
        """The augmentation epoch of training epoch ``epoch``: itself."""
        return epoch


@dataclass(frozen=True)
class FreshTeacher:
    """Ask :func:`prepare` for a teacher of ``arch`` with fresh weights (``sskd bench``): no run to check."""

    arch: str


class CacheOpener(Protocol):
    """A teacher-output cache to open for a run (:class:`sskd.cache.CacheFolder`): checked against what the
    run expects, it becomes the run's teacher source."""

    path: Path

    def open(
        self, binding: dict[str, Any], method: type, teacher: LiveTeacher, temperatures: dict[str, tuple]
    ) -> Any: ...


@dataclass(frozen=True)
class RunSpec:
    """One stage's run, resolved once by :func:`prepare`. Frozen: nothing downstream works any of it out again.

    ``manifest`` is the shard manifest as read (not to be modified); ``shards_sha256`` the hash of its
    bytes. ``views`` is None when the method trains on the normal view only. ``size`` is the input
    height and width, ``data_device`` where DALI makes the views (``cpu`` or ``gpu``). ``teacher`` is the
    teacher source: a :class:`LiveTeacher`, a cached teacher, or None (no teacher for this stage).
    """

    cfg: Config
    stage: str  # config section: teacher | ss_head | student
    method: type  # the sskd.methods.Method subclass the stage's section names
    manifest: dict[str, Any]
    shards_sha256: str
    views: Any  # pipelines.ViewConfig | None
    size: int
    data_device: str
    teacher: Any = None  # LiveTeacher | sskd.cache.CachedTeacher | None
    out: Path | None = None
    resume: bool = False
    overwrite: bool = False  # replace an earlier run in ``out`` (else refused unless resuming)
    cache: Path | None = None  # the teacher-output cache a student reads

    @property
    def st(self):
        """The stage's config section (:class:`sskd.engine.config.StageConfig`)."""
        return getattr(self.cfg, self.stage)

    @property
    def arch(self) -> str:
        return self.st.arch

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def record(self) -> dict[str, Any]:
        """What ``model.json`` (and every checkpoint) records of the run beside the model itself: the data it
        learnt from, the views, the method, the architecture and the teacher it learnt from."""
        views = self.views.ss_views if self.views is not None else ()
        rec: dict[str, Any] = {
            "shards_sha256": self.shards_sha256,
            "seed": self.cfg.run.seed,
            "views": ",".join(views) if views else "none",
        }
        if self.cache is not None:
            rec["cache"] = str(self.cache)
        teacher = self.teacher
        if self.stage == "ss_head":  # the stage trains around the teacher's backbone: its architecture
            rec.update(
                arch=teacher.info["arch"],
                method=self.method.name,
                teacher_source=str(teacher.source),
                teacher_weights_sha256=teacher.info.get("weights_sha256"),
            )
            return rec
        rec.update(arch=self.arch, method=self.method.name)
        if teacher is not None:
            rec.update(
                teacher=str(teacher.source),
                teacher_arch=teacher.info["arch"],
                teacher_weights_sha256=teacher.info.get("weights_sha256"),
            )
            if teacher.info.get(
                "normalization"
            ):  # the teacher sees its own normalisation (sskd.models.weights)
                rec["teacher_normalization"] = teacher.info["normalization"]
        return rec

    @property
    def method_cfg(self) -> Any:
        """The method's config section (``method.Config``), None for a method without one."""
        return self.cfg.section(self.method.section) if self.method.section else None

    def cache_binding(self, split: str = "train") -> dict[str, Any]:
        """What a teacher-output cache must have been made from to serve this run's ``split``: the method,
        the teacher's weights, the shards, the seed, the views, the size, the pipeline and its device type,
        the data settings."""
        from pipelines import PIPELINE_VERSION

        return {
            "method": self.method.name,
            "teacher_weights_sha256": self.teacher.info.get("weights_sha256"),
            "shards_manifest_sha256": self.shards_sha256,
            "seed": self.cfg.run.seed,
            "views": list(self.views.names) if self.views is not None else ["normal"],
            "size": self.size,
            "pipeline_version": PIPELINE_VERSION,
            "device_type": self.data_device,
            "split": split,
            "subset_fraction": self.cfg.data.subset_fraction if split == "train" else 1.0,
            "label_noise": self.cfg.data.label_noise if split == "train" else 0.0,
            "level": self.cfg.student.cache_level,  # compared only when not "any" (sskd.cache.levels)
        }


def prepare(
    cfg: Config,
    stage: str,
    *,
    out: str | Path | None = None,
    teacher: str | FreshTeacher | None = None,
    cache: CacheOpener | None = None,
    resume: bool = False,
    overwrite: bool = False,
    without_teacher: bool = False,
    teacher_weights: str | Path | None = None,
) -> RunSpec:
    """Resolve ``stage``'s run under ``cfg`` once, every check included (one line each, in this order):
    the shard folder, the method's views, the cache's method, the teacher, the cache's binding.

    ``teacher``: a run folder or ``torchvision:NAME`` (``train-ss-head`` and every student method that
    needs one; ignored, with a log line, by a student method that does not), or a :class:`FreshTeacher`.
    ``cache``: the teacher-output cache a student reads instead of running its teacher (``distill --cache``).
    ``without_teacher``: resolve everything but the teacher, which is left out (``sskd sweep`` plans runs
    whose teachers are not trained yet). ``teacher_weights``: ``teacher`` is then an architecture whose
    weights this file holds (``--teacher-weights``).
    """
    from pipelines.loader import DEFAULT_SIZE
    from shards.format import load_manifest_and_sha256
    from sskd.engine.dist import pipeline_device
    from sskd.methods import resolve_views, stage_method
    from sskd.runs.models import teacher_info

    manifest, sha = load_manifest_and_sha256(cfg.data.shards)  # a wrong --shards folder: before anything else
    cls = stage_method(cfg, stage)
    views = resolve_views(cfg, cls)  # a method's fixed views refuse another --views here
    if cache is not None:
        check_cacheable(cls)
        if teacher is None:
            raise SSKDError("--cache needs --teacher RUN (the run the cache was made from, to check it)")
    source = None
    needs = stage == "ss_head" or (stage == "student" and cls.needs_teacher)
    if needs and not without_teacher:
        if teacher is None:
            if stage == "ss_head":
                raise SSKDError("train-ss-head needs --teacher RUN (a train-teacher run or torchvision:NAME)")
            raise SSKDError(f"--method {cls.name} needs --teacher RUN")
        if isinstance(teacher, FreshTeacher):
            info = {
                "arch": teacher.arch,
                "num_classes": manifest["num_classes"],
                "wrapper": cls.teacher_part,
                "stage": "fresh",
                "weights_sha256": None,
            }
            source = LiveTeacher(f"a fresh {teacher.arch}", info, fresh=True)
        else:
            source = LiveTeacher(str(teacher), teacher_info(str(teacher), manifest, teacher_weights))
            if stage == "student":
                cls.check_teacher(source.info, source.source, cfg)
    elif teacher_weights is not None and teacher is None:
        raise SSKDError(
            "--teacher-weights needs --teacher ARCH (the architecture whose weights the file holds)"
        )
    elif teacher is not None and not needs:
        log.info("--method %s uses no teacher: --teacher %s is ignored", cls.name, teacher)
    spec = RunSpec(
        cfg=cfg,
        stage=stage,
        method=cls,
        manifest=manifest,
        shards_sha256=sha,
        views=views,
        size=cfg.data.size or DEFAULT_SIZE[manifest["layout"]],
        data_device=pipeline_device(cfg.data.device),
        teacher=source,
        out=Path(out) if out is not None else None,
        resume=resume,
        overwrite=overwrite,
    )
    if cache is None:
        return spec
    opened = cache.open(spec.cache_binding(), cls, source, cls.topk_temperatures(spec.method_cfg))
    return replace(spec, teacher=opened, cache=Path(cache.path))


def check_cacheable(cls: type, *, refuse: bool = True) -> None:
    """A method whose teacher outputs a cache holds must declare some and, unless ``refuse`` is off (a dry
    run), not refuse the cache; one line otherwise."""
    if not cls.outputs:
        raise SSKDError(f"--method {cls.name} uses no teacher outputs: there is nothing to cache for it")
    if refuse and cls.cache_refusal:
        raise SSKDError(
            f"--method {cls.name} does not use the cache: {cls.cache_refusal} (`sskd cache --dry-run` "
            "prints what it would need)"
        )


def build_method(spec: RunSpec, *, gather=None, all_gather=None):
    """The stage's method, made by its class's ``build`` from ``spec``: the trained model first, from the run
    seed; a live teacher after it, loaded under a forked RNG so that it moves nothing the seed decides (see
    :meth:`sskd.methods.BuildContext.teacher_model`), so live and cached runs start alike.

    ``gather`` / ``all_gather``: the run's all-gathers of rows across ranks (None on one process), which the
    build context hands to the methods that use them (:class:`sskd.methods.BuildContext`)."""
    import torch

    from sskd.methods import BuildContext

    torch.manual_seed(spec.cfg.run.seed)
    return spec.method.build(BuildContext(spec, gather=gather, all_gather=all_gather))
