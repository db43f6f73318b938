"""The `sskd export` round trips of docs/export.md: every built-in student architecture trained an epoch on
the digits shards, exported as ONNX, TorchScript and safetensors, each checked on the whole validation split.

    python tests/scripts/export_round_trips.py [ARCH ...] [--all] [--steps 45] [--work DIR]

Prints one markdown row per architecture (the largest absolute logit difference and the top-1 agreement of
each format, and the largest absolute logit they are measured against) and the machine, torch and onnxruntime versions; exits 1 if any file misses the targets
(max |Δlogit| <= 1e-4, agreement 100 %). Without ARCH: the students (STUDENTS); with --all every registry
name without a prefix (the CIFAR architectures; `torchvision:` and other prefixed names only when named).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

FORMATS = ("onnx", "torchscript", "safetensors")
# The students of the shipped recipes (sskd/configs/cifar100 and its method folders) and of the digits sweep.
STUDENTS = (
    "resnet8",
    "resnet20",
    "resnet8x4",
    "wrn_16_2",
    "wrn_40_1",
    "vgg8",
    "MobileNetV2",
    "ShuffleV1",
    "ShuffleV2",
)
# The recipes' learning rate for the light students (0.05 elsewhere): at 0.05 their logits run to thousands.
LR = {"MobileNetV2": 0.01, "ShuffleV1": 0.01, "ShuffleV2": 0.01}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archs", nargs="*", help="architectures (default: the students, STUDENTS)")
    parser.add_argument("--all", action="store_true", help="every built-in CIFAR architecture")
    parser.add_argument(
        "--steps", type=int, default=45, help="training steps of each run (45: one epoch of the digits)"
    )
    parser.add_argument(
        "--work", help="folder for shards, runs and exported files (default: a temporary one)"
    )
    args = parser.parse_args()

    import onnxruntime
    import torch

    from shards import write_digits
    from sskd.cli import main

    def sskd(argv: list[str]) -> int:  # its own lines (the export's summary) stay out of the table
        with contextlib.redirect_stdout(io.StringIO()):
            return main(argv)

    from sskd.models import create_model, list_models

    archs = args.archs or (
        [name for name in list_models() if ":" not in name] if args.all else list(STUDENTS)
    )
    work = Path(args.work or tempfile.mkdtemp(prefix="sskd-export-"))
    shards = work / "digits"
    if not (shards / "manifest.json").is_file():
        write_digits(shards, seed=0, max_count=256, progress=False)
    quiet = ["--no-progress", "--batch-size", "32", "--set", "data.eval_batch_size=128"]
    print(
        f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, "
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; {args.steps} training steps"
    )
    print(
        "| architecture | params | val top-1 | max abs logit | "
        + " | ".join(f"{f}: max abs Δlogit, top-1 agreement" for f in FORMATS)
        + " |"
    )
    print("|---|---|---|---|" + "---|" * len(FORMATS))
    failed = False
    for arch in archs:
        run = work / "runs" / arch.replace(":", "_")
        if not (run / "model.json").is_file():
            code = sskd(
                [
                    "train-teacher",
                    "--shards",
                    str(shards),
                    "--arch",
                    arch,
                    "--out",
                    str(run),
                    "--max-steps",
                    str(args.steps),
                    "--overwrite",
                    "--lr",
                    str(LR.get(arch, 0.05)),
                    *quiet,
                ]
            )
            if code >= 128:  # interrupted (Ctrl-C, SIGTERM): the training command said so; stop here
                return code
            if code:
                print(f"| {arch} | training failed ({code}) |")
                failed = True
                continue
        cells, scale = [], 0.0
        for fmt in FORMATS:
            out = work / "exported" / f"{run.name}.{fmt}"
            if sskd(["export", str(run), "--format", fmt, "--out", str(out), "--shards", str(shards)]):
                cells.append("**failed**")
                failed = True
                continue
            check = json.loads(Path(str(out) + ".json").read_text())["check"]
            scale = check["max_abs_logit"]
            ok = check["max_abs_logit_diff"] <= 1e-4 and check["top1_agreement"] == 100.0
            failed |= not ok
            cell = f"{check['max_abs_logit_diff']:.1e}, {check['top1_agreement']:.0f} %"
            cells.append(cell if ok else f"**{cell}**")
        params = sum(p.numel() for p in create_model(arch, num_classes=10).parameters()) / 1e6
        top1 = json.loads((run / "model.json").read_text())["top1"]
        print(
            f"| {arch} | {params:.2f}M | {top1:.1f} % | {scale:.3g} | " + " | ".join(cells) + " |", flush=True
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
