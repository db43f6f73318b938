"""``sskd cache``."""

from __future__ import annotations


def _student_run(args):
    """The student run whose teacher outputs the cache holds, resolved once (``--epochs`` and
    ``--batch-size`` are the cache's own, not the student's)."""
    from sskd.cli.train import allow_download, resolve_config
    from sskd.engine.prepare import prepare

    allow_download(args)
    return prepare(
        resolve_config(args, "student", own=("epochs", "batch_size")),
        "student",
        teacher=args.teacher,
        teacher_weights=args.teacher_weights,
    )


def _storage_flags(args) -> dict:
    """The storage-level flags, the checks that need no shapes done here (before the run is prepared)."""
    from sskd.cache.levels import MIN_DIM, check_request
    from sskd.core.errors import SSKDError

    if args.embed_dim is not None and args.embed_dim < MIN_DIM:
        raise SSKDError(f"--embed-dim {args.embed_dim}: must be at least {MIN_DIM}")
    if args.topk is not None and args.topk < 1:
        raise SSKDError(f"--topk {args.topk}: must be at least 1")
    # --exact with --budget, a budget below 1, --level with any other storage flag
    others = {"topk": args.topk, "embed": args.embed, "embed_dim": args.embed_dim} if args.level else {}
    check_request([], exact=args.exact, budget=args.budget, level=args.level, **others)
    return {
        "exact": args.exact,
        "embed": args.embed,
        "embed_dim": args.embed_dim,
        "budget": args.budget,
        "level": args.level,
    }


