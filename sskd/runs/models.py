"""Models of run folders and teachers: a fresh model by name, a run's model rebuilt from its ``model.json``,
a teacher checked against the shards.

The teacher checks here run before any training starts (:func:`sskd.engine.prepare.prepare`), so a wrong
teacher fails in a second with a one-line error instead of after an epoch. Which model a stage trains is
the method's business (:meth:`sskd.methods.Method.build`); rebuilding a saved model only needs its
``model.json`` (architecture, classes and the wrapper that adds its parts: SS head, branches).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sskd import runs
from sskd.core.errors import SSKDError

TORCHVISION_PREFIX = "torchvision:"


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
    """What ``model.json`` says so the model can be rebuilt: its wrapper and the wrapper's arguments
    (``has_head``: whether the wrapper is the SS head, for readers of the file; rebuilding reads ``wrapper``)."""
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
    info = run_info(run)
    return model_from_info(run, info), info


def run_info(run: str | Path) -> dict[str, Any]:
    """A run's ``model.json``, with the fields that rebuild its model (``arch``, ``num_classes``)."""
    info = runs.load_model_info(run)
    for field in ("arch", "num_classes"):
        if field not in info:
            raise SSKDError(f"{Path(run) / runs.MODEL_INFO}: field {field!r} is missing")
    return info


def model_from_info(run: str | Path, info: dict[str, Any]) -> torch.nn.Module:
    """The model a run's ``model.json`` (``info``, already read and checked) describes, with its weights."""
    model = new_model(
        info["arch"], info["num_classes"], wrapper=info.get("wrapper"), wrapper_args=info.get("wrapper_args")
    )
    runs.load_weights(run, model)
    return model


def teacher_info(source: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """The teacher's ``model.json`` (or a torchvision stand-in), checked against the shards; no weights."""
    if source.startswith(TORCHVISION_PREFIX):
        return {
            "arch": source,
            "num_classes": manifest["num_classes"],
            "wrapper": None,
            "stage": "torchvision-pretrained",
            "weights_sha256": "torchvision-pretrained:" + source,
        }
    info = run_info(source)
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


def teacher_model(source: str, info: dict[str, Any]) -> torch.nn.Module:
    """The model of a teacher whose ``model.json`` (``info``, from :func:`teacher_info`) was checked: a run's
    trained model, or ``torchvision:NAME``'s pretrained weights."""
    if source.startswith(TORCHVISION_PREFIX):
        return new_model(source, info["num_classes"], pretrained=True)
    return model_from_info(source, info)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """The frozen-teacher contract: eval mode and no gradients, so neither its weights nor its BatchNorm
    statistics ever move."""
    model.eval()
    model.requires_grad_(False)
    return model
