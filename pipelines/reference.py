"""The same views in plain torch/torchvision: an exact reference of the plan, and the obvious baseline.

- :func:`reference_views` takes its parameters from the same plan function as the DALI graph
  (:mod:`pipelines.plan`) and applies each view's own reference
  (:meth:`pipelines.view_registry.View.reference`: torch ops on uint8 tensors). Tests use it to check
  DALI's output per view: crops, flips, 90° rotations and colour drop (DALI's fixed-point luma) are
  exact; colour distortion (the same 3x3 matrix in float32) agrees to float rounding; random-resized
  crops agree to a tolerance, because torchvision crops an integer window (≤ 0.5 px shift) and its
  antialiasing kernel differs from DALI's.
- :class:`BaselineViews` is how a user would write these views with torchvision's own random
  transforms (``transforms.v2`` on uint8 tensors): the honest baseline of ``sskd bench pipeline``.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from pipelines import params, plan
from pipelines.view_registry import SharedView, get_view
from sskd.core.errors import SSKDError


def reference_view(
    img: torch.Tensor, prm: dict, *, name: str, view: int, size: int, normal: torch.Tensor | None = None
) -> torch.Tensor:
    """One view (3, size, size) of a decoded uint8 image ``img`` (3, H, W) with the parameters of
    :func:`pipelines.plan.view_params` for this sample (row 0 of each array): uint8, or float 0-255 for
    colour distortion. The registered view's own reference (:meth:`pipelines.view_registry.View.reference`)
    after the shared flip; ``normal``: view 0, for the views made from it."""
    if prm["flip"][0]:  # the shared flip, on the decoded image
        img = TF.horizontal_flip(img)
    return get_view(name).reference(img, prm, view=view, size=size, normal=normal).contiguous()


def reference_views(
    img: torch.Tensor, sid: int, *, names, seed: int, epoch: int, size: int, layout: str, mean, std
) -> torch.Tensor:
    """All views (V, 3, size, size) float32, normalised, of one decoded uint8 image (3, H, W)."""
    prm = plan.view_params(
        np.array([sid]), np.array([img.shape[1:]]), seed=seed, epoch=epoch, views=names, layout=layout
    )
    views = []
    for i, n in enumerate(names):
        views.append(reference_view(img, prm, name=n, view=i, size=size, normal=views[0] if views else None))
    return normalize(torch.stack(views), mean, std)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) * 255
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1) * 255
    return (x.float() - m) / s


class BaselineViews:
    """The straightforward torchvision implementation of the same views (its own random transforms)."""

    def __init__(self, names, *, size: int, layout: str, mean, std):
        if layout == "imagenet":
            base = [
                v2.RandomResizedCrop(size, scale=params.RRC_SCALE, antialias=True),
                v2.RandomHorizontalFlip(),
            ]
        else:
            base = [v2.RandomCrop(size, padding=params.PAD), v2.RandomHorizontalFlip()]
        tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
        self.names = list(names)
        self.transforms = []
        for n in names:
            view = get_view(n)
            steps = view.baseline(base, size=size, layout=layout)
            if steps is None and not isinstance(view, SharedView):
                raise SSKDError(f"view {n!r} has no torchvision baseline (View.baseline)")
            self.transforms.append(None if steps is None else v2.Compose([*steps, *tail]))
        # Views made from view 0 (SharedView) turn the baseline's view 0 by their k quarter turns.
        self._turns = {
            i: getattr(get_view(n), "k", 0) for i, n in enumerate(names) if self.transforms[i] is None
        }

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        views = []
        for i, t in enumerate(self.transforms):
            views.append(torch.rot90(views[0], self._turns[i], dims=(-2, -1)) if t is None else t(img))
        return torch.stack(views)
