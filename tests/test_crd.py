"""CRD: the critic, the NCE loss and the bank update against the formulas; the negatives; the labels read
from the shards; the method's banks (Z, update, state, resume); the commands live, cached, resumed and on
2 ranks."""

import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from shards.labels import split_labels
from sskd.cli import main as sskd_main
from sskd.core.errors import SSKDError
from sskd.losses.crd import bank_rows, crd_scores, nce_contrast_loss
from sskd.methods.crd import CRD, CRDConfig, NegativeSampler
from sskd.models import create_model
from sskd.runs import file_sha256, load_model_info, read_metrics

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
K64 = ["--set", "crd.nce_k=64"]


def run(*args) -> int:
    return sskd_main([str(a) for a in args])


# ---- the pure functions against the formulas ----------------------------------------------------------


def test_scores_and_nce_loss_are_the_formulas():
    g = torch.Generator().manual_seed(0)
    n, d, b, k, T = 10, 4, 2, 3, 0.5
    bank, v = (
        torch.randn(n, d, generator=g, dtype=torch.float64),
        torch.randn(b, d, generator=g, dtype=torch.float64),
    )
    idx = torch.tensor([[4, 0, 7, 9], [1, 2, 3, 8]])
    p = crd_scores(bank, v, idx, T)
    want = [
        [math.exp(sum(bank[j, c].item() * v[i, c].item() for c in range(d)) / T) for j in idx[i].tolist()]
        for i in range(b)
    ]
    assert p.flatten().tolist() == pytest.approx([x for row in want for x in row], rel=1e-12)
    z = 3.0
    mpn, eps = k / n, 1e-7
    loss = 0.0
    for row in want:
        pos, negs = row[0] / z, [x / z for x in row[1:]]
        loss -= math.log(pos / (pos + mpn + eps)) + sum(math.log(mpn / (q + mpn + eps)) for q in negs)
    got = nce_contrast_loss(p / z, n)
    assert got.ndim == 0 and got.item() == pytest.approx(loss / b, rel=1e-12)


def test_bank_update_is_momentum_then_renormalisation():
    g = torch.Generator().manual_seed(1)
    bank, v = torch.randn(6, 3, generator=g), torch.randn(2, 3, generator=g)
    ids = torch.tensor([4, 1])
    rows = bank_rows(bank, ids, v, 0.25)
    for r, i in enumerate(ids.tolist()):
        mixed = [0.25 * bank[i, c].item() + 0.75 * v[r, c].item() for c in range(3)]
        norm = math.sqrt(sum(x * x for x in mixed))
        assert rows[r].tolist() == pytest.approx([x / norm for x in mixed], rel=1e-5)
    kept = bank[ids] / bank[ids].norm(dim=1, keepdim=True)  # momentum 1: the old rows, renormalised
    assert bank_rows(bank, ids, v, 1.0).flatten().tolist() == pytest.approx(kept.flatten().tolist(), rel=1e-6)


# ---- the negatives --------------------------------------------------------------------------------

LABELS = np.array([i % 4 for i in range(40)], dtype=np.int64)  # 4 classes of 10: 30 samples of other classes


def test_negatives_are_other_classes_without_replacement_and_a_function_of_seed_epoch_id():
    s = NegativeSampler(LABELS, 30, seed=3)
    ids = np.array([5, 0, 39, 12])
    out = s.draw(ids, epoch=2)
    assert out.shape == (4, 31) and out.dtype == np.int64
    assert out[:, 0].tolist() == ids.tolist()  # 'exact': the positive is the sample itself
    for row, i in zip(out, ids):
        assert len(set(row[1:].tolist())) == 30  # no repeats: all 30 samples of the other classes
        assert (LABELS[row[1:]] != LABELS[i]).all()
    small = NegativeSampler(LABELS, 7, seed=3)
    a = small.draw(ids, epoch=2)
    assert (small.draw(ids[::-1], epoch=2) == a[::-1]).all()  # per id, whatever else is in the batch
    assert (NegativeSampler(LABELS, 7, seed=3).draw(ids[2:3], 2) == a[2:3]).all()  # a new sampler: the same
    assert not (small.draw(ids, epoch=3) == a).all()  # another epoch, other negatives
    assert not (NegativeSampler(LABELS, 7, seed=4).draw(ids, 2) == a).all()  # another seed too
    relax = NegativeSampler(LABELS, 7, seed=3, mode="relax").draw(ids, 2)
    assert (LABELS[relax[:, 0]] == LABELS[ids]).all()  # 'relax': a positive of the same class


