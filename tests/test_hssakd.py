"""HSSAKD: the losses against the formulas, the branches of every architecture, both teacher modes, the student
live and from the cache, the online mode, the commands, bad input and 2-process runs."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sskd.cli import main as sskd_main
from sskd.losses import hssakd_online_terms, hssakd_student_terms, hssakd_teacher_terms, joint_labels
from sskd.models import create_model
from sskd.models.branches import BranchedModel
from sskd.runs import load_model_info, read_metrics

REPO = Path(__file__).resolve().parents[1]
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


def kl_by_hand(s_rows, t_rows, T):
    """Mean over rows of KL(softmax(t/T) || softmax(s/T)), in plain Python."""
    total = 0.0
    for srow, trow in zip(s_rows, t_rows):
        zs, zt = sum(math.exp(x / T) for x in srow), sum(math.exp(x / T) for x in trow)
        total += sum(
            math.exp(b / T) / zt * ((b / T - math.log(zt)) - (a / T - math.log(zs)))
            for a, b in zip(srow, trow)
        )
    return total / len(s_rows)


def ce_by_hand(rows, targets):
    return sum(math.log(sum(math.exp(x) for x in row)) - row[t] for row, t in zip(rows, targets)) / len(rows)


def test_joint_labels_are_class_major():
    assert joint_labels(torch.tensor([0, 2, 7])).tolist() == [[0, 1, 2, 3], [8, 9, 10, 11], [28, 29, 30, 31]]


def test_teacher_and_student_terms_are_the_official_formulas():
    g = torch.Generator().manual_seed(0)
    b, R, K, L = 3, 4, 5, 2
    labels = torch.tensor([1, 4, 0])
    logits, t_logits = torch.randn(b, R, K, generator=g), torch.randn(b, R, K, generator=g)
    aux = [torch.randn(b, R, R * K, generator=g) for _ in range(L)]
    t_aux = [torch.randn(b, R, R * K, generator=g) for _ in range(L)]
    joint = [4 * int(y) + r for y in labels for r in range(R)]  # image-major rows, rotation r of image i
    teacher = hssakd_teacher_terms(logits, aux, labels)
    assert teacher["ce"].item() == pytest.approx(ce_by_hand(logits[:, 0].tolist(), labels.tolist()), rel=1e-5)
    want_aux = sum(ce_by_hand(a.reshape(b * R, -1).tolist(), joint) for a in aux)  # every one of the b*R rows
    assert teacher["aux"].item() == pytest.approx(want_aux, rel=1e-5)
    assert teacher["loss"].item() == pytest.approx(teacher["ce"].item() + want_aux, rel=1e-6)

    T = 3.0
    student = hssakd_student_terms(logits, aux, t_logits, t_aux, labels, T)
    rows = lambda t: t.reshape(b * R, -1).tolist()  # noqa: E731
    assert student["ce"].item() == pytest.approx(ce_by_hand(logits[:, 0].tolist(), labels.tolist()), rel=1e-5)
    assert student["kd"].item() == pytest.approx(
        T * T * kl_by_hand(rows(logits), rows(t_logits), T), rel=1e-5
    )
    want = sum(T * T * kl_by_hand(rows(s), rows(t), T) for s, t in zip(aux, t_aux))
    assert student["aux"].item() == pytest.approx(want, rel=1e-5)
    assert student["loss"].item() == pytest.approx(
        sum(student[k].item() for k in ("ce", "kd", "aux")), rel=1e-6
    )
    same = hssakd_student_terms(logits, aux, logits, aux, labels, T)
    assert same["kd"].item() == pytest.approx(0, abs=1e-6) and same["aux"].item() == pytest.approx(
        0, abs=1e-6
    )
    with pytest.raises(ValueError, match="student has 2 branches, teacher 1"):
        hssakd_student_terms(logits, aux, t_logits, t_aux[:1], labels, T)


def test_online_terms_are_symmetric_with_every_target_detached():
    g = torch.Generator().manual_seed(1)
    b, R, K = 2, 4, 3
    labels = torch.tensor([2, 0])
    la, lb = (torch.randn(b, R, K, generator=g, requires_grad=True) for _ in range(2))
    aa, ab = ([torch.randn(b, R, R * K, generator=g, requires_grad=True)] for _ in range(2))
    terms = hssakd_online_terms([la, lb], [aa, ab], labels, 3.0)
    assert set(terms) == {"ce", "aux_ce", "kd", "aux", "loss"}
    (grad_a,) = torch.autograd.grad(terms["kd"], la, retain_graph=True)
    # with the peer detached, d kd / d la is the gradient of KL(p_b || p_a) alone (a is the student there)
    only_a = 9 * F.kl_div(
        F.log_softmax(la.reshape(-1, K) / 3, 1),
        F.softmax(lb.detach().reshape(-1, K) / 3, 1),
        reduction="batchmean",
    )
    (want,) = torch.autograd.grad(only_a, la)
    assert torch.allclose(grad_a, want, atol=1e-6)
    terms["loss"].backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (la, lb, aa[0], ab[0]))


# -- branches of every architecture (the official code's layout) --------------------------------------

BRANCHES = {  # arch: (L, tap channels)
    "resnet8x4": (3, [64, 128, 256]),
    "resnet32x4": (3, [64, 128, 256]),
    "resnet56": (3, [16, 32, 64]),
    "resnet20": (3, [16, 32, 64]),
    "wrn_40_2": (3, [32, 64, 128]),
    "wrn_16_2": (3, [32, 64, 128]),
    "wrn_40_1": (3, [16, 32, 64]),
    "vgg13": (4, [64, 128, 256, 512]),
    "vgg8": (4, [64, 128, 256, 512]),
    "MobileNetV2": (4, [12, 16, 48, 160]),
    "ShuffleV1": (3, [240, 480, 960]),
    "ShuffleV2": (3, [116, 232, 464]),
    "ResNet50": (4, [256, 512, 1024, 2048]),
    "torchvision:resnet18": (4, [64, 128, 256, 512]),
    "torchvision:resnet34": (4, [64, 128, 256, 512]),
}


@pytest.mark.parametrize("arch", BRANCHES)
def test_branches_of_every_architecture(arch):
    torch.manual_seed(0)
    k = 7
    model = BranchedModel(create_model(arch, k), k).eval()
    size = 64 if arch.startswith("torchvision") else 32
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    n, channels = BRANCHES[arch]
    assert model.num_branches == n and len(out.aux) == n
    assert all(a.shape == (2, 4 * k) for a in out.aux) and out.logits.shape == (2, k)
    assert [out.stages[i].shape[1] for i in model.taps] == channels
    # fresh copies, not shared modules: no parameter of a branch is a backbone parameter
    backbone = {id(p) for p in model.backbone.parameters()}
    assert not backbone & {id(p) for p in model.branches.parameters()}


def test_resnet32x4_branch_sizes_match_the_official_count():
    """The official layout: about 18.9M branch parameters beside 7.4M in the backbone (CIFAR-100)."""
    model = BranchedModel(create_model("resnet32x4", 100), 100)
    count = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
    assert count(model.backbone) == pytest.approx(7.4, abs=0.1) and count(model.branches) == pytest.approx(
        18.9, abs=0.1
    )


# -- the stages end to end on the digits -------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs_dir(digits_shards, tmp_path_factory):
    """A CE teacher, its HSSAKD branches (frozen mode) and a joint-mode teacher, a few steps each."""
    root = tmp_path_factory.mktemp("hssakd")
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
            3,
            *FAST,
        )
        == 0
    )
    assert (
        run(
            "train-ss-head",
            "--method",
            "hssakd",
            "--teacher",
            root / "t",
            "--shards",
            digits_shards,
            "--out",
            root / "frozen",
            "--max-steps",
            3,
            *FAST,
        )
        == 0
    )
    assert (
        run(
            "train-teacher",
            "--method",
            "hssakd",
            "--arch",
            "resnet8",
            "--shards",
            digits_shards,
            "--out",
            root / "joint",
            "--max-steps",
            2,
            *FAST,
        )
        == 0
    )
    return root


def test_frozen_mode_trains_only_the_branches(runs_dir):
    from safetensors.torch import load_file

    base, frozen = (
        load_file(str(runs_dir / "t" / "model.safetensors")),
        load_file(str(runs_dir / "frozen" / "model.safetensors")),
    )
    for k, v in base.items():  # backbone and classifier bit-identical, BN statistics included
        assert torch.equal(frozen["backbone." + k], v), k
    info = load_model_info(runs_dir / "frozen")
    assert info["wrapper"] == "branches" and info["wrapper_args"] == {"rotations": 4, "num_branches": 3}
    assert info["views"] == "shared_rot90,shared_rot180,shared_rot270"
    rec = [r for r in read_metrics(runs_dir / "frozen") if r["kind"] == "train"][-1]
    assert {"ce", "aux", "aux_acc"} <= rec.keys()


def test_joint_mode_trains_backbone_and_branches(runs_dir):
    info = load_model_info(runs_dir / "joint")
    assert (info["stage"], info["method"], info["wrapper"]) == ("teacher", "hssakd", "branches")


@pytest.mark.parametrize("teacher", ["frozen", "joint"])
def test_student_from_either_teacher_and_its_terms(runs_dir, digits_shards, tmp_path, teacher):
    out = tmp_path / "s"
    assert (
        run(
            "distill",
            "--method",
            "hssakd",
            "--teacher",
            runs_dir / teacher,
            "--student",
            "resnet8",
            "--shards",
            digits_shards,
            "--out",
            out,
            "--max-steps",
            2,
            *FAST,
        )
        == 0
    )
    rec = [r for r in read_metrics(out) if r["kind"] == "train"][-1]
    assert {"ce", "kd", "aux", "loss"} <= rec.keys()
    assert rec["loss"] == pytest.approx(rec["ce"] + rec["kd"] + rec["aux"], rel=1e-4)
    info = load_model_info(out)
    assert info["method"] == "hssakd" and info["wrapper"] == "branches" and 0 <= info["top1"] <= 100


def test_cached_student_terms_equal_the_live_ones_and_topk(runs_dir, digits_shards, tmp_path):
    from pipelines import ViewLoader
    from sskd.cache import CacheReader
    from sskd.methods import create_method
    from sskd.runs.models import load_run_model

    cache = tmp_path / "c"
    assert (
        run(
            "cache",
            "--method",
            "hssakd",
            "--teacher",
            runs_dir / "frozen",
            "--shards",
            digits_shards,
            "--epochs",
            1,
            "--out",
            cache,
            "--batch-size",
            128,
            "--no-progress",
        )
        == 0
    )
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["method"] == "hssakd" and manifest["binding"]["method"] == "hssakd"
    assert {o["name"]: o["shape"] for o in manifest["outputs"]} == {"logits": [10], "aux": [3, 40]}
    teacher, _ = load_run_model(runs_dir / "frozen")
    torch.manual_seed(0)
    student = BranchedModel(create_model("resnet8", 10), 10)
    live = create_method("hssakd", student=student, teacher=teacher).eval()
    cached = create_method("hssakd", student=student, teacher=None).eval()
    batch = next(iter(ViewLoader(digits_shards, "train", batch_size=40, views="shared_rotation").epoch(0)))
    reader = CacheReader(cache)
    with torch.no_grad():
        a, c = live(batch), cached({**batch, **reader.lookup(batch["id"], 0)})
    for k in ("ce", "kd", "aux", "loss"):
        assert c[k].item() == pytest.approx(a[k].item(), rel=5e-3, abs=2e-4), k
    # the student trains from the cache, and --topk stores 400-way branch logits as top-K
    assert (
        run(
            "distill",
            "--method",
            "hssakd",
            "--teacher",
            runs_dir / "frozen",
            "--cache",
            cache,
            "--student",
            "resnet8",
            "--shards",
            digits_shards,
            "--out",
            tmp_path / "s",
            "--max-steps",
            2,
            *FAST,
        )
        == 0
    )
    assert (
        run(
            "cache",
            "--method",
            "hssakd",
            "--teacher",
            runs_dir / "frozen",
            "--shards",
            digits_shards,
            "--epochs",
            1,
            "--out",
            tmp_path / "k",
            "--batch-size",
            256,
            "--topk",
            5,
            "--no-progress",
        )
        == 0
    )
    got = CacheReader(tmp_path / "k").lookup(torch.tensor([3, 700]), 0)
    assert got["t_aux"].shape == (2, 4, 3, 40) and got["t_logits"].shape == (2, 4, 10)


def test_online_mode_two_peers_export_the_better(digits_shards, tmp_path):
    out = tmp_path / "o"
    assert (
        run(
            "distill",
            "--method",
            "hssakd_online",
            "--student",
            "resnet8",
            "--shards",
            digits_shards,
            "--out",
            out,
            "--max-steps",
            2,
            *FAST,
        )
        == 0
    )
    info = load_model_info(out)
    peers = info["peers"]
    assert len(peers) == 2 and info["exported_peer"] in (0, 1)
    assert (
        info["top1"] == max(p["top1"] for p in peers) and info["top1"] == peers[info["exported_peer"]]["top1"]
    )
    rec = [r for r in read_metrics(out) if r["kind"] == "train"][-1]
    assert {"ce", "aux_ce", "kd", "aux"} <= rec.keys()


def test_online_peers_both_learn():
    from sskd.methods import create_method

    torch.manual_seed(0)
    peers = torch.nn.ModuleList([BranchedModel(create_model("resnet8", 5), 5) for _ in range(2)])
    method = create_method("hssakd_online", student=peers)
    g = torch.Generator().manual_seed(0)
    views = torch.randn(2, 1, 3, 32, 32, generator=g)
    views = torch.cat([torch.rot90(views, k, dims=(3, 4)) for k in range(4)], dim=1)
    method({"views": views, "label": torch.tensor([1, 3]), "id": torch.arange(2)})["loss"].backward()
    for peer in peers:
        assert peer.backbone.fc.weight.grad.abs().sum() > 0
        assert all(b.fc.weight.grad.abs().sum() > 0 for b in peer.branches)


def test_hssakd_bad_input_is_one_line_before_training(runs_dir, digits_shards, tmp_path, capsys):
    cases = [
        (
            ["distill", "--method", "hssakd", "--teacher", runs_dir / "t", "--student", "resnet8"],
            "--method hssakd needs a teacher with branches (it is a `teacher` run without one)",
        ),
        (
            ["distill", "--method", "hssakd", "--teacher", runs_dir / "frozen", "--student", "vgg8"],
            "resnet8 has 3 branches but the student vgg8 has 4",
        ),
        (
            [
                "distill",
                "--method",
                "hssakd",
                "--teacher",
                runs_dir / "frozen",
                "--student",
                "resnet8",
                "--views",
                "paper",
            ],
            "method 'hssakd' trains on its own views (shared_rotation)",
        ),
        (
            [
                "distill",
                "--method",
                "hssakd",
                "--teacher",
                runs_dir / "frozen",
                "--student",
                "resnet8",
                "--set",
                "hssakd.ss_T=1",
            ],
            "unknown config key 'hssakd.ss_T' ('ss_T' is a key of section 'sskd')",
        ),
        (
            ["distill", "--method", "sskd", "--teacher", runs_dir / "frozen", "--student", "resnet8"],
            "--method sskd needs a teacher with ss head",
        ),
    ]
    for args, needle in cases:
        assert run(*args, "--shards", digits_shards, "--out", tmp_path / "x", "--max-steps", 1, *FAST) == 2, (
            args
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("sskd: error:") and needle in err[-1], (args, err[-1])
        assert not (tmp_path / "x" / "config.yaml").exists()
    with pytest.raises(SystemExit):  # argparse: choices come from the registry
        sskd_main(
            ["distill", "--method", "hssakdd", "--shards", str(digits_shards), "--out", str(tmp_path / "y")]
        )
    assert "invalid choice: 'hssakdd'" in capsys.readouterr().err


def test_a_cache_of_another_method_or_views_is_refused(runs_dir, digits_shards, tmp_path, capsys):
    assert (
        run(
            "train-ss-head",
            "--teacher",
            runs_dir / "t",
            "--shards",
            digits_shards,
            "--out",
            tmp_path / "ss",
            "--max-steps",
            1,
            *FAST,
        )
        == 0
    )
    assert (
        run(
            "cache",
            "--teacher",
            tmp_path / "ss",
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
    )  # an SSKD cache
    assert (
        run(
            "distill",
            "--method",
            "hssakd",
            "--teacher",
            runs_dir / "frozen",
            "--cache",
            tmp_path / "c",
            "--student",
            "resnet8",
            "--shards",
            digits_shards,
            "--out",
            tmp_path / "x",
            *FAST,
        )
        == 2
    )
    assert "cache was made with method='sskd' but this run has 'hssakd'" in capsys.readouterr().err
    assert (
        run(
            "distill",
            "--method",
            "sskd",
            "--teacher",
            tmp_path / "ss",
            "--cache",
            tmp_path / "c",
            "--views",
            "paper",
            "--student",
            "resnet8",
            "--shards",
            digits_shards,
            "--out",
            tmp_path / "y",
            *FAST,
        )
        == 2
    )
    assert "cache was made with views=['normal', 'rot90', 'rot180', 'rot270']" in capsys.readouterr().err


def test_methods_command_lists_every_method(capsys):
    assert run("methods") == 0
    out = capsys.readouterr().out
    for name in ("ce", "kd", "sskd", "hssakd", "hssakd_online"):
        assert f"  {name} " in out
    assert run("methods", "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    online = next(r for r in rows if r["name"] == "hssakd_online")
    assert online["role"] == "student" and online["teacher"] is None and not online["cache"]


def test_bench_distill_for_hssakd_writes_the_named_keys(digits_shards, tmp_path):
    out = tmp_path / "b.json"
    assert (
        run(
            "bench",
            "distill",
            "--method",
            "hssakd",
            "--shards",
            digits_shards,
            "--teacher-arch",
            "resnet8",
            "--student-arch",
            "resnet8",
            "--batch-size",
            16,
            "--steps",
            2,
            "--warmup",
            1,
            "--json",
            out,
        )
        == 0
    )
    res = json.loads(out.read_text())
    assert res["method"] == "hssakd" and {"ce_step_s", "live_step_s", "cached_step_s"} <= res.keys()
    assert res["config"]["views"] == ["normal", "shared_rot90", "shared_rot180", "shared_rot270"]


@pytest.mark.slow
def test_every_hssakd_stage_on_two_ranks(digits_shards, tmp_path):
    env = dict(
        os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""
    )  # CPU ranks (gloo) even on a GPU node
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "launch/accelerate/cpu.yaml"),
        "--main_process_port",
        "29621",
        "-m",
        "sskd",
    ]
    common = ["--shards", str(digits_shards), "--max-steps", "2", *FAST]
    stages = [
        ["train-teacher", "--arch", "resnet8", "--out", str(tmp_path / "t")],
        [
            "train-ss-head",
            "--method",
            "hssakd",
            "--teacher",
            str(tmp_path / "t"),
            "--out",
            str(tmp_path / "frozen"),
        ],
        ["train-teacher", "--method", "hssakd", "--arch", "resnet8", "--out", str(tmp_path / "joint")],
        [
            "distill",
            "--method",
            "hssakd",
            "--teacher",
            str(tmp_path / "frozen"),
            "--student",
            "resnet8",
            "--out",
            str(tmp_path / "s"),
        ],
        ["distill", "--method", "hssakd_online", "--student", "resnet8", "--out", str(tmp_path / "o")],
    ]
    for stage in stages:
        proc = subprocess.run(launch + stage + common, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (stage, proc.stderr[-3000:])
        out = Path(stage[stage.index("--out") + 1])
        recs = [r for r in read_metrics(out) if r["kind"] == "train"]
        assert recs[-1]["world_size"] == 2 and load_model_info(out)["steps"] == 2
        evals = [r for r in read_metrics(out) if r["kind"] == "eval"]
        assert evals[-1]["count"] == 360  # every validation sample once across the two ranks
