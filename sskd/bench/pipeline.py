"""``sskd bench pipeline``: decode, floor, DALI views and torchvision, measured side by side in one run.

- decode: DALI reads and decodes only.
- floor: DALI decodes and makes one crop (CIFAR layout) or crop-resize (ImageNet layout) per view — the
  geometry no view can avoid — and nothing else.
- dali: the full view pipeline through :class:`pipelines.ViewLoader` (torch tensors out).
- torchvision: the straightforward implementation (:class:`pipelines.reference.BaselineViews`: webdataset,
  ``torchvision.io.decode_image``, ``transforms.v2`` on uint8 tensors) in a DataLoader with as many
  workers as DALI has threads.
Warm-up batches are excluded (``--warmup`` per thread or worker, the same images for every variant:
a DataLoader worker's first batches are slower, its allocator still growing, and DataLoader workers
deliver batches in rounds, one from each); each variant runs alone, twice, in the order A B C D D C B A
(the mean of its two runs cancels a linear drift of the machine), over the same number of images. ``--rounds R``
repeats that R times and reports every round's ratios beside the means: the spread is the noise.
"""

from __future__ import annotations

import json
import os
import platform
import time

import torch

from pipelines.loader import DEFAULT_SIZE, ViewLoader
from pipelines.plan import ViewConfig
from shards.format import load_manifest, split_files
from sskd.core.atomic import write_json

TRIALS = 5  # runs of each resize kernel timing; the best counts


def _rate(gen, images: int, warmup: int) -> float:
    """images/s of an endless batch-size iterator over ``images`` images after ``warmup`` batches."""
    for _ in range(warmup):
        next(gen)
    t0, seen = time.perf_counter(), 0
    while seen < images:
        seen += next(gen)
    rate = seen / (time.perf_counter() - t0)
    gen.close()  # stop its pipeline / DataLoader workers before the next variant runs
    return rate


