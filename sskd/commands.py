"""``sskd train-teacher | train-ss-head | distill | evaluate | demo``: thin wrappers over the library.

Each command resolves its config (defaults → ``--config`` YAML → flags → ``--set``), runs the checks
of :mod:`sskd.stages`, then hands a :class:`sskd.train.Job` to the one training loop. All of them run
plainly or under ``accelerate launch ... -m sskd <command>``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)

RECIPES = Path(__file__).parent / "configs"  # the paper's recipes ship inside the package


def _common(p: argparse.ArgumentParser, *, shards: bool = True) -> None:
    if shards:
        p.add_argument("--shards", required=True, help="shard folder written by `sskd shard`")
    p.add_argument("--config", help="YAML recipe (sskd/configs/...); the flags below override it")
    p.add_argument("--out", required=True, help="run folder to write (config, checkpoints, metrics, model)")
    p.add_argument("--epochs", type=int, help="epochs of this stage")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (smoke runs)")
    p.add_argument("--batch-size", type=int, help="images per process per step (each with all its views)")
    p.add_argument("--lr", type=float, help="base learning rate")
    p.add_argument("--seed", type=int, help="plan seed: model init, epoch shuffles and every view")
    p.add_argument("--views", help="SS views: rotation (official code) | paper (four transforms) | comma list")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], help="where DALI makes the views")
    p.add_argument("--threads", type=int, help="DALI threads per process")
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], help="autocast dtype (bf16 works on CPU)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config value, e.g. --set student.milestones=[30,60] (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from RUN/checkpoints/last.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run in --out (without --resume or this, such a folder is refused)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")


def resolve_config(args: argparse.Namespace, stage: str, own: tuple[str, ...] = ()):
    """Defaults, the YAML file, then this command's flags for section ``stage``, then ``--set``.

    ``own``: flags the command uses for itself, not for the config (``sskd cache --epochs``)."""
    from sskd.config import load_config

    sets = []
    flag_map = {"epochs": f"{stage}.epochs", "max_steps": f"{stage}.max_steps", "batch_size": f"{stage}.batch_size",
                "lr": f"{stage}.lr", "seed": "run.seed", "views": "data.views", "device": "data.device",
                "threads": "data.threads", "mixed_precision": "run.mixed_precision", "shards": "data.shards",
                "arch": f"{stage}.arch", "student": "student.arch", "method": "student.method",
                "global_ss_batch": "run.global_ss_batch"}
    for flag, dotted in flag_map.items():
        value = None if flag in own else getattr(args, flag, None)
        # Only an absent flag is skipped: 0 and 0.0 are values (``value not in (None, False)`` dropped them,
        # since 0 == False); a store_true flag that is off says nothing.
        if value is None or value is False:
            continue
        sets.append(f"{dotted}={value}")
    if getattr(args, "no_progress", False):
        sets.append("run.progress=false")
    return load_config(args.config, sets + list(args.set))


def _job(args, stage, cfg, build, info):
    from shards.format import load_manifest
    from sskd.stages import manifest_sha256
    from sskd.train import Job

    load_manifest(cfg.data.shards)  # a missing or wrong --shards folder: one line, before anything else
    info.setdefault("shards_sha256", manifest_sha256(cfg.data.shards))
    info.setdefault("seed", cfg.run.seed)
    info.setdefault("views", cfg.data.views)
    return Job(stage=stage, cfg=cfg, out=Path(args.out), build=build, info=info, resume=args.resume,
               overwrite=args.overwrite)


def _report(out: Path, result: dict) -> int:
    """The final line, printed once (by the main process)."""
    if result.get("rank", 0) != 0:
        return 0
    if "top1" in result:
        log.info("%s: top-1 %.2f%%  top-5 %.2f%%  (%d val samples)", out, result["top1"], result["top5"], result["count"])
    else:
        log.info("%s: finished (the shards have no val split: not evaluated)", out)
    return 0


def cmd_train_teacher(args) -> int:
    from sskd.stages import teacher_builder
    from sskd.train import train

    cfg = resolve_config(args, "teacher")
    info = {"arch": cfg.teacher.arch}
    return _report(Path(args.out), train(_job(args, "teacher", cfg, teacher_builder(cfg), info)))


def cmd_train_ss_head(args) -> int:
    from sskd.stages import ss_head_builder
    from sskd.train import train

    cfg = resolve_config(args, "ss_head")
    info: dict = {}
    return _report(Path(args.out), train(_job(args, "ss_head", cfg, ss_head_builder(cfg, args.teacher, info), info)))


def cmd_distill(args) -> int:
    from sskd.stages import student_builder
    from sskd.train import train

    cfg = resolve_config(args, "student")
    info: dict = {}
    job = _job(args, "student", cfg, student_builder(cfg, args.teacher, info, cached=bool(args.cache)), info)
    if args.cache:
        from sskd.cache_build import attach_cache

        attach_cache(job, args.cache, args.teacher)
    return _report(Path(args.out), train(job))


def cmd_evaluate(args) -> int:
    from pipelines import ViewLoader
    from sskd.dist import make_accelerator, pipeline_device
    from sskd.errors import SSKDError
    from sskd.evaluate import evaluate
    from sskd.stages import load_run_model

    if args.batch_size < 1 or args.threads < 1:
        raise SSKDError(f"--batch-size and --threads must be at least 1 (got {args.batch_size}, {args.threads})")
    if args.json:
        from sskd.atomic import check_writable

        check_writable(args.json, "--json result")
    model, info = load_run_model(args.model)
    accelerator = make_accelerator(device=args.device)
    loader = ViewLoader(args.shards, args.split, batch_size=args.batch_size, views=None, train=False,
                        rank=accelerator.process_index, world_size=accelerator.num_processes,
                        device=pipeline_device(args.device), threads=args.threads, torch_device=accelerator.device)
    if loader.manifest["num_classes"] != info["num_classes"]:
        raise SSKDError(f"--model {args.model}: {info['num_classes']} classes, shards have {loader.manifest['num_classes']}")
    result = evaluate(model.to(accelerator.device), loader, accelerator)
    result.update(model=str(args.model), arch=info["arch"], split=args.split)
    if accelerator.is_main_process:
        print(f"{args.model} ({info['arch']}) on {args.split}: top-1 {result['top1']:.2f}%  "
              f"top-5 {result['top5']:.2f}%  ({result['count']} samples)")
        if args.json:
            from sskd.atomic import write_json

            write_json(args.json, result)
    return 0


def cmd_demo(args) -> int:
    from sskd.demo import run_demo

    run_demo(Path(args.out), fast=args.fast, progress=not args.no_progress)
    return 0


def register(sub, fmt) -> None:
    p = sub.add_parser("train-teacher", help="stage 1: train the teacher with cross-entropy", formatter_class=fmt,
                       description="Stage 1 of SSKD: train the teacher classifier with CE on the normal view.",
                       epilog="example:\n  sskd train-teacher --shards data/shards/c100 --arch resnet32x4 --out runs/t \\\n"
                              "      --config sskd/configs/cifar100/resnet32x4-resnet8x4.yaml\n"
                              "  accelerate launch --config_file launch/accelerate/multi_gpu.yaml -m sskd train-teacher ...")
    _common(p)
    p.add_argument("--arch", help="teacher architecture (registry name, e.g. wrn_40_2 or torchvision:resnet34)")
    p.set_defaults(func=cmd_train_teacher)

    p = sub.add_parser("train-ss-head", help="stage 2: train the teacher's SS head (backbone frozen)", formatter_class=fmt,
                       description="Stage 2 of SSKD (Eq. 5): a 2-layer MLP head on the frozen teacher's pooled "
                                   "feature learns the contrastive task over the SS views. Its run holds the "
                                   "complete SSKD teacher.",
                       epilog="example:\n  sskd train-ss-head --teacher runs/t --shards data/shards/c100 --out runs/t-ss\n"
                              "  sskd train-ss-head --teacher torchvision:resnet34 --shards data/shards/imagenet --out runs/r34-ss")
    p.add_argument("--teacher", required=True, help="a train-teacher run folder, or torchvision:NAME (pretrained)")
    _common(p)
    p.set_defaults(func=cmd_train_ss_head)

    p = sub.add_parser("distill", help="train a student: sskd (Eq. 8), kd or ce", formatter_class=fmt,
                       description="Train a student from a frozen teacher. sskd = CE + KD + transformed-view KD + "
                                   "SS similarity KD (Eq. 8); kd = Hinton KD; ce = no teacher.",
                       epilog="example:\n  sskd distill --teacher runs/t-ss --student resnet8x4 --method sskd "
                              "--shards data/shards/c100 --out runs/s\n"
                              "  sskd distill --teacher runs/t-ss --cache caches/t --student resnet8x4 ... (teacher not run)")
    p.add_argument("--teacher", help="teacher run (a train-ss-head run for sskd; any run or torchvision:NAME for kd)")
    p.add_argument("--student", help="student architecture")
    p.add_argument("--method", choices=["sskd", "kd", "ce"], help="distillation method")
    p.add_argument("--cache", help="teacher-output cache from `sskd cache`: the teacher is not run")
    p.add_argument("--global-ss-batch", action="store_true",
                   help="all-gather SS embeddings across ranks: one similarity matrix over the global batch")
    _common(p)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("evaluate", help="top-1 / top-5 of a trained model", formatter_class=fmt,
                       description="Evaluate a run's model on a split (each sample exactly once, across ranks too).",
                       epilog="example:\n  sskd evaluate --model runs/s --shards data/shards/c100 --json eval.json")
    p.add_argument("--model", required=True, help="run folder with model.safetensors")
    p.add_argument("--shards", required=True, help="shard folder")
    p.add_argument("--split", default="val", help="split to evaluate")
    p.add_argument("--json", help="write {top1, top5, count} here")
    p.add_argument("--batch-size", type=int, default=256, help="images per process per batch")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto", help="where DALI decodes")
    p.add_argument("--threads", type=int, default=2, help="DALI threads per process")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="the whole SSKD recipe on scikit-learn's digits, in minutes on a CPU",
                       formatter_class=fmt,
                       description="Shards the bundled digits, trains a teacher and its SS head, distills CE, KD "
                                   "and SSKD students, evaluates all, prints a table and writes results.json and "
                                   "curves.png.",
                       epilog="example:\n  sskd demo --out demo-out")
    p.add_argument("--out", default="demo-out", help="folder for shards, runs, results.json, curves.png")
    p.add_argument("--fast", action="store_true", help="a much shorter schedule (smoke test; lower accuracy)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)
