"""``sskd views`` and ``sskd bench pipeline``."""

from __future__ import annotations

import argparse


def _ids(args, num_samples: int) -> list[int]:
    from sskd.core.errors import SSKDError

    if args.ids:
        try:
            return [int(x) for x in args.ids.split(",") if x.strip()]
        except ValueError as exc:
            raise SSKDError(f"--ids {args.ids!r}: expected comma-separated sample ids") from exc
    n = min(args.n, num_samples)
    return list(range(n))


def cmd_views(args) -> int:
    import numpy as np

    from pipelines.views import render_views, save_grid
    from shards.format import load_manifest
    from sskd.core.atomic import atomic_path, check_writable
    from sskd.core.errors import SSKDError

    for flag in ("n", "batch_size", "threads"):
        if getattr(args, flag) < 1:
            raise SSKDError(f"--{flag.replace('_', '-')} must be at least 1, not {getattr(args, flag)}")
    if args.epoch < 0:
        raise SSKDError(f"--epoch must be 0 or more, not {args.epoch}")
    if not (args.out or args.npz):
        raise SSKDError("nothing to write: give --out FILE.png and/or --npz FILE.npz")
    for flag, path in (("--out", args.out), ("--npz", args.npz)):
        if path:
            check_writable(path, flag)  # before the views are made, not after
    manifest = load_manifest(args.shards)
    if args.split not in manifest["splits"]:
        raise SSKDError(f"{args.shards}: no split {args.split!r}")
    ids = _ids(args, manifest["splits"][args.split]["num_samples"])
    got, labels, views, loader = render_views(
        args.shards,
        args.epoch,
        ids,
        views=args.views,
        seed=args.seed,
        size=args.size,
        batch_size=args.batch_size,
        threads=args.threads,
        split=args.split,
    )
    if args.out:
        save_grid(
            args.out,
            got,
            labels,
            views,
            loader.view_names,
            manifest["classes"],
            manifest["mean"],
            manifest["std"],
            args.epoch,
        )
        print(
            f"wrote {args.out}: {len(got)} samples x {views.shape[1]} views ({', '.join(loader.view_names)})"
        )
    if args.npz:
        with atomic_path(args.npz) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, ids=got, labels=labels, views=views, view_names=np.array(loader.view_names))
        print(f"wrote {args.npz}: ids {got.shape}, views {views.shape} float32")
    return 0


def cmd_bench(args) -> int:
    from sskd.bench.pipeline import run_bench
    from sskd.core.errors import SSKDError

    for flag in ("images", "rounds", "batch_size", "threads"):
        if getattr(args, flag) < 1:
            raise SSKDError(f"--{flag.replace('_', '-')} must be at least 1, not {getattr(args, flag)}")
    if args.warmup < 0:
        raise SSKDError(f"--warmup must be 0 or more, not {args.warmup}")
    run_bench(args)
    return 0


def _view_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--views", default="paper", help="SS views: paper | rotation | comma list of view names")
    p.add_argument("--seed", type=int, default=0, help="plan seed")
    p.add_argument("--size", type=int, help="output size (default from the manifest: 32 or 224)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch")
    p.add_argument(
        "--threads", type=int, default=2, help="DALI threads (and DataLoader workers in the bench)"
    )


def register(sub, fmt) -> None:
    p = sub.add_parser(
        "views",
        help="show the views of chosen samples (PNG grid) and save their tensors",
        formatter_class=fmt,
        description="Renders the exact training views of the chosen samples in one epoch: a row "
        "per sample, a column per view. The tensors are identical to those the "
        "samples get inside a full training epoch (views are keyed by sample id).",
        epilog="example:\n  sskd views --shards data/shards/digits --epoch 0 --n 6 --out views.png "
        "--npz views.npz\n  sskd views --shards data/shards/digits --epoch 3 --ids 3,17,42 "
        "--views rotation --out rot.png",
    )
    p.add_argument("--shards", required=True, help="shard folder")
    p.add_argument("--epoch", type=int, default=0, help="epoch whose views to show")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--ids", help="comma-separated sample ids")
    who.add_argument("--n", type=int, default=8, help="the first N sample ids")
    p.add_argument("--split", default="train", help="split the ids belong to")
    p.add_argument("--out", help="PNG grid to write")
    p.add_argument("--npz", help="write ids (N,), labels (N,) and views (N, V, 3, H, W) float32 here")
    _view_args(p)
    p.set_defaults(func=cmd_views)


def register_bench(bench_sub, fmt) -> None:
    p = bench_sub.add_parser(
        "pipeline",
        help="throughput: decode, floor, DALI views, torchvision",
        formatter_class=fmt,
        description="Measures in one run, warm-up excluded: (a) decode only, (b) the floor = decode + one "
        "crop-resize per view, (c) the full DALI view pipeline, (d) a straightforward torchvision "
        "implementation of the same views through a DataLoader with as many workers as DALI "
        "threads. Prints images/s and ratios.",
        epilog="example:\n  sskd bench pipeline --shards data/shards/digits --json bench.json\n"
        "  sskd bench pipeline --shards data/shards/photos --batch-size 32 --images 2048 --rounds 3",
    )
    p.add_argument("--shards", required=True, help="shard folder")
    p.add_argument("--split", default="train", help="split to read")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="DALI device")
    p.add_argument("--images", type=int, default=2048, help="images measured per variant (after warm-up)")
    p.add_argument(
        "--warmup",
        type=int,
        default=4,
        help="warm-up batches per DALI thread / DataLoader worker, not measured (the same for every variant)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat the whole A B C D D C B A measurement; prints every round's ratios (the noise)",
    )
    p.add_argument("--json", help="write the results here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _view_args(p)
    p.set_defaults(func=cmd_bench)
