"""Config fields with their checks: the dataclass fields of config sections (the fixed ones and each
method's), carrying the range or choices the config loader checks."""

from __future__ import annotations

from dataclasses import MISSING, field
from typing import Any


def bound(
    default: Any = MISSING,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    choices: tuple[str, ...] | None = None,
    factory: Any = MISSING,
) -> Any:
    """A dataclass field with the range or choices :func:`validate` checks (None always passes)."""
    meta = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("choices", choices)) if v is not None}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)
