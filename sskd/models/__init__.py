"""Model zoo: the CIFAR architectures of SSKD/CRD and torchvision's ImageNet ResNets, one registry, and
any timm architecture as ``timm:NAME`` (:mod:`sskd.models.timm_models`, looked up in timm when asked for).

``create_model(name, num_classes)`` is the single door; every model answers ``model(x)`` (logits) and
``model(x, features=True)`` (:class:`Features`: logits, pooled feature, stage maps), and has ``feat_dim``.
"""

from __future__ import annotations

import importlib
import pkgutil

from torch import nn

from sskd.models.base import Classifier, Features
from sskd.models.imported import create_imported, is_import_path
from sskd.models.registry import MODELS
from sskd.models.timm_models import PREFIX as TIMM_PREFIX
from sskd.models.timm_models import create_timm


def create_model(name: str, num_classes: int, **kw) -> nn.Module:
    """A new model by registry name (``resnet8x4``, ``wrn_40_2``, ``torchvision:resnet34``, ...) or any timm
    architecture as ``timm:NAME`` (``timm:convnext_tiny``), or a user's as ``module.path:function``
    (:mod:`sskd.models.imported`); ``pretrained=True`` (timm and torchvision only): their pretrained weights."""
    if num_classes < 1:
        from sskd.core.errors import SSKDError

        raise SSKDError(f"num_classes must be >= 1, not {num_classes}")
    if name.startswith(TIMM_PREFIX):
        return create_timm(name, num_classes, **kw)
    if kw.get("pretrained") and not name.startswith("torchvision:"):
        from sskd.core.errors import SSKDError

        raise SSKDError(
            f"{name} has no pretrained weights (timm:NAME and torchvision:NAME have); start it from a file "
            "with --weights FILE"
        )
    if name not in MODELS and is_import_path(name):
        return create_imported(name, num_classes)
    return MODELS.get(name)(num_classes=num_classes, **kw)


def list_models() -> list[str]:
    """The built-in architectures (timm's are not listed: any ``timm:NAME`` of ``timm.list_models()`` works)."""
    return MODELS.names()


def _discover() -> None:
    """Import every module of this package: architectures and parts (SS head, branches, ...) register."""
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_discover()

__all__ = ["MODELS", "Classifier", "Features", "create_model", "list_models"]
