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

import sskd.engine.loop as loop
from sskd.engine.config import load_config
from sskd.engine.prepare import prepare


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
    real_build, real_step = loop.build_method, loop.train_step

    def build_method(spec, **kw):  # the method as built, with its banks before any step
        method = real_build(spec, **kw)
        made.append((method, method.bank_s.clone(), method.bank_t.clone()))
        return method

    def train_step(run, batch):  # the ids of every batch this rank trains on
        seen.extend(batch["id"].tolist())
        real_step(run, batch)

    loop.build_method, loop.train_step = build_method, train_step
    result = loop.train(prepare(cfg, "student", out=out, teacher=teacher))
    method, s0, t0 = made[0]
    banks = torch.stack([method.bank_s, method.bank_t]).cpu().contiguous()
    moved = ((method.bank_s != s0).any(1) | (method.bank_t != t0).any(1)).nonzero().flatten().tolist()
    weights = hashlib.sha256()
    for name, tensor in sorted(method.state_dict().items()):
        weights.update(name.encode())
        weights.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    record = {
        "rank": result["rank"],
        "world": result["world_size"],
        "ids": seen,
        "moved": moved,
        "z": method.z,
        "banks": hashlib.sha256(banks.numpy().tobytes()).hexdigest(),
        "weights": weights.hexdigest(),
    }
    (Path(out) / f"crd-probe-rank{result['rank']}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
