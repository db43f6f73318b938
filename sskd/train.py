"""The one training loop: every stage and every method goes through :func:`train`.

The loop knows no method. A method is a module that takes a batch and returns ``{"loss", "logits",
<named terms>}``; Accelerate owns devices, DDP, mixed precision and gradient accumulation. Metrics are
synchronised only every ``run.log_every`` steps (no ``.item()`` in the hot path).

:func:`train` reads top to bottom: claim the run folder, set up, restore a checkpoint, run epochs,
export. Each part is a function of :class:`Run`, the state one stage holds while it trains.
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

from sskd import atomic, runs
from sskd.config import Config, StageConfig, diff_configs, dump_yaml
from sskd.dist import agree_on_error, make_accelerator, make_gather, pipeline_device, sync_buffers
from sskd.errors import SSKDError
from sskd.methods import resolve_views, stage_method
from sskd.stages import describe_model
from sskd.stop import Interrupted, StopFlag, StopRequest

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
    overwrite: bool = False  # replace an earlier run in ``out`` (else it is refused unless resuming)
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


def _loaders(job: Job, accelerator, views):
    from pipelines import ViewLoader

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
    train = ViewLoader(cfg.data.shards, "train", batch_size=st.batch_size, views=views, train=True,
                       reuse_buffers=True, subset_fraction=cfg.data.subset_fraction,
                       label_noise=cfg.data.label_noise, **common)
    if train.subset_fraction < 1 or train.label_noise > 0:
        from pipelines.settings import describe, write_record

        log.info("%s: training on %s: %d of the split's samples%s", job.out,
                 describe(train.subset_fraction, train.label_noise), train.num_samples,
                 f", {len(train.flipped_ids)} labels flipped" if train.label_noise else "")
        if accelerator.is_main_process:
            write_record(job.out, train)
    val = None
    if "val" in train.manifest["splits"]:
        val = ViewLoader(cfg.data.shards, "val", batch_size=cfg.data.eval_batch_size, train=False, **common)
    else:
        log.info("%s: no val split: the run trains without evaluation", cfg.data.shards)
    return train, val


class Run:
    """One stage while it trains: the method, its optimizer and loaders, the counters, the outputs."""

    def __init__(self, job: Job, accelerator):
        from shards.format import load_manifest

        self.job, self.cfg, self.out = job, job.cfg, job.out
        self.st: StageConfig = getattr(job.cfg, job.stage)
        self.accelerator, self.main, self.world = accelerator, accelerator.is_main_process, accelerator.num_processes
        # Built before the loaders so a bad teacher or architecture fails before any data is touched.
        method = job.build(load_manifest(self.cfg.data.shards))
        self.method_cls = stage_method(self.cfg, job.stage)
        self.train_loader, self.val_loader = _loaders(job, accelerator, resolve_views(self.cfg, self.method_cls))
        self.params = method.phase_parameters(None)
        st = self.st
        optimizer = torch.optim.SGD(self.params, lr=st.lr, momentum=st.momentum, weight_decay=st.weight_decay,
                                    nesterov=st.nesterov)
        self.steps_per_epoch = max(1, len(self.train_loader) // st.grad_accum)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(st, self.steps_per_epoch))
        if accelerator.is_main_process and st.schedule == "step" and st.gamma != 1 and st.milestones \
                and min(st.milestones) >= st.epochs:
            log.warning("%s.milestones %s all fall at or after epoch %d: the lr stays %g for the whole run "
                        "(set --set %s.milestones=[...] or %s.schedule=cosine)", job.stage, st.milestones,
                        st.epochs, st.lr, job.stage, job.stage)
        self.total_steps = min(st.epochs * self.steps_per_epoch, st.max_steps or math.inf)
        if self.world > 1:
            method.all_gather = make_gather(accelerator)
            if self.cfg.run.global_ss_batch:
                method.gather = method.all_gather
        self.method, self.optimizer = accelerator.prepare(method, optimizer)
        self.core = accelerator.unwrap_model(self.method)
        # Pre-training phases (a method's own; most have none), then the main training: state["phase"]
        # indexes [*phases, main], so a run without phases is always in phase 0.
        self.phases = [p for p in self.core.phases() if p.epochs > 0]
        self.main_phase = (self.params, self.optimizer, self.scheduler, self.total_steps, st.epochs)
        self.epochs = st.epochs
        self.state = {"step": 0, "epoch": 0, "batch": 0, "best_top1": -1.0, "phase": 0}
        self.resume_data: dict | None = None  # this rank's DALI pipeline checkpoint at the resumed batch
        self.last_eval: dict[str, Any] | None = None
        self.metrics: runs.MetricsLog | None = None
        self.bar = None
        self.batches = None  # the running epoch's batch iterator
        self._sums: dict[str, torch.Tensor] = {}
        self._seen, self._micro, self._t0 = 0, 0, time.perf_counter()

    @property
    def finished(self) -> bool:
        return self.state["step"] >= self.total_steps or self.state["epoch"] >= self.epochs

    @property
    def phase_name(self) -> str | None:
        """The pre-training phase in progress, None in the main training."""
        index = self.state["phase"]
        return self.phases[index].name if index < len(self.phases) else None

    def enter_phase(self) -> None:
        """Set up the optimizer, schedule and length of phase ``state["phase"]`` and tell the method."""
        index, st = self.state["phase"], self.st
        if index >= len(self.phases):
            self.params, self.optimizer, self.scheduler, self.total_steps, self.epochs = self.main_phase
        else:
            phase = self.phases[index]
            self.params = self.core.phase_parameters(phase.name)
            optimizer = torch.optim.SGD(self.params, lr=phase.lr or st.lr, momentum=st.momentum,
                                        weight_decay=st.weight_decay, nesterov=st.nesterov)
            self.optimizer = self.accelerator.prepare(optimizer)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)  # constant lr
            self.epochs = phase.epochs
            self.total_steps = min(phase.epochs * self.steps_per_epoch, st.max_steps or math.inf)
        # Only what this phase's optimizer steps keeps its gradient: the rest neither costs a backward nor
        # carries stale gradients into the next phase.
        active = {id(p) for p in self.params}
        for p in self.core.parameters():
            p.requires_grad_(id(p) in active)
        self.core.set_phase(self.phase_name)
        if self.bar is not None:
            self.bar.reset(total=self.total_steps)
            self.bar.update(self.state["step"])
            self.bar.set_description(f"{self.job.stage} ({self.phase_name})" if self.phase_name else self.job.stage)

    def checkpoint(self, name: str) -> None:
        """Write ``checkpoints/<name>.pt`` with every rank's reader position (a collective: all ranks call)."""
        self.accelerator.wait_for_everyone()
        data = self.train_loader.state()  # where each rank's reader stands, to resume without re-making batches
        if self.world == 1:
            data_states = [data]
        else:
            from accelerate.utils import gather_object

            data_states = gather_object([data])
        if self.main:
            scaler = self.accelerator.scaler
            runs.save_checkpoint(self.out, name, {
                "model": self.core.state_dict(),
                "optimizer": self.optimizer.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "config": self.cfg.to_dict(),
                "stage": self.job.stage,
                "info": self.job.info,
                "world_size": self.world,
                "data_state": data_states,
                **self.state,
            })

    def evaluate(self, epoch: int) -> dict[str, Any] | None:
        """Validation top-1/top-5 (every sample once across ranks); keeps ``best.pt``."""
        sync_buffers(self.core, self.accelerator)
        if self.val_loader is None:
            return None
        result = self.core.validate(self.val_loader, self.accelerator)
        self.method.train()
        result["step"] = self.state["step"]
        self.metrics.write({"kind": "eval", "epoch": epoch, **result, **self._phase_tag()})
        if result["top1"] > self.state["best_top1"]:
            self.state["best_top1"] = result["top1"]
            self.checkpoint("best")
        self.last_eval = result
        return result

    def _phase_tag(self) -> dict[str, Any]:
        """Records of a run with pre-training phases say which phase (index and name) they belong to."""
        if not self.phases:
            return {}
        return {"phase": self.state["phase"], "phase_name": self.phase_name or "main"}

    def log_interval(self, epoch: int) -> None:
        """One metrics line: each term averaged over the interval's micro-batches and all ranks."""
        rec = _reduce(self._sums, self.accelerator, self._micro, self._seen)
        dt = time.perf_counter() - self._t0
        rec.update(kind="train", step=self.state["step"], epoch=epoch, lr=self.scheduler.get_last_lr()[0],
                   images_per_s=round(self._seen * self.world / dt, 1), world_size=self.world, **self._phase_tag())
        self.metrics.write(rec)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{rec['loss']:.3f}", img_s=f"{rec['images_per_s']:.0f}")
        self._sums, self._seen, self._micro, self._t0 = {}, 0, 0, time.perf_counter()


