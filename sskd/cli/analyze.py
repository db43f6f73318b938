"""``sskd analyze similarity | tsne | selection``: analyses of trained runs (library: :mod:`sskd.experiments.analyze`).

Heavy imports (torch, DALI, scikit-learn, matplotlib) stay inside the command functions so that
``sskd --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)

KL_TEXT = (
    "KL = mean over val samples of KL(p_teacher || p_student), p = softmax(logits) at temperature 1, "
    "natural log (nats)"
)
CKA_TEXT = (
    "CKA = linear CKA (Kornblith et al. 2019, centred-HSIC form) of the two models' penultimate pooled "
    "features (n x d_teacher vs n x d_student; the widths may differ)"
)


# -- shared steps ------------------------------------------------------------------------------------


def _check_json(args) -> None:
    if getattr(args, "json", None):
        from sskd.core.atomic import check_writable

        check_writable(args.json, "--json result")


def _manifest(shards: str, split: str) -> dict:
    from shards.format import MANIFEST, load_manifest
    from sskd.core.errors import SSKDError

    manifest = load_manifest(shards)
    if split not in manifest["splits"]:
        raise SSKDError(
            f"{Path(shards) / MANIFEST}: no {split!r} split (has {', '.join(sorted(manifest['splits']))}); "
            f"sskd analyze reads the {split} split"
        )
    return manifest


def _load(run: str, flag: str, manifest: dict):
    """A run folder's model and ``model.json``, checked against the shards (classes)."""
    from sskd import runs
    from sskd.core.errors import SSKDError
    from sskd.runs.models import load_run_model

    info = runs.load_model_info(
        run
    )  # checked before the weights are read: a mismatch is named, not a shape error
    where = Path(run) / runs.MODEL_INFO
    if info.get("num_classes") != manifest["num_classes"]:
        raise SSKDError(
            f"{where}: num_classes is {info.get('num_classes')} but the shards ({manifest['dataset']}) "
            f"have {manifest['num_classes']} ({flag} {run})"
        )
    if info.get("classes") and info["classes"] != manifest["classes"]:
        raise SSKDError(f"{where}: classes differ from the shards' ({manifest['dataset']}) ({flag} {run})")
    return load_run_model(run)


def _device():
    from sskd.engine.dist import make_accelerator

    return make_accelerator().device


def _val_loader(args, device):
    from pipelines import ViewLoader
    from sskd.core.errors import SSKDError
    from sskd.engine.dist import pipeline_device

    if args.batch_size < 1 or args.threads < 1:
        raise SSKDError(
            f"--batch-size and --threads must be at least 1 (got {args.batch_size}, {args.threads})"
        )
    return ViewLoader(
        args.shards,
        "val",
        batch_size=args.batch_size,
        views=None,
        train=False,
        device=pipeline_device(args.device),
        threads=args.threads,
        torch_device=device,
    )


def _write_json(path, result) -> None:
    if path:
        from sskd.core.atomic import write_json

        write_json(path, result)


# -- commands ----------------------------------------------------------------------------------------


def cmd_similarity(args) -> int:
    from sskd.experiments.analyze import collect, similarity

    _check_json(args)
    manifest = _manifest(args.shards, "val")
    teacher, t_info = _load(args.teacher, "--teacher", manifest)
    student, s_info = _load(args.student, "--student", manifest)
    device = _device()
    loader = _val_loader(args, device)
    t, s = collect(
        [teacher.to(device), student.to(device)], loader, progress=not args.no_progress, desc="similarity"
    )
    result = {
        **similarity(t, s),
        "count": t.count,
        "split": "val",
        "teacher": str(args.teacher),
        "student": str(args.student),
        "teacher_arch": t_info["arch"],
        "student_arch": s_info["arch"],
    }
    print(
        f"{args.teacher} ({t_info['arch']}) vs {args.student} ({s_info['arch']}) on val: "
        f"KL {result['kl']:.4f} nats  linear CKA {result['cka']:.4f}  ({result['count']} samples)"
    )
    _write_json(args.json, result)
    return 0


def cmd_tsne(args) -> int:
    from sskd.core.atomic import check_writable
    from sskd.core.errors import SSKDError
    from sskd.experiments.analyze import collect, plot_tsne, subsample, tsne_embed

    if args.max_samples is not None and args.max_samples < 3:
        raise SSKDError(f"--max-samples must be at least 3 (got {args.max_samples})")
    check_writable(args.out, "t-SNE picture")
    _check_json(args)
    manifest = _manifest(args.shards, "val")
    model, info = _load(args.model, "--model", manifest)
    device = _device()
    got = collect(model.to(device), _val_loader(args, device), progress=not args.no_progress, desc="features")
    rows = subsample(got.count, args.max_samples, args.seed)
    log.info("t-SNE of %d x %d features (seed %d) ...", len(rows), got.feat.shape[1], args.seed)
    emb, kl = tsne_embed(got.feat[rows], seed=args.seed, perplexity=args.perplexity)
    plot_tsne(
        args.out,
        emb,
        got.label[rows],
        manifest["classes"],
        f"t-SNE of {info['arch']} penultimate features ({args.model}, {manifest['dataset']} val, "
        f"{len(rows)} samples)",
    )
    result = {
        "path": str(args.out),
        "count": len(rows),
        "kl_divergence": kl,
        "model": str(args.model),
        "arch": info["arch"],
        "seed": args.seed,
        "split": "val",
    }
    print(f"{args.out}: t-SNE of {args.model} ({info['arch']}), {len(rows)} val samples, KL {kl:.4f}")
    _write_json(args.json, result)
    return 0


