"""The GPU branches of the code, one test each (``-m gpu``; skipped without CUDA, see conftest.py).

Covered: DALI ``mixed`` (nvJPEG) decode and the views made on the GPU against the CPU views (32 px PNG:
the documented 0.05 in normalised units of tests/test_dali.py; 224-px-layout JPEG photos: against
the torchvision reference within the README's 8 of 255 levels); the loader handing CUDA tensors
(``device="gpu"``, and ``torch_device`` cuda with DALI on the CPU; the evaluation pipeline in float16);
``pipeline_device`` and ``make_accelerator`` on CUDA; fp16 with loss scaling and bf16 training steps
through ``sskd train-teacher --max-steps 2``; a cache built and read on the GPU (``sskd cache --device
gpu``, ``distill --cache``, the device-type binding); NCCL with one process (torch.distributed, and
Accelerate choosing it under a launcher's environment, with the loop's all-gather); ``sskd bench pipeline
--device gpu``, ``sskd bench train --device gpu`` (with ``--cache``) and ``sskd bench distill --device cuda``
in fp16 and bf16 (no DALI needed: synthetic views).

Tests that need DALI skip themselves when it is not installed, so the torch-only ones still run there
(``launch/gpu-check.sh`` relies on it): nothing here imports DALI at module level.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[1]
FAST = [
    "--no-progress",
    "--batch-size",
    "32",
    "--set",
    "run.log_every=1",
    "--set",
    "data.eval_batch_size=128",
]


def _dali():
    pytest.importorskip("nvidia.dali", reason="DALI is not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sskd(*args, env: dict | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    """``python -m sskd ARGS`` in a fresh process (its own CUDA context and Accelerate state)."""
    proc = subprocess.run(
        [sys.executable, "-m", "sskd", *map(str, args)],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _collect(loader, epoch=0):
    out = {}
    for b in loader.epoch(epoch):
        for i, sid in enumerate(b["id"].tolist()):
            out[sid] = b["views"][i].float().cpu()
    return out


def _decoded_images(folder, split="train"):
    """Every image of a split decoded by PIL, by sample id (as tests/test_dali.py reads them)."""
    import io

    import numpy as np
    import webdataset as wds
    from PIL import Image

    from shards.format import load_manifest

    m = load_manifest(folder)
    imgs = {}
    for s in wds.WebDataset(
        [str(folder / e["file"]) for e in m["splits"][split]["shards"]], shardshuffle=False
    ):
        ext = "png" if "png" in s else "jpg"
        arr = np.array(Image.open(io.BytesIO(s[ext])).convert("RGB"))
        imgs[int.from_bytes(s["sid"], "little")] = torch.from_numpy(arr).permute(2, 0, 1)
    return imgs, m


# -- DALI on the GPU: decode, views, the loader's tensors -----------------------------------------------


def test_gpu_views_match_cpu_views_every_view_kind(digits_shards):
    """The paper's four views plus the normal one, made by DALI on the GPU, equal the CPU's to 0.05
    (normalised units; the tolerance of tests/test_dali.py::test_gpu_pipeline_matches_cpu)."""
    _dali()
    from pipelines import ViewLoader

    for views in ("paper", "shared_rotation"):
        cpu = _collect(ViewLoader(digits_shards, "train", batch_size=64, views=views))
        gpu = _collect(ViewLoader(digits_shards, "train", batch_size=64, views=views, device="gpu"))
        assert cpu.keys() == gpu.keys()
        worst = max((cpu[k] - gpu[k]).abs().max().item() for k in cpu)
        assert worst < 0.05, (views, worst)


def test_mixed_decode_photo_views_close_to_the_reference(photo_shards):
    """ImageNet layout (JPEG through nvJPEG, GPU random-resized crops) at 224 px: every view within the
    README's mean error of 8 of 255 levels of the torchvision reference, as the CPU pipeline is."""
    _dali()
    from pipelines import ViewLoader
    from pipelines.reference import reference_views

    imgs, m = _decoded_images(photo_shards)
    loader = ViewLoader(photo_shards, "train", batch_size=8, views="paper", size=224, device="gpu")
    batch = next(iter(loader.epoch(0)))
    assert batch["views"].is_cuda and batch["views"].shape == (8, 5, 3, 224, 224)
    std = torch.tensor(m["std"]).view(1, 3, 1, 1)
    for i, sid in enumerate(batch["id"].tolist()):
        ref = reference_views(
            imgs[sid],
            sid,
            names=loader.view_names,
            seed=0,
            epoch=0,
            size=224,
            layout="imagenet",
            mean=m["mean"],
            std=m["std"],
        )
        err = ((batch["views"][i].float().cpu() - ref).abs() * 255 * std).mean(dim=(1, 2, 3))
        assert err.max() < 8, err.tolist()


