"""The augmentation plan: a pure, well-spread function of (seed, epoch, id, view, slot)."""

import numpy as np
import pytest

from pipelines import plan
from pipelines.params import hash_streams, reader_seed, stream_constant, to_float
from pipelines.plan import ViewConfig
from pipelines.view_registry import view_names
from sskd.core.errors import SSKDError

IDS = np.arange(20000, dtype=np.int64)


def sample_uniforms(seed: int, epoch: int, ids: np.ndarray, view: int, slot: int) -> np.ndarray:
    """The float32 uniforms of one plan stream (view, slot) for ``ids``."""
    c = stream_constant(seed, epoch, view, slot)
    return to_float(hash_streams(np.asarray(ids, dtype=np.int64), c, c // 7 + 1))


def test_the_plan_hash_is_pinned():
    """The plan's numbers are part of every view and every teacher cache: they never change."""
    ids = np.array([0, 1, 2, 10**12], dtype=np.int64)
    c = stream_constant(0, 0, 0, 0)
    assert c == 1796062657 and hash_streams(ids, c, c // 7 + 1).tolist() == [
        5858033,
        9416046,
        1209709,
        3174417,
    ]
    c = stream_constant(5, 2, 1, 4)
    assert hash_streams(ids, c, c // 7 + 1).tolist() == [13440935, 9124199, 16232111, 7133219]
    assert reader_seed(3, 4) == 37123984


def test_uniforms_are_pure_and_in_range():
    a = sample_uniforms(0, 3, IDS, 2, 1)
    assert a.dtype == np.float32 and np.array_equal(a, sample_uniforms(0, 3, IDS, 2, 1))
    assert a.min() >= 0.0 and a.max() < 1.0
    # the value of one id does not depend on which other ids are asked with it (batch composition)
    assert sample_uniforms(0, 3, IDS[[17]], 2, 1)[0] == a[17]


def test_uniforms_are_well_spread():
    u = sample_uniforms(7, 0, IDS, 1, 0)
    hist = np.histogram(u, bins=10, range=(0, 1))[0]
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.std() - 12**-0.5) < 0.01
    assert hist.min() > 0.9 * len(u) / 10


@pytest.mark.parametrize("other", [(1, 0, 1, 0), (7, 1, 1, 0), (7, 0, 2, 0), (7, 0, 1, 1)])
def test_streams_are_uncorrelated(other):
    """Different seed, epoch, view or slot: new, uncorrelated parameters (and neighbouring ids too)."""
    u = sample_uniforms(7, 0, IDS, 1, 0)
    v = sample_uniforms(other[0], other[1], IDS, other[2], other[3])
    assert abs(np.corrcoef(u, v)[0, 1]) < 0.03
    assert np.mean(u == v) < 0.001
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.03


def test_large_ids_stay_exact():
    big = np.array([2**40 + 5, 2**31 - 1, 2**31, 10**12], dtype=np.int64)
    u = sample_uniforms(0, 0, big, 0, 0)
    assert np.all((u >= 0) & (u < 1)) and len(set(u.tolist())) == 4


def test_view_config_presets_and_errors():
    assert ViewConfig.parse("rotation").names == ("normal", "rot90", "rot180", "rot270")
    assert ViewConfig.parse("paper").ss_views == ("color_drop", "rotation", "crop_resize", "color_distort")
    assert ViewConfig.parse("color_drop, rot90").num_views == 3
    assert ViewConfig.parse(None).num_views == 1
    with pytest.raises(SSKDError, match="unknown view 'blur'"):
        ViewConfig.parse("blur")
    presets = (
        set(plan.PRESETS["paper"]) | set(plan.PRESETS["rotation"]) | set(plan.PRESETS["shared_rotation"])
    )
    assert presets <= set(view_names()[1:])  # every preset names registered views, never view 0