def _epochs(args, spec) -> int:
    """``--epochs``, or the student run's own epochs (``student.epochs`` from --config/--set): a cache of
    every epoch the student trains."""
    from sskd.core.errors import SSKDError

    epochs = args.epochs if args.epochs is not None else int(spec.st.epochs)
    if epochs < 1:
        raise SSKDError(f"--epochs must be >= 1, not {epochs}")
    return epochs


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
    missing = [flag for flag, v in (("--teacher", args.teacher), ("--shards", args.shards)) if v is None]
    if missing:
        raise SSKDError(f"the following arguments are required to build a cache: {', '.join(missing)}")
    if args.dry_run:
        from sskd.cache.build import dry_run

        flags = _storage_flags(args)
        spec = _student_run(args)
        dry_run(spec, _epochs(args, spec), topk=args.topk, split=args.split, **flags)
        return 0
    for flag in ("batch_size", "chunk_batches"):
        if getattr(args, flag) < 1:
            raise SSKDError(f"--{flag.replace('_', '-')} must be >= 1, not {getattr(args, flag)}")
    if args.epochs is not None and args.epochs < 1:
        raise SSKDError(f"--epochs must be >= 1, not {args.epochs}")
    flags = _storage_flags(args)
    spec = _student_run(args)
    build_cache(
        spec,
        args.out,
        _epochs(args, spec),
        topk=args.topk,
        split=args.split,
        batch_size=args.batch_size,
        chunk_batches=args.chunk_batches,
        resume=args.resume,
        progress=not args.no_progress,
        **flags,
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
        "kd: the normal view's logits) at a storage level: fp16 (--exact), 8-bit codes of class scores "
        "(q8), the top K logits + log-sum-exp (--topk), the top K over an int8 code of the whole row "
        "(--level logits:top10-d64: a centred PCA fitted on the first 4,096 rows), int8 unit-normalised embeddings (--embed int8) projected to D dims "
        "(--embed-dim), or the most faithful level within --budget bytes per image-epoch; by default the "
        "compact level for >= 100 classes and >= 128-dim embeddings, fp16 below. --dry-run prints every "
        "level's size for this run and for the ImageNet recipe. "
        "`sskd distill --cache` then never runs the teacher; student epochs beyond E reuse "
        "augmentation epoch e mod E. The cache is bound to the method, teacher weights, shards, plan "
        "seed, views, image size, pipeline version and device type, and refused if any differs.",
        epilog="example:\n  sskd cache --teacher runs/t-ss --shards data/shards/digits --epochs 10 --out caches/t\n"
        "  sskd cache --dry-run --method hssakd --teacher runs/t-hs --shards data/shards/digits --epochs 10\n"
        "  sskd cache --verify --out caches/t\n"
        "  sskd cache --teacher runs/t-ss --shards data/shards/digits --epochs 10 --skip-bad --out caches/t\n"
        "  sskd distill --teacher runs/t-ss --cache caches/t --student resnet8 --method sskd "
        "--shards data/shards/digits --out runs/s\n"
        "  sskd cache --method hssakd --teacher runs/t-hs --shards data/shards/digits --epochs 10 --out caches/h\n"
        "  sskd cache --dry-run --teacher runs/t-ss --shards data/shards/digits --epochs 10 --budget 1024\n"
        "  sskd cache --teacher runs/t-ss --shards data/shards/digits --epochs 10 --embed int8 --embed-dim 32 --out caches/c\n"
        "  sskd cache --teacher runs/p8-ss --shards data/shards/pairs --epochs 10 --level logits:top10-d32 --out caches/p\n"
        "  sskd cache --teacher runs/t-ss --shards data/shards/digits --level compact --set student.epochs=10 --out caches/k\n"
        "  accelerate launch --config_file launch/accelerate/multi_gpu.yaml -m sskd cache ... --budget 1024",
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
        help="the teacher run the student will use (for sskd a train-ss-head run; for the logit methods also "
        "timm:NAME.TAG or torchvision:NAME, or ARCH with --teacher-weights); required to build",
    )
    from sskd.cli.train import add_weight_flags

    add_weight_flags(p, own=None, teacher=True)
    p.add_argument("--shards", help="shard folder; required to build")
    p.add_argument(
        "--epochs",
        type=int,
        help="augmentation epochs to cache (E; default: the student run's student.epochs, from --config "
        "or --set)",
    )
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
        "--topk",
        type=int,
        help="store only the top-K logits per view (values fp16, classes int16, + the log-sum-exp at the "
        "temperature the method reads them at, so the other classes' mass is exact there); top-50 of 1000 "
        "is reported to cost nothing, top-10 to cost points",
    )
    p.add_argument(
        "--embed",
        choices=["fp16", "int8"],
        help="how to store embeddings read only through cosines (SSKD's contrastive SS embeddings): "
        "int8 unit rows with a per-row fp16 scale (about half of fp16's bytes)",
    )
    p.add_argument(
        "--embed-dim",
        type=int,
        metavar="D",
        help="project those embeddings to D dims (uncentred PCA fitted on the first 4,096 rows, stored in "
        "the cache, scored on the 1,024 after them: a warning if similarities read back more than 0.03 off); "
        "int8 unless --embed fp16",
    )
    p.add_argument(
        "--budget",
        type=int,
        metavar="BYTES",
        help="bytes per image and epoch: store the most faithful level that fits, and say which",
    )
    p.add_argument(
        "--exact", action="store_true", help="every output in fp16 (format 3's storage; no compact default)"
    )
    p.add_argument(
        "--level",
        metavar="LEVEL",
        help="every output's storage by name: exact, compact (the compact level whatever the class count) "
        "or a level as --dry-run lists them, e.g. logits:top10-d64+embed:int8-d128 (outputs left out: fp16); "
        "what `distill --cache-level` and a sweep setting's `cache:` name. A code under a top K (-dD) is "
        "fitted on the first 4,096 rows and scored on the 1,024 after them: a warning if the read rows' "
        "probabilities are more than 1 %% off (then try a larger D)",
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
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave out samples that fail their checksum, id or label check (listed once, and in the "
        "manifest's `skipped`) instead of stopping at the first: what a student with --skip-bad reads "
        "(data.skip_bad)",
    )
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], help="teacher autocast dtype")
    p.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="any config override"
    )
    p.add_argument(
        "--resume", action="store_true", help="finish an interrupted cache (complete chunks are kept)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_cache)


def cmd_bench_cache(args) -> int:
    from sskd.bench.cache import run_bench

    run_bench(args)
    return 0


def register_bench(bench_sub, fmt) -> None:
    p = bench_sub.add_parser(
        "cache",
        help="fidelity and read speed of every cache storage level against the exact teacher",
        formatter_class=fmt,
        description="Runs the teacher on real batches of the training views and, for every storage level "
        "the method allows, compares against the exact fp32 outputs: the relative error of each loss "
        "term the method computes with a fixed student (per batch, the largest) and of the gradient of its "
        "loss with respect to that student's parameters, the largest error of "
        "the teacher's similarity entries, the agreement of SSKD's selective-transfer row mask, the top-1 "
        "agreement of the stored logits, and the read rate of a chunk (memory-mapped, decoded to "
        "tensors, one thread) beside the pipeline's decode rate for the same samples (one thread).",
        epilog="example:\n  sskd bench cache --teacher runs/t-ss --shards data/shards/digits --json cache.json\n"
        "  sskd bench cache --method hssakd --teacher runs/t-hs --shards data/shards/digits\n"
        "  sskd bench cache --teacher runs/p8-ss --shards data/shards/pairs --level logits:top10-d32+embed:int8\n"
        "  sskd bench cache --teacher runs/t3-ss --shards data/shards/triples --only --level compact "
        "--level logits:top10-d32+embed:int8",
    )
    p.add_argument("--teacher", required=True, help="the teacher run (for sskd a train-ss-head run)")
    p.add_argument("--shards", required=True, help="shard folder")
    from sskd.methods import METHODS

    names = [n for n in METHODS["student"].names() if METHODS["student"].get(n).outputs]
    p.add_argument(
        "--method", choices=names, default="sskd", help="the student method whose terms to compare"
    )
    p.add_argument("--student-arch", help="the fixed student (fresh, seed 0; default: the config's)")
    p.add_argument(
        "--batch-size", type=int, default=64, help="images per batch (the similarity matrix's size)"
    )
    p.add_argument("--batches", type=int, default=8, help="batches of epoch 0 to compare on")
    p.add_argument("--config", help="the run's YAML recipe")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override")
    p.add_argument(
        "--level",
        action="append",
        default=[],
        metavar="NAME",
        help="also measure this level (a name as `sskd cache --dry-run` lists them, or compact); repeatable",
    )
    p.add_argument(
        "--only",
        action="store_true",
        help="measure only the --level levels (and exact, the reference, and the default), not every level "
        "on the front (on two cores a 1,000-class teacher's front, 21 levels, took 32 min; 5 levels, 8)",
    )
    p.add_argument("--json", help="write the results here")
    p.set_defaults(func=cmd_bench_cache)
