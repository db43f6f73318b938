"""Run under `accelerate launch` by tests/test_crd.py: a few CRD steps on 2 CPU ranks.

Each rank records the sample ids it trained on, a hash of its two memory banks, the bank rows that
moved and its weights' hash, so the test can check that both ranks hold the same banks and that those
cover every rank's samples (the update is all-gathered), not only their own.
"""

import hashlib
import json
import sys
from pathlib import Path

import torch

from sskd.engine.config import load_config
from sskd.engine.prepare import builder
from sskd.engine.loop import Job, train


def main(shards: str, teacher: str, out: str) -> None:
    cfg = load_config(
        None,
        [
            f"data.shards={shards}",
            "run.progress=false",
            "run.log_every=1",
            "student.method=crd",
            "student.arch=resnet8",
            "student.max_steps=3",
            "student.batch_size=16",
            "crd.nce_k=64",
        ],
    )
    seen: list[int] = []
    made = []
    build = builder(cfg, "student", {}, teacher=teacher)

    def keep(manifest):
        method = build(manifest)
        made.append((method, method.bank_s.clone(), method.bank_t.clone()))
        return method

    def hook(batch, epoch):
        seen.extend(batch["id"].tolist())
        return batch

    result = train(
        Job(stage="student", cfg=cfg, out=Path(out), build=keep, info={"arch": "resnet8"}, batch_hook=hook)
    )
    method, s0, t0 = made[0]
    banks = torch.stack([method.bank_s, method.bank_t]).cpu().contiguous()
    moved = ((method.bank_s != s0).any(1) | (method.bank_t != t0).any(1)).nonzero().flatten().tolist()
    record = {
        "rank": result["rank"],
        "world": result["world_size"],
        "ids": seen,
        "moved": moved,
        "z": method.z,
        "banks": hashlib.sha256(banks.numpy().tobytes()).hexdigest(),
        "weights": result["rank_weights_sha256"],
    }
    (Path(out) / f"crd-probe-rank{result['rank']}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
