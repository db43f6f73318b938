"""What each command trains: model construction, teacher loading and the checks that run first.

Every check here runs before any training starts, so a wrong teacher, architecture or shard folder
fails in a second with a one-line error instead of after an epoch.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from sskd import runs
from sskd.config import Config, LossConfig
from sskd.errors import SSKDError

TORCHVISION_PREFIX = "torchvision:"


def manifest_sha256(shards: str | Path) -> str:
    """Hash of the shard manifest: binds runs and caches to the exact data they were made from."""
    return hashlib.sha256((Path(shards) / "manifest.json").read_bytes()).hexdigest()


def loss_config(cfg: LossConfig) -> LossConfig:
    """The losses use the run config's ``loss`` section as it is (``sskd.losses.SSKDLossConfig``)."""
    return cfg


def new_model(arch: str, num_classes: int, *, head: bool = False, pretrained: bool = False) -> torch.nn.Module:
    """A fresh model by registry name, optionally wrapped with a new SS head."""
    from sskd.heads import SSHead, SSModel
    from sskd.models import create_model

    kw = {"pretrained": True} if pretrained else {}
    backbone = create_model(arch, num_classes=num_classes, **kw)
    return SSModel(backbone, SSHead(backbone.feat_dim)) if head else backbone


def load_run_model(run: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The trained model of a run folder (backbone, or backbone + SS head) and its ``model.json``."""
    info = runs.load_model_info(run)
    for field in ("arch", "num_classes", "has_head"):
        if field not in info:
            raise SSKDError(f"{Path(run) / runs.MODEL_INFO}: field {field!r} is missing")
    model = new_model(info["arch"], info["num_classes"], head=info["has_head"])
    runs.load_weights(run, model)
    return model, info


def teacher_info(source: str, manifest: dict[str, Any], *, need_head: bool) -> dict[str, Any]:
    """The teacher's ``model.json`` (or a torchvision stand-in), checked against the shards; no weights."""
    if source.startswith(TORCHVISION_PREFIX):
        if need_head:
            raise SSKDError(
                f"--teacher {source}: a torchvision model has no SS head; "
                f"run `sskd train-ss-head --teacher {source} ...` first and pass that run"
            )
        return {"arch": source, "num_classes": manifest["num_classes"], "has_head": False,
                "weights_sha256": "torchvision-pretrained:" + source}
    info = runs.load_model_info(source)
    if info.get("num_classes") != manifest["num_classes"]:
        raise SSKDError(
            f"--teacher {source}: teacher has {info.get('num_classes')} classes but the shards "
            f"({manifest['dataset']}) have {manifest['num_classes']}"
        )
    if info.get("classes") and info["classes"] != manifest["classes"]:
        raise SSKDError(f"--teacher {source}: teacher's class names differ from the shards' ({manifest['dataset']})")
    if need_head and not info.get("has_head"):
        raise SSKDError(
            f"--teacher {source}: this teacher has no SS head (it is a `{info.get('stage')}` run); "
            f"train one with `sskd train-ss-head --teacher {source} ...` and pass that run"
        )
    return info


def load_teacher(source: str, manifest: dict[str, Any], *, need_head: bool) -> tuple[torch.nn.Module, dict]:
    """A teacher from a run folder or ``torchvision:NAME`` (pretrained), checked against the shards."""
    info = teacher_info(source, manifest, need_head=need_head)
    if source.startswith(TORCHVISION_PREFIX):
        return new_model(source, manifest["num_classes"], pretrained=True), info
    model, info = load_run_model(source)
    return model, info


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """The frozen-teacher contract: eval mode and no gradients (DESIGN.md, invariant 2)."""
    model.eval()
    model.requires_grad_(False)
    return model


def teacher_builder(cfg: Config):
    def build(manifest):
        from sskd.methods import create_method

        model = new_model(cfg.teacher.arch, manifest["num_classes"])
        return create_method("teacher", student=model, num_classes=manifest["num_classes"],
                             loss_cfg=loss_config(cfg.loss))

    return build


def ss_head_builder(cfg: Config, teacher: str, info_out: dict[str, Any]):
    def build(manifest):
        from sskd.heads import SSHead, SSModel
        from sskd.methods import create_method

        backbone, info = load_teacher(teacher, manifest, need_head=False)
        if isinstance(backbone, SSModel):  # re-training the head of an SS teacher: keep its backbone
            backbone = backbone.backbone
        info_out.update(arch=info["arch"], teacher_source=str(teacher), teacher_weights_sha256=info.get("weights_sha256"))
        model = SSModel(backbone, SSHead(backbone.feat_dim))
        return create_method("ss_head", student=model, num_classes=manifest["num_classes"],
                             loss_cfg=loss_config(cfg.loss))

    return build


def student_builder(cfg: Config, teacher: str | None, info_out: dict[str, Any], *, cached: bool = False):
    def build(manifest):
        from sskd.methods import create_method

        method = cfg.student.method
        t_model = None
        if method in ("kd", "sskd") and teacher is None:
            raise SSKDError(f"--method {method} needs --teacher RUN")
        # The student first, from the run seed: building the live teacher draws random initial weights
        # (then overwritten), which must not change the student's, so live and cached runs start alike.
        torch.manual_seed(cfg.run.seed)
        student = new_model(cfg.student.arch, manifest["num_classes"], head=(method == "sskd"))
        if teacher is not None and method != "ce":
            if cached:  # the teacher's outputs come from the cache: check the run, build nothing
                t_info = teacher_info(teacher, manifest, need_head=(method == "sskd"))
            else:
                t_model, t_info = load_teacher(teacher, manifest, need_head=(method == "sskd"))
                freeze(t_model)
            info_out.update(teacher=str(teacher), teacher_arch=t_info["arch"],
                            teacher_weights_sha256=t_info.get("weights_sha256"))
        info_out.update(arch=cfg.student.arch, method=method)
        return create_method(method, student=student, teacher=t_model,
                             num_classes=manifest["num_classes"], loss_cfg=loss_config(cfg.loss))

    return build