def test_more_negatives_than_other_class_samples_are_drawn_with_replacement(caplog):
    """RepDistiller: ``replace = k > len(cls_negative[target])``, per class; said once (the old refusal is gone)."""
    labels = np.array([0] * 5 + [1] * 3)
    with caplog.at_level("INFO", logger="sskd.methods.crd"):
        s = NegativeSampler(labels, 4, seed=0, classes=["a", "b"])
    assert [r.getMessage() for r in caplog.records] == [
        "crd: class 'a' has 3 samples of other classes, fewer than crd.nce_k=4: its negatives are drawn with "
        "replacement, as RepDistiller does"
    ]
    out = s.draw(np.array([0, 5]), epoch=1)
    assert (labels[out[0, 1:]] == 1).all()  # class a: 4 of the 3 b samples, so with repeats
    assert len(set(out[1, 1:].tolist())) == 4 and (labels[out[1, 1:]] == 0).all()  # class b: 4 of 5, distinct
    assert (
        NegativeSampler(labels, 4, seed=0).draw(np.array([5, 0]), 1) == out[::-1]
    ).all()  # (seed, epoch, id)
    with pytest.raises(SSKDError, match="class 'a' has no samples of other classes"):
        NegativeSampler(np.array([0, 0, 0]), 2, seed=0, classes=["a"])


# ---- labels from the shards ---------------------------------------------------------------------------


