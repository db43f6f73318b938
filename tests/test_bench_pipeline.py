"""``sskd bench pipeline``: runs every variant side by side and reports consistent figures (no timing asserts:
speed is judged from the printed ratios, never by a timed test)."""

import json

import pytest

from sskd.cli import main


@pytest.mark.parametrize("shards, views", [("digits_shards", "paper"), ("photo_shards", "rotation")])
def test_bench_pipeline_reports_every_variant(request, tmp_path, capsys, shards, views):
    folder = request.getfixturevalue(shards)
    out = tmp_path / "bench.json"
    rc = main(
        [
            "bench",
            "pipeline",
            "--shards",
            str(folder),
            "--views",
            views,
            "--images",
            "32",
            "--batch-size",
            "8",
            "--warmup",
            "1",
            "--rounds",
            "2",
            "--size",
            "48" if shards == "photo_shards" else "32",
            "--no-progress",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    nv = 1 + (4 if views == "paper" else 3)
    for k in ("decode", "floor", "dali", "torchvision"):
        assert res[k]["images_per_s"] > 0, k
        if k != "decode":
            assert res[k]["views_per_s"] == pytest.approx(res[k]["images_per_s"] * nv, rel=1e-3)
    assert res["ratios"]["dali_vs_torchvision"] == pytest.approx(
        res["dali"]["images_per_s"] / res["torchvision"]["images_per_s"], abs=0.006
    )
    assert len(res["rounds"]) == 2 and res["config"]["warmup_batches"] == 2
    for r in res["rounds"]:  # each round's ratio is its own quotient; the means are the rounds' means
        assert r["dali_vs_floor"] == pytest.approx(
            r["images_per_s"]["dali"] / r["images_per_s"]["floor"], abs=0.006
        )
    assert res["dali"]["images_per_s"] == pytest.approx(
        sum(r["images_per_s"]["dali"] for r in res["rounds"]) / 2, abs=0.11
    )
    kernel = res["resize_kernel"]
    # DALI's figure is a difference of two timings (with and without the resize): reported, not judged
    assert isinstance(kernel["dali_ms"], float) and kernel["torchvision_ms"] > 0
    assert kernel["size"] == res["config"]["size"]
    printed = capsys.readouterr().out
    assert "dali_vs_torchvision per round" in printed and "torchvision" in printed


def test_bench_pipeline_rejects_bad_counts(digits_shards, capsys):
    assert main(["bench", "pipeline", "--shards", str(digits_shards), "--images", "0"]) == 2
    assert "--images must be at least 1" in capsys.readouterr().err
