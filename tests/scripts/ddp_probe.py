"""Run under `accelerate launch` by tests/test_train.py: a few real training steps on 2 CPU ranks.

Each rank records the world size, the sample ids it trained on, the evaluation count and a hash of
its own final weights, so the test can check disjoint data, identical weights and exact-once evaluation.
"""

import json
import sys
from pathlib import Path

from sskd.engine.config import load_config
from sskd.engine.prepare import builder
from sskd.engine.loop import Job, train


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

    def hook(batch, epoch):
        seen.extend(batch["id"].tolist())
        return batch

    job = Job(
        stage="teacher",
        cfg=cfg,
        out=Path(out),
        build=builder(cfg, "teacher", {}),
        info={"arch": "resnet8"},
        batch_hook=hook,
    )
    result = train(job)
    record = {
        "rank": result["rank"],
        "world": result["world_size"],
        "ids": seen,
        "eval_count": result.get("count"),
        "weights": result["rank_weights_sha256"],
    }
    (Path(out) / f"probe-rank{result['rank']}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
