"""The KDSS variant: its loss terms against the formulas, the teacher's head stage, the student live and cached."""

import math

import pytest
import torch
import torch.nn.functional as F

from sskd.cli import main as sskd_main
from sskd.losses.kdss import alignment_loss, instance_contrast, rotation_labels, rotation_loss
from sskd.runs import load_model_info, read_metrics

FAST = [
    "--no-progress",
    "--batch-size",
    "16",
    "--set",
    "run.log_every=1",
    "--set",
    "data.eval_batch_size=128",
]


def run(*args) -> int:
    return sskd_main([str(a) for a in args])


def test_rotation_labels_and_loss():
    assert rotation_labels(2, 4).tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 4, 4, generator=g), torch.randn(2, 4, 4, generator=g)
    terms = rotation_loss(s, t, T=4.0)
    rows, trows = s.reshape(8, 4).tolist(), t.reshape(8, 4).tolist()
    ce = sum(math.log(sum(math.exp(x) for x in r)) - r[k % 4] for k, r in enumerate(rows)) / 8
    assert terms["rot_ce"].item() == pytest.approx(ce, rel=1e-5)
    kl = 0.0
    for a, b in zip(rows, trows):
        zs, zt = sum(math.exp(x / 4) for x in a), sum(math.exp(x / 4) for x in b)
        kl += sum(math.exp(y / 4) / zt * (y / 4 - math.log(zt) - x / 4 + math.log(zs)) for x, y in zip(a, b))
    assert terms["rot_kd"].item() == pytest.approx(16 * kl / 8, rel=1e-5)
    assert rotation_loss(s, None)["rot_kd"].item() == 0.0


def test_instance_contrast_is_multi_positive_infonce():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    got = instance_contrast(q, k, tau=0.5).item()
    qn, kn = F.normalize(q.reshape(12, 5), dim=1), F.normalize(k.reshape(12, 5), dim=1)
    total = 0.0
    for a in range(12):
        scores = [float(qn[a] @ kn[c]) / 0.5 for c in range(12)]
        lse = math.log(sum(math.exp(x) for x in scores))
        total += (
            -sum(scores[c] - lse for c in range(12) if c // 4 == a // 4) / 4
        )  # 4 positives: the image's views
    assert got == pytest.approx(total / 12, rel=1e-5)
    # one network's own views: a row is not its own candidate, 3 positives
    own = instance_contrast(q, q, tau=0.5).item()
    total = 0.0
    for a in range(12):
        scores = {c: float(qn[a] @ qn[c]) / 0.5 for c in range(12) if c != a}
        lse = math.log(sum(math.exp(x) for x in scores.values()))
        total += -sum(v - lse for c, v in scores.items() if c // 4 == a // 4) / 3
    assert own == pytest.approx(total / 12, rel=1e-5)


def test_alignment_is_one_minus_cosine_and_teacher_detached():
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0]], requires_grad=True)
    loss = alignment_loss(s, t)
    assert loss.item() == pytest.approx((0 + 1) / 2)
    loss.backward()
    assert t.grad is None and s.grad is not None


@pytest.fixture(scope="module")
def teachers(digits_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("kdss")
    assert (
        run(
            "train-teacher",
            "--shards",
            digits_shards,
            "--arch",
            "resnet8",
            "--out",
            root / "t",
            "--max-steps",
            2,
            *FAST,
        )
        == 0
    )
    assert (
        run(
            "train-ss-head",
            "--method",
            "kdss",
            "--teacher",
            root / "t",
            "--shards",
            digits_shards,
            "--out",
            root / "heads",
            "--max-steps",
            3,
            *FAST,
        )
        == 0
    )
    return root


def test_head_stage_trains_rotation_head_and_projection_on_the_frozen_backbone(teachers):
    from safetensors.torch import load_file

    base, heads = (
        load_file(str(teachers / "t" / "model.safetensors")),
        load_file(str(teachers / "heads" / "model.safetensors")),
    )
    assert all(torch.equal(heads["backbone." + k], v) for k, v in base.items())
    assert {"rot_head.weight", "proj.net.0.weight"} <= heads.keys()
    info = load_model_info(teachers / "heads")
    assert info["wrapper"] == "kdss_heads" and info["views"] == "shared_rot90,shared_rot180,shared_rot270"
    rec = [r for r in read_metrics(teachers / "heads") if r["kind"] == "train"][-1]
    assert {"rot_ce", "con", "rot_acc"} <= rec.keys()


@pytest.mark.parametrize("student", ["resnet8", "resnet8x4"])  # same and different widths (64 -> 256)
def test_student_terms_live_and_from_the_cache(teachers, digits_shards, tmp_path, student):
    common = [
        "distill",
        "--method",
        "kdss",
        "--teacher",
        teachers / "heads",
        "--student",
        student,
        "--shards",
        digits_shards,
        "--max-steps",
        2,
        *FAST,
    ]
    assert run(*common, "--out", tmp_path / "live") == 0
    rec = [r for r in read_metrics(tmp_path / "live") if r["kind"] == "train"][0]
    assert {"ce", "kd", "rot_ce", "rot_kd", "con", "align"} <= rec.keys()
    want = 0.1 * rec["ce"] + 0.9 * rec["kd"] + rec["rot_ce"] + rec["rot_kd"] + rec["con"] + rec["align"]
    assert rec["loss"] == pytest.approx(want, rel=1e-4)
    assert (
        run(
            "cache",
            "--method",
            "kdss",
            "--teacher",
            teachers / "heads",
            "--shards",
            digits_shards,
            "--epochs",
            1,
            "--out",
            tmp_path / "c",
            "--batch-size",
            256,
            "--no-progress",
        )
        == 0
    )
    assert run(*common, "--out", tmp_path / "cached", "--cache", tmp_path / "c") == 0
    cached = [r for r in read_metrics(tmp_path / "cached") if r["kind"] == "train"][0]
    assert cached["ce"] == rec["ce"]  # same student, same batch
    for k in ("kd", "rot_kd", "con", "align"):
        assert cached[k] == pytest.approx(rec[k], rel=2e-2, abs=2e-3), k  # fp16 teacher outputs


def test_student_only_contrast_and_bad_teacher(teachers, digits_shards, tmp_path, capsys):
    assert (
        run(
            "distill",
            "--method",
            "kdss",
            "--teacher",
            teachers / "heads",
            "--student",
            "resnet8",
            "--shards",
            digits_shards,
            "--out",
            tmp_path / "s",
            "--max-steps",
            1,
            "--set",
            "kdss.con_mode=student",
            *FAST,
        )
        == 0
    )
    assert (
        run(
            "distill",
            "--method",
            "kdss",
            "--teacher",
            teachers / "t",
            "--student",
            "resnet8",
            "--shards",
            digits_shards,
            "--out",
            tmp_path / "x",
            "--max-steps",
            1,
            *FAST,
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--method kdss needs a teacher with kdss heads" in err and "train-ss-head --method kdss" in err
