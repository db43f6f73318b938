"""Fixed-seed CPU runs of every stage and method whose final weights are pinned in ``tests/data``.

A refactor must keep behaviour (same weights for a fixed seed). An exact hash only holds on the machine
that made it (oneDNN picks kernels per CPU), so each run is pinned by a fingerprint that survives float
rounding but not a change of behaviour: 32 fixed random projections of all its weights, plus the sha256
for a bit-exact check on the same machine.

Regenerate (only when behaviour is meant to change, and say why in the commit)::

    python tests/integration/golden.py tests/data/golden_weights.json
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

FAST = [
    "--no-progress",
    "--batch-size",
    "32",
    "--seed",
    "3",
    "--set",
    "run.log_every=1",
    "--set",
    "data.eval_batch_size=128",
]
STUDENTS = ("ce", "kd", "sskd")


def fingerprint(path: Path) -> dict:
    """sha256 and 32 seeded random projections of a safetensors file's weights (sorted by name)."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    flat = torch.cat([state[k].double().flatten() for k in sorted(state)])
    gen = torch.Generator().manual_seed(1234)
    proj = torch.randn(32, flat.numel(), generator=gen, dtype=torch.float64) @ flat
    digest = hashlib.sha256(
        b"".join(state[k].contiguous().numpy().tobytes() for k in sorted(state))
    ).hexdigest()
    return {"sha256": digest, "proj": [round(float(p), 9) for p in proj], "numel": int(flat.numel())}


def golden_runs(shards: Path, root: Path) -> dict[str, dict]:
    """Train teacher, SS head and the CE/KD/SSKD students for a few steps; fingerprint each."""
    from sskd.cli import main

    def run(*args) -> None:
        assert main([str(a) for a in args]) == 0, args

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # intra-op threads change reduction order, and 4 steps amplify that to 1e-3
    try:
        return _runs(run, shards, root)
    finally:
        torch.set_num_threads(threads)


def _runs(run, shards: Path, root: Path) -> dict[str, dict]:

    run(
        "train-teacher", "--shards", shards, "--arch", "resnet8", "--out", root / "t", "--max-steps", 4, *FAST
    )
    run(
        "train-ss-head",
        "--teacher",
        root / "t",
        "--shards",
        shards,
        "--out",
        root / "ss",
        "--max-steps",
        3,
        *FAST,
    )
    for method in STUDENTS:
        teacher = [] if method == "ce" else ["--teacher", root / "ss"]
        run(
            "distill",
            *teacher,
            "--student",
            "resnet8",
            "--method",
            method,
            "--shards",
            shards,
            "--out",
            root / method,
            "--max-steps",
            3,
            *FAST,
        )
    run(
        "distill",
        "--teacher",
        root / "ss",
        "--student",
        "resnet8",
        "--method",
        "sskd",
        "--views",
        "paper",
        "--shards",
        shards,
        "--out",
        root / "sskd-paper",
        "--max-steps",
        2,
        *FAST,
    )
    names = ["t", "ss", *STUDENTS, "sskd-paper"]
    return {name: fingerprint(root / name / "model.safetensors") for name in names}


if __name__ == "__main__":
    from shards import write_digits

    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        write_digits(shards, seed=0, max_count=256, progress=False)
        result = golden_runs(shards, Path(tmp) / "runs")
    Path(sys.argv[1]).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {sys.argv[1]}")
