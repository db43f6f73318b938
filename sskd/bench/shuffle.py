"""``sskd bench shuffle``: how much the training order changes between epochs, against an ideal shuffle.

Three figures over E epochs at W ranks (batch B per rank):

- ``rank_change``: the share of samples on another rank than in the epoch before (ideal 1 - 1/W);
- ``position_corr``: the Spearman correlation of a sample's position in its rank's stream between
  consecutive epochs (ideal 0: where a sample comes in an epoch carries over nothing);
- ``neighbours``: the distinct in-batch neighbours a sample meets over the E epochs (mean over probe
  samples), beside the same count under an ideal global shuffle (``neighbours_ideal``).

On real shards the order is the one DALI produces (a pipeline that reads only each sample's id, no
decoding); on a folder that holds only a ``manifest.json`` (or with ``--layout N:S``) it is simulated
with the very functions that decide the real order (:mod:`pipelines.order`). ``--legacy`` also
measures the order before :mod:`pipelines.order` (a fixed shard list, DALI's by-count sharding with
``stick_to_shard`` and its 1,024-sample shuffle buffer): real on real shards; on a manifest alone
approximated by a local window shuffle of the same size.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.order import Shard, epoch_sequence, rank_range, split_shards
from sskd.core.errors import SSKDError

LEGACY_BUFFER = 1024


def layout_shards(spec: str) -> list[Shard]:
    """``N:S``: N samples in S equal shards (ids in shard order), no files."""
    try:
        n, s = (int(x) for x in spec.split(":"))
    except ValueError:
        raise SSKDError(f"--layout {spec!r}: expected SAMPLES:SHARDS, e.g. 1281167:1024") from None
    if n < 1 or s < 1 or s > n:
        raise SSKDError(f"--layout {spec!r}: need 1 <= SHARDS <= SAMPLES")
    cuts = [(n * k) // s for k in range(s + 1)]
    return [Shard("", "", np.arange(a, b, dtype=np.int64)) for a, b in zip(cuts, cuts[1:])]


def simulated_epoch(shards: list[Shard], seed: int, epoch: int, world: int) -> list[np.ndarray]:
    """Every rank's ids of one epoch in reading order, from :mod:`pipelines.order` (what DALI is told)."""
    shard_of, line_of = epoch_sequence(shards, seed, epoch, world)
    starts = np.cumsum([0] + [len(s.ids) for s in shards])
    flat_ids = np.concatenate([s.ids for s in shards])
    ids = flat_ids[starts[shard_of] + line_of]
    return [ids[slice(*rank_range(len(ids), r, world))] for r in range(world)]


def ideal_epoch(n_ids: np.ndarray, seed: int, epoch: int, world: int) -> list[np.ndarray]:
    """A global uniform shuffle of all samples, split by count: the reference."""
    rng = np.random.default_rng([seed, epoch, 0x1DEA1])
    ids = n_ids[rng.permutation(len(n_ids))]
    return [ids[slice(*rank_range(len(ids), r, world))] for r in range(world)]


def legacy_simulated_epoch(shards: list[Shard], seed: int, epoch: int, world: int) -> list[np.ndarray]:
    """Approximation of the old order: fixed shard order, by-count rank slices, a local shuffle window."""
    ids = np.concatenate([s.ids if s.keep is None else s.ids[s.keep] for s in shards])
    rng = np.random.default_rng([seed, epoch, 0x01D])
    out = []
    for r in range(world):
        part = ids[slice(*rank_range(len(ids), r, world))]
        key = np.arange(len(part)) + rng.uniform(0, LEGACY_BUFFER, size=len(part))
        out.append(part[np.argsort(key, kind="stable")])
    return out


def dali_epoch(loader_args: dict, epoch: int, world: int, legacy: bool = False) -> list[np.ndarray]:
    """Every rank's ids of one epoch as DALI reads them (ids only, nothing decoded)."""
    from nvidia.dali import fn, pipeline_def, types

    from pipelines import ViewLoader
    from pipelines.params import reader_seed
    from shards import format as sfmt

    out = []
    for rank in range(world):
        loader = ViewLoader(rank=rank, world_size=world, **loader_args)
        n = loader.rank_num_samples
        if legacy:
            tars, idxs = loader.tars, loader.idxs
            kw = dict(
                shard_id=rank,
                num_shards=world,
                random_shuffle=True,
                initial_fill=LEGACY_BUFFER,
                seed=reader_seed(loader.seed, epoch),
                stick_to_shard=True,
            )
        else:
            tars, idxs = loader.epoch_files(epoch)
            kw = dict(shard_id=0, num_shards=1, random_shuffle=False)

        @pipeline_def(batch_size=256, num_threads=1, device_id=None, prefetch_queue_depth=1)
        def ids_only():
            sid = fn.readers.webdataset(
                paths=tars,
                index_paths=idxs,
                ext=[sfmt.ID_EXT],
                dtypes=[types.INT64],
                pad_last_batch=True,
                **kw,
            )
            return fn.reshape(sid, shape=[])

        pipe = ids_only()
        pipe.build()
        got: list[int] = []
        while len(got) < n:
            got.extend(np.asarray(pipe.run()[0].as_tensor()).reshape(-1).tolist())
        out.append(np.asarray(got[:n], dtype=np.int64))
        del pipe
    return out


