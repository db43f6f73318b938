"""The teacher cache: exact against the live teacher, bound to what made it, resumable, rank-split."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sskd.cache import CacheReader, dense_from_topk
from sskd.cache.build import build_cache
from sskd.cli import main as sskd_main
from sskd.core.errors import SSKDError
from sskd.engine.config import load_config
from sskd.engine.prepare import prepare
from sskd.runs import read_metrics

REPO = Path(__file__).resolve().parents[1]
FAST = ["--no-progress", "--batch-size", "32", "--set", "data.eval_batch_size=128"]


def run(*args):
    return sskd_main([str(a) for a in args])


@pytest.fixture(scope="module")
def ss_teacher(digits_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_teacher")
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
            "--teacher",
            root / "t",
            "--shards",
            digits_shards,
            "--out",
            root / "ss",
            "--max-steps",
            2,
            *FAST,
        )
        == 0
    )
    return root / "ss"


def cfg_for(shards, *extra):
    return load_config(None, [f"data.shards={shards}", "run.progress=false", *extra])


def student_run(shards, teacher, *extra):
    """The SSKD student run (its spec) whose teacher outputs a cache holds."""
    return prepare(cfg_for(shards, *extra), "student", teacher=str(teacher))


@pytest.fixture(scope="module")
def cache(ss_teacher, digits_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "c"
    build_cache(
        student_run(digits_shards, ss_teacher),
        out,
        epochs=2,
        batch_size=128,
        chunk_batches=4,
        progress=False,
    )
    return out


def test_cached_terms_equal_live_terms(cache, ss_teacher, digits_shards):
    from pipelines import ViewLoader
    from sskd.methods import create_method
    from sskd.models import create_model
    from sskd.models.heads import SSModel
    from sskd.runs.models import load_run_model

    teacher, _ = load_run_model(ss_teacher)
    reader = CacheReader(cache)
    torch.manual_seed(0)
    student = SSModel(create_model("resnet8", 10))
    live = create_method("sskd", student=student, teacher=teacher).eval()
    cached = create_method("sskd", student=student, teacher=None).eval()
    loader = ViewLoader(digits_shards, "train", batch_size=50, views="rotation")
    for epoch in (1, 3):  # epoch 3 of the student reuses augmentation epoch 3 mod 2 = 1
        batch = next(iter(loader.epoch(epoch % 2)))
        with torch.no_grad():
            a = live(batch)
            c = cached({**batch, **reader.lookup(batch["id"], epoch)})
        for k in ("ce", "kd", "tf", "ss", "loss"):
            assert c[k].item() == pytest.approx(a[k].item(), rel=5e-3, abs=2e-4), k


def test_manifest_binds_the_cache(cache, ss_teacher, digits_shards):
    m = json.loads((cache / "manifest.json").read_text())
    assert m["complete"] and m["epochs"] == 2 and m["num_samples"] == 1437 and m["num_views"] == 4
    good = student_run(digits_shards, ss_teacher).cache_binding()
    CacheReader(cache, expected=good)  # accepted
    for field, value in [
        ("teacher_weights_sha256", "0" * 64),
        ("shards_manifest_sha256", "f" * 64),
        ("seed", 1),
        ("views", ["normal", "rot90"]),
        ("size", 64),
        ("pipeline_version", 0),
        ("device_type", "gpu"),
    ]:
        with pytest.raises(SSKDError, match=f"{field}="):
            CacheReader(cache, expected=dict(good, **{field: value}))


def test_distill_from_cache_refuses_other_seed_and_runs(cache, ss_teacher, digits_shards, tmp_path, capsys):
    common = [
        "distill",
        "--teacher",
        ss_teacher,
        "--cache",
        cache,
        "--student",
        "resnet8",
        "--method",
        "sskd",
        "--shards",
        digits_shards,
        *FAST,
    ]
    assert run(*common, "--out", tmp_path / "bad", "--seed", "5", "--max-steps", 1) == 2
    assert "seed=0" in capsys.readouterr().err
    assert run(*common, "--out", tmp_path / "s", "--max-steps", 3, "--set", "run.log_every=1") == 0
    info = json.loads((tmp_path / "s" / "model.json").read_text())
    assert info["cache"] == str(cache) and info["steps"] == 3
    # A live run with the same seed starts from the same student on the same batch: its first CE (which
    # no teacher output enters) is identical, whether or not a teacher model was built.
    i = common.index("--cache")
    live = common[:i] + common[i + 2 :]
    assert run(*live, "--out", tmp_path / "live", "--max-steps", 1, "--set", "run.log_every=1") == 0
    first = [next(r for r in read_metrics(tmp_path / d) if r["kind"] == "train") for d in ("s", "live")]
    assert first[0]["step"] == first[1]["step"] == 1 and first[0]["ce"] == first[1]["ce"]
    assert first[0]["kd"] == pytest.approx(first[1]["kd"], rel=5e-3)


@pytest.mark.slow
def test_cache_skip_bad_leaves_out_what_cannot_be_read_and_serves_a_skip_bad_student(
    cache, ss_teacher, digits_shards, tmp_path, capsys
):
    """`sskd cache` stopped at a corrupt sample telling the user to rerun with --skip-bad, a flag it did not
    have: a student distilled with --skip-bad could not get a cache at all."""
    from test_loader_faults import corrupt

    case = corrupt(Path(digits_shards), tmp_path / "bad", "magic", seed=0)
    out = tmp_path / "k"
    argv = ["cache", "--teacher", ss_teacher, "--shards", case["folder"], "--epochs", 2, "--out", out]
    argv += ["--batch-size", 128, "--chunk-batches", 4, "--no-progress"]
    assert run(*argv) == 2  # without the flag: the first bad sample stops it, named, nothing complete
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"sample {case['bad'][0]:09d}" in err and "--skip-bad" in err
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    assert run(*argv, "--resume", "--skip-bad") == 2  # started without it: refused, naming both
    bad = case["bad"][0]
    assert f"leaving out the samples none, this run leaves out {bad}" in capsys.readouterr().err
    import shutil

    shutil.rmtree(out)
    assert run(*argv, "--skip-bad") == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] and list(map(int, m["skipped"])) == case["bad"]
    assert m["num_samples"] == 1437 - len(case["bad"])
    # Every other sample holds what the intact shards' cache holds: views are keyed by sample id, not by
    # the batch a sample lands in (fp16 storage: the teacher's batches differ, so allow its rounding).
    reader, ref = CacheReader(out), CacheReader(cache)
    kept = torch.tensor([i for i in range(1437) if i not in case["bad"]])
    for epoch in (0, 1):
        a, b = reader.lookup(kept, epoch), ref.lookup(kept, epoch)
        assert all(torch.allclose(a[k], b[k], rtol=2e-3, atol=2e-3) for k in a)
    with pytest.raises(
        SSKDError, match=f"sample {case['bad'][0]} is not in the cache .left out as unreadable"
    ):
        reader.lookup(torch.tensor(case["bad"]), 1)
    assert reader.verify() == []
    student = ["distill", "--teacher", ss_teacher, "--cache", out, "--student", "resnet8", "--method", "sskd"]
    student += ["--shards", case["folder"], "--out", tmp_path / "s", "--max-steps", 2, *FAST]
    assert run(*student) == 2  # a student that would read the bad sample stops at it, as without a cache
    assert f"sample {case['bad'][0]:09d}" in capsys.readouterr().err
    assert run(*student, "--skip-bad", "--overwrite") == 0


@pytest.mark.parametrize("damage", ["truncated", "missing", "incomplete"])
def test_damaged_cache_is_an_error_naming_the_file(cache, tmp_path, damage):
    import shutil

    c = tmp_path / "c"
    shutil.copytree(cache, c)
    chunk = sorted((c / "epoch-0001").glob("*.safetensors"))[1]
    if damage == "truncated":
        chunk.write_bytes(chunk.read_bytes()[:-100])
        needle = f"{chunk}: truncated"
    elif damage == "missing":
        chunk.unlink()  # found when the cache is opened, whichever epoch is read first (issue 19)
        needle = "epoch-0001: the chunk of rank 000 for batches 4..7 of epoch 1 is missing"
    else:
        m = json.loads((c / "manifest.json").read_text())
        m["complete"] = False
        (c / "manifest.json").write_text(json.dumps(m))
        needle = "incomplete"
    with pytest.raises(SSKDError, match=needle):
        CacheReader(c).lookup(torch.arange(4), 1)


def test_interrupted_cache_resumes_to_the_same_files(ss_teacher, digits_shards, cache, tmp_path, monkeypatch):
    import sskd.cache.build as cb

    real, calls = cb.write_chunk, {"n": 0}

    def dying(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(cb, "write_chunk", dying)
    out = tmp_path / "c"
    with pytest.raises(KeyboardInterrupt):
        build_cache(
            student_run(digits_shards, ss_teacher),
            out,
            epochs=2,
            batch_size=128,
            chunk_batches=4,
            progress=False,
        )
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    with pytest.raises(SSKDError, match="incomplete"):
        CacheReader(out)
    monkeypatch.setattr(cb, "write_chunk", real)
    with pytest.raises(SSKDError, match="--resume"):
        build_cache(
            student_run(digits_shards, ss_teacher),
            out,
            epochs=2,
            batch_size=128,
            chunk_batches=4,
            progress=False,
        )
    build_cache(
        student_run(digits_shards, ss_teacher),
        out,
        epochs=2,
        batch_size=128,
        chunk_batches=4,
        resume=True,
        progress=False,
    )
    for f in sorted(cache.glob("epoch-*/*.safetensors")):
        assert (out / f.relative_to(cache)).read_bytes() == f.read_bytes(), f.name


def test_topk_reconstruction_keeps_top_probabilities_and_rest_mass():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 3, 50, generator=g) * 3
    top = logits.topk(5, dim=-1)
    dense = dense_from_topk(top.values.numpy(), top.indices.numpy(), torch.logsumexp(logits, -1).numpy(), 50)
    p, q = torch.softmax(logits, -1), torch.softmax(torch.from_numpy(dense), -1)
    assert torch.allclose(q.gather(-1, top.indices), p.gather(-1, top.indices), atol=1e-5)
    assert torch.allclose(q.sum(-1), torch.ones(6, 3), atol=1e-5)
    assert torch.allclose(q.argmax(-1), p.argmax(-1))


def test_topk_cache_round_trip(ss_teacher, digits_shards, tmp_path):
    out = tmp_path / "k"
    build_cache(student_run(digits_shards, ss_teacher), out, epochs=1, topk=3, batch_size=256, progress=False)
    reader = CacheReader(out)
    got = reader.lookup(torch.tensor([5, 1000, 7]), 0)
    assert got["t_logits"].shape == (3, 4, 10) and got["t_embed"].shape == (3, 4, 64)


@pytest.mark.slow
def test_two_process_cache_covers_every_sample_once(ss_teacher, digits_shards, tmp_path):
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
        "29588",
        "-m",
        "sskd",
        "cache",
        "--teacher",
        str(ss_teacher),
        "--shards",
        str(digits_shards),
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "c"),
        "--batch-size",
        "128",
        "--no-progress",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert m["world_size"] == 2 and m["complete"]
    from sskd.cache import map_chunk

    per_rank = {
        r: np.concatenate(
            [
                np.asarray(map_chunk(f)["ids"])
                for f in sorted((tmp_path / "c" / "epoch-0000").glob(f"r{r:03d}-*"))
            ]
        )
        for r in (0, 1)
    }
    assert per_rank[0].size and per_rank[1].size and not set(per_rank[0]) & set(per_rank[1])
    assert sorted(np.concatenate(list(per_rank.values())).tolist()) == list(range(1437))


def test_a_bit_flip_is_caught_when_the_chunk_is_first_read_and_by_verify(cache, tmp_path, capsys):
    """Chunks had no checksum: a flipped bit was never caught."""
    import shutil

    c = tmp_path / "c"
    shutil.copytree(cache, c)
    chunk = sorted((c / "epoch-0001").glob("*.safetensors"))[1]
    data = bytearray(chunk.read_bytes())
    data[-300] ^= 0x01
    chunk.write_bytes(bytes(data))
    from sskd.cache import map_chunk

    reader = CacheReader(c)  # headers and sizes are intact: it opens
    first = sorted((c / "epoch-0001").glob("*.safetensors"))[0]
    reader.lookup(torch.from_numpy(np.array(map_chunk(first)["ids"][:4])), 1)  # an intact chunk reads fine
    with pytest.raises(SSKDError, match=f"{chunk}: checksum mismatch"):
        reader.lookup(torch.from_numpy(np.array(map_chunk(chunk)["ids"][:4])), 1)
    assert run("cache", "--verify", "--out", c) == 1
    err = capsys.readouterr().err
    assert f"FAIL {chunk}: checksum mismatch" in err and "1 problem(s)" in err
    assert run("cache", "--verify", "--out", cache) == 0
    assert "every chunk's checksum matches" in capsys.readouterr().out


def test_a_damaged_chunk_of_a_later_epoch_fails_when_the_run_starts(cache, tmp_path):
    """Chunks were checked only when their epoch came up (hours in, on ImageNet)."""
    import shutil

    c = tmp_path / "c"
    shutil.copytree(cache, c)
    chunk = sorted((c / "epoch-0001").glob("*.safetensors"))[2]
    chunk.write_bytes(chunk.read_bytes()[:-50])
    with pytest.raises(SSKDError, match=f"{chunk}: truncated cache chunk"):
        CacheReader(c)


def test_sigterm_saves_the_batches_made_and_resume_finishes_identically(
    ss_teacher, digits_shards, cache, tmp_path, monkeypatch, capsys
):
    import signal

    import sskd.cache.build as cb

    real, calls = cb.write_chunk, {"n": 0}

    def write_then_signal(*a, **kw):
        real(*a, **kw)
        calls["n"] += 1
        if calls["n"] == 1:  # SLURM's time limit, right after the first chunk: the next batch is in flight
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(cb, "write_chunk", write_then_signal)
    out = tmp_path / "c"
    args = [
        "cache",
        "--teacher",
        ss_teacher,
        "--shards",
        digits_shards,
        "--epochs",
        2,
        "--out",
        out,
        "--batch-size",
        128,
        "--chunk-batches",
        4,
        "--no-progress",
    ]
    assert run(*args) == 128 + signal.SIGTERM
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("sskd: stopped by SIGTERM in epoch 0 after batch 4") and "--resume" in err
    # the batch in flight when the signal came was saved as its own chunk
    assert [p.name for p in sorted((out / "epoch-0000").glob("*.safetensors"))] == [
        "r000-b000000.safetensors",
        "r000-b000004.safetensors",
    ]
    monkeypatch.setattr(cb, "write_chunk", real)
    assert run(*args, "--resume") == 0
    reader, ref = CacheReader(out), CacheReader(cache)
    for epoch in (0, 1):
        ids = torch.arange(1437)
        a, b = reader.lookup(ids, epoch), ref.lookup(ids, epoch)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_cache_chunks_readable_by_the_group(cache):
    """safetensors wrote 0600 files whatever the umask: teammates could not read a shared cache."""
    import stat

    modes = {stat.S_IMODE(p.stat().st_mode) for p in cache.rglob("*.safetensors")}
    assert modes == {0o666 & ~_umask()}


def _umask():
    from sskd.core.atomic import _umask

    return _umask()


def test_dry_run_prints_the_size_and_writes_nothing(ss_teacher, digits_shards, tmp_path, capsys):
    assert run("cache", "--dry-run", "--teacher", ss_teacher, "--shards", digits_shards, "--epochs", 3) == 0
    out = capsys.readouterr().out
    # 8 (id) + 4 views x (10 logits + 64 embed) x 2 bytes = 600
    assert (
        "--method sskd: per sample and view logits 10, embed 64; 4 views: 600 bytes per sample per epoch"
        in out
    )
    assert "1,437 samples" in out and not list(tmp_path.iterdir())
    assert run("cache", "--teacher", ss_teacher, "--shards", digits_shards, "--epochs", 3) == 2
    assert "--out is required" in capsys.readouterr().err
