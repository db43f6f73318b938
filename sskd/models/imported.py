"""Your own architecture by import path: ``--arch mypackage.models:make_net``.

``create_imported("mypackage.models:make_net", K)`` imports ``mypackage.models`` (the current directory is
on the import path, as for ``python -m``), calls ``make_net(num_classes=K)`` and wraps what it returns.
**This runs your code**, at every command that builds the model (training, ``evaluate``, ``export``), since
the run's ``model.json`` records the import path, not the code.

- A :class:`sskd.models.base.Classifier` (``forward(x, features=...)`` returning :class:`Features`, a
  ``feat_dim``, optionally ``branch_spec()``) is used as it is: every method works with it.
- Any other ``nn.Module`` whose ``forward(x)`` returns logits (or a tuple/dict whose first entry or
  ``"logits"`` is) is wrapped in :class:`ImportedClassifier`: logits, and the pooled feature taken as the
  input of its last ``nn.Linear`` (its classifier), which is what the logit methods and SSKD's SS head read.
  It has no stage maps and no branch layout, so the feature methods and HSSAKD refuse it in one line
  before training.
"""

from __future__ import annotations

import importlib
import os
import sys

import torch
from torch import nn

from sskd.core.errors import SSKDError
from sskd.models.base import Classifier, Features

ADVICE = "return a sskd.models.base.Classifier (docs: Bring your own model) to give"


def is_import_path(name: str) -> bool:
    """``module.path:function``: a colon not after ``timm`` or ``torchvision``."""
    module, sep, attr = name.partition(":")
    return bool(sep and module and attr) and module not in ("timm", "torchvision")


def create_imported(name: str, num_classes: int) -> nn.Module:
    """The model ``function(num_classes=K)`` of ``module:function`` makes, behind the model interface."""
    module_name, _, attr = name.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # a missing module, or the user's module failing at import
        raise SSKDError(f"--arch {name}: cannot import {module_name} ({type(exc).__name__}: {exc})") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise SSKDError(f"--arch {name}: {module_name} has no {attr}")
    if not callable(fn):
        raise SSKDError(f"--arch {name}: {module_name}.{attr} is a {type(fn).__name__}, not a function")
    try:
        net = fn(num_classes=num_classes)
    except Exception as exc:
        raise SSKDError(
            f"--arch {name}: {attr}(num_classes={num_classes}) failed ({type(exc).__name__}: {exc})"
        ) from None
    if isinstance(net, Classifier):
        net.arch = name
        return net
    if not isinstance(net, nn.Module):
        raise SSKDError(
            f"--arch {name}: {attr}(num_classes={num_classes}) returned a {type(net).__name__}, not a torch.nn.Module"
        )
    return ImportedClassifier(name, net)


class ImportedClassifier(Classifier):
    """A user's ``nn.Module`` (``self.net``) that returns logits: see the module docstring."""

    def __init__(self, name: str, net: nn.Module):
        super().__init__()
        self.arch, self.net = name, net
        linears = [name for name, m in net.named_modules() if isinstance(m, nn.Linear)]
        self.head_name = linears[-1] if linears else None  # a name, so the head is not registered twice
        self.feat_dim = net.get_submodule(self.head_name).in_features if linears else 0

    def _logits(self, out) -> torch.Tensor:
        """The logits of the user's output: a tensor, ``out.logits`` / ``out["logits"]``, or a tuple's first entry."""
        if torch.is_tensor(out):
            return out
        if isinstance(out, dict) and torch.is_tensor(out.get("logits")):
            return out["logits"]
        if torch.is_tensor(getattr(out, "logits", None)):
            return out.logits
        if isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
            return out[0]
        raise SSKDError(f"{self.arch}: forward returned a {type(out).__name__}, not logits (a tensor)")

    def branch_spec(self):
        raise NotImplementedError(f"an imported model has no stage layout; {ADVICE} branch_spec()")

    def forward(self, x: torch.Tensor, features: bool | str = False):
        if features not in (False, True, "preact"):
            raise ValueError(f"features must be False, True or 'preact', not {features!r}")
        if not features:
            return self._logits(self.net(x))
        if features == "preact":
            raise SSKDError(f"{self.arch} gives no pre-activation maps; {ADVICE} them")
        if self.head_name is None:
            raise SSKDError(
                f"{self.arch} has no nn.Linear classifier, so no pooled feature for the methods that read "
                f"one; {ADVICE} it"
            )
        grabbed: list[torch.Tensor] = []
        handle = self.net.get_submodule(self.head_name).register_forward_pre_hook(
            lambda _m, args: grabbed.append(args[0])
        )
        try:
            logits = self._logits(self.net(x))
        finally:
            handle.remove()
        return Features(logits, grabbed[-1].flatten(1), [], [])
