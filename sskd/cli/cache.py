"""``sskd cache``."""

from __future__ import annotations


def _student_run(args):
    """The student run whose teacher outputs the cache holds, resolved once (``--epochs`` and
    ``--batch-size`` are the cache's own, not the student's)."""
    from sskd.cli.train import resolve_config
    from sskd.engine.prepare import prepare

    return prepare(
        resolve_config(args, "student", own=("epochs", "batch_size")), "student", teacher=args.teacher
    )


def cmd_cache(args) -> int:
    from sskd.cache.build import build_cache
    from sskd.core.errors import SSKDError, report_problems

    if not args.out and not args.dry_run:
        raise SSKDError("--out is required: the cache folder to write (or, with --verify, to check)")
    if args.verify:
        from sskd.cache import CacheReader

        problems = CacheReader(args.out, require_complete=False).verify(log_line=print)
        return report_problems(
            args.out,
            problems,
            f"{args.out}: every epoch holds every sample once and every chunk's checksum matches",
        )
    missing = [
        flag
        for flag, v in (("--teacher", args.teacher), ("--shards", args.shards), ("--epochs", args.epochs))
        if v is None
    ]
    if missing:
        raise SSKDError(f"the following arguments are required to build a cache: {', '.join(missing)}")
    if args.dry_run:
        from sskd.cache.build import dry_run

        if args.epochs < 1:
            raise SSKDError(f"--epochs must be >= 1, not {args.epochs}")
        dry_run(_student_run(args), args.epochs, topk=args.topk, split=args.split)
        return 0
    for flag in ("batch_size", "chunk_batches", "epochs"):
        if getattr(args, flag) < 1:
            raise SSKDError(f"--{flag.replace('_', '-')} must be >= 1, not {getattr(args, flag)}")
    build_cache(
        _student_run(args),
        args.out,
        args.epochs,
        topk=args.topk,
        split=args.split,
        batch_size=args.batch_size,
        chunk_batches=args.chunk_batches,
        resume=args.resume,
        progress=not args.no_progress,
    )
    print(f"wrote {args.out}/manifest.json")
    return 0


def register(sub, fmt) -> None:
    p = sub.add_parser(
        "cache",
        help="run the frozen teacher once over E epochs of views; store the outputs a student method uses",
        formatter_class=fmt,
        description="Runs the frozen teacher once over the exact views the training pipeline makes in epochs "
        "0..E-1 and stores, per (sample id, epoch, view), the outputs the student method consumes "
        "(sskd: logits and SS embeddings; hssakd: logits and every branch's class x rotation logits; "
        "kd: the normal view's logits), in fp16 or, with --topk, as the top K + log-sum-exp. "
        "`sskd distill --cache` then never runs the teacher; student epochs beyond E reuse "
        "augmentation epoch e mod E. The cache is bound to the method, teacher weights, shards, plan "
        "seed, views, image size, pipeline version and device type, and refused if any differs.",
        epilog="example:\n  sskd cache --teacher runs/t-ss --shards data/shards/digits --epochs 10 --out caches/t\n"
        "  sskd cache --dry-run --method hssakd --teacher runs/t-hs --shards data/shards/digits --epochs 10\n"
        "  sskd cache --verify --out caches/t\n"
        "  sskd distill --teacher runs/t-ss --cache caches/t --student resnet8 --method sskd "
        "--shards data/shards/digits --out runs/s\n"
        "  sskd cache --method hssakd --teacher runs/t-hs --shards data/shards/digits --epochs 10 --out caches/h\n"
        "  accelerate launch --config_file launch/accelerate/multi_gpu.yaml -m sskd cache ... --topk 10",
    )
    from sskd.methods import METHODS

    names = [n for n in METHODS["student"].names() if METHODS["student"].get(n).outputs]
    p.add_argument(
        "--method",
        choices=names,
        help="the student method whose teacher outputs to store (default: sskd; "
        "the same as the student run's --method)",
    )
    p.add_argument(
        "--teacher",
        help="the teacher run the student will use (for sskd a train-ss-head run); required to build",
    )
    p.add_argument("--shards", help="shard folder; required to build")
    p.add_argument("--epochs", type=int, help="augmentation epochs to cache (E); required to build")
    p.add_argument("--out", help="cache folder (not needed with --dry-run)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print what the cache would hold and weigh (per sample, per epoch, in all); write nothing",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="check an existing cache in --out: every sample once per epoch, every chunk's checksum",
    )
    p.add_argument(
        "--topk", type=int, help="store only the top-K logits per view (+ log-sum-exp): for 1000 classes"
    )
    p.add_argument("--split", default="train", help="split to cache")
    p.add_argument("--batch-size", type=int, default=256, help="images per process per teacher batch")
    p.add_argument(
        "--chunk-batches", type=int, default=20, help="batches per chunk file (the unit of resume)"
    )
    p.add_argument("--config", help="the run's YAML recipe (views, seed, size must match the student run)")
    p.add_argument("--seed", type=int, help="plan seed (must match the student run)")
    p.add_argument("--views", help="SS views (must match the student run)")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], help="where DALI makes the views")
    p.add_argument("--threads", type=int, help="DALI threads per process")
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], help="teacher autocast dtype")
    p.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="any config override"
    )
    p.add_argument(
        "--resume", action="store_true", help="finish an interrupted cache (complete chunks are kept)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_cache)
