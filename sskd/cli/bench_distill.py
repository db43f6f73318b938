"""``sskd bench distill``."""

from __future__ import annotations


def cmd_bench(args) -> int:
    from sskd.bench.distill import run_bench

    run_bench(args)
    return 0


def register_bench(bench_sub, fmt) -> None:
    p = bench_sub.add_parser(
        "distill",
        help="step time: CE-only student, a method with its live teacher and from the cache",
        formatter_class=fmt,
        description="Measures in one run, on the same batches of views (made beforehand and held on the "
        "training device, warm-up excluded, the three variants taking turns on every batch), the training "
        "step time and images/s of the method's student model alone with CE only, the method with the live "
        "teacher and the method from a teacher cache, and prints the ratios. Models are freshly "
        "initialised: the step cost does not depend on the weights. Every figure names its device, "
        "precision and batch size.",
        epilog="example:\n  sskd bench distill --shards data/shards/digits --teacher-arch resnet32x4 "
        "--student-arch resnet8x4 --json distill.json\n"
        "  sskd bench distill --method hssakd --shards data/shards/digits --teacher-arch resnet32x4 "
        "--student-arch resnet8x4 --json hssakd.json\n"
        "  sskd bench distill --method all --device cuda --mixed-precision no,fp16,bf16 --data synthetic "
        "--shards data/shards/digits --teacher-arch resnet32x4 --student-arch resnet8x4 --json families.json",
    )
    p.add_argument(
        "--shards",
        required=True,
        help="shard folder (classes, sample count, labels; with --data loader the images too)",
    )
    p.add_argument("--teacher-arch", required=True, help="teacher architecture")
    p.add_argument("--student-arch", required=True, help="student architecture")
    p.add_argument(
        "--method",
        default="sskd",
        help="the method to time (any with teacher outputs), a comma list, or all: one of each family "
        "(sskd, hssakd, kd, dkd, crd, fitnet)",
    )
    p.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cuda", "cpu"),
        help="where the models train (auto: CUDA when a device is visible)",
    )
    p.add_argument(
        "--mixed-precision",
        default="no",
        help="no, fp16 (CUDA only, with loss scaling), bf16, or a comma list (each is timed)",
    )
    p.add_argument(
        "--data",
        default="loader",
        choices=("loader", "synthetic"),
        help="loader: views made by the DALI ViewLoader from the shards; synthetic: random views of the "
        "same shape (no DALI needed; the step cost does not depend on the pixels)",
    )
    p.add_argument("--views", default="auto", help="SS views (auto: the method's own)")
    p.add_argument("--size", type=int, help="view size in pixels (default: the shards' own, 32 or 224)")
    p.add_argument("--batch-size", type=int, default=64, help="images per step")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    p.add_argument("--json", help="write the results here")
    p.set_defaults(func=cmd_bench)