def _writer_labels(folder: Path) -> dict[int, int]:
    """id -> label from the `.cls` text members (what the writer put there), through tarfile, not the index."""
    out = {}
    for tar in sorted(folder.glob("train-*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf:
                if m.name.endswith(".cls"):
                    out[int(m.name.split(".")[0])] = int(tf.extractfile(m).read())
    return out


def test_split_labels_are_the_labels_the_writer_wrote(digits_shards, tmp_path):
    labels = split_labels(digits_shards, "train")
    manifest = json.loads((Path(digits_shards) / "manifest.json").read_text())
    assert labels.dtype == np.int64 and len(labels) == manifest["splits"]["train"]["num_samples"]
    want = _writer_labels(Path(digits_shards))
    assert labels.tolist() == [want[i] for i in range(len(labels))]
    # A label outside the classes (a damaged shard) is a one-line error naming the shard.
    import shutil

    from shards.index import parse_index

    bad = tmp_path / "bad"
    shutil.copytree(digits_shards, bad)
    entry = manifest["splits"]["train"]["shards"][1]
    _, samples = parse_index(bad / entry["index"])
    off = next(o for ext, o, _, _ in samples[3] if ext == "lbl")
    with open(bad / entry["file"], "r+b") as fh:
        fh.seek(off)
        fh.write((77).to_bytes(8, "little"))
    with pytest.raises(
        SSKDError, match=rf"{entry['file']}: sample 0*{entry['first_id'] + 3} has label 77, outside 0..9"
    ):
        split_labels(bad, "train")
    (bad / entry["index"]).unlink()
    with pytest.raises(SSKDError, match=f"index of shard {entry['file']} is missing"):
        split_labels(bad, "train")


# ---- the method ---------------------------------------------------------------------------------------


def crd_method(seed=0, **cfg):
    torch.manual_seed(seed)
    teacher, student = create_model("resnet8", 4).eval(), create_model("resnet8", 4)
    return CRD(student, teacher, cfg=CRDConfig(nce_k=8, **cfg), labels=LABELS, seed=seed)


def a_batch(ids, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor(ids)
    return {
        "views": torch.randn(len(ids), 1, 3, 32, 32, generator=g),
        "label": torch.from_numpy(LABELS)[ids],
        "id": ids,
    }


def test_the_crd_term_is_the_two_sided_nce_with_z_from_the_first_batch():
    method = crd_method().eval()  # eval: BN statistics fixed and the banks left as they are
    batch = a_batch([3, 17, 22])
    out = method(batch)
    with torch.no_grad():
        v_s = method.embed_s(method.student(batch["views"][:, 0], features=True).feat)
        v_t = method.embed_t(method.teacher(batch["views"][:, 0], features=True).feat)
        idx = torch.from_numpy(method.sampler.draw(batch["id"].numpy(), 0))
        p_s, p_t = crd_scores(method.bank_t, v_s, idx, 0.07), crd_scores(method.bank_s, v_t, idx, 0.07)
    z = [p_s.mean().item() * 40, p_t.mean().item() * 40]
    assert method.z == pytest.approx(z, rel=1e-5)
    want = nce_contrast_loss(p_s / method.z[0], 40) + nce_contrast_loss(p_t / method.z[1], 40)
    assert out["crd"].item() == pytest.approx(want.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx((out["ce"] + 0.8 * out["crd"]).item(), rel=1e-6)  # kd weight 0
    frozen = list(method.z)
    method(a_batch([1, 2], seed=5))
    assert method.z == frozen  # set once, then frozen


def test_teacher_outputs_are_the_pooled_feature_of_plain_and_wrapped_teachers():
    from sskd.models.heads import SSModel

    torch.manual_seed(0)
    plain = create_model("resnet8", 4).eval()
    views = torch.randn(2, 3, 3, 32, 32)
    with torch.no_grad():
        want = plain(views[:, 0], features=True)
        for model in (plain, SSModel(plain).eval()):
            out = CRD.teacher_outputs(model, views)
            assert out["feat"].shape == (2, 1, 64) and torch.equal(out["feat"][:, 0], want.feat)
            assert torch.equal(out["logits"][:, 0], want.logits)


def test_a_training_step_moves_exactly_the_batch_rows_to_unit_norm():
    method = crd_method().train()
    s0, t0 = method.bank_s.clone(), method.bank_t.clone()
    method(a_batch([3, 17, 22]))
    for new, old in ((method.bank_s, s0), (method.bank_t, t0)):
        moved = (new != old).any(1).nonzero().flatten().tolist()
        assert moved == [3, 17, 22]
        assert new[moved].norm(dim=1).tolist() == pytest.approx([1.0] * 3, abs=1e-6)
    bound = 1 / math.sqrt(128 / 3)  # RepDistiller's init: uniform in [-1/sqrt(d/3), 1/sqrt(d/3)]
    assert s0.abs().max() <= bound and s0.shape == (40, 128)


def test_banks_are_extra_state_not_buffers_and_round_trip():
    method = crd_method().train()
    method(a_batch([3, 17, 22]))
    assert not any(
        b is method.bank_s or b is method.bank_t for b in method.buffers()
    )  # DDP never broadcasts them
    state = method.state_dict()
    assert state["_extra_state"].shape == (2, 41, 128)
    other = crd_method(seed=9)
    other.load_state_dict(state)
    assert torch.equal(other.bank_s, method.bank_s) and torch.equal(other.bank_t, method.bank_t)
    assert other.z == method.z
    assert other.double().bank_s.dtype == torch.float64  # the banks move with the method (_apply)
    small = crd_method(feat_dim=16)
    with pytest.raises(SSKDError) as exc:
        small.set_extra_state(state["_extra_state"])
    assert "holds 40 samples x 128 dims, this run's holds 40 samples x 16 dims" in str(exc.value)
    assert "\n" not in str(exc.value)


# ---- the commands -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher(digits_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("crd_teacher") / "t"
    assert (
        run(
            "train-teacher",
            "--shards",
            digits_shards,
            "--arch",
            "resnet8",
            "--out",
            out,
            "--max-steps",
            2,
            "--no-progress",
            "--batch-size",
            16,
        )
        == 0
    )
    return out


def distill(teacher, shards, out, *extra):
    return run(
        "distill",
        "--method",
        "crd",
        "--teacher",
        teacher,
        "--student",
        "resnet8",
        "--shards",
        shards,
        "--out",
        out,
        *FAST,
        *K64,
        *extra,
    )


def test_two_optimizer_steps_through_the_cli(teacher, digits_shards, tmp_path):
    assert (
        sskd_main(
            [
                "distill",
                "--method",
                "crd",
                "--teacher",
                str(teacher),
                "--student",
                "resnet8",
                "--shards",
                str(digits_shards),
                "--out",
                str(tmp_path / "s"),
                "--max-steps",
                "2",
                "--no-progress",
                "--batch-size",
                "16",
                "--set",
                "crd.nce_k=64",
            ]
        )
        == 0
    )
    info = load_model_info(tmp_path / "s")
    assert (info["method"], info["steps"]) == ("crd", 2)
    rec = [r for r in read_metrics(tmp_path / "s") if r["kind"] == "train"][-1]
    assert {"ce", "kd", "crd", "loss"} <= rec.keys() and rec["crd"] > 0
    assert rec["loss"] == pytest.approx(rec["ce"] + 0.8 * rec["crd"], rel=1e-4)


def _banks(run_dir: Path) -> torch.Tensor:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["model"]["_extra_state"]


def test_resume_equals_uninterrupted_weights_and_banks(teacher, digits_shards, tmp_path, capsys):
    common = ["--set", "run.eval_every=0"]
    assert distill(teacher, digits_shards, tmp_path / "full", "--max-steps", 4, *common) == 0
    assert distill(teacher, digits_shards, tmp_path / "cut", "--max-steps", 2, *common) == 0
    assert distill(teacher, digits_shards, tmp_path / "cut", "--max-steps", 4, "--resume", *common) == 0
    assert load_model_info(tmp_path / "cut")["steps"] == 4
    assert file_sha256(tmp_path / "cut" / "model.safetensors") == file_sha256(
        tmp_path / "full" / "model.safetensors"
    )
    assert torch.equal(_banks(tmp_path / "cut"), _banks(tmp_path / "full"))  # both banks and both Z
    capsys.readouterr()
    # A checkpoint whose banks have another size does not resume: one line naming both sizes.
    assert (
        distill(
            teacher,
            digits_shards,
            tmp_path / "cut",
            "--max-steps",
            6,
            "--resume",
            *common,
            "--set",
            "crd.feat_dim=64",
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(
        f"sskd: error: {tmp_path / 'cut' / 'checkpoints' / 'last.pt'}: its CRD memory bank holds "
        "1437 samples x 128 dims, this run's holds 1437 samples x 64 dims"
    ), err


def test_cached_teacher_features_give_the_live_terms(teacher, digits_shards, tmp_path):
    assert (
        run(
            "cache",
            "--method",
            "crd",
            "--teacher",
            teacher,
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
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert [(o["name"], o["shape"]) for o in manifest["outputs"]] == [("feat", [64]), ("logits", [10])]
    assert distill(teacher, digits_shards, tmp_path / "live", "--max-steps", 1) == 0
    assert (
        distill(teacher, digits_shards, tmp_path / "cached", "--max-steps", 1, "--cache", tmp_path / "c") == 0
    )
    live, cached = (
        next(r for r in read_metrics(tmp_path / d) if r["kind"] == "train") for d in ("live", "cached")
    )
    assert cached["ce"] == live["ce"]  # same student, same batch
    for k in ("crd", "kd", "loss"):  # the teacher's outputs as fp16
        assert cached[k] == pytest.approx(live[k], rel=1e-2, abs=1e-4), k


@pytest.mark.slow
def test_two_ranks_keep_identical_banks_covering_both_ranks_samples(teacher, digits_shards, tmp_path):
    env = dict(
        os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""
    )  # CPU ranks (gloo) even on a GPU node
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "launch/accelerate/cpu.yaml"),
        "--main_process_port",
        "29631",
        str(REPO / "tests/scripts/crd_probe.py"),
        str(digits_shards),
        str(teacher),
        str(tmp_path / "run"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    p0, p1 = (json.loads((tmp_path / "run" / f"crd-probe-rank{r}.json").read_text()) for r in (0, 1))
    assert p0["world"] == p1["world"] == 2
    assert p0["banks"] == p1["banks"] and p0["z"] == p1["z"] and p0["weights"] == p1["weights"]
    ids0, ids1 = set(p0["ids"]), set(p1["ids"])
    assert ids0 and ids1 and not ids0 & ids1
    assert set(p0["moved"]) == set(p1["moved"]) == ids0 | ids1  # every rank's bank took every rank's rows
