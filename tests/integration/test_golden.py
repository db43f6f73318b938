"""Behaviour is kept through refactors: fixed-seed runs of every stage give the pinned weights."""

import json
from pathlib import Path

import pytest
from golden import golden_runs

GOLDEN = json.loads((Path(__file__).parents[1] / "data" / "golden_weights.json").read_text())


def test_fixed_seed_runs_give_the_pinned_weights(digits_shards, tmp_path):
    got = golden_runs(digits_shards, tmp_path)
    assert set(got) == set(GOLDEN)
    for name, want in GOLDEN.items():
        have = got[name]
        assert have["numel"] == want["numel"], name
        if have["sha256"] == want["sha256"]:
            continue  # bit for bit, as on the machine that pinned them
        # Another CPU may round differently (kernel choice, measured: up to 0.04 after these few steps with
        # 1 instead of 2 threads); a change of behaviour moves them far more (CE vs KD students: 1.08).
        assert have["proj"] == pytest.approx(want["proj"], rel=0, abs=0.1), name
