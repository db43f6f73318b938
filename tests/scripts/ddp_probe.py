"""Run under `accelerate launch` by tests/test_loop.py: a few real training steps on 2 CPU ranks.

Each rank records the world size, the sample ids it trained on, the evaluation count and a hash of
its own final weights, so the test can check disjoint data, identical weights and exact-once evaluation.
"""

import hashlib
import json
import sys
from pathlib import Path

import sskd.engine.loop as loop
from sskd.engine.config import load_config
from sskd.engine.prepare import prepare


def state_digest(state: dict) -> str:
    """sha256 over sorted (name, bytes) of a state dict."""
    h = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(shards: str, out: str) -> None:
    cfg = load_config(
        None,
        [
            f"data.shards={shards}",
            "run.progress=false",
            "run.log_every=2",
            "teacher.arch=resnet8",
            "teacher.max_steps=6",
            "teacher.batch_size=16",
            "teacher.epochs=1",
        ],
    )
    seen: list[int] = []
    weights: list[str] = []
    real_step, real_export = loop.train_step, loop.export

    def train_step(run, batch):  # the ids of every batch this rank trains on
        seen.extend(batch["id"].tolist())
        real_step(run, batch)

    def export(run):  # this rank's final weights (the whole method), as DDP left them
        result = real_export(run)
        weights.append(state_digest(run.core.state_dict()))
        return result

    loop.train_step, loop.export = train_step, export
    result = loop.train(prepare(cfg, "teacher", out=out))
    record = {
        "rank": result["rank"],
        "world": result["world_size"],
        "ids": seen,
        "eval_count": result.get("count"),
        "weights": weights[0],
    }
    (Path(out) / f"probe-rank{result['rank']}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