def measure(epochs: list[list[np.ndarray]], batch: int, n_id: int, probes: np.ndarray) -> dict[str, float]:
    """The three figures of a sequence of epochs (each: per-rank id arrays in reading order)."""
    world = len(epochs[0])
    rank_of, pos_of = [], []
    for ranks in epochs:
        r_of = np.full(n_id, -1, dtype=np.int64)
        p_of = np.full(n_id, -1, dtype=np.int64)
        for r, ids in enumerate(ranks):
            r_of[ids] = r
            p_of[ids] = np.arange(len(ids))
        rank_of.append(r_of)
        pos_of.append(p_of)
    held = rank_of[0] >= 0
    changes, corrs = [], []
    for a in range(len(epochs) - 1):
        changes.append(float(np.mean(rank_of[a][held] != rank_of[a + 1][held])))
        corrs.append(_spearman(pos_of[a][held], pos_of[a + 1][held]))
    seen: list[list[np.ndarray]] = [[] for _ in probes]
    for e, ranks in enumerate(epochs):
        for k, p in enumerate(probes):
            ids = ranks[rank_of[e][p]]
            b0 = (pos_of[e][p] // batch) * batch
            seen[k].append(ids[b0 : b0 + batch])
    distinct = [len(np.setdiff1d(np.unique(np.concatenate(s)), [p])) for s, p in zip(seen, probes)]
    return {
        "rank_change": float(np.mean(changes)) if changes else 0.0,
        "position_corr": float(np.mean(corrs)) if corrs else 0.0,
        "neighbours": float(np.mean(distinct)),
        "world_size": world,
    }


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if len(a) < 3:
        return 0.0
    return float(spearmanr(a, b).statistic)


def run(
    shards_dir: str | None,
    layout: str | None,
    world: int,
    epochs: int,
    batch: int,
    seed: int = 0,
    n_probes: int = 2000,
    legacy: bool = False,
    progress=print,
) -> dict[str, Any]:
    from shards.format import MANIFEST

    mode = "simulated"
    loader_args = None
    if layout:
        shards = layout_shards(layout)
        source = f"layout {layout}"
    else:
        folder = Path(shards_dir)
        if not (folder / MANIFEST).is_file():
            raise SSKDError(
                f"{folder / MANIFEST}: not found (a shard folder, or a folder with its manifest.json)"
            )
        manifest = json.loads((folder / MANIFEST).read_text())
        if "train" not in manifest.get("splits", {}):
            raise SSKDError(f"{folder / MANIFEST}: no train split")
        shards = split_shards(folder, manifest, "train")
        source = str(folder)
        if all(Path(s.tar).is_file() and Path(s.idx).is_file() for s in shards):
            mode = "dali"
            loader_args = dict(shards=folder, split="train", batch_size=batch, views=None, seed=seed)
    n = sum(len(s.ids) for s in shards)
    if n < world:
        raise SSKDError(f"{source}: {n} samples, fewer than {world} ranks")
    all_ids = np.concatenate([s.ids for s in shards])
    n_id = int(all_ids.max()) + 1
    rng = np.random.default_rng([seed, 0x9B0BE])
    probes = rng.choice(all_ids, size=min(n_probes, len(all_ids)), replace=False)
    t0 = time.perf_counter()
    variants = {
        "order": (
            lambda e: (
                dali_epoch(loader_args, e, world)
                if mode == "dali"
                else simulated_epoch(shards, seed, e, world)
            )
        ),
        "ideal": (lambda e: ideal_epoch(all_ids, seed, e, world)),
    }
    if legacy:
        variants["legacy"] = lambda e: (
            dali_epoch(loader_args, e, world, legacy=True)
            if mode == "dali"
            else legacy_simulated_epoch(shards, seed, e, world)
        )
    figures = {}
    for name, make in variants.items():
        progress(f"{name}: {epochs} epochs x {world} ranks ...")
        figures[name] = measure([make(e) for e in range(epochs)], batch, n_id, probes)
    out = {
        "rank_change": figures["order"]["rank_change"],
        "rank_change_ideal": figures["ideal"]["rank_change"],
        "position_corr": figures["order"]["position_corr"],
        "position_corr_ideal": figures["ideal"]["position_corr"],
        "neighbours": figures["order"]["neighbours"],
        "neighbours_ideal": figures["ideal"]["neighbours"],
        "mode": mode,
        "source": source,
        "samples": n,
        "shards": len(shards),
        "world_size": world,
        "epochs": epochs,
        "batch_size": batch,
        "seed": seed,
        "probes": len(probes),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if legacy:
        out["legacy"] = {k: figures["legacy"][k] for k in ("rank_change", "position_corr", "neighbours")}
        out["legacy"]["mode"] = "dali" if mode == "dali" else "approximated (local window shuffle)"
    w = world
    out["targets"] = {
        "rank_change >= 0.8 (1 - 1/W)": out["rank_change"] >= 0.8 * (1 - 1 / w),
        "|position_corr| <= 0.1": abs(out["position_corr"]) <= 0.1,
        "neighbours >= 0.5 ideal": out["neighbours"] >= 0.5 * out["neighbours_ideal"],
    }
    return out
