"""Every registered view against its torch reference: the DALI pipeline (on the CPU) and
:meth:`pipelines.view_registry.View.reference` agree within the view's own tolerance
(``View.tolerance`` in the CIFAR layout, ``View.resized_tolerance`` in the ImageNet layout). The views are those registered when the tests are collected, so a new view is
checked the moment it is registered, as tests/integration/test_family.py trains every registered method."""

from __future__ import annotations

import pytest
import torch
from test_dali import decoded_images

from pipelines import ViewLoader
from pipelines.reference import reference_views
from pipelines.view_registry import FixedRotation, get_view, view_names

# Both sides are normalised floats: their difference, back in 0-255 levels, carries the float rounding of
# the normalisation (about 1e-5 of a level); one level is 1.
ROUNDING = 1e-3
LAYOUTS = {"digits_shards": ("cifar", None), "photo_shards": ("imagenet", 64)}


@pytest.fixture(scope="module")
def decoded(request):
    """Decoded train images of a shard fixture, by sample id, and its manifest (decoded once per module)."""
    cache = {}

    def get(fixture: str):
        if fixture not in cache:
            cache[fixture] = decoded_images(request.getfixturevalue(fixture))
        return cache[fixture]

    return get


def check_view(folder, imgs: dict, manifest: dict, name: str, *, layout: str, size: int | None, n: int = 8):
    """The views ``("normal", name)`` of the first ``n`` samples of an epoch, DALI against the reference."""
    loader = ViewLoader(folder, "train", batch_size=n, views=name, size=size)
    batch = next(iter(loader.epoch(1)))
    std = torch.tensor(manifest["std"]).view(1, 3, 1, 1)
    for i, sid in enumerate(batch["id"].tolist()):
        ref = reference_views(
            imgs[sid],
            sid,
            names=loader.view_names,
            seed=0,
            epoch=1,
            size=loader.size,
            layout=layout,
            mean=manifest["mean"],
            std=manifest["std"],
        )
        err = (batch["views"][i] - ref).abs() * 255 * std  # (V, 3, H, W) in 0-255 levels
        for v, view_name in enumerate(loader.view_names):
            view = get_view(view_name)
            if layout == "cifar":
                worst = float(err[v].max())
                assert worst <= view.tolerance + ROUNDING, f"{view_name} (view {v}), sample {sid}: {worst}"
            else:
                mean = float(err[v].mean())
                assert mean <= view.resized_tolerance, f"{view_name} (view {v}), sample {sid}: {mean}"


@pytest.mark.parametrize("fixture", list(LAYOUTS))
@pytest.mark.parametrize("name", view_names()[1:])
def test_every_registered_view_matches_its_reference(name, fixture, decoded, request):
    layout, size = LAYOUTS[fixture]
    imgs, manifest = decoded(fixture)
    check_view(request.getfixturevalue(fixture), imgs, manifest, name, layout=layout, size=size)


def test_a_view_that_disagrees_with_its_reference_fails_the_check(digits_shards, decoded, monkeypatch):
    """The check has teeth: rot90 with a reference that forgets to turn is caught, naming the view."""
    monkeypatch.setattr(FixedRotation, "after_reference", lambda self, v, prm, *, view, size: v)
    imgs, manifest = decoded("digits_shards")
    with pytest.raises(AssertionError, match="rot90 \\(view 1\\)"):
        check_view(digits_shards, imgs, manifest, "rot90", layout="cifar", size=None)
