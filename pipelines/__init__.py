"""DALI view pipelines, the augmentation plan, the torchvision reference and the profiler."""

from pipelines.loader import PIPELINE_VERSION, ViewLoader, rank_counts
from pipelines.plan import PRESETS, VIEW_NAMES, ViewConfig

__all__ = ["PIPELINE_VERSION", "PRESETS", "VIEW_NAMES", "ViewConfig", "ViewLoader", "rank_counts"]