def test_gpu_pipeline_decodes_like_the_cpu(photo_shards):
    """nvJPEG against libjpeg-turbo on the evaluation view (decode, resize, centre crop, normalise):
    the same image up to IDCT rounding and the resize kernels (mean error under 8 of 255 levels)."""
    _dali()
    from pipelines import ViewLoader
    from shards.format import load_manifest

    std = torch.tensor(load_manifest(photo_shards)["std"]).view(1, 3, 1, 1)
    cpu = _collect(ViewLoader(photo_shards, "val", batch_size=8, train=False))
    gpu = _collect(ViewLoader(photo_shards, "val", batch_size=8, train=False, device="gpu"))
    assert cpu.keys() == gpu.keys()
    for k in cpu:
        err = ((cpu[k] - gpu[k]).abs() * 255 * std).mean().item()
        assert err < 8, (k, err)


@pytest.mark.parametrize("dali_device, torch_device", [("gpu", None), ("gpu", "cuda"), ("cpu", "cuda")])
def test_loader_hands_cuda_tensors(digits_shards, dali_device, torch_device):
    """DALI on the GPU (its own buffers copied into CUDA tensors) or on the CPU with the training device
    as ``torch_device``: every tensor of the batch, views and labels alike, is on the GPU; the reused
    buffers of the training loop's mode hold the same values as copies."""
    _dali()
    from pipelines import ViewLoader

    kw = {"batch_size": 64, "views": "rotation", "device": dali_device, "torch_device": torch_device}
    fresh = ViewLoader(digits_shards, "train", **kw)
    reused = ViewLoader(digits_shards, "train", reuse_buffers=True, **kw)
    for a, b in zip(fresh.epoch(0), reused.epoch(0)):
        # with a torch_device every tensor goes there; without one, what DALI made on the GPU (the views)
        # is a CUDA tensor and what its reader made on the CPU (labels, ids) stays a CPU tensor
        for key in a if torch_device else ["views"]:
            assert a[key].is_cuda and b[key].is_cuda, key
        assert a["views"].dtype == torch.float32 and a["views"].shape[1:] == (4, 3, 32, 32)
        assert torch.equal(a["views"], b["views"]) and torch.equal(a["id"], b["id"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_eval_loader_in_half_precision(digits_shards, dtype):
    """The evaluation pipeline's float16 output (DALI FLOAT16 on the GPU) and bfloat16 (converted in
    torch): CUDA tensors, the float32 views rounded."""
    _dali()
    from pipelines import ViewLoader

    full = ViewLoader(digits_shards, "val", batch_size=128, train=False, device="gpu")
    half = ViewLoader(digits_shards, "val", batch_size=128, train=False, device="gpu", dtype=dtype)
    for a, b in zip(full.epoch(0), half.epoch(0)):
        assert b["views"].is_cuda and b["views"].dtype == dtype
        assert torch.allclose(a["views"], b["views"].float(), atol=0.03 if dtype == torch.bfloat16 else 4e-3)


# -- Accelerate on CUDA: devices, precision, the training loop ------------------------------------------


def test_pipeline_device_and_accelerator_pick_the_gpu():
    from sskd.engine.dist import make_accelerator, pipeline_device

    assert (
        pipeline_device("auto") == "gpu"
        and pipeline_device("gpu") == "gpu"
        and pipeline_device("cpu") == "cpu"
    )
    for mp in ("fp16", "bf16", "no"):
        acc = make_accelerator(mp)
        assert acc.device.type == "cuda" and acc.mixed_precision == mp
        assert (acc.scaler is not None) == (mp == "fp16")  # fp16: a GradScaler; bf16: autocast only


def test_fp16_step_scales_the_loss_and_bf16_autocasts():
    """One method step as train_step makes it, under fp16 (GradScaler: the scaled backward, an unscaled
    step) and bf16 autocast: finite loss, weights move, the forward ran in the half dtype."""
    from sskd.engine.dist import make_accelerator
    from sskd.methods import create_method
    from sskd.models import create_model

    for mp, half in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        acc = make_accelerator(mp)
        torch.manual_seed(0)
        method = create_method("ce", student=create_model("resnet8", 10))
        opt = torch.optim.SGD(method.parameters(), lr=0.1, momentum=0.9)
        method, opt = acc.prepare(method, opt)
        before = [p.detach().clone() for p in method.parameters()]
        seen = []  # Accelerate hands the outputs back in float32: look inside, at the first convolution
        conv = next(m for m in method.modules() if isinstance(m, torch.nn.Conv2d))
        hook = conv.register_forward_hook(lambda mod, inp, outp, seen=seen: seen.append(outp.dtype))
        batch = {
            "views": torch.randn(16, 1, 3, 32, 32, device=acc.device),
            "label": torch.randint(0, 10, (16,), device=acc.device),
        }
        out = method(batch)
        hook.remove()
        assert seen == [half], seen
        acc.backward(out["loss"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert torch.isfinite(out["loss"]).item()
        assert any(not torch.equal(a, b) for a, b in zip(before, method.parameters()))
        if mp == "fp16":
            assert (
                acc.scaler.get_scale() > 1
            )  # the loss was scaled (GradScaler's initial 65536, or after a skip)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_train_teacher_on_cuda_in_mixed_precision(digits_shards, tmp_path, precision):
    """``sskd train-teacher --max-steps 2 --mixed-precision fp16|bf16`` on CUDA, DALI on the GPU: finite
    logged losses, the model exported, fp16's loss scaler saved in the checkpoint (none for bf16)."""
    _dali()
    from sskd.runs import load_checkpoint, load_model_info, read_metrics

    out = tmp_path / "t"
    sskd(
        "train-teacher",
        "--shards",
        digits_shards,
        "--arch",
        "resnet8",
        "--out",
        out,
        "--max-steps",
        2,
        "--mixed-precision",
        precision,
        "--device",
        "gpu",
        *FAST,
    )
    train = [r for r in read_metrics(out) if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    assert load_model_info(out)["steps"] == 2 and "top1" in load_model_info(out)
    ckpt = load_checkpoint(out, "last")
    assert ckpt["config"]["run"]["mixed_precision"] == precision
    if precision == "fp16":
        assert ckpt["scaler"] is not None and ckpt["scaler"]["scale"] > 0
    else:
        assert ckpt["scaler"] is None


def test_cache_built_and_read_on_the_gpu(digits_shards, tmp_path):
    """A KD teacher trained on CUDA, its cache made with DALI on the GPU (bound to device type gpu),
    ``distill --cache`` on the GPU reading it; a CPU-views student run is refused (views are bit-identical
    only on one device type)."""
    _dali()
    from sskd.cache import CacheReader
    from sskd.runs import read_metrics

    teacher, cache, student = tmp_path / "t", tmp_path / "cache", tmp_path / "s"
    sskd(
        "train-teacher",
        "--shards",
        digits_shards,
        "--arch",
        "resnet8",
        "--out",
        teacher,
        "--max-steps",
        2,
        "--device",
        "gpu",
        *FAST,
    )
    sskd(
        "cache",
        "--method",
        "kd",
        "--teacher",
        teacher,
        "--shards",
        digits_shards,
        "--epochs",
        1,
        "--out",
        cache,
        "--device",
        "gpu",
        "--batch-size",
        128,
        "--no-progress",
    )
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["complete"] and manifest["binding"]["device_type"] == "gpu"
    assert CacheReader(cache, require_complete=True).verify() == []
    sskd(
        "distill",
        "--teacher",
        teacher,
        "--cache",
        cache,
        "--student",
        "resnet8",
        "--method",
        "kd",
        "--shards",
        digits_shards,
        "--out",
        student,
        "--max-steps",
        2,
        "--device",
        "gpu",
        *FAST,
    )
    assert [r["step"] for r in read_metrics(student) if r["kind"] == "train"] == [1, 2]
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "sskd",
            "distill",
            "--teacher",
            str(teacher),
            "--cache",
            str(cache),
            "--student",
            "resnet8",
            "--method",
            "kd",
            "--shards",
            str(digits_shards),
            "--out",
            str(tmp_path / "cpu"),
            "--max-steps",
            "1",
            "--device",
            "cpu",
            *FAST,
        ],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert refused.returncode == 2 and "device_type" in refused.stderr, refused.stderr[-2000:]


# -- NCCL with one process ------------------------------------------------------------------------------


NCCL_SCRIPT = textwrap.dedent("""
    import torch, torch.distributed as dist
    from types import SimpleNamespace
    dist.init_process_group("nccl", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1)
    torch.cuda.set_device(0)
    x = torch.arange(4, device="cuda", dtype=torch.float32)
    dist.all_reduce(x)
    assert dist.get_backend() == "nccl" and x.tolist() == [0.0, 1.0, 2.0, 3.0], x
    out = [torch.zeros(2, device="cuda")]
    dist.all_gather(out, torch.ones(2, device="cuda"))
    assert out[0].tolist() == [1.0, 1.0]
    dist.barrier()
    dist.destroy_process_group()
    print("nccl ok")
""")

ACCELERATE_SCRIPT = textwrap.dedent("""
    import torch, torch.distributed as dist
    from sskd.engine.dist import make_accelerator, make_gather, sync_buffers
    acc = make_accelerator("no")
    assert dist.is_initialized() and dist.get_backend() == "nccl", dist.is_initialized()
    assert acc.num_processes == 1 and acc.device.type == "cuda", (acc.num_processes, acc.device)
    v = acc.reduce(torch.tensor([1.0, 3.0], device=acc.device), "mean")
    assert v.tolist() == [1.0, 3.0]
    z = torch.randn(5, 8, device=acc.device, requires_grad=True)
    z_all, offset = make_gather(acc)(z)
    assert offset == 0 and torch.equal(z_all, z)
    z_all.sum().backward()  # the differentiable all-gather
    assert torch.equal(z.grad, torch.ones_like(z))
    sync_buffers(torch.nn.BatchNorm1d(8).cuda(), acc)
    print("accelerate nccl ok")
""")


def _one_rank_env(port: int) -> dict:
    return dict(
        os.environ,
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )


def test_nccl_one_process_all_reduce():
    if not torch.distributed.is_nccl_available():
        pytest.fail("this torch build has no NCCL")
    proc = subprocess.run(
        [sys.executable, "-c", NCCL_SCRIPT.format(port=_free_port())],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "nccl ok" in proc.stdout, proc.stderr[-3000:]


def test_accelerate_picks_nccl_under_a_launcher_environment():
    """With a launcher's variables (LOCAL_RANK set) Accelerate initialises NCCL; the loop's reduce and
    differentiable all-gather work on one rank."""
    proc = subprocess.run(
        [sys.executable, "-c", ACCELERATE_SCRIPT],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env=_one_rank_env(_free_port()),
    )
    assert proc.returncode == 0 and "accelerate nccl ok" in proc.stdout, proc.stderr[-3000:]


def test_training_under_torchrun_with_nccl(digits_shards, tmp_path):
    """The training loop as one NCCL rank (torchrun --nproc_per_node 1): DDP set-up, the rank-sharded
    loader with DALI on the GPU, the checkpoint's gathered reader states."""
    _dali()
    from sskd.runs import load_model_info

    out = tmp_path / "t"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "1",
            "--master_port",
            str(_free_port()),
            "-m",
            "sskd",
            "train-teacher",
            "--shards",
            str(digits_shards),
            "--arch",
            "resnet8",
            "--out",
            str(out),
            "--max-steps",
            "2",
            "--device",
            "gpu",
            *FAST,
        ],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_model_info(out)["steps"] == 2


# -- the benchmarks' GPU paths --------------------------------------------------------------------------


def test_bench_pipeline_on_the_gpu(digits_shards, tmp_path):
    """``sskd bench pipeline --device gpu``: decode-only and floor pipelines with ``mixed`` decode, the
    ViewLoader on the GPU, against torchvision; every variant measured."""
    _dali()
    from sskd.bench.pipeline import run_bench

    args = SimpleNamespace(
        shards=digits_shards,
        split="train",
        views="rotation",
        size=None,
        batch_size=64,
        threads=2,
        device="gpu",
        images=512,
        warmup=1,
        rounds=1,
        json=tmp_path / "b.json",
        no_progress=True,
        seed=0,
    )
    res = run_bench(args)
    for k in ("decode", "floor", "dali", "torchvision"):
        assert res[k]["images_per_s"] > 0
    assert json.loads((tmp_path / "b.json").read_text())["config"]["device"] == "gpu"


@pytest.mark.parametrize("cache", [False, True])
def test_bench_train_on_the_gpu(digits_shards, tmp_path, cache):
    """``sskd bench train --device gpu``: DALI on the GPU, steps on CUDA (synchronised), the cache
    variant's lookups moved to the GPU."""
    _dali()
    from sskd.bench.train import run_bench

    args = SimpleNamespace(
        shards=digits_shards,
        method="sskd",
        teacher_arch="resnet8",
        student_arch="resnet8",
        cache=cache,
        views="auto",
        size=None,
        batch_size=32,
        steps=2,
        warmup=1,
        log_every=1,
        device="gpu",
        threads=2,
        mixed_precision="no",
        json=tmp_path / "t.json",
    )
    res = run_bench(args)
    assert res["config"]["dali_device"] == "gpu" and res["machine"]["training_device"].startswith("cuda")
    assert res["ratio"] > 0 and res["loader_images_per_s"] > 0


def test_bench_distill_on_the_gpu_in_every_precision(digits_shards, tmp_path):
    """``sskd bench distill --device cuda --data synthetic --mixed-precision no,fp16,bf16`` (no DALI): the
    models and batches on CUDA, each precision timed, every result naming the GPU, precision and batch size;
    ``--device auto`` picks the GPU."""
    out = tmp_path / "d.json"
    common = [
        "--shards",
        digits_shards,
        "--teacher-arch",
        "resnet8",
        "--student-arch",
        "resnet8",
        "--data",
        "synthetic",
    ]
    sskd(
        "bench",
        "distill",
        *common,
        "--method",
        "kd,sskd",
        "--device",
        "cuda",
        "--mixed-precision",
        "no,fp16,bf16",
        "--batch-size",
        32,
        "--steps",
        2,
        "--warmup",
        1,
        "--json",
        out,
    )
    res = json.loads(out.read_text())
    got = [(r["method"], r["precision"]) for r in res["results"]]
    assert got == [(m, p) for m in ("kd", "sskd") for p in ("no", "fp16", "bf16")]
    for r in res["results"]:
        assert r["device"].startswith("cuda (") and r["batch_size"] == 32 and r["cached_images_per_s"] > 0
    sskd("bench", "distill", *common, "--method", "kd", "--steps", 1, "--warmup", 1, "--json", out)
    assert json.loads(out.read_text())["device"].startswith("cuda (")