def _run_config(run: str):
    """The run's saved config (``RUN/config.yaml``); the defaults when the run has none."""
    import yaml

    from sskd import runs
    from sskd.core.errors import SSKDError
    from sskd.engine.config import from_dict, load_config

    path = Path(run) / runs.CONFIG
    if not path.is_file():
        log.info("%s: not found; using the default config (views, seed, keep ratio)", path)
        return load_config()
    try:
        return from_dict(yaml.safe_load(path.read_text()) or {})
    except yaml.YAMLError as exc:
        raise SSKDError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc


def cmd_selection(args) -> int:
    from pipelines import ViewLoader
    from sskd.core.errors import SSKDError
    from sskd.engine.prepare import prepare
    from sskd.experiments.analyze import selection
    from sskd.runs import load_model_info

    _check_json(args)
    manifest = _manifest(args.shards, "train")
    info = load_model_info(args.teacher)
    if info.get("wrapper") != "ss_head":
        raise SSKDError(
            f"--teacher {args.teacher}: no SS head (it is a `{info.get('stage')}` run); make one with "
            f"`sskd train-ss-head --teacher {args.teacher} --shards {args.shards} --out RUN-ss` "
            "and pass that run"
        )
    pretext = (info.get("wrapper_args") or {}).get(
        "pretext", "contrastive"
    )  # runs before pretext tasks: contrastive
    if pretext != "contrastive":
        raise SSKDError(
            f"{Path(args.teacher) / 'model.json'}: the SS head was trained for the {pretext} pretext task; "
            "sskd analyze selection measures the contrastive task's similarity rows (Eq. 4) only"
        )
    teacher, info = _load(args.teacher, "--teacher", manifest)
    cfg = _run_config(args.teacher)
    # The SSKD student run the teacher's config describes (its views, seed, size, keep ratio), on --shards and
    # --device; its teacher is the one given, checked above.
    cfg.data.shards, cfg.data.device, cfg.data.threads = args.shards, args.device, args.threads
    cfg.student.method = "sskd"
    spec = prepare(cfg, "student", without_teacher=True)
    if spec.views is None or not spec.views.ss_views:
        raise SSKDError(
            f"{Path(args.teacher) / 'config.yaml'}: data.views {cfg.data.views!r} has no transformed view"
        )
    ratio = cfg.section("sskd").ss_ratio
    batch_size = args.batch_size or cfg.student.batch_size
    if batch_size < 1 or args.threads < 1:
        raise SSKDError(f"--batch-size and --threads must be at least 1 (got {batch_size}, {args.threads})")
    if args.max_batches is not None and args.max_batches < 1:
        raise SSKDError(f"--max-batches must be at least 1 (got {args.max_batches})")
    device = _device()
    # Every sample of the split, with its own label: the analysis is of the views, not of a training run.
    loader = ViewLoader.for_run(
        spec,
        "train",
        torch_device=device,
        batch_size=batch_size,
        subset_fraction=1.0,
        label_noise=0.0,
        skip_bad=False,
    )
    got = selection(
        teacher.to(device), loader, ratio, max_batches=args.max_batches, progress=not args.no_progress
    )
    result = {
        **got,
        "teacher": str(args.teacher),
        "arch": info["arch"],
        "keep_ratio": ratio,
        "batch_size": batch_size,
        "epoch": 0,
        "seed": cfg.run.seed,
        "split": "train",
    }
    print(
        f"{args.teacher} ({info['arch']}): SS views of train epoch 0, {got['count']} images in {got['batches']} "
        f"batches of {batch_size}, keep ratio {ratio:g}"
    )
    print(f"  {'view':<16} {'rows':>7} {'ss acc':>8} {'kept':>8}")
    for name, r in [*got["views"].items(), ("overall", got["overall"])]:
        print(f"  {name:<16} {r['rows']:>7} {100 * r['ss_acc']:>7.2f}% {100 * r['keep']:>7.2f}%")
    _write_json(args.json, result)
    return 0


# -- parsers -----------------------------------------------------------------------------------------


