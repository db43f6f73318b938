"""Accelerate set-up in one place: device choice, mixed precision, the CPU multi-process trap.

Library code names no CUDA device itself: the device comes from the Accelerator (GPU when CUDA is present,
CPU otherwise) and DALI's device from :func:`pipeline_device`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from sskd.core.errors import SSKDError

log = logging.getLogger(__name__)


def pipeline_device(requested: str = "auto") -> str:
    """DALI device for this process: ``gpu`` when asked for (or ``auto`` with CUDA present), else ``cpu``."""
    if requested == "gpu" and not torch.cuda.is_available():
        raise SSKDError("data.device=gpu but no CUDA device is visible; use --device cpu or auto")
    if requested == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return requested


def make_accelerator(
    mixed_precision: str = "no",
    grad_accum: int = 1,
    device: str = "auto",
    find_unused_parameters: bool = False,
    **trackers,
):
    """An :class:`accelerate.Accelerator` for this process.

    Without CUDA it is built with ``cpu=True`` so torch.distributed uses gloo; this is how
    ``launch/accelerate/cpu.yaml`` (declared MULTI_GPU, because ``--cpu --num_processes 2`` starts one
    process, accelerate#2741) gets two real CPU ranks. ``trackers``: ``log_with`` and ``project_dir``
    (:func:`sskd.runs.accelerator_trackers`).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # ``device`` is where DALI makes the views; the model trains on the GPU whenever there is one
    # (DALI-on-CPU feeding GPU training is a standard mode on machines with many cores).
    del device
    cpu = not torch.cuda.is_available()
    if mixed_precision == "fp16" and cpu:
        raise SSKDError("run.mixed_precision=fp16 needs a GPU; use bf16 on CPU")
    # Accelerate keeps one process-wide AcceleratorState and refuses a second Accelerator with another
    # precision. Several stages in one process (the demo, tests, notebooks) may differ in precision, so
    # the per-run part of the state is dropped; the process group (PartialState) is kept.
    if (
        AcceleratorState._shared_state
        and AcceleratorState._shared_state.get("_mixed_precision") != mixed_precision
    ):
        AcceleratorState._reset_state(reset_partial_state=False)
    handlers = []
    if find_unused_parameters:  # methods with pre-training phases leave some parameters without a gradient
        from accelerate.utils import DistributedDataParallelKwargs

        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    return Accelerator(
        cpu=cpu,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=grad_accum,
        step_scheduler_with_optimizer=False,
        kwargs_handlers=handlers,
        **trackers,
    )


def make_gather(accelerator) -> Callable[[torch.Tensor], tuple[torch.Tensor, int]]:
    """A differentiable all-gather of per-rank rows for one global SS similarity matrix.

    Returns ``gather(z (B_local, d)) -> (z_all (B_total, d), offset)`` where ``offset`` is the row of
    this rank's first sample in ``z_all``. Ranks may hold different batch sizes (the last batch).
    """
    import torch.distributed as dist
    import torch.distributed.nn.functional as dist_fn

    def gather(z: torch.Tensor) -> tuple[torch.Tensor, int]:
        size = torch.tensor([z.shape[0]], device=z.device)
        sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
        dist.all_gather(sizes, size)
        sizes_l = [int(s) for s in sizes]
        padded = torch.nn.functional.pad(z, (0, 0, 0, max(sizes_l) - z.shape[0]))
        parts = dist_fn.all_gather(padded)
        z_all = torch.cat([p[:n] for p, n in zip(parts, sizes_l)])
        return z_all, sum(sizes_l[: dist.get_rank()])

    return gather


def sync_buffers(module: torch.nn.Module, accelerator) -> None:
    """Copy rank 0's buffers (BN running statistics) to every rank.

    DDP keeps parameters identical, but each rank's last forward updates its own BN statistics; before
    evaluating or saving, every rank takes rank 0's so all ranks hold and evaluate one model.
    """
    if accelerator.num_processes < 2:
        return
    import torch.distributed as dist

    for buf in module.buffers():
        dist.broadcast(buf.data, src=0)


def agree_on_error(accelerator, error: str | None) -> str | None:
    """The main process's verdict (an error message or None) on every rank, so all of them stop or go on."""
    if accelerator.num_processes < 2:
        return error
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([error], from_process=0)[0]
