"""Where a 224-px image's CPU time goes beyond the floor (docs/benchmarks.md, "Against the targets")

    python tests/scripts/view_costs.py [BATCH]

The floor of `sskd bench pipeline` decodes and crop-resizes every view and stops there; the views
pipeline also turns all five into normalised floats in torch (pipelines/finish.py), turning the rotation
view by its per-sample quarter turns on the way. This script times those extra pieces on random 224x224
uint8 batches, one thread, as process CPU time per image (so other jobs on the machine disturb it less
than wall time): the finishing step as the loader calls it (with and without the turns), each kind of
view in it alone, DALI's nearest-neighbour rotate (where the turn was made before) against a plain DALI
copy, and a rewrite of the plain views' scale and shift as a lookup table (the same output bit for bit,
checked).
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

from pipelines.finish import Finisher

SIZE, ROUNDS = 224, 3


def cpu_ms_per_image(func, batch: int, reps: int = 8) -> float:
    func()
    start = time.process_time()
    for _ in range(reps):
        func()
    return (time.process_time() - start) / reps / batch * 1e3


def best(func, batch: int) -> float:
    return min(cpu_ms_per_image(func, batch) for _ in range(ROUNDS))


def dali_rotate_cost(batch: int) -> tuple[float, float]:
    from nvidia.dali import fn, pipeline_def, types

    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(batch)]
    ks = [np.array(k, dtype=np.int32) for k in rng.integers(1, 4, batch)]

    def build(rotate: bool):
        @pipeline_def(batch_size=batch, num_threads=1, device_id=None, prefetch_queue_depth=1)
        def pipe():
            x = fn.external_source(source=lambda: imgs, layout="HWC")
            k = fn.external_source(source=lambda: ks)
            if rotate:  # as pipelines.view_registry.Rotation does it
                return fn.rotate(
                    x, angle=fn.cast(k, dtype=types.FLOAT) * 90.0, interp_type=types.INTERP_NN, keep_size=True
                )
            return fn.copy(x)

        p = pipe()
        p.build()
        return p

    copy, rotate = build(False), build(True)
    return best(copy.run, batch), best(rotate.run, batch)


def main(batch: int = 32) -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    views = [torch.randint(0, 255, (batch, SIZE, SIZE, 3), dtype=torch.uint8, generator=g) for _ in range(5)]
    views[1] = views[1][..., :1].contiguous()  # colour drop: one luma channel
    m = torch.eye(3).expand(batch, 3, 3) * 0.9 + 0.03 * torch.rand(batch, 3, 3, generator=g)
    colour = {4: (m.contiguous(), 10 * torch.rand(batch, 3, generator=g))}
    turns = {2: torch.randint(1, 4, (batch,), generator=g)}  # the paper's rotation is view 2
    finish = Finisher([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    whole = best(lambda: finish(views, colour, turns, reuse=True), batch)
    unturned = best(lambda: finish(views, colour, reuse=True), batch)
    plain = best(lambda: finish(views[:1], {}, reuse=True), batch)
    grey = best(lambda: finish(views[1:2], {}, reuse=True), batch)
    col = best(lambda: finish(views[4:5], {0: colour[4]}, reuse=True), batch)
    print(f"finishing step, 5 views: {whole:.3f} ms CPU per image ({unturned:.3f} without the turns)")
    print(f"  a plain view {plain:.3f}, the grey view {grey:.3f}, the colour-distortion view {col:.3f}")

    scale, bias = finish._scale_bias(torch.device("cpu"))
    lut = (torch.arange(256, dtype=torch.float32).view(1, 256) * scale.view(3, 1) + bias.view(3, 1)).numpy()
    x, out = views[0].numpy(), np.empty((batch, 3, SIZE, SIZE), np.float32)

    def lookup():
        for c in range(3):
            np.take(lut[c], x[..., c], out=out[:, c])

    t_lut = best(lookup, batch)
    assert np.array_equal(out, finish(views[:1], {}).numpy()[:, 0]), "the lookup table changed the output"
    print(f"  a plain view by lookup table: {t_lut:.3f} against {plain:.3f} (same output)")
    t_copy, t_rot = dali_rotate_cost(batch)
    print(
        f"DALI rotate (nearest neighbour, k x 90 deg): {t_rot:.3f} ms CPU per image, a DALI copy {t_copy:.3f}: "
        f"{t_rot - t_copy:.3f} above it; the turns in the finishing step {whole - unturned:.3f}"
    )


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