def _data_flags(p: argparse.ArgumentParser, batch_default: int | None) -> None:
    p.add_argument("--shards", required=True, help="shard folder written by `sskd shard`")
    p.add_argument("--json", help="write the result here (JSON)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=batch_default,
        help="images per batch"
        + ("" if batch_default else " (default: the run config's student.batch_size, what distill uses)"),
    )
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto", help="where DALI decodes")
    p.add_argument("--threads", type=int, default=2, help="DALI threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(sub, fmt) -> None:
    analyze = sub.add_parser(
        "analyze",
        help="analyse trained runs: teacher-student KL and CKA, t-SNE, selective transfer",
        formatter_class=fmt,
        description="Analyses of trained run folders: how close a student is to its teacher (the SSKD paper's "
        "Table 6), a t-SNE picture of a model's features (Fig. 3), and what SSKD's selective "
        "transfer keeps of an SS teacher's similarity rows (Sec. 3.3).",
        epilog="example:\n  sskd analyze similarity --teacher runs/t-ss --student runs/s-sskd --shards data/shards/digits\n"
        "  sskd analyze tsne --model runs/s-sskd --shards data/shards/digits --out tsne.png\n"
        "  sskd analyze selection --teacher runs/t-ss --shards data/shards/digits --json sel.json",
    )
    a_sub = analyze.add_subparsers(dest="analysis", metavar="ANALYSIS")

    def no_analysis(args) -> int:
        analyze.print_help()
        return 2

    analyze.set_defaults(func=no_analysis)

    p = a_sub.add_parser(
        "similarity",
        help="KL and linear CKA between a teacher and a student on the val split",
        formatter_class=fmt,
        description="Teacher-student closeness on the val split's deterministic eval view (the SSKD paper's "
        f"Table 6). {KL_TEXT}. {CKA_TEXT}. Both models are read through their features=True "
        "interface: an SS-head or branch-wrapped teacher answers with its backbone's. A model "
        "against itself gives KL 0 and CKA 1. JSON: kl, cka, count, teacher, student, "
        "teacher_arch, student_arch, split.",
        epilog="example:\n  sskd analyze similarity --teacher runs/t-ss --student runs/s-sskd "
        "--shards data/shards/digits --json sim.json\n"
        "  sskd analyze similarity --teacher runs/t --student runs/s-kd --shards data/shards/c100",
    )
    p.add_argument("--teacher", required=True, help="teacher run folder (train-teacher or train-ss-head run)")
    p.add_argument("--student", required=True, help="student run folder (any run with model.json)")
    _data_flags(p, 256)
    p.set_defaults(func=cmd_similarity)

    p = a_sub.add_parser(
        "tsne",
        help="t-SNE picture of a model's penultimate features on the val split, coloured by class",
        formatter_class=fmt,
        description="scikit-learn's TSNE (2-D, PCA init, random_state = --seed) of the model's penultimate "
        "pooled features on the val split's eval view (all samples, or --max-samples of them "
        "drawn with --seed), drawn as a scatter coloured by class with a legend (PNG, written "
        "atomically). JSON: path, count, kl_divergence (the fit's kl_divergence_), model, arch, seed.",
        epilog="example:\n  sskd analyze tsne --model runs/s-sskd --shards data/shards/digits --out tsne.png\n"
        "  sskd analyze tsne --model runs/t --shards data/shards/c100 --out t.png --max-samples 5000 --json t.json",
    )
    p.add_argument("--model", required=True, help="run folder with model.json")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument(
        "--max-samples", type=int, help="t-SNE of at most this many val samples (drawn with --seed)"
    )
    p.add_argument("--seed", type=int, default=0, help="TSNE random_state and the subsample draw")
    p.add_argument(
        "--perplexity", type=float, default=30.0, help="TSNE perplexity (capped below the sample count)"
    )
    _data_flags(p, 256)
    p.set_defaults(func=cmd_tsne)

    p = a_sub.add_parser(
        "selection",
        help="an SS teacher's SS accuracy and what selective transfer keeps, per view",
        formatter_class=fmt,
        description="For an SSKD teacher (a `train-ss-head --method sskd` run: backbone + SS head), over the "
        "training views of epoch 0 (the views, seed and image size of the run's config, as distill "
        "makes them), per transformed view and overall: the teacher's SS accuracy (share of "
        "transformed rows whose positive, the same image's normal view, ranks first in its "
        "similarity row) and the share of rows selective transfer keeps (Sec. 3.3; every row "
        "ranked right plus int(wrong x sskd.ss_ratio) of the others, per batch), using the "
        "library's similarity_matrix and select_rows. Both depend on the batch size (the "
        "matrix is per batch). JSON: views {name: {rows, ss_acc, keep}}, overall, count, batches, "
        "keep_ratio, batch_size, teacher.",
        epilog="example:\n  sskd analyze selection --teacher runs/t-ss --shards data/shards/digits --json sel.json\n"
        "  sskd analyze selection --teacher runs/t-ss --shards data/shards/c100 --batch-size 64 --max-batches 50",
    )
    p.add_argument("--teacher", required=True, help="train-ss-head --method sskd run (backbone + SS head)")
    p.add_argument("--max-batches", type=int, help="stop after this many batches (default: the whole epoch)")
    _data_flags(p, None)
    p.set_defaults(func=cmd_selection)