def claim_folder(job: Job, accelerator):
    """The main process locks the run folder and checks it may write there; every rank learns the verdict."""
    lock, error = None, None
    if accelerator.is_main_process:
        try:
            lock = runs.claim_run(job.out, resume=job.resume, overwrite=job.overwrite)
        except SSKDError as exc:
            error = str(exc)
    error = agree_on_error(accelerator, error)
    if error:
        raise SSKDError(error)
    return lock


# What a resumed run may not change: they decide the model's shape or the data it learns from.
FIXED_FOR_RESUME = ("{stage}.arch", "{stage}.method", "data.size", "data.subset_fraction", "data.label_noise")
# The shards are compared by their manifest's hash and the views as resolved (auto = the method's own).
# Trackers (run.log_with) only watch: a resume may add or drop them.
IGNORED_FOR_RESUME = ("run.progress", "run.log_with", "data.shards", "data.views")


def check_resumable(run: Run, ckpt: dict[str, Any]) -> None:
    """Refuse a resume whose settings cannot continue the checkpoint; say plainly what else changed."""
    stage, path = run.job.stage, run.out / runs.CHECKPOINTS / "last.pt"
    if ckpt.get("stage") not in (None, stage):
        raise SSKDError(f"{path}: is a {ckpt['stage']!r} checkpoint, this command trains {stage!r}")
    fixed = {k.format(stage=stage) for k in FIXED_FOR_RESUME}
    sections = {stage, "data", "run", run.method_cls.section}  # other stages' and methods' sections do not act here
    diffs = [d for d in diff_configs(ckpt.get("config", {}), run.cfg.to_dict())
             if d[0].split(".")[0] in sections and d[0] not in IGNORED_FOR_RESUME]
    saved_info = ckpt.get("info") or {}
    for key in ("shards_sha256", "teacher_weights_sha256", "views"):
        if saved_info.get(key) and run.job.info.get(key) and saved_info[key] != run.job.info[key]:
            short = 12 if key.endswith("sha256") else None
            diffs.append((key, saved_info[key][:short], run.job.info[key][:short]))
            fixed.add(key)
    refused = [f"{k} was {a!r}, now {b!r}" for k, a, b in diffs if k in fixed]
    if refused:
        raise SSKDError(f"{run.out}: cannot resume: {'; '.join(refused)} (start a new --out, or --overwrite this run)")
    if diffs:
        log.warning("%s: resuming with changed settings: %s", run.out, ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in diffs))


