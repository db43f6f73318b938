"""``sskd export``: a run's plain classifier as ONNX, TorchScript or safetensors, with its equivalence check."""

from __future__ import annotations


def cmd_export(args) -> int:
    from pathlib import Path

    from sskd.core.atomic import check_writable
    from sskd.core.errors import SSKDError
    from sskd.runs import load_model_info
    from sskd.runs.export import export_run, info_path, preprocessing, require_format

    if args.batch_size < 1 or args.threads < 1:
        raise SSKDError(
            f"--batch-size and --threads must be at least 1 (got {args.batch_size}, {args.threads})"
        )
    if not (args.atol >= 0 and args.rtol >= 0):
        raise SSKDError(f"--atol and --rtol must be numbers >= 0 (got {args.atol}, {args.rtol})")
    require_format(args.format)
    info = load_model_info(args.run)
    check_writable(args.out, "exported model")
    check_writable(info_path(args.out), "export description")
    prep = preprocessing(args.run, info, args.shards)
    batches, data = None, ""
    if args.shards:
        from pipelines import ViewLoader
        from sskd.engine.dist import pipeline_device

        loader = ViewLoader(
            args.shards,
            args.split,
            batch_size=args.batch_size,
            views=None,
            train=False,
            device=pipeline_device(args.device),
            threads=args.threads,
            size=prep["size"],
            torch_device="cpu",
        )
        batches = ((b["views"][:, 0], b["label"]) for b in loader.epoch(0))
        data = f"{loader.num_samples} {args.split} images of {Path(args.shards).name}"
    record = export_run(
        args.run, args.format, args.out, prep=prep, batches=batches, data=data, atol=args.atol, rtol=args.rtol
    )
    check = record["check"]
    line = (
        f"{args.out} ({args.format}, {record['arch']}, input {prep['size']}x{prep['size']}): "
        f"max |Δlogit| {check['max_abs_logit_diff']:.3g} (logits up to {check['max_abs_logit']:.3g}; "
        f"--atol {args.atol:g} + --rtol {args.rtol:g} x |logit|), "
        f"top-1 agreement {check['top1_agreement']:.2f}% on {check['data']}"
    )
    if "top1_exported" in check:
        line += f"; top-1 {check['top1_pytorch']:.2f}% (PyTorch) / {check['top1_exported']:.2f}% (exported)"
    print(line)
    print(f"{info_path(args.out)}: input size, normalisation, classes, source run")
    return 0


def register(sub, fmt) -> None:
    p = sub.add_parser(
        "export",
        help="export a run's classifier (ONNX, TorchScript, safetensors), checked against the run's model",
        formatter_class=fmt,
        description="Write a run's trained classifier on its own (an SSKD student's SS head, HSSAKD's "
        "branches and KDSS's heads are left out: images (b, 3, H, W) in, logits (b, K) out) as ONNX, "
        "TorchScript or safetensors, and FILE.json beside it (input size, normalisation, class names, the "
        "source run and its weights' sha256). The written file, loaded back (onnxruntime, torch.jit.load, "
        "a fresh model), is compared with the run's PyTorch model on the validation images of --shards (or "
        "on random inputs without --shards): the largest absolute logit difference and the top-1 agreement "
        "are printed, and where a logit differs by more than --atol + --rtol x |logit| the command fails "
        "and publishes nothing.",
        epilog="example:\n  sskd export runs/s --format onnx --out student.onnx --shards data/shards/c100\n"
        "  sskd evaluate --model student.onnx --shards data/shards/c100",
    )
    p.add_argument("run", help="run folder with model.safetensors and model.json")
    p.add_argument(
        "--format", required=True, choices=["onnx", "torchscript", "safetensors"], help="file format"
    )
    p.add_argument("--out", required=True, help="file to write (FILE.json is written beside it)")
    p.add_argument(
        "--shards",
        help="shard folder whose validation images the check runs on (and whose normalisation is recorded); "
        "default: random inputs and the shards the run's config.yaml names",
    )
    p.add_argument("--split", default="val", help="split of --shards the check runs on")
    p.add_argument(
        "--atol",
        type=float,
        default=1e-4,  # sskd.runs.export.DEFAULT_ATOL (not imported here: it would import torch)
        help="absolute logit difference accepted (fp32)",
    )
    p.add_argument(
        "--rtol",
        type=float,
        default=1e-5,  # sskd.runs.export.DEFAULT_RTOL
        help="logit difference accepted in proportion to the logit, on top of --atol (fp32 rounding of "
        "large logits)",
    )
    p.add_argument("--batch-size", type=int, default=256, help="images per batch of the check")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto", help="where DALI decodes")
    p.add_argument("--threads", type=int, default=2, help="DALI threads")
    p.set_defaults(func=cmd_export)
