"""Every registered model name builds the same model as before the registry moved to named, decorated
functions: the parameter count and a digest of the whole ``state_dict`` (names, shapes, dtypes, values)
after ``torch.manual_seed(0)``, pinned in ``tests/data/model_fingerprints.json``.

Regenerate the pins only for an intended change of an architecture:
``python -c "from tests.test_models_registry import write_pins; write_pins()"``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from sskd.models import create_model, list_models
from sskd.models.registry import MODELS

PINS = Path(__file__).parent / "data" / "model_fingerprints.json"
NUM_CLASSES = 100


def fingerprint(name: str) -> dict:
    """``{"params", "sha256"}`` of ``create_model(name, 100)`` built after ``torch.manual_seed(0)``."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=NUM_CLASSES)
    state = model.state_dict()
    params = sum(p.numel() for p in model.parameters())
    digest = hashlib.sha256()
    for key, value in state.items():
        digest.update(f"{key}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(value.detach().contiguous().cpu().numpy().tobytes())
    return {"params": params, "sha256": digest.hexdigest()}


def shipped() -> list[str]:
    """The names sskd registers, in order (a test module may register a toy model of its own)."""
    return [name for name in list_models() if MODELS.get(name).__module__.startswith("sskd.models.")]


def write_pins() -> None:
    PINS.write_text(json.dumps({name: fingerprint(name) for name in shipped()}, indent=1) + "\n")


def test_every_pinned_name_is_registered_in_order():
    assert shipped() == list(json.loads(PINS.read_text()))


@pytest.mark.parametrize("name", list(json.loads(PINS.read_text())))
def test_registered_model_builds_as_pinned(name):
    pinned = json.loads(PINS.read_text())[name]
    got = fingerprint(name)
    assert got == pinned


def test_registered_names_are_found_by_grep():
    """Each name is spelt once, in a decorator on a named, documented function (``grep "resnet8x4"``)."""
    for name in shipped():
        fn = MODELS.get(name)
        assert fn.__name__ != "<lambda>" and fn.__doc__, name
