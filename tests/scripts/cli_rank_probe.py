"""``sskd <command> ...`` exactly as the CLI runs it, plus a per-rank probe (tests/integration/test_multinode.py).

    accelerate launch ... tests/scripts/cli_rank_probe.py PROBE_DIR distill --teacher ... --out ...

Everything after PROBE_DIR goes to :func:`sskd.cli.main` unchanged: the same parser, config resolution,
:func:`sskd.engine.prepare.prepare` and :func:`sskd.engine.loop.train` as ``python -m sskd distill``. The
probe only observes, through wrappers that hand every value on untouched:

* :func:`sskd.engine.loop.train_step`: the ids and augmentation epoch of each batch this rank trained on
  (the batch as the method gets it, with any cached teacher outputs);
* ``ViewLoader.epoch`` of evaluation loaders: the ids of each evaluation pass on this rank;
* :func:`sskd.engine.loop.export`: after it, a digest of this rank's whole method (``rank_weights_sha256``:
  DDP keeps the ranks identical) and of its exported module (the student), taken as
  :func:`sskd.runs.save_model` would write it, so it can be compared with rank 0's model.safetensors.

Each rank writes PROBE_DIR/rank<R>.json with the torchrun environment it ran in and train()'s result
(world size, rank, evaluation count).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path


def state_digest(state: dict) -> str:
    """sha256 over sorted (name, bytes) of a state dict, the same for a module and its safetensors file."""
    h = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(argv: list[str]) -> int:
    probe_dir, cli_args = Path(argv[0]), argv[1:]
    import sskd.engine.loop as train_mod
    from pipelines.loader import ViewLoader
    from sskd.cli import main as sskd_main

    record: dict = {
        "env": {
            k: os.environ.get(k)
            for k in (
                "RANK",
                "WORLD_SIZE",
                "LOCAL_RANK",
                "LOCAL_WORLD_SIZE",
                "GROUP_RANK",
                "MASTER_ADDR",
                "MASTER_PORT",
            )
        },
        "pid": os.getpid(),
        "train": [],
        "eval_passes": [],
        "calls": 0,
    }
    real_train, real_export, real_epoch = train_mod.train, train_mod.export, ViewLoader.epoch
    real_step = train_mod.train_step

    def epoch(self, *args, **kwargs):
        if self.train:
            yield from real_epoch(self, *args, **kwargs)
            return
        ids: list[int] = []
        record["eval_passes"].append(ids)
        for batch in real_epoch(self, *args, **kwargs):
            ids.extend(batch["id"].tolist())
            yield batch

    def export(run):
        result = real_export(run)
        record["rank_weights_sha256"] = state_digest(run.core.state_dict())
        record["exported_sha256"] = state_digest(run.core.trainable_module().state_dict())
        return result

    def train_step(run, batch):
        teacher, epoch = run.spec.teacher, run.state["epoch"]
        data_epoch = teacher.data_epoch(epoch) if teacher is not None else epoch
        record["train"].append({"epoch": data_epoch, "ids": batch["id"].tolist()})
        real_step(run, batch)

    def train(spec):
        record["calls"] += 1
        result = real_train(spec)
        record.update(result={k: v for k, v in result.items() if isinstance(v, (int, float, str))})
        return result

    ViewLoader.epoch, train_mod.export, train_mod.train = epoch, export, train
    train_mod.train_step = train_step
    code = sskd_main(cli_args)
    record["exit"] = code
    probe_dir.mkdir(parents=True, exist_ok=True)
    rank = os.environ.get("RANK", "x")  # torchrun's global rank (train()'s own is in "result")
    (probe_dir / f"rank{rank}.json").write_text(json.dumps(record))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
