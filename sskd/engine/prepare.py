"""How a stage's run is put together from its config: the records of its data and the method's builder."""

from __future__ import annotations

from typing import Any

import torch

from sskd.engine.config import Config
from sskd.runs.models import manifest_sha256


def run_info(cfg: Config, stage: str) -> dict[str, Any]:
    """What every run's ``model.json`` records of its data: the shards' hash, the seed, the views as resolved."""
    from sskd.methods import resolve_views, stage_method

    views = resolve_views(cfg, stage_method(cfg, stage))  # a method's fixed views refuse another --views here
    return {
        "shards_sha256": manifest_sha256(cfg.data.shards),
        "seed": cfg.run.seed,
        "views": ",".join(views.ss_views) if views is not None and views.ss_views else "none",
    }


def builder(
    cfg: Config, stage: str, info_out: dict[str, Any], *, teacher: str | None = None, cached: bool = False
):
    """``build(manifest) -> Method`` for ``stage``: the method the config names, made by its own ``build``."""

    def build(manifest):
        from sskd.methods import BuildContext, stage_method

        cls = stage_method(cfg, stage)
        if stage == "student" and not cls.needs_teacher and teacher is not None:
            import logging

            logging.getLogger(__name__).info(
                "--method %s uses no teacher: --teacher %s is ignored", cls.name, teacher
            )
        # The student first, from the run seed: building a live teacher draws random initial weights
        # (then overwritten), which must not change the student's, so live and cached runs start alike.
        torch.manual_seed(cfg.run.seed)
        ctx = BuildContext(
            cfg=cfg, stage=stage, manifest=manifest, teacher=teacher, cached=cached, info=info_out
        )
        info_out.setdefault("arch", ctx.arch)
        info_out["method"] = cls.name
        return cls.build(ctx)

    return build
