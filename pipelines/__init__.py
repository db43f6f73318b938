"""The view pipelines, bottom to top: the plan's parameter hashing and constants (``params``), colour maths
(``colors``), the view classes (``view_registry``), the augmentation plan (``plan``), the DALI graph
(``dali``), the torch finishing step (``finish``), the sample order (``order``), the loader (``loader``) and
the torch reference (``reference``, ``torch_ops``)."""

from pipelines.loader import PIPELINE_VERSION, ViewLoader, rank_counts
from pipelines.plan import PRESETS, ViewConfig

__all__ = ["PIPELINE_VERSION", "PRESETS", "ViewConfig", "ViewLoader", "rank_counts"]
