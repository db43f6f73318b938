"""The model registry (filled by the architecture modules on import)."""

from sskd.registry import Registry

MODELS = Registry("model")
