"""``sskd bench train``: the command line of :mod:`sskd.bench.train`."""

from __future__ import annotations


def register_bench(bench_sub, fmt) -> None:
    p = bench_sub.add_parser(
        "train",
        help="images/s of training steps fed by the DALI loader vs on pre-loaded batches",
        formatter_class=fmt,
        description="Measures in one run the images/s of the training loop's own steps (sskd.engine.loop.train_step, "
        "its optimizer, lr schedule and metrics line) fed by the DALI ViewLoader with the "
        "method's views, against the same steps on the same batches loaded into memory "
        "beforehand (the compute bound); prints the ratio and where the loader-fed time goes "
        "(waiting for data, the step, logging). Runs in the order loader, preloaded, preloaded, "
        "loader, each after --warmup untimed steps. Models are freshly initialised.",
        epilog="example:\n  sskd bench train --shards data/shards/digits --method sskd --teacher-arch resnet32x4 "
        "--student-arch resnet8x4 --json train.json\n"
        "  sskd bench train --shards data/shards/photos --method kd --teacher-arch torchvision:resnet34 "
        "--student-arch torchvision:resnet18 --cache --device gpu --batch-size 128 --json train-gpu.json",
    )
    from sskd.methods import METHODS

    p.add_argument("--shards", required=True, help="shard folder")
    p.add_argument(
        "--method", choices=METHODS["student"].names(), default="sskd", help="the student method to train"
    )
    p.add_argument("--teacher-arch", required=True, help="teacher architecture (freshly initialised)")
    p.add_argument("--student-arch", required=True, help="student architecture")
    p.add_argument(
        "--cache",
        action="store_true",
        help="teacher outputs from a cache of these batches built first in a temporary folder",
    )
    p.add_argument("--views", default="auto", help="SS views (auto: the method's own)")
    p.add_argument("--size", type=int, help="view size (default: the layout's, 32 or 224)")
    p.add_argument("--batch-size", type=int, default=64, help="images per step")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant (split over its two runs)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before each run")
    p.add_argument(
        "--log-every",
        type=int,
        default=5,
        help="steps between metrics lines, as run.log_every (each run also logs at its last step)",
    )
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "gpu"],
        default="auto",
        help="where DALI makes the views (auto: gpu when CUDA is present); training uses CUDA when present",
    )
    p.add_argument("--threads", type=int, help="DALI threads (default: data.threads)")
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no", help="autocast dtype")
    p.add_argument("--json", help="write the results here")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    from sskd.bench.train import run_bench

    run_bench(args)
    return 0
