"""Which rank-D projection keeps SSKD's teacher similarity matrix best? (docs/cache.md, "Which projection")

    python tests/scripts/cache_projections.py RUN SHARDS [BATCH]

RUN is an SSKD teacher (a train-ss-head run with the contrastive head). Each projection is fitted on the
first 8 batches' embeddings of epoch 0's rotation views (as `sskd cache` fits its own) and scored on the 8
batches after them, without int8 coding, to isolate the projection: the largest and the mean error of the
similarity entries, and the share of rows whose selective-transfer mask (ss_ratio 0.75) is the same.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from pipelines import ViewLoader
from sskd.bench.cache import _similarity
from sskd.cache.levels import fit_projection, unit_rows
from sskd.losses import select_rows
from sskd.losses.pretext import own_image_targets
from sskd.methods.sskd import SSKD
from sskd.runs.models import load_run_model

FIT_BATCHES, SCORE_BATCHES, FIT_ROWS, SS_RATIO = 8, 8, 4096, 0.75


def projections(fit: np.ndarray, d: int, dim: int, rng: np.random.Generator) -> dict:
    """Uncentred PCA (the cache's subspace), centred PCA and a random orthogonal projection to ``dim``."""
    u = unit_rows(fit.astype(np.float64))
    mu = u.mean(0)
    centred = np.linalg.svd(u - mu, full_matrices=False)[2][:dim].T
    w = fit_projection(fit, dim)["basis"].astype(np.float64)  # its projector: the rotation inside cancels
    r = np.linalg.qr(rng.normal(size=(d, dim)))[0]
    return {
        "uncentred PCA": lambda x: unit_rows(x) @ w @ w.T,
        "centred PCA": lambda x: (unit_rows(x) - mu) @ centred @ centred.T + mu,
        "random orthogonal": lambda x: unit_rows(x) @ r @ r.T,
    }


def main(run: str, shards: str, batch_size: int = 64) -> None:
    torch.manual_seed(0)
    teacher, _ = load_run_model(run)
    teacher.eval()
    loader = ViewLoader(shards, "train", batch_size=batch_size, views="rotation", threads=1)
    embs = []
    for i, b in enumerate(loader.epoch(0)):
        with torch.no_grad():
            embs.append(SSKD.teacher_outputs(teacher, b["views"])["embed"].numpy())
        if i == FIT_BATCHES + SCORE_BATCHES - 1:
            break
    d = embs[0].shape[-1]
    fit = np.concatenate(embs[:FIT_BATCHES]).reshape(-1, d)[:FIT_ROWS]
    rng = np.random.default_rng(0)
    print(f"teacher {run}: d={d}; fitted on {len(fit)} rows of the first {FIT_BATCHES} batches, scored after")
    for dim in [x for x in (128, 64, 32, 16) if x < d]:
        for name, project in projections(fit, d, dim, rng).items():
            worst, means, agree = 0.0, [], []
            for e in embs[FIT_BATCHES:]:
                e = torch.from_numpy(e)
                exact = _similarity(e)
                approx = _similarity(torch.from_numpy(project(e.numpy().astype(np.float64))).float())
                worst = max(worst, float((exact - approx).abs().max()))
                means.append(float((exact - approx).abs().mean()))
                t = own_image_targets(e.shape[0], 4, exact.device)
                same = select_rows(exact, t, SS_RATIO) == select_rows(approx, t, SS_RATIO)
                agree.append(float(same.float().mean()))
            print(
                f"  D={dim:<4} {name:<18} max |dA| {worst:.4f}  mean |dA| {np.mean(means):.5f}  "
                f"mask agreement {np.mean(agree):.4f}"
            )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 64)
