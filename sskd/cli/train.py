"""``sskd train-teacher | train-ss-head | distill | evaluate | demo``: thin wrappers over the library.

Each command resolves its config (defaults → ``--config`` YAML → flags → ``--set``), resolves the run once
(:func:`sskd.engine.prepare.prepare`: shards, method, views, teacher, cache, every check), then hands the
:class:`sskd.engine.prepare.RunSpec` to the one training loop (:func:`sskd.engine.loop.train`). All of them
run plainly or under ``accelerate launch ... -m sskd <command>``.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def _tracker_names(text: str) -> list[str]:
    """``--log-with`` value: one name or a comma list of tensorboard, wandb, mlflow, aim (or none)."""
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in ("tensorboard", "wandb", "mlflow", "aim", "none")]
    if bad:
        raise argparse.ArgumentTypeError(f"{bad[0]!r}: choose from tensorboard, wandb, mlflow, aim (or none)")
    return names


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
    p.add_argument(
        "--views", help="SS views: rotation (official code) | paper (four transforms) | comma list"
    )
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], help="where DALI makes the views")
    p.add_argument("--threads", type=int, help="DALI threads per process")
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave out samples that fail their checksum, id or label check (listed once) instead of "
        "stopping at the first (data.skip_bad)",
    )
    p.add_argument(
        "--mixed-precision", choices=["no", "bf16", "fp16"], help="autocast dtype (bf16 works on CPU)"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override any config value, e.g. --set student.milestones=[30,60] (repeatable)",
    )
    p.add_argument("--resume", action="store_true", help="continue from RUN/checkpoints/last.pt")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier run in --out (without --resume or this, such a folder is refused): "
        "only once every check has passed; it is set aside until this run's first checkpoint and "
        "put back if this run fails before then",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.add_argument(
        "--log-with",
        action="append",
        type=_tracker_names,
        metavar="TRACKER",
        help="also log to Accelerate's trackers: tensorboard | wandb | mlflow | aim (repeatable or a "
        "comma list; none = no tracker; default: the config's run.log_with, empty). They write "
        "in the run folder; wandb runs offline, mlflow to a file store; metrics.jsonl is kept",
    )


def resolve_config(args: argparse.Namespace, stage: str, own: tuple[str, ...] = ()):
    """Defaults, the YAML file, then this command's flags for section ``stage``, then ``--set``.

    ``own``: flags the command uses for itself, not for the config (``sskd cache --epochs``)."""
    from sskd.engine.config import load_config

    sets = []
    flag_map = {
        "epochs": f"{stage}.epochs",
        "max_steps": f"{stage}.max_steps",
        "batch_size": f"{stage}.batch_size",
        "lr": f"{stage}.lr",
        "seed": "run.seed",
        "views": "data.views",
        "device": "data.device",
        "threads": "data.threads",
        "mixed_precision": "run.mixed_precision",
        "shards": "data.shards",
        "arch": f"{stage}.arch",
        "student": "student.arch",
        "method": f"{stage}.method",
        "global_ss_batch": "run.global_ss_batch",
        "skip_bad": "data.skip_bad",
        "cache_level": "student.cache_level",
        "pretrained": f"{stage}.pretrained",
        "weights": f"{stage}.weights",
    }
    for flag, dotted in flag_map.items():
        value = None if flag in own else getattr(args, flag, None)
        # Only an absent flag is skipped: 0 and 0.0 are values (``value not in (None, False)`` dropped them,
        # since 0 == False); a store_true flag that is off says nothing.
        if value is None or value is False:
            continue
        sets.append(f"{dotted}={value}")
    if getattr(args, "no_progress", False):
        sets.append("run.progress=false")
    if getattr(args, "log_with", None):  # --log-with a,b --log-with c; "none" clears the config's trackers
        names = list(dict.fromkeys(n for item in args.log_with for n in item if n != "none"))
        sets.append(f"run.log_with=[{','.join(names)}]")
    return load_config(args.config, sets + list(args.set))


def _report(out: Path, result: dict) -> int:
    """The final line, printed once (by the main process)."""
    if result.get("rank", 0) != 0:
        return 0
    if "top1" in result:
        log.info(
            "%s: top-1 %.2f%%  top-5 %.2f%%  (%d val samples)",
            out,
            result["top1"],
            result["top5"],
            result["count"],
        )
    else:
        log.info("%s: finished (the shards have no val split: not evaluated)", out)
    return 0


def _train_stage(args, stage: str, *, teacher: str | None = None, cache: str | None = None) -> int:
    from sskd.engine.loop import train
    from sskd.engine.prepare import prepare

    allow_download(args)

    opener = None
    if cache:
        from sskd.cache import CacheFolder

        opener = CacheFolder(Path(cache))
    spec = prepare(
        resolve_config(args, stage),
        stage,
        out=args.out,
        teacher=teacher,
        cache=opener,
        resume=args.resume,
        overwrite=args.overwrite,
        teacher_weights=getattr(args, "teacher_weights", None),
    )
    return _report(Path(args.out), train(spec))


def allow_download(args: argparse.Namespace) -> None:
    """``--allow-download``: this process (and the ranks it starts) may fetch pretrained weights."""
    if getattr(args, "allow_download", False):
        from sskd.models.weights import ALLOW_DOWNLOAD_ENV

        os.environ[ALLOW_DOWNLOAD_ENV] = "1"


def add_weight_flags(p: argparse.ArgumentParser, *, own: str | None, teacher: bool) -> None:
    """The flags that start a model from weights made elsewhere (``own``: what the stage's model is called
    in the help; ``teacher``: the command takes a teacher)."""
    if own:
        p.add_argument(
            "--pretrained",
            action="store_true",
            help=f"start the {own} from its pretrained weights (timm:NAME[.TAG] from the local Hugging Face "
            "cache, torchvision:NAME from the torch hub cache); a different class count gets a new head",
        )
        p.add_argument(
            "--weights",
            metavar="FILE",
            help=f"start the {own} from this .safetensors or .pth state dict (weights only; a different "
            "class count gets a new head)",
        )
    if teacher:
        p.add_argument(
            "--teacher-weights",
            metavar="FILE",
            help="the teacher is --teacher ARCH (any architecture) with the weights of this .safetensors or "
            ".pth state dict (its classes must be the shards')",
        )
    p.add_argument(
        "--allow-download",
        action="store_true",
        help="fetch pretrained weights missing from the local cache (default: never touch the network)",
    )


def cmd_train_teacher(args) -> int:
    return _train_stage(args, "teacher")


def cmd_train_ss_head(args) -> int:
    return _train_stage(args, "ss_head", teacher=args.teacher)


def cmd_distill(args) -> int:
    return _train_stage(args, "student", teacher=args.teacher, cache=args.cache)


def cmd_methods(args) -> int:
    import json

    from sskd.methods import describe

    rows = describe()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for role, command in (("student", "distill"), ("teacher", "train-teacher"), ("head", "train-ss-head")):
        print(
            f"sskd {command} --method NAME        (teacher it needs; c = sskd cache can store its teacher outputs)"
        )
        for r in (r for r in rows if r["role"] == role):
            paper = f" [{r['paper']}]" if r["paper"] not in ("-", "") else ""
            teacher = f" -- teacher: {r['teacher']}" if r["teacher"] else ""
            print(f"  {r['name']:<14} {'c' if r['cache'] else ' '} {r['summary']}{paper}{teacher}")
        print()
    print("views, config sections and all of this as records: sskd methods --json")
    return 0


def cmd_models(args) -> int:
    import torch

    from sskd.core.errors import SSKDError
    from sskd.models import create_model, list_models
    from sskd.models.branches import BranchedModel

    if args.name and args.arch and args.name != args.arch:
        raise SSKDError(
            f"sskd models: two architectures given ({args.name} and --arch {args.arch}); give one"
        )
    one = args.name or args.arch
    for name in [one] if one else list_models():
        model = create_model(name, num_classes=args.classes).eval()
        try:
            with torch.no_grad():
                f = model(torch.zeros(1, 3, args.size, args.size), features=True)
        except (RuntimeError, ValueError) as exc:
            why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SSKDError(f"{name} at {args.size}x{args.size}: {why} (try another --size)") from None
        try:
            branches = str(BranchedModel(model, args.classes).num_branches)
        except SSKDError:
            branches = "none"
        shape = lambda t: "x".join(str(d) for d in t.shape[1:])  # noqa: E731
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(
            f"{name:<22} {params:6.2f}M  feat {model.feat_dim}  maps {', '.join(shape(m) for m in f.maps) or 'none'}  "
            f"stages {', '.join(shape(s) for s in f.stages) or 'none'}  branches {branches}"
        )
    if not one:
        print(
            "\nany timm architecture works too, as timm:NAME (a name timm.list_models() gives, e.g. "
            "timm:convnext_tiny): sskd models timm:NAME --size 224"
        )
    return 0


def method_help(role: str) -> tuple[list[str], str]:
    """``--method`` choices and help from the registry (a plug-in method appears without touching this file)."""
    from sskd.methods import METHODS

    names = METHODS[role].names()
    return names, "; ".join(f"{n}: {METHODS[role].get(n).summary}" for n in names)


def cmd_evaluate(args) -> int:
    from pipelines import ViewLoader
    from sskd.core.errors import SSKDError
    from sskd.engine.dist import make_accelerator, pipeline_device
    from sskd.engine.evaluate import evaluate
    from sskd.runs.models import load_run_model

    if args.batch_size < 1 or args.threads < 1:
        raise SSKDError(
            f"--batch-size and --threads must be at least 1 (got {args.batch_size}, {args.threads})"
        )
    if args.json:
        from sskd.core.atomic import check_writable

        check_writable(args.json, "--json result")
    size, described = None, None  # a run: the layout's default size, as the run's own evaluation
    if Path(args.model).is_file():  # an exported ONNX classifier (`sskd export`), run by onnxruntime
        from sskd.runs.export import OnnxClassifier, read_info

        if Path(args.model).suffix != ".onnx":
            raise SSKDError(
                f"--model {args.model}: a file but not an .onnx one (a run folder or an exported .onnx)"
            )
        model, described = OnnxClassifier(args.model), read_info(args.model) or {}
        info = {"arch": described.get("arch", "onnx"), "num_classes": model.num_classes}
        size = model.size or (described.get("input") or {}).get("size")
    else:
        model, info = load_run_model(args.model)
    accelerator = make_accelerator(device=args.device)
    loader = ViewLoader(
        args.shards,
        args.split,
        batch_size=args.batch_size,
        views=None,
        train=False,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        device=pipeline_device(args.device),
        threads=args.threads,
        size=size,
        torch_device=accelerator.device,
        skip_bad=args.skip_bad,
    )
    if loader.manifest["num_classes"] != info["num_classes"]:
        raise SSKDError(
            f"--model {args.model}: {info['num_classes']} classes, shards have {loader.manifest['num_classes']}"
        )
    norm = {k: ((described or {}).get("input") or {}).get(k) for k in ("mean", "std")}
    if any(v is not None and list(v) != list(loader.manifest[k]) for k, v in norm.items()):
        raise SSKDError(
            f"--model {args.model}: its .json records mean {norm['mean']} / std {norm['std']}, but the shards "
            f"{args.shards} normalise with {loader.manifest['mean']} / {loader.manifest['std']}"
        )
    result = evaluate(model.to(accelerator.device), loader, accelerator)
    result.update(model=str(args.model), arch=info["arch"], split=args.split)
    if args.skip_bad:
        result["skipped"] = {str(i): why for i, why in sorted(loader.skipped.items())}
    if accelerator.is_main_process:
        left_out = f"; {len(loader.skipped)} unreadable left out" if loader.skipped else ""
        print(
            f"{args.model} ({info['arch']}) on {args.split}: top-1 {result['top1']:.2f}%  "
            f"top-5 {result['top5']:.2f}%  ({result['count']} samples{left_out})"
        )
        if args.json:
            from sskd.core.atomic import write_json

            write_json(args.json, result)
    return 0


def cmd_demo(args) -> int:
    from sskd.experiments.demo import run_demo

    run_demo(Path(args.out), fast=args.fast, progress=not args.no_progress)
    return 0


def register(sub, fmt) -> None:
    p = sub.add_parser(
        "train-teacher",
        help="stage 1: train the teacher (CE; or HSSAKD's joint teacher)",
        formatter_class=fmt,
        description="Stage 1: train the teacher classifier with CE on the normal view (--method ce, "
        "the default), or with a method's teacher task from scratch (--method hssakd: "
        "backbone and branches together on classes and class x rotation).",
        epilog="example:\n  sskd train-teacher --shards data/shards/c100 --arch resnet32x4 --out runs/t \\\n"
        "      --config sskd/configs/cifar100/resnet32x4-resnet8x4.yaml\n"
        "  sskd train-teacher --method hssakd --arch resnet32x4 --shards data/shards/c100 --out runs/t-hs\n"
        "  sskd train-teacher --arch timm:convnext_tiny.fb_in1k --pretrained --shards data/shards/c100 --out runs/t-cnx\n"
        "  accelerate launch --config_file launch/accelerate/multi_gpu.yaml -m sskd train-teacher ...",
    )
    _common(p)
    p.add_argument(
        "--arch",
        help="teacher architecture: a built-in name (wrn_40_2, torchvision:resnet34), timm:NAME, or your own "
        "as module.path:function (`sskd models`)",
    )
    add_weight_flags(p, own="teacher", teacher=False)
    names, text = method_help("teacher")
    p.add_argument("--method", choices=names, help=f"what the teacher learns (default: ce). {text}")
    p.set_defaults(func=cmd_train_teacher)

    p = sub.add_parser(
        "train-ss-head",
        help="stage 2: the teacher's method-specific part on its frozen backbone",
        formatter_class=fmt,
        description="Stage 2: the teacher's backbone and classifier stay frozen (eval mode, "
        "bit-identical) and only the method's part trains: the SS head of SSKD (Eq. 5: "
        "a 2-layer MLP learns the sskd.pretext task over the SS views: contrastive by default, or "
        "exemplar, rotation, jigsaw; --method sskd, the "
        "default) or HSSAKD's branches (--method hssakd, the frozen-teacher mode). Its "
        "run holds the complete teacher.",
        epilog="example:\n  sskd train-ss-head --teacher runs/t --shards data/shards/c100 --out runs/t-ss\n"
        "  sskd train-ss-head --method hssakd --teacher runs/t --shards data/shards/c100 --out runs/t-hs\n"
        "  sskd train-ss-head --teacher torchvision:resnet34 --shards data/shards/imagenet --out runs/r34-ss\n"
        "  sskd train-ss-head --teacher timm:resnet50.a1_in1k --shards data/shards/imagenet --out runs/r50-ss\n"
        "  sskd train-ss-head --teacher resnet32x4 --teacher-weights t.safetensors --shards data/shards/c100 --out runs/t-ss",
    )
    p.add_argument(
        "--teacher",
        required=True,
        help="a train-teacher run folder; torchvision:NAME or timm:NAME[.TAG] (pretrained, from the local "
        "caches); or any architecture with --teacher-weights FILE",
    )
    add_weight_flags(p, own=None, teacher=True)
    names, text = method_help("head")
    p.add_argument(
        "--method", choices=names, help=f"the teacher's method-specific part (default: sskd). {text}"
    )
    _common(p)
    p.set_defaults(func=cmd_train_ss_head)

    p = sub.add_parser(
        "distill",
        help="train a student with a method (sskd, kd, ce, hssakd, ...; `sskd methods`)",
        formatter_class=fmt,
        description="Train a student from a frozen teacher (or, for ce and hssakd_online, without "
        "one). `sskd methods` lists every method with the teacher run it needs.",
        epilog="example:\n  sskd distill --teacher runs/t-ss --student resnet8x4 --method sskd "
        "--shards data/shards/c100 --out runs/s\n"
        "  sskd distill --method hssakd --teacher runs/t-hs --student resnet8x4 --shards data/shards/c100 --out runs/h\n"
        "  sskd distill --method hssakd_online --student resnet8x4 --shards data/shards/c100 --out runs/o\n"
        "  sskd distill --teacher runs/t-ss --cache caches/t --student resnet8x4 ... (teacher not run)\n"
        "  sskd distill --method kd --teacher timm:resnet50.a1_in1k --student timm:mobilenetv3_large_100 \\\n"
        "      --pretrained --shards data/shards/imagenet --out runs/mnv3-kd\n"
        "  sskd distill --method kd --teacher runs/t --student mypackage.models:make_net --shards ... --out runs/m",
    )
    p.add_argument(
        "--teacher",
        help="teacher run: a train-ss-head run for sskd (SS head) and hssakd (branches; or "
        "a train-teacher --method hssakd run); for kd and the other methods any run, "
        "torchvision:NAME or timm:NAME[.TAG] (pretrained), or an architecture with --teacher-weights FILE",
    )
    p.add_argument(
        "--student",
        help="student architecture: a built-in name, timm:NAME, or module.path:function (`sskd models`)",
    )
    add_weight_flags(p, own="student", teacher=True)
    names, text = method_help("student")
    p.add_argument(
        "--method",
        choices=names,
        help=f"distillation method (default: sskd; `sskd methods` lists them). {text}",
    )
    p.add_argument("--cache", help="teacher-output cache from `sskd cache`: the teacher is not run")
    p.add_argument(
        "--cache-level",
        metavar="LEVEL",
        help="accept only a cache stored at this level: exact, compact or a level name (`sskd cache "
        "--dry-run` lists them; default: any)",
    )
    p.add_argument(
        "--global-ss-batch",
        action="store_true",
        help="all-gather SS embeddings across ranks: one similarity matrix over the global batch",
    )
    _common(p)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser(
        "methods",
        help="list the registered methods: what each is, its paper, teacher and cache",
        formatter_class=fmt,
        description="Every method the three training commands accept, by command: a line on what it "
        "is, the views it trains on, the teacher run it needs, its config section, "
        "whether `sskd cache` can store its teacher outputs, and its paper.",
        epilog="example:\n  sskd methods\n  sskd methods --json",
    )
    p.add_argument("--json", action="store_true", help="machine-readable: one record per method and role")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser(
        "models",
        help="list the architectures: parameters and the feature tensors each returns",
        formatter_class=fmt,
        description="For each built-in architecture (or one given, built-in or timm:NAME): parameters, "
        "the pooled feature width (feat), the maps feature methods read (RepDistiller's feat[1:-1]) and "
        "every stage's output, as CxHxW for a --size input, and HSSAKD's branch count. Any timm "
        "architecture is named timm:NAME (a name of timm.list_models()).",
        epilog="example:\n  sskd models --size 32\n  sskd models --size 224 --arch torchvision:resnet18\n"
        "  sskd models timm:convnext_tiny --size 224",
    )
    p.add_argument(
        "name", nargs="?", help="one architecture, e.g. timm:convnext_tiny (default: all built-in)"
    )
    p.add_argument("--size", type=int, default=32, help="input height and width")
    p.add_argument("--arch", help="one architecture, as the positional name (default: all built-in)")
    p.add_argument("--classes", type=int, default=100, help="number of classes")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "evaluate",
        help="top-1 / top-5 of a trained model",
        formatter_class=fmt,
        description="Evaluate a run's model, or a file `sskd export` wrote as ONNX, on a split (each sample exactly "
        "once, across ranks too).",
        epilog="example:\n  sskd evaluate --model runs/s --shards data/shards/c100 --json eval.json\n"
        "  sskd evaluate --model student.onnx --shards data/shards/c100 --skip-bad",
    )
    p.add_argument(
        "--model",
        required=True,
        help="run folder with model.safetensors, or an .onnx file from `sskd export`",
    )
    p.add_argument("--shards", required=True, help="shard folder")
    p.add_argument("--split", default="val", help="split to evaluate")
    p.add_argument(
        "--json", help="write {top1, top5, count} here (with --skip-bad also skipped: {id: what is wrong})"
    )
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="check every sample of the split first and leave out those that cannot be read (counted, listed "
        "in the log and --json) instead of stopping at the first",
    )
    p.add_argument("--batch-size", type=int, default=256, help="images per process per batch")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto", help="where DALI decodes")
    p.add_argument("--threads", type=int, default=2, help="DALI threads per process")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "demo",
        help="SSKD and HSSAKD on scikit-learn's digits, in minutes on a CPU",
        formatter_class=fmt,
        description="Shards the bundled digits, trains a teacher, its SS head and its HSSAKD "
        "branches, distills CE, KD, SSKD and HSSAKD students, evaluates all, prints a "
        "table and writes results.json and curves.png.",
        epilog="example:\n  sskd demo --out demo-out",
    )
    p.add_argument("--out", default="demo-out", help="folder for shards, runs, results.json, curves.png")
    p.add_argument("--fast", action="store_true", help="a much shorter schedule (smoke test; lower accuracy)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)
