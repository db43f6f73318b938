"""The one training loop: every stage and every method goes through :func:`train`.

The loop knows no method. A method is a module that takes a batch and returns ``{"loss", "logits",
<named terms>}``; Accelerate owns devices, DDP, mixed precision and gradient accumulation. Metrics are
synchronised only every ``run.log_every`` steps (no ``.item()`` in the hot path).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sskd import runs
from sskd.config import Config, StageConfig, dump_yaml
from sskd.dist import make_accelerator, make_gather, pipeline_device, sync_buffers
from sskd.evaluate import evaluate

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One stage to run: which config section, where to write, how to build the method."""

    stage: str  # config section: teacher | ss_head | student
    cfg: Config
    out: Path
    build: Callable[[dict[str, Any]], torch.nn.Module]  # shard manifest -> method
    info: dict[str, Any] = field(default_factory=dict)  # extra fields for model.json
    resume: bool = False
    batch_hook: Callable[[dict[str, Any], int], dict[str, Any]] | None = None  # e.g. add cached teacher outputs
    data_epoch: Callable[[int], int] | None = None  # augmentation epoch of a training epoch (cache: e mod E)


def lr_factor(st: StageConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of the base lr after ``step`` optimizer steps: warm-up, then step or cosine decay."""
    warmup = st.warmup_epochs * steps_per_epoch
    total = st.epochs * steps_per_epoch

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if st.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
        epoch = step / steps_per_epoch
        return st.gamma ** sum(epoch >= m for m in st.milestones)

    return factor


def _loaders(job: Job, accelerator, views_needed: int | None):
    from pipelines import ViewConfig, ViewLoader

    cfg, st = job.cfg, getattr(job.cfg, job.stage)
    common = dict(
        seed=cfg.run.seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        device=pipeline_device(cfg.data.device),
        threads=cfg.data.threads,
        size=cfg.data.size,
        torch_device=accelerator.device,
    )
    # The loop is done with a batch before it asks for the next: no copy of DALI's buffers needed.
    views = None if views_needed == 1 else ViewConfig.parse(cfg.data.views)
    train = ViewLoader(cfg.data.shards, "train", batch_size=st.batch_size, views=views, train=True,
                       reuse_buffers=True, **common)
    val = None
    if "val" in train.manifest["splits"]:
        val = ViewLoader(cfg.data.shards, "val", batch_size=cfg.data.eval_batch_size, train=False, **common)
    return train, val


def train(job: Job) -> dict[str, Any]:
    """Run ``job`` to the end (or to ``max_steps``); returns the final evaluation."""
    cfg, st, out = job.cfg, getattr(job.cfg, job.stage), job.out
    accelerator = make_accelerator(cfg.run.mixed_precision, st.grad_accum, cfg.data.device)
    main = accelerator.is_main_process
    torch.manual_seed(cfg.run.seed)  # same initial weights on every rank (DDP also broadcasts them)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_yaml(cfg))
    # Built before the loaders so a bad teacher or architecture fails before any data is touched.
    from shards.format import load_manifest

    manifest = load_manifest(cfg.data.shards)
    method = job.build(manifest)
    train_loader, val_loader = _loaders(job, accelerator, getattr(method, "views_needed", None))

    params = [p for p in method.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params, lr=st.lr, momentum=st.momentum, weight_decay=st.weight_decay, nesterov=st.nesterov
    )
    steps_per_epoch = max(1, len(train_loader) // st.grad_accum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(st, steps_per_epoch))
    total_steps = st.epochs * steps_per_epoch
    if st.max_steps:
        total_steps = min(total_steps, st.max_steps)
    if cfg.run.global_ss_batch and accelerator.num_processes > 1:
        method.gather = make_gather(accelerator)
    method, optimizer = accelerator.prepare(method, optimizer)
    core = accelerator.unwrap_model(method)

    state = {"step": 0, "epoch": 0, "batch": 0, "best_top1": -1.0}
    resume_data = None  # this rank's DALI pipeline checkpoint at the resumed batch, if the run saved one
    if job.resume:
        ckpt = runs.load_checkpoint(out, "last")
        if ckpt is None:
            log.debug("no checkpoint in %s: starting from scratch", out)
        else:
            core.load_state_dict(ckpt["model"])
            optimizer.optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            if accelerator.scaler is not None and ckpt.get("scaler"):
                accelerator.scaler.load_state_dict(ckpt["scaler"])
            state.update({k: ckpt[k] for k in state})
            data_states = ckpt.get("data_state") or []
            if len(data_states) == accelerator.num_processes:
                resume_data = data_states[accelerator.process_index]
            log.info("resumed %s at step %d (epoch %d, batch %d)", out, state["step"], state["epoch"], state["batch"])
    metrics = runs.MetricsLog(out, enabled=main)

    def checkpoint(name: str) -> None:
        accelerator.wait_for_everyone()
        data = train_loader.state()  # where each rank's reader stands, to resume without re-making batches
        if accelerator.num_processes == 1:
            data_states = [data]
        else:
            from accelerate.utils import gather_object

            data_states = gather_object([data])
        if main:
            runs.save_checkpoint(out, name, {
                "model": core.state_dict(),
                "optimizer": optimizer.optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                "config": cfg.to_dict(),
                "stage": job.stage,
                "data_state": data_states,
                **state,
            })

    def run_eval(epoch: int) -> dict[str, Any] | None:
        sync_buffers(core, accelerator)
        if val_loader is None:
            return None
        result = evaluate(core.trainable_module(), val_loader, accelerator)
        method.train()
        result["step"] = state["step"]
        metrics.write({"kind": "eval", "epoch": epoch, **result})
        if result["top1"] > state["best_top1"]:
            state["best_top1"] = result["top1"]
            checkpoint("best")
        return result

    world = accelerator.num_processes
    bar = None
    if main and cfg.run.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=state["step"], desc=f"{job.stage}", unit="step", dynamic_ncols=True)
    sums: dict[str, torch.Tensor] = {}
    seen, n_micro, t0 = 0, 0, time.perf_counter()
    last_eval: dict[str, Any] | None = None
    method.train()
    while state["step"] < total_steps and state["epoch"] < st.epochs:
        epoch = state["epoch"]
        views_epoch = job.data_epoch(epoch) if job.data_epoch else epoch
        batches = train_loader.epoch(views_epoch, start_batch=state["batch"], resume_state=resume_data)
        resume_data = None
        for batch in batches:
            if job.batch_hook is not None:
                batch = job.batch_hook(batch, views_epoch)
            with accelerator.accumulate(method):
                out_d = method(batch)
                accelerator.backward(out_d["loss"])
                if st.clip_grad and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, st.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            state["batch"] += 1
            n_micro += 1
            seen += batch["label"].shape[0]
            for k, v in out_d.items():
                if k != "logits" and torch.is_tensor(v) and v.ndim == 0:
                    sums[k] = sums.get(k, 0) + v.detach().float()
            sums["correct"] = sums.get("correct", 0) + (
                out_d["logits"].argmax(1) == batch["label"]).sum().float()
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            state["step"] += 1
            if bar is not None:
                bar.update(1)
            if state["step"] % cfg.run.log_every == 0 or state["step"] == total_steps:
                rec = _reduce(sums, accelerator, n_micro, seen)
                dt = time.perf_counter() - t0
                rec.update(kind="train", step=state["step"], epoch=epoch, lr=scheduler.get_last_lr()[0],
                           images_per_s=round(seen * world / dt, 1), world_size=world)
                metrics.write(rec)
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", img_s=f"{rec['images_per_s']:.0f}")
                sums, seen, n_micro, t0 = {}, 0, 0, time.perf_counter()
            if cfg.run.ckpt_every and state["step"] % cfg.run.ckpt_every == 0:
                checkpoint("last")
            if state["step"] >= total_steps:
                break
        else:  # the epoch ran to its end
            state["epoch"], state["batch"] = epoch + 1, 0
            if cfg.run.eval_every and state["epoch"] % cfg.run.eval_every == 0:
                last_eval = run_eval(epoch)
            checkpoint("last")
            continue
        break
    if bar is not None:
        bar.close()
    checkpoint("last")
    sync_buffers(core, accelerator)
    fresh = last_eval is not None and last_eval.get("step") == state["step"]
    final = last_eval if fresh else run_eval(state["epoch"])
    if main:
        module = core.trainable_module()
        info = {"stage": job.stage, "steps": state["step"], "epochs_done": state["epoch"],
                "has_head": getattr(module, "head", None) is not None,
                "num_classes": train_loader.manifest["num_classes"], "classes": train_loader.manifest["classes"],
                **job.info}
        if final is not None:
            info.update(top1=final["top1"], top5=final["top5"], best_top1=state["best_top1"])
        runs.save_model(out, module, info)
    metrics.close()
    accelerator.wait_for_everyone()
    # Each rank's own weights: DDP keeps them identical, and tests check that it did.
    result = dict(final or {}, world_size=world, rank=accelerator.process_index,
                  rank_weights_sha256=_weights_digest(core))
    return result


def _weights_digest(module: torch.nn.Module) -> str:
    import hashlib

    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _reduce(sums: dict[str, torch.Tensor], accelerator, n_micro: int, seen: int) -> dict[str, float]:
    """Average the summed loss terms over micro-batches and ranks; one device sync for all of them."""
    keys = sorted(sums)
    vec = torch.stack([torch.as_tensor(sums[k], device=accelerator.device).float() for k in keys])
    vec = accelerator.reduce(vec, "mean")
    values = vec.tolist()
    rec = {k: round(v / n_micro, 6) for k, v in zip(keys, values) if k != "correct"}
    rec["train_top1"] = round(100.0 * values[keys.index("correct")] / max(1, seen), 3)
    return rec
