"""Methods as self-describing plug-ins: one module per method under ``sskd/methods/``.

Every module in this package is imported here and registers its classes (:func:`register`); a method
defined anywhere else registers the same way once imported: a test file, or a user's module named in
``SSKD_METHODS`` (comma-separated module names, imported by every ``sskd`` command). The loop, the CLI
(``--method`` choices and help), the stage commands, config loading and the cache ask the registry and
the class attributes of :class:`Method`; none of them names a method.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import warnings
from typing import Any

from torch import nn

from sskd.core.errors import SSKDError
from sskd.methods.base import (
    METHODS,
    ROLES,
    STAGE_ROLE,
    BuildContext,
    Method,
    method_class,
    part_makers,
    register,
)

PLUGINS_ENV = "SSKD_METHODS"  # comma-separated modules of the user's own methods, imported with these


def _load_plugins() -> None:
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_") and info.name not in ("base", "families"):
            importlib.import_module(f"{__name__}.{info.name}")
    for name in filter(None, (n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise SSKDError(
                f"{PLUGINS_ENV}={os.environ[PLUGINS_ENV]}: cannot import {name!r} ({exc})"
            ) from exc


_load_plugins()


def create_method(
    name: str,
    *,
    student: nn.Module,
    teacher: nn.Module | None = None,
    cfg: Any = None,
    role: str = "student",
    num_classes: int | None = None,
) -> Method:
    """A method from models already made (tests, benchmarks): ``create_method("sskd", student=, teacher=)``.

    Without a teacher the teacher's outputs must come in every batch (from a cache). ``num_classes`` is
    deprecated and ignored, with a warning: a method takes the class count from the models it is given.
    """
    if num_classes is not None:
        warnings.warn(
            "create_method(num_classes=...) is deprecated and ignored: a method takes the class count from "
            "its models",
            DeprecationWarning,
            stacklevel=2,
        )
    return method_class(role, name)(student, teacher, cfg=cfg)


def section_types() -> dict[str, type]:
    """Config section name -> its dataclass, over every registered method."""
    out: dict[str, type] = {}
    for registry in METHODS.values():
        for name in registry.names():
            cls = registry.get(name)
            if cls.section and cls.Config is not None:
                if out.get(cls.section, cls.Config) is not cls.Config:
                    raise ValueError(f"config section {cls.section!r} declared with two dataclasses")
                out[cls.section] = cls.Config
    return out


def stage_method(cfg, stage: str) -> type[Method]:
    """The method class a config's stage section names (``student.method``, ...)."""
    return method_class(STAGE_ROLE[stage], getattr(cfg, stage).method)


def resolve_views(cfg, cls: type[Method]):
    """The views ``cls`` trains on under ``cfg``: a :class:`pipelines.ViewConfig`, or None for view 0 only.

    ``data.views: auto`` means the method's default; a method with fixed views refuses any other set, and
    every method refuses a set with fewer SS views than its :attr:`Method.min_ss_views` (one line, at start).
    """
    from pipelines import PRESETS, ViewConfig

    asked = cfg.data.views
    if cls.views is None:
        return None
    if cls.views == "ss":
        views = ViewConfig.parse(cls.auto_views(cfg) if asked == "auto" else asked)
    else:
        if asked not in ("auto", cls.views) and ViewConfig.parse(asked).ss_views != PRESETS[cls.views]:
            raise SSKDError(
                f"config: data.views: method {cls.name!r} trains on its own views ({cls.views}); "
                f"leave --views out (or auto), not {asked!r}"
            )
        views = ViewConfig.parse(cls.views)
    if len(views.ss_views) < cls.min_ss_views:  # its SS terms would silently be 0
        need = f"{cls.min_ss_views} SS view" + ("s" if cls.min_ss_views > 1 else "")
        own = cls.auto_views(cfg) if cls.views == "ss" else cls.views
        raise SSKDError(
            f"config: data.views: method {cls.name!r} ({ROLES[cls.role]}) needs at least {need} beside the "
            f"normal view (its own: {own}; leave --views out or name views), not {asked!r}"
        )
    return views


def describe(role: str | None = None) -> list[dict[str, Any]]:
    """One record per registered method (``sskd methods``)."""
    rows = []
    for r, registry in METHODS.items():
        if role and r != role:
            continue
        for name in registry.names():
            cls = registry.get(name)
            teacher = None
            if r == "student" and cls.needs_teacher:
                teacher = (
                    f"a run with {cls.teacher_part.replace('_', ' ')} ({' or '.join(part_makers(cls.teacher_part))})"
                    if cls.teacher_part
                    else "any classifier run"
                )
            elif r == "head":
                teacher = "a train-teacher run (frozen)"
            views = {
                None: "the normal view only",
                "ss": f"--views (default {cls.default_views}"
                + (", or the sskd.pretext task's own" if cls.section == "sskd" else "")
                + ")",
            }.get(cls.views, f"{cls.views} (fixed)")
            rows.append(
                {
                    "name": name,
                    "role": r,
                    "command": ROLES[r],
                    "summary": cls.summary,
                    "paper": cls.paper,
                    "views": views,
                    "teacher": teacher,
                    "section": cls.section,
                    "cache": bool(cls.outputs) and not cls.cache_refusal,
                }
            )
    return rows


__all__ = [
    "METHODS",
    "ROLES",
    "BuildContext",
    "Method",
    "create_method",
    "describe",
    "method_class",
    "register",
    "resolve_views",
    "section_types",
    "stage_method",
]
