"""The prototype of the cache's ``topK-dD`` level: would a PCA code of the logits keep SSKD's `kd` term where
top-K does not? (docs/cache.md, "1,000 classes"; the level itself is measured by `sskd bench cache`, with
its basis fitted on the first 4,096 rows only, where this script fits on every row it codes)

    python tests/scripts/logit_codes.py --teacher runs/t3-ss --shards data/shards/triples [--batches 16]

At 1,000 classes the compact level's top 25 logits leave SSKD's terms far from exact (`sskd bench cache`).
A network's logits are an affine function of its last features (512 dimensions for a ResNet-34, 64 for a
resnet8), so they may be coded far more cheaply as coordinates in a subspace. This script runs the
teacher on ``--batches`` batches of 64 training views (4 views each, as `sskd bench cache` does), fits a
centred PCA of the logit rows, and prints, for top-K (as the cache stores it: fp16 values, the tail's
mass exact at T = 4), for int8 PCA codes of D dimensions (per-row fp16 scale) and for the K largest
values (fp16) written over a PCA reconstruction, the bytes per row, the relative error of the mean
KL(teacher || student) at T = 4 times T² (SSKD's `kd` term) against a fixed random resnet8 student, the
mean total variation between the teacher's and the coded rows' probabilities at T = 4 (what `sskd cache`
logs for a code it fits, and warns above 1 %), and the top-1 agreement with the exact logits. The basis is fitted on the rows it codes (a cache would fit
it on the first 4,096 rows, as `--embed-dim` does), so the PCA figures are a best case.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

T = 4.0


def main(argv: list[str] | None = None) -> int:
    from pipelines import ViewLoader
    from sskd.bench.cache import bench_spec
    from sskd.cache import dense_from_topk
    from sskd.cache.levels import total_variation
    from sskd.models import create_model
    from sskd.runs.models import freeze

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True, help="a teacher run with its SSKD SS head")
    p.add_argument("--shards", required=True, help="the training shards")
    p.add_argument("--batches", type=int, default=16, help="batches of 64 images (default 16)")
    a = p.parse_args(argv)
    args = argparse.Namespace(
        shards=a.shards,
        method="sskd",
        batch_size=64,
        student_arch=None,
        config=None,
        set=[],
        teacher=a.teacher,
    )
    spec = bench_spec(args)
    k = spec.num_classes
    loader = ViewLoader.for_run(spec, "train", train=True, label_noise=0.0, skip_bad=False)
    teacher = freeze(spec.teacher.load())
    torch.manual_seed(0)
    student = create_model("resnet8", k).eval()
    z, s = [], []
    with torch.inference_mode():
        for i, b in enumerate(loader.epoch(0)):
            z.append(spec.method.teacher_outputs(teacher, b["views"])["logits"].float().reshape(-1, k))
            s.append(student(b["views"].flatten(0, 1)).float())
            if i + 1 == a.batches:
                break
    z = torch.cat(z).double().numpy()
    s = torch.log_softmax(torch.cat(s).double() / T, -1)

    def kd(x: np.ndarray) -> float:
        pt = torch.log_softmax(torch.from_numpy(np.asarray(x, np.float64)) / T, -1)
        return float((pt.exp() * (pt - s)).sum(-1).mean()) * T * T

    mu = z.mean(0)
    _, sv, vt = np.linalg.svd(z - mu, full_matrices=False)
    energy = np.cumsum(sv**2) / (sv**2).sum()

    def fp16(x):
        return np.asarray(x).astype(np.float16).astype(np.float64)

    def pca(d: int) -> np.ndarray:
        basis = vt[:d].T
        c = (z - mu) @ basis
        scale = fp16(np.maximum(np.abs(c).max(-1, keepdims=True), 1e-12) / 127)
        return mu + np.clip(np.rint(c / scale), -127, 127) * scale @ basis.T

    def top(kk: int, base: np.ndarray | None = None) -> np.ndarray:
        t = torch.from_numpy(z).topk(kk, -1)
        if base is None:
            lse = (T * torch.logsumexp(torch.from_numpy(z) / T, -1)).numpy().astype(np.float32)
            return dense_from_topk(fp16(t.values.numpy()).astype(np.float32), t.indices.numpy(), lse, k, T)
        out = base.copy()
        np.put_along_axis(out, t.indices.numpy(), fp16(t.values.numpy()), -1)
        return out

    rows = [(f"top{kk}", kk * 4 + 4, top(kk)) for kk in (100, 50, 25, 10) if kk < k]
    rows += [(f"pca{d} int8", d + 2, pca(d)) for d in (8, 16, 32, 64) if d < k]
    rows += [
        (f"top{kk} + pca{d}", kk * 4 + d + 2, top(kk, pca(d)))
        for kk, d in ((10, 8), (10, 16), (10, 32), (5, 32), (10, 64), (10, 128))
        if d < min(k, len(z))
    ]
    ref = kd(z)
    print(f"{len(z)} logit rows of {k} classes; kd (T = {T:g}) {ref:.5f}")
    print(
        "PCA energy at D = 8, 16, 32, 64, 128: "
        + ", ".join(f"{energy[min(d, len(energy)) - 1]:.5f}" for d in (8, 16, 32, 64, 128))
    )
    print(f"{'code':16s} {'B/row':>6s} {'kd rel err':>11s} {'total variation':>16s} {'top-1 agreement':>16s}")
    for name, nb, x in rows:
        agree = float((x.argmax(-1) == z.argmax(-1)).mean())
        print(
            f"{name:16s} {nb:6d} {abs(kd(x) - ref) / ref:11.2e} {total_variation(z, x, T):16.2e} {agree:16.4f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
