"""Model zoo: the CIFAR architectures of SSKD/CRD and torchvision's ImageNet ResNets, one registry.

``create_model(name, num_classes)`` is the single door; every model answers ``model(x)`` (logits) and
``model(x, features=True)`` (:class:`Features`: logits, pooled feature, stage maps), and has ``feat_dim``.
"""

from __future__ import annotations

from torch import nn

from sskd.models import cifar_resnet, mobilenetv2, shufflenet, tv, vgg, wrn  # noqa: F401  (they register)
from sskd.models.base import Classifier, Features
from sskd.models.registry import MODELS


def create_model(name: str, num_classes: int, **kw) -> nn.Module:
    """A new model by registry name (``resnet8x4``, ``wrn_40_2``, ``torchvision:resnet34``, ...)."""
    if num_classes < 1:
        from sskd.errors import SSKDError

        raise SSKDError(f"num_classes must be >= 1, not {num_classes}")
    return MODELS.get(name)(num_classes=num_classes, **kw)


def list_models() -> list[str]:
    return MODELS.names()


__all__ = ["MODELS", "Classifier", "Features", "create_model", "list_models"]