def restore(run: Run) -> None:
    """Continue from ``checkpoints/last.pt`` when there is one (``--resume``)."""
    ckpt = runs.load_checkpoint(run.out, "last")
    if ckpt is None:
        log.debug("%s: no checkpoint yet: starting from the beginning", run.out)
        return
    check_resumable(run, ckpt)
    path = run.out / runs.CHECKPOINTS / "last.pt"
    run.state.update({k: ckpt.get(k, 0) for k in run.state})
    if run.state["phase"]:
        run.enter_phase()  # the checkpoint's optimizer is that of the phase it stopped in
    try:
        run.core.load_state_dict(ckpt["model"])
        run.optimizer.optimizer.load_state_dict(ckpt["optimizer"])
        run.scheduler.load_state_dict(ckpt["scheduler"])
    except SSKDError as exc:  # a method's own state (a memory bank) refusing, in its words
        raise SSKDError(f"{path}: {exc}") from exc
    except (RuntimeError, ValueError, KeyError) as exc:
        raise SSKDError(f"{path}: does not fit this run ({str(exc).strip().splitlines()[-1][:200]})") from exc
    if run.accelerator.scaler is not None and ckpt.get("scaler"):
        run.accelerator.scaler.load_state_dict(ckpt["scaler"])
    data_states = ckpt.get("data_state") or []
    old_world = ckpt.get("world_size", len(data_states) or 1)
    old_batch = (ckpt.get("config", {}).get(run.job.stage) or {}).get("batch_size", run.st.batch_size)
    if run.state["batch"] and (old_world, old_batch) != (run.world, run.st.batch_size):
        # A rank's position in an epoch means other samples under another rank count or batch size.
        log.warning("%s: the checkpoint stopped in epoch %d at batch %d with %d rank(s) x batch %d; with %d x %d "
                    "that position means other samples, so epoch %d restarts from its first batch (its first "
                    "%d batches are seen twice)", run.out, run.state["epoch"], run.state["batch"], old_world, old_batch,
                    run.world, run.st.batch_size, run.state["epoch"], run.state["batch"])
        run.state["batch"] = 0
    elif len(data_states) == run.world:
        run.resume_data = data_states[run.accelerator.process_index]
    log.info("resumed %s at step %d (epoch %d, batch %d)", run.out, run.state["step"], run.state["epoch"],
             run.state["batch"])


