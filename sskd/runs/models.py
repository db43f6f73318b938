"""Models of run folders and teachers, and the one builder every stage command uses.

Every check here runs before any training starts, so a wrong teacher, architecture or shard folder
fails in a second with a one-line error instead of after an epoch. Which model a stage trains is the
method's business (:meth:`sskd.methods.Method.build`); rebuilding a saved model only needs its
``model.json`` (architecture, classes and the wrapper that adds its parts: SS head, branches).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from sskd import runs
from sskd.core.errors import SSKDError

TORCHVISION_PREFIX = "torchvision:"


def manifest_sha256(shards: str | Path) -> str:
    """Hash of the shard manifest: binds runs and caches to the exact data they were made from."""
    return hashlib.sha256((Path(shards) / "manifest.json").read_bytes()).hexdigest()


def new_model(
    arch: str,
    num_classes: int,
    *,
    wrapper: str | None = None,
    wrapper_args: dict | None = None,
    pretrained: bool = False,
) -> torch.nn.Module:
    """A fresh model by registry name, optionally wrapped with its parts (``ss_head``, ``branches``)."""
    from sskd.models import create_model

    kw = {"pretrained": True} if pretrained else {}
    backbone = create_model(arch, num_classes=num_classes, **kw)
    if wrapper is None:
        return backbone
    from sskd.models.registry import WRAPPERS

    return WRAPPERS.get(wrapper)(backbone, num_classes, **(wrapper_args or {}))


def describe_model(module: torch.nn.Module) -> dict[str, Any]:
    """What ``model.json`` says so the model can be rebuilt: its wrapper and the wrapper's arguments."""
    wrapper = getattr(module, "wrapper", None)
    args = dict(module.wrapper_args()) if wrapper and hasattr(module, "wrapper_args") else {}
    return {
        "wrapper": wrapper,
        "wrapper_args": args,
        "has_head": wrapper == "ss_head",
        "feat_dim": module.feat_dim,
    }


def load_run_model(run: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The trained model of a run folder (with its parts) and its ``model.json``."""
    info = runs.load_model_info(run)
    for field in ("arch", "num_classes"):
        if field not in info:
            raise SSKDError(f"{Path(run) / runs.MODEL_INFO}: field {field!r} is missing")
    wrapper = info.get("wrapper", "ss_head" if info.get("has_head") else None)
    model = new_model(
        info["arch"], info["num_classes"], wrapper=wrapper, wrapper_args=info.get("wrapper_args")
    )
    runs.load_weights(run, model)
    return model, info


def teacher_info(source: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """The teacher's ``model.json`` (or a torchvision stand-in), checked against the shards; no weights."""
    if source.startswith(TORCHVISION_PREFIX):
        return {
            "arch": source,
            "num_classes": manifest["num_classes"],
            "has_head": False,
            "wrapper": None,
            "stage": "torchvision-pretrained",
            "weights_sha256": "torchvision-pretrained:" + source,
        }
    info = runs.load_model_info(source)
    if info.get("num_classes") != manifest["num_classes"]:
        raise SSKDError(
            f"--teacher {source}: teacher has {info.get('num_classes')} classes but the shards "
            f"({manifest['dataset']}) have {manifest['num_classes']}"
        )
    if info.get("classes") and info["classes"] != manifest["classes"]:
        raise SSKDError(
            f"--teacher {source}: teacher's class names differ from the shards' ({manifest['dataset']})"
        )
    return info


def load_teacher(source: str, manifest: dict[str, Any]) -> tuple[torch.nn.Module, dict]:
    """A teacher from a run folder or ``torchvision:NAME`` (pretrained), checked against the shards."""
    info = teacher_info(source, manifest)
    if source.startswith(TORCHVISION_PREFIX):
        return new_model(source, manifest["num_classes"], pretrained=True), info
    model, info = load_run_model(source)
    return model, info


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """The frozen-teacher contract: eval mode and no gradients (DESIGN.md, invariant 2)."""
    model.eval()
    model.requires_grad_(False)
    return model
