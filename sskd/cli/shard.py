"""``sskd shard imagefolder | cifar100 | digits | verify``."""

from __future__ import annotations

import json
from pathlib import Path

EXAMPLES = {
    "imagefolder": "sskd shard imagefolder /data/imagenet data/shards/imagenet --workers 32\n"
    "  sskd shard imagefolder /data/imagenet data/shards/imagenet --val-labels LOC_val_labels.txt",
    "cifar100": "sskd shard cifar100 data/cifar-100-python data/shards/c100",
    "digits": "sskd shard digits data/shards/digits",
    "photos": "sskd shard photos data/shards/photos --per-class 128",
    "verify": "sskd shard verify data/shards/digits",
    "reindex": "sskd shard reindex data/shards/imagenet",
}


def _opts(args):
    import math

    from shards.writer import ShardOptions
    from sskd.core.errors import SSKDError

    if not math.isfinite(args.max_size) or args.max_size <= 0:
        raise SSKDError(f"--max-size must be a positive number of MB, not {args.max_size}")
    return ShardOptions(
        seed=args.seed,
        max_count=args.max_count,
        max_size=max(1, int(args.max_size * 1e6)),
        workers=args.workers,
        skip_bad=args.skip_bad,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )


def _source(args):
    from shards import sources

    if args.source == "imagefolder":
        return sources.FolderSource(args.src, args.val_labels, skip_bad=args.skip_bad)
    if args.source == "cifar100":
        return sources.cifar100_source(args.src)
    if args.source == "photos":
        import tempfile

        tmp = tempfile.mkdtemp(prefix="sskd-photos-")
        args.cleanup = tmp  # removed by cmd_write when done
        tree = sources.sample_photo_tree(
            Path(tmp) / "src",
            classes=args.classes,
            per_class=args.per_class,
            val_per_class=max(1, args.per_class // 4),
            seed=args.seed,
        )
        src = sources.FolderSource(tree)
        src.dataset = "photos"
        return src
    return sources.digits_source(seed=args.seed, val_fraction=args.val_fraction)


def cmd_write(args) -> int:
    import shutil

    try:
        return _cmd_write(args)
    finally:
        if getattr(args, "cleanup", None):
            shutil.rmtree(args.cleanup, ignore_errors=True)


def _cmd_write(args) -> int:
    from shards.format import MANIFEST
    from shards.writer import write_shards

    if args.resume and args.overwrite:  # before any source is read
        from sskd.core.errors import SSKDError

        raise SSKDError(
            "--resume and --overwrite exclude each other: --resume continues (or checks) the shards in "
            f"{args.out}, --overwrite replaces them"
        )
    source = _source(args)
    if args.dry_run:
        report = {"dataset": source.dataset, "classes": len(source.classes), "splits": {}}
        for name, split in source.splits.items():
            per_class = [0] * len(source.classes)
            for label in split.labels:
                per_class[label] += 1
            est = source.estimated_bytes(name)
            shards = max(-(-len(split.labels) // args.max_count), -(-est // int(args.max_size * 1e6)))
            report["splits"][name] = {
                "num_samples": len(split.labels),
                "estimated_bytes": est,
                "estimated_shards": shards,
                "min_per_class": min(per_class),
                "max_per_class": max(per_class),
                "skipped_while_listing": split.skipped,
            }
        print(json.dumps(report, indent=2))
        return 0
    opts = _opts(args)
    complete = (
        args.resume and (Path(args.out) / MANIFEST).is_file()
    )  # finished before: checked, not rewritten
    manifest = write_shards(source, args.out, opts)
    if complete:
        n = sum(len(info["shards"]) for info in manifest["splits"].values())
        print(
            f"{args.out}: already complete ({n} shards made from this source with these settings); nothing to do"
        )
        return 0
    for split, info in manifest["splits"].items():
        print(
            f"{split}: {info['num_samples']} samples in {len(info['shards'])} shards, "
            f"{len(info['skipped'])} skipped"
        )
    print(f"wrote {args.out}/manifest.json")
    return 0


def cmd_verify(args) -> int:
    from shards.verify import verify
    from sskd.core.errors import report_problems

    problems = verify(args.out, dali=not args.no_dali, log=print if args.verbose_list else (lambda *_: None))
    return report_problems(
        args.out,
        problems,
        f"{args.out}: every shard matches the manifest (webdataset{' and DALI' if not args.no_dali else ''})",
    )


def cmd_reindex(args) -> int:
    from shards.index import reindex

    done = reindex(args.out, log_line=print if args.verbose_list else (lambda *_: None))
    rebuilt = [name for name, status in done.items() if status != "ok"]
    print(
        f"{args.out}: {len(done)} indexes checked against their tars, {len(rebuilt)} rebuilt"
        + (f" ({', '.join(rebuilt[:5])}{' ...' if len(rebuilt) > 5 else ''})" if rebuilt else "")
    )
    return 0


def register(sub, fmt) -> None:
    shard = sub.add_parser(
        "shard",
        help="write webdataset shards (+ DALI indexes) from a dataset; verify them",
        formatter_class=fmt,
        description="Turn an image dataset into webdataset tar shards with DALI index files and a manifest. "
        "Output is deterministic (same input and --seed give byte-identical shards whatever "
        "--workers), written under temporary names, and resumable with --resume.",
        epilog="examples:\n  " + "\n  ".join(EXAMPLES.values()),
    )
    sources = shard.add_subparsers(dest="source", metavar="SOURCE")
    helps = {
        "imagefolder": "ImageNet layout: SRC/train/<wnid>/*.JPEG and SRC/val/<wnid>/* (or flat + --val-labels)",
        "cifar100": "the official cifar-100-python folder (train, test, meta pickles); test -> val",
        "digits": "scikit-learn's 1,797 bundled handwritten digits as 32x32 RGB (no download)",
        "photos": "ImageNet-layout JPEGs (~500x375, q90) cut from scikit-learn's two real sample photos, "
        "for profiling the ImageNet path without ImageNet",
    }
    for name, text in helps.items():
        p = sources.add_parser(
            name, help=text, description=text, formatter_class=fmt, epilog="example:\n  " + EXAMPLES[name]
        )
        if name not in ("digits", "photos"):
            p.add_argument("src", help="source folder")
        p.add_argument("out", help="output folder (must be empty or absent, unless --resume or --overwrite)")
        if name == "imagefolder":
            p.add_argument(
                "--val-labels", help="for a flat SRC/val/: one class index per line, sorted file order"
            )
        if name == "digits":
            p.add_argument("--val-fraction", type=float, default=0.2, help="share of images held out as val")
        if name == "photos":
            p.add_argument("--classes", type=int, default=8, help="number of (arbitrary) classes")
            p.add_argument(
                "--per-class", type=int, default=64, help="train images per class (val: a quarter)"
            )
        big = name in ("imagefolder", "photos")
        p.add_argument(
            "--max-count", type=int, default=10_000 if big else 512, help="samples per shard at most"
        )
        p.add_argument(
            "--max-size", type=float, default=1000.0 if big else 100.0, help="MB per shard at most"
        )
        p.add_argument("--workers", type=int, default=1, help="processes encoding/validating images")
        p.add_argument("--seed", type=int, default=0, help="seed of the sample order (and the digits split)")
        p.add_argument(
            "--skip-bad",
            action="store_true",
            help="skip corrupt/unreadable images and empty classes (listed in the manifest) "
            "instead of stopping",
        )
        p.add_argument(
            "--resume",
            action="store_true",
            help="continue an interrupted run in OUT (same source and settings); on a finished OUT, "
            "check it was made from this source with these settings and change nothing",
        )
        p.add_argument(
            "--overwrite",
            action="store_true",
            help="replace the shards in OUT (finished or not); the earlier ones are set aside once "
            "every check has passed, put back if the new run fails, deleted when it finishes",
        )
        p.add_argument(
            "--dry-run", action="store_true", help="count samples per split and class; write nothing"
        )
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.set_defaults(func=cmd_write)
    p = sources.add_parser(
        "verify",
        help="re-read shards with webdataset and DALI; check against the manifest",
        formatter_class=fmt,
        epilog="example:\n  " + EXAMPLES["verify"],
        description="Checks sample counts, ids (0..N-1 once each), labels (cls == lbl) and "
        "sha256 of every shard, reading each with webdataset and with DALI's CPU "
        "reader through its index. Exit status 1 on any mismatch.",
    )
    p.add_argument("out", help="shard folder")
    p.add_argument("--no-dali", action="store_true", help="skip the DALI read (webdataset only)")
    p.add_argument("--list", dest="verbose_list", action="store_true", help="print every shard checked")
    p.set_defaults(func=cmd_verify)
    p = sources.add_parser(
        "reindex",
        help="rebuild missing or stale DALI index files from the tars (no re-sharding)",
        formatter_class=fmt,
        epilog="example:\n  " + EXAMPLES["reindex"],
        description="Reads every tar of the folder, builds its DALI index from the tar's own "
        "headers and rewrites the index file where it is missing or differs. The "
        "tars are not touched; a tar whose sample count differs from the "
        "manifest is an error (re-shard it).",
    )
    p.add_argument("out", help="shard folder")
    p.add_argument("--list", dest="verbose_list", action="store_true", help="print every index checked")
    p.set_defaults(func=cmd_reindex)
    shard.set_defaults(func=lambda a: shard.print_help() or 2)