def open_outputs(run: Run) -> None:
    """After every check passed: the resolved config (atomically), the metrics log, the progress bar."""
    if run.main:
        atomic.write_bytes(run.out / runs.CONFIG, dump_yaml(run.cfg).encode())
    keep_until = (run.state["phase"], run.state["step"]) if run.job.resume else None
    run.metrics = runs.MetricsLog(run.out, enabled=run.main, keep_until=keep_until, accelerator=run.accelerator)
    runs.start_trackers(run.accelerator, run.out, run.cfg.to_dict(), run.cfg.run.log_with,
                        resume_step=run.metrics.tracker_step(*keep_until) if keep_until else None)
    if run.main and run.cfg.run.progress:
        from tqdm.auto import tqdm

        run.bar = tqdm(total=run.total_steps, initial=run.state["step"], desc=run.job.stage, unit="step",
                       dynamic_ncols=True)


def train_step(run: Run, batch: dict[str, Any]) -> None:
    """Forward, backward and (every ``grad_accum`` micro-batches) an optimizer step; sums the terms."""
    accelerator, st = run.accelerator, run.st
    with accelerator.accumulate(run.method):
        out = run.method(batch)
        accelerator.backward(out["loss"])
        if st.clip_grad and accelerator.sync_gradients:
            accelerator.clip_grad_norm_(run.params, st.clip_grad)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    run.state["batch"] += 1
    run._micro += 1
    run._seen += batch["label"].shape[0]
    for k, v in out.items():
        if k != "logits" and torch.is_tensor(v) and v.ndim == 0:
            run._sums[k] = run._sums.get(k, 0) + v.detach().float()
    run._sums["correct"] = run._sums.get("correct", 0) + (out["logits"].argmax(1) == batch["label"]).sum().float()


def run_epoch(run: Run, stop: StopFlag) -> None:
    """The current epoch from where it stands, to its end, to ``max_steps``, or to an agreed stop."""
    state = run.state
    epoch = state["epoch"]
    views_epoch = run.job.data_epoch(epoch) if run.job.data_epoch else epoch
    # Kept on the run: a reader stopped mid-epoch (max_steps) stays open, so the final checkpoint holds
    # its DALI position and a later --resume continues it instead of re-making the batches.
    run.batches = batches = run.train_loader.epoch(views_epoch, start_batch=state["batch"],
                                                   resume_state=run.resume_data)
    run.resume_data = None
    run.core.set_epoch(epoch)
    for batch in batches:
        if run.job.batch_hook is not None:
            batch = run.job.batch_hook(batch, views_epoch)
        train_step(run, batch)
        if not run.accelerator.sync_gradients:
            continue
        run.scheduler.step()
        state["step"] += 1
        if run.bar is not None:
            run.bar.update(1)
        if state["step"] % run.cfg.run.log_every == 0 or state["step"] == run.total_steps:
            run.log_interval(epoch)
        if run.cfg.run.ckpt_every and state["step"] % run.cfg.run.ckpt_every == 0:
            run.checkpoint("last")
        if state["step"] >= run.total_steps:
            break
        signum = stop.should_stop()
        if signum:
            run.checkpoint("last")
            raise Interrupted(f"stopped by {stop.request.describe(signum)} after step {state['step']} (epoch {epoch}, "
                              f"batch {state['batch']}); {run.out}/checkpoints/last.pt holds it: rerun the same "
                              "command with --resume to continue", signum, quiet=not run.main)
    if state["batch"] >= len(run.train_loader):  # the epoch ran to its end
        state["epoch"], state["batch"] = epoch + 1, 0
        if run.phase_name is None and run.cfg.run.eval_every and state["epoch"] % run.cfg.run.eval_every == 0:
            run.evaluate(epoch)
        run.checkpoint("last")


