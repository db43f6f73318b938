"""The model registry (filled by the architecture modules on import)."""

from sskd.core.registry import Registry

MODELS = Registry("model")
# Parts a method adds around a backbone (SS head, HSSAKD's branches, ...), by the name model.json records:
# ``WRAPPERS.get(name)(backbone, num_classes, **wrapper_args)`` rebuilds a saved model.
WRAPPERS = Registry("model part")