def _measure(makers: dict, images: int, warmup: int, rounds: int, progress: bool) -> dict[str, list[float]]:
    """Per round, each variant alone (background workers of one would load the others), in the order
    A B C D D C B A, each run measuring half the images; the mean of its two runs cancels a linear drift
    of the machine. Returns each variant's images/s per round."""
    from tqdm.auto import tqdm

    order = (list(makers) + list(reversed(makers))) * rounds
    runs: dict[str, list[float]] = {name: [] for name in makers}
    for name in tqdm(order, desc="bench", unit="run", disable=not progress, leave=False):
        runs[name].append(_rate(makers[name](), max(1, images // 2), warmup))
    return {name: [(r[i] + r[i + 1]) / 2 for i in range(0, len(r), 2)] for name, r in runs.items()}


def _dali_runs(kind: str, tars, idxs, manifest, names, size, batch_size, threads, device):
    """Endless batch sizes from a decode-only or floor DALI pipeline (pipe.run(), no torch copy)."""
    from nvidia.dali import fn, pipeline_def

    from pipelines import dali as D

    layout = manifest["layout"]

    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=None if device == "cpu" else 0)
    def pipe():
        enc, sid, _ = D._read(tars, idxs, shard_id=0, num_shards=1, shuffle=True, seed=1, initial_fill=256)
        img = D._decode(enc, device)
        if kind == "decode":
            return img
        prm = D.params_node(sid, fn.peek_image_shape(enc), seed=0, epoch=0, views=names, layout=layout)
        outs = [
            D.make_view(img, prm, name="normal" if n != "crop_resize" else n, view=v, size=size)
            for v, n in enumerate(names)
        ]
        return tuple(outs)

    p = pipe()
    p.build()
    while True:
        out = p.run()
        yield len(out[0])


def _dali_views(shards, split, views, size, batch_size, threads, device):
    loader = ViewLoader(
        shards,
        split,
        batch_size=batch_size,
        views=views,
        size=size,
        threads=threads,
        device=device,
        reuse_buffers=True,
    )  # as the training loop reads it
    epoch = 0
    while True:
        for b in loader.epoch(epoch):
            yield b["views"].shape[0]
        epoch += 1


def _decode(sample: dict) -> torch.Tensor:
    """A webdataset sample's image as torchvision decodes it: uint8 (3, H, W)."""
    from torchvision.io import ImageReadMode, decode_image

    data = sample.get("jpg", sample.get("png"))
    return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def _torchvision(tars, manifest, names, size, batch_size, workers):
    import webdataset as wds

    from pipelines.reference import BaselineViews

    transform = BaselineViews(
        names, size=size, layout=manifest["layout"], mean=manifest["mean"], std=manifest["std"]
    )

    def make(sample):
        return transform(_decode(sample)), int(sample["cls"])

    ds = wds.WebDataset(tars, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
    ds = ds.repeat().shuffle(256).map(make)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=batch_size, num_workers=workers, persistent_workers=workers > 0
    )
    for views, _ in loader:
        yield views.shape[0]


def _resize_kernels(tars, size: int, reps: int = 64) -> dict:
    """One thread each, the same uint8 window (the centre 80 % of the split's first image) resized to
    size x size with antialiasing: DALI's CPU ``fn.resize`` vs torchvision's ``resized_crop``. The
    resampling every view pays, kernel against kernel: it explains the floor. Each is the best of
    :data:`TRIALS` runs, DALI's taken alternately with and without the resize; at 32 px the resize is
    within the noise of that difference, which may then come out slightly negative."""
    import webdataset as wds
    from nvidia.dali import fn, pipeline_def, types
    from torchvision.transforms.v2 import functional as TF

    img = _decode(next(iter(wds.WebDataset(tars[:1], shardshuffle=False, empty_check=False))))
    h, w = img.shape[1:]
    y0, x0, wh, ww = h // 10, w // 10, h - 2 * (h // 10), w - 2 * (w // 10)
    TF.resized_crop(img, y0, x0, wh, ww, [size, size], antialias=True)
    tv = []
    for _ in range(TRIALS):
        t0 = time.perf_counter()
        for _ in range(reps):
            TF.resized_crop(img, y0, x0, wh, ww, [size, size], antialias=True)
        tv.append((time.perf_counter() - t0) / reps * 1e3)
    hwc = img.permute(1, 2, 0).contiguous().numpy()
    batch = 16

    @pipeline_def(
        batch_size=batch,
        num_threads=1,
        device_id=None,
        exec_async=False,
        exec_pipelined=False,
        prefetch_queue_depth=1,
    )
    def pipe(resize: bool):
        x = fn.external_source(source=lambda: [hwc] * batch, batch=True, layout="HWC")
        if resize:
            x = fn.resize(
                x,
                size=[size, size],
                roi_start=[y0, x0],
                roi_end=[y0 + wh, x0 + ww],
                roi_relative=False,
                interp_type=types.INTERP_LINEAR,
                antialias=True,
            )
        return x

    pipes = [pipe(resize) for resize in (False, True)]  # the resize alone: minus the same without it
    for p in pipes:
        p.build()
        p.run()
    runs = max(1, reps // batch)
    per_image: list[list[float]] = [[], []]
    for _ in range(TRIALS):  # alternating, best of each: a loaded machine only ever adds time
        for k, p in enumerate(pipes):
            t0 = time.perf_counter()
            for _ in range(runs):
                p.run()
            per_image[k].append((time.perf_counter() - t0) / (runs * batch) * 1e3)
    del pipes
    return {
        "window_hw": [int(wh), int(ww)],
        "size": size,
        "dali_ms": round(min(per_image[1]) - min(per_image[0]), 3),
        "torchvision_ms": round(min(tv), 3),
    }


def run_bench(args) -> dict:
    manifest = load_manifest(args.shards)
    tars, idxs = split_files(args.shards, manifest, args.split)
    views = ViewConfig.parse(args.views)
    size = args.size or DEFAULT_SIZE[manifest["layout"]]
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)  # the work is in DALI threads / DataLoader workers, as in training
    try:
        return _run_bench(args, manifest, tars, idxs, views, size)
    finally:
        torch.set_num_threads(threads_before)  # a caller in the same process (tests, notebooks) keeps its own


def _run_bench(args, manifest, tars, idxs, views, size) -> dict:
    makers = {
        "decode": lambda: _dali_runs(
            "decode", tars, idxs, manifest, views.names, size, args.batch_size, args.threads, args.device
        ),
        "floor": lambda: _dali_runs(
            "floor", tars, idxs, manifest, views.names, size, args.batch_size, args.threads, args.device
        ),
        "dali": lambda: _dali_views(
            args.shards, args.split, views, size, args.batch_size, args.threads, args.device
        ),
        "torchvision": lambda: _torchvision(tars, manifest, views.names, size, args.batch_size, args.threads),
    }
    warmup = args.warmup * max(1, args.threads)
    per_round = _measure(makers, args.images, warmup, args.rounds, progress=not args.no_progress)
    res: dict = {}
    for k, rates in per_round.items():
        res[k] = {"images_per_s": round(sum(rates) / len(rates), 1)}
        if k != "decode":
            res[k]["views_per_s"] = round(res[k]["images_per_s"] * views.num_views, 1)
    res["ratios"] = {
        "dali_vs_torchvision": round(res["dali"]["images_per_s"] / res["torchvision"]["images_per_s"], 2),
        "dali_vs_floor": round(res["dali"]["images_per_s"] / res["floor"]["images_per_s"], 2),
    }
    res["rounds"] = [
        {
            "images_per_s": {k: round(r[i], 1) for k, r in per_round.items()},
            "dali_vs_torchvision": round(per_round["dali"][i] / per_round["torchvision"][i], 2),
            "dali_vs_floor": round(per_round["dali"][i] / per_round["floor"][i], 2),
        }
        for i in range(args.rounds)
    ]
    res["resize_kernel"] = _resize_kernels(tars, size)
    res["config"] = {
        "shards": str(args.shards),
        "dataset": manifest["dataset"],
        "views": list(views.names),
        "size": size,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "device": args.device,
        "images": args.images,
        "warmup_batches": warmup,
        "rounds": args.rounds,
    }
    res["machine"] = {
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    print(format_table(res))
    if args.json:
        write_json(args.json, res)
        print(f"wrote {args.json}")
    return res


def format_table(res: dict) -> str:
    dali = res["dali"]["images_per_s"]
    lines = [
        f"views: {', '.join(res['config']['views'])} at {res['config']['size']} px, batch "
        f"{res['config']['batch_size']}, {res['config']['threads']} threads/workers, {res['config']['device']}",
        f"{'variant':<12} {'images/s':>10} {'views/s':>10} {'dali / this':>12}",
        "-" * 47,
    ]
    for k in ("decode", "floor", "dali", "torchvision"):
        r = res[k]
        views = f"{r['views_per_s']:>10.1f}" if "views_per_s" in r else f"{'':>10}"
        lines.append(f"{k:<12} {r['images_per_s']:>10.1f} {views} {dali / r['images_per_s']:>12.2f}")
    if len(res["rounds"]) > 1:
        for key in ("dali_vs_torchvision", "dali_vs_floor"):
            each = [r[key] for r in res["rounds"]]
            lines.append(
                f"{key} per round: {', '.join(f'{x:.2f}' for x in each)} (min {min(each):.2f}, "
                f"max {max(each):.2f})"
            )
    k = res["resize_kernel"]
    lines.append(
        f"one antialiased resize, {k['window_hw'][0]}x{k['window_hw'][1]} -> {k['size']}x{k['size']} uint8, one "
        f"thread: DALI {k['dali_ms']:.3f} ms, torchvision {k['torchvision_ms']:.3f} ms"
    )
    return "\n".join(lines) + "\n" + json.dumps(res["ratios"])