def export(run: Run) -> dict[str, Any]:
    """Last checkpoint, a final evaluation unless one is fresh, ``model.safetensors`` + ``model.json``."""
    state = run.state
    run.checkpoint("last")
    sync_buffers(run.core, run.accelerator)
    fresh = run.last_eval is not None and run.last_eval.get("step") == state["step"]
    epoch = state["epoch"] - 1 if state["batch"] == 0 and state["epoch"] > 0 else state["epoch"]
    final = run.last_eval if fresh else run.evaluate(epoch)
    if run.main:
        module = run.core.trainable_module()
        manifest = run.train_loader.manifest
        info = {"stage": run.job.stage, "steps": state["step"], "epochs_done": state["epoch"], **describe_model(module),
                "num_classes": manifest["num_classes"], "classes": manifest["classes"], **run.job.info,
                **run.core.export_info()}
        if final is not None:
            info.update(top1=final["top1"], top5=final["top5"], best_top1=state["best_top1"])
        runs.save_model(run.out, module, info)
    run.accelerator.wait_for_everyone()
    # Each rank's own weights: DDP keeps them identical, and tests check that it did.
    return dict(final or {}, world_size=run.world, rank=run.accelerator.process_index,
                rank_weights_sha256=_weights_digest(run.core))


def train(job: Job) -> dict[str, Any]:
    """Run ``job`` to the end (or to ``max_steps``); returns the final evaluation.

    On SIGTERM or SIGINT the step in flight finishes, ``last.pt`` is written and :class:`Interrupted`
    is raised; ``--resume`` then continues exactly.
    """
    st = getattr(job.cfg, job.stage)
    accelerator = make_accelerator(job.cfg.run.mixed_precision, st.grad_accum, job.cfg.data.device,
                                   find_unused_parameters=stage_method(job.cfg, job.stage).has_phases,
                                   **runs.accelerator_trackers(job.cfg.run.log_with, job.out))
    torch.manual_seed(job.cfg.run.seed)  # same initial weights on every rank (DDP also broadcasts them)
    lock = claim_folder(job, accelerator)
    try:
        with StopRequest() as request:
            run = Run(job, accelerator)
            run.enter_phase()
            if job.resume:
                restore(run)  # may enter the phase the checkpoint stopped in, and loads its optimizer
            open_outputs(run)
            stop = StopFlag(request, run.world)
            run.method.train()
            try:
                while True:
                    while not run.finished:
                        run_epoch(run, stop)
                    if run.phase_name is None:
                        break
                    log.info("%s: pre-training phase %r done after %d steps", run.out, run.phase_name,
                             run.state["step"])
                    run.state.update(phase=run.state["phase"] + 1, step=0, epoch=0, batch=0)
                    run.batches = None  # the phase's reader position is of no use to the next phase
                    run.enter_phase()
                    run.checkpoint("last")
                stop.close()
                if run.bar is not None:
                    run.bar.close()
                return export(run)
            finally:
                if run.bar is not None:
                    run.bar.close()
                run.metrics.close()
    finally:
        if lock is not None:
            lock.release()


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
    # 6 significant digits, not decimals: some terms live near 1e-5 (PKT's) and would log as 1e-06
    rec = {k: float(f"{v / n_micro:.6g}") for k, v in zip(keys, values) if k != "correct"}
    rec["train_top1"] = round(100.0 * values[keys.index("correct")] / max(1, seen), 3)
    return rec
