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
from typing import Any

import torch

from sskd import runs
from sskd.core import atomic
from sskd.core.errors import SSKDError
from sskd.core.stop import Interrupted, StopFlag, StopRequest
from sskd.engine.config import StageConfig, diff_configs, dump_yaml
from sskd.engine.dist import agree_on_error, make_accelerator, make_gather, sync_buffers
from sskd.engine.evaluate import evaluate
from sskd.engine.prepare import RunSpec, build_method
from sskd.runs.models import describe_model

log = logging.getLogger(__name__)


def make_optimizer(params, st, lr: float) -> torch.optim.Optimizer:
    """The stage's optimizer: SGD (momentum, Nesterov, weight decay: the official codes'), or AdamW with the
    stage's weight decay on every parameter (``optimizer: adamw``, the transformer recipes')."""
    if st.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=st.weight_decay)
    return torch.optim.SGD(
        params, lr=lr, momentum=st.momentum, weight_decay=st.weight_decay, nesterov=st.nesterov
    )


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


def _loaders(spec: RunSpec, accelerator):
    """The run's training loader and its evaluation loader (None without a val split), on this rank."""
    from pipelines import ViewLoader

    where = dict(
        rank=accelerator.process_index, world_size=accelerator.num_processes, torch_device=accelerator.device
    )
    # The loop is done with a batch before it asks for the next: no copy of DALI's buffers needed.
    train = ViewLoader.for_run(spec, "train", reuse_buffers=True, **where)
    if train.subset_fraction < 1 or train.label_noise > 0:
        from pipelines.settings import describe

        log.info(
            "%s: training on %s: %d of the split's samples%s",
            spec.out,
            describe(train.subset_fraction, train.label_noise),
            train.num_samples,
            f", {len(train.flipped_ids)} labels flipped" if train.label_noise else "",
        )
        # RUN/data.json is written with the run's other files (open_outputs), once every check has passed
    val = None
    if "val" in spec.manifest["splits"]:
        val = ViewLoader.for_run(spec, "val", **where)
    else:
        log.info("%s: no val split: the run trains without evaluation", spec.cfg.data.shards)
    return train, val


class Run:
    """One stage while it trains: the method, its optimizer and loaders, the counters, the outputs."""

    def __init__(self, spec: RunSpec, accelerator):
        self.spec, self.cfg, self.out, self.stage = spec, spec.cfg, spec.out, spec.stage
        self.record = spec.record  # what model.json and every checkpoint say of the run
        self.st: StageConfig = spec.st
        self.accelerator, self.main, self.world = (
            accelerator,
            accelerator.is_main_process,
            accelerator.num_processes,
        )
        gather = make_gather(accelerator) if self.world > 1 else None
        # Built before the loaders so a bad architecture fails before any data is touched.
        method = build_method(
            spec, all_gather=gather, gather=gather if self.cfg.run.global_ss_batch else None
        )
        self.train_loader, self.val_loader = _loaders(spec, accelerator)
        self.params = method.phase_parameters(None)
        st = self.st
        optimizer = make_optimizer(self.params, st, st.lr)
        self.steps_per_epoch = max(1, len(self.train_loader) // st.grad_accum)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(st, self.steps_per_epoch))
        if (
            accelerator.is_main_process
            and st.schedule == "step"
            and st.gamma != 1
            and st.milestones
            and min(st.milestones) >= st.epochs
        ):
            log.warning(
                "%s.milestones %s all fall at or after epoch %d: the lr stays %g for the whole run "
                "(set --set %s.milestones=[...] or %s.schedule=cosine)",
                self.stage,
                st.milestones,
                st.epochs,
                st.lr,
                self.stage,
                self.stage,
            )
        self.total_steps = min(st.epochs * self.steps_per_epoch, st.max_steps or math.inf)
        # Only the trained module is prepared (and under DDP wrapped); the frozen teacher is none of it and
        # only goes to the training device.
        self.method, self.optimizer = accelerator.prepare(method, optimizer)
        if method.frozen_teacher is not None:
            method.frozen_teacher.to(accelerator.device)
        self.core = accelerator.unwrap_model(self.method)
        # Pre-training phases (a method's own; most have none), then the main training: state["phase"]
        # indexes [*phases, main], so a run without phases is always in phase 0.
        self.phases = [p for p in self.core.phases() if p.epochs > 0]
        self.main_phase = (self.params, self.optimizer, self.scheduler, self.total_steps, st.epochs)
        self.epochs = st.epochs
        # skipped: optimizer steps skipped for a non-finite loss (run.nonfinite=skip), over the whole run
        self.state = {"step": 0, "epoch": 0, "batch": 0, "best_top1": -1.0, "phase": 0, "skipped": 0}
        self.resume_data: dict | None = None  # this rank's DALI pipeline checkpoint at the resumed batch
        self.last_eval: dict[str, Any] | None = None
        self.metrics: runs.MetricsLog | None = None
        self.bar = None
        self.batches = None  # the running epoch's batch iterator
        self._sums: dict[str, torch.Tensor] = {}
        self._seen, self._micro, self._t0 = 0, 0, time.perf_counter()
        # Non-finite losses (run.nonfinite). stop: per term, the first (step, epoch) whose value was NaN/inf
        # and that value, kept on the device (no sync per step), looked at when the interval's sums are
        # reduced and before every checkpoint. skip: the accumulation window's verdict, the skipped steps.
        self.skip_nonfinite = self.cfg.run.nonfinite == "skip"
        self._nf_first: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self._window_bad: torch.Tensor | None = None
        self._good: torch.Tensor | None = None  # skip: micro-batches of the interval whose terms were finite
        self._skipped = 0  # skip: optimizer steps skipped in the interval
        self._buffers: list[torch.Tensor] | None = None  # skip: the buffers as the accumulation window began
        self.start: runs.NewRun | None = (
            None  # a new run's start, undone if it fails before its first checkpoint
        )
        self.last_step: int | None = (
            None  # the step checkpoints/last.pt holds (this process wrote or resumed)
        )

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
            optimizer = make_optimizer(self.params, st, phase.lr or st.lr)
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
            self.bar.set_description(f"{self.stage} ({self.phase_name})" if self.phase_name else self.stage)

    def checkpoint(self, name: str) -> None:
        """Write ``checkpoints/<name>.pt`` with every rank's reader position (a collective: all ranks call).

        Never a state with a non-finite loss behind it or non-finite weights: that stops the run instead."""
        self.check_finite()
        self.accelerator.wait_for_everyone()
        data = (
            self.train_loader.state()
        )  # where each rank's reader stands, to resume without re-making batches
        if self.world == 1:
            data_states = [data]
        else:
            from accelerate.utils import gather_object

            data_states = gather_object([data])
        error = None
        if self.main:
            scaler = self.accelerator.scaler
            try:
                runs.save_checkpoint(
                    self.out,
                    name,
                    {
                        "model": self.core.state_dict(),
                        "optimizer": self.optimizer.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(),
                        "scaler": scaler.state_dict() if scaler is not None else None,
                        "config": self.cfg.to_dict(),
                        "stage": self.stage,
                        "info": self.record,
                        "world_size": self.world,
                        "data_state": data_states,
                        **self.state,
                    },
                )
            except SSKDError as exc:  # a full disk: every rank stops with the main process's line
                error = str(exc)
        error = agree_on_error(self.accelerator, error)
        if error:
            raise SSKDError(error)
        if name == "last":
            self.last_step = self.state["step"]
            if self.start is not None:
                self.start.commit()  # the first checkpoint: an earlier run this one replaces is deleted now

    def evaluate(self, epoch: int) -> dict[str, Any] | None:
        """Validation top-1/top-5 (every sample once across ranks); keeps ``best.pt``."""
        sync_buffers(self.core, self.accelerator)
        if self.val_loader is None:
            return None
        result = self.core.validate(lambda module: evaluate(module, self.val_loader, self.accelerator))
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
        """One metrics line: each term averaged over the interval's micro-batches and all ranks.

        The same reduction carries whether any rank saw a non-finite term (stop: the run stops here, all
        ranks together) and, with run.nonfinite=skip, how many micro-batches were finite (the averages
        are over those) and how many optimizer steps were skipped."""
        sums = dict(self._sums)
        if self.skip_nonfinite:
            sums[_GOOD] = (
                self._good if self._good is not None else torch.zeros((), device=self.accelerator.device)
            )
        else:
            sums[_NONFINITE] = self._nonfinite_flag()
        rec = _reduce(sums, self.accelerator, self._micro, self._seen)
        if rec.pop(_NONFINITE, 0):
            self.stop_nonfinite()
        dt = time.perf_counter() - self._t0
        rec.update(
            kind="train",
            step=self.state["step"],
            epoch=epoch,
            lr=self.scheduler.get_last_lr()[0],
            images_per_s=round(self._seen * self.world / dt, 1),
            world_size=self.world,
            **self._phase_tag(),
        )
        if self.skip_nonfinite:
            rec["skipped"] = self._skipped
        self.metrics.write(rec)
        if self.bar is not None:
            loss = rec.get("loss")
            self.bar.set_postfix(
                loss=f"{loss:.3f}" if loss is not None else "-", img_s=f"{rec['images_per_s']:.0f}"
            )
        self.reset_interval()

    # ---- what a training step keeps between calls ------------------------------------------------------

    def reset_interval(self) -> None:
        """Start a new logging interval: no terms summed, no image seen, the clock from now."""
        self._sums, self._seen, self._micro, self._t0 = {}, 0, 0, time.perf_counter()
        self._good, self._skipped = None, 0

    def begin_micro_batch(self) -> None:
        """Skip mode, at an accumulation window's first micro-batch: keep the buffers as they are (its
        forwards move BatchNorm statistics), to put them back if the window's step is skipped."""
        if self.skip_nonfinite and self._buffers is None:
            self._buffers = [b.detach().clone() for b in self.core.buffers()]

    def skip_window(self) -> None:
        """Skip mode: the window's optimizer step is skipped; count it, say so once, and put the buffers
        back, so that the window's forwards leave no trace either (BatchNorm running statistics)."""
        self._skipped += 1
        self.state["skipped"] += 1
        if self.state["skipped"] == 1:
            log.warning(
                "%s: non-finite loss or gradients at step %d (epoch %d): its optimizer step is skipped "
                "(run.nonfinite=skip; skipped steps are counted in metrics.jsonl)",
                self.out,
                self.state["step"] + 1,
                self.state["epoch"],
            )
        with torch.no_grad():
            for buf, saved in zip(self.core.buffers(), self._buffers):
                buf.copy_(saved)

    def end_window(self) -> None:
        """An optimizer step closed the accumulation window."""
        self._buffers = None

    def add_terms(self, out: dict[str, Any], batch: dict[str, Any], anybad: torch.Tensor | None) -> None:
        """Count a micro-batch and add its terms (and correct predictions) to the interval's sums, on the
        device; in skip mode a micro-batch with a non-finite term (``anybad``) is left out of the averages."""
        self.state["batch"] += 1
        self._micro += 1
        self._seen += batch["label"].shape[0]
        for k, v in out.items():
            if k != "logits" and torch.is_tensor(v) and v.ndim == 0:
                v = v.detach().float()
                if anybad is not None:
                    v = torch.where(anybad, torch.zeros_like(v), v)
                self._sums[k] = self._sums.get(k, 0) + v
        correct = (out["logits"].argmax(1) == batch["label"]).sum().float()
        self._sums["correct"] = self._sums.get("correct", 0) + correct

    # ---- non-finite losses ---------------------------------------------------------------------------

    def note_terms(self, out: dict[str, Any]) -> torch.Tensor | None:
        """Look at one micro-batch's terms for NaN/inf without a device sync; returns the "any bad" flag
        (a 0-dim bool tensor) in skip mode.

        stop: per term, the first (step, epoch) with a non-finite value and that value stay on the device
        (a few element-wise kernels on a vector of the terms). skip: the accumulation window's verdict."""
        keys = tuple(k for k, v in out.items() if k != "logits" and torch.is_tensor(v) and v.ndim == 0)
        if not keys:
            return None
        vec = torch.stack([out[k].detach().float() for k in keys])
        bad = ~torch.isfinite(vec)
        if self.skip_nonfinite:
            anybad = bad.any()
            self._window_bad = anybad if self._window_bad is None else self._window_bad | anybad
            good = (~anybad).float()
            self._good = good if self._good is None else self._good + good
            return anybad
        code = (self.state["step"] + 1) * _EPOCH_CODE + self.state[
            "epoch"
        ]  # the optimizer step this batch is in
        first, values = self._nf_first.get(keys) or (
            torch.zeros(len(keys), dtype=torch.long, device=vec.device),
            torch.zeros(len(keys), device=vec.device),
        )
        new = bad & (first == 0)
        self._nf_first[keys] = (torch.where(new, code, first), torch.where(new, vec, values))
        return None

    def _nonfinite_flag(self) -> torch.Tensor:
        """1.0 when this rank has seen a non-finite term (stop mode), else 0.0: a device scalar."""
        flags = [(first > 0).any() for first, _ in self._nf_first.values()]
        if not flags:
            return torch.zeros((), device=self.accelerator.device)
        return torch.stack(flags).any().float()

    def window_is_bad(self) -> bool:
        """skip mode, at an optimizer step: did any rank's loss or the gradients turn non-finite? All ranks
        get the same answer. One device sync (and under DDP one small all-reduce) per optimizer step: the
        price of skipping, paid only when asked for. Under fp16 the gradients are the GradScaler's to check
        (it skips such steps itself and lowers its scale)."""
        flag = (
            self._window_bad.float()
            if self._window_bad is not None
            else torch.zeros((), device=self.accelerator.device)
        )
        self._window_bad = None
        if self.accelerator.scaler is None:
            grads = [p.grad for p in self.params if p.grad is not None]
            if grads:
                norms = torch._foreach_norm(grads, math.inf)  # max |g|: NaN or inf when any entry is
                flag = flag + (~torch.isfinite(torch.stack(list(norms)))).any().float()
        if self.world > 1:
            flag = self.accelerator.reduce(flag, "sum")
        return bool(flag.item())

    def check_finite(self) -> None:
        """Before a checkpoint (all ranks): stop if a term went non-finite since the last look, or if the
        weights are not finite; one small all-reduce under DDP, next to the checkpoint's own collectives."""
        flags = [
            self._nonfinite_flag()
            if not self.skip_nonfinite
            else torch.zeros((), device=self.accelerator.device)
        ]
        tensors = [t for t in self.core.state_dict().values() if torch.is_tensor(t) and t.is_floating_point()]
        flags.append(
            torch.stack([(~torch.isfinite(t)).any() for t in tensors]).any().float()
            if tensors
            else torch.zeros((), device=self.accelerator.device)
        )
        vec = torch.stack([f.to(self.accelerator.device) for f in flags])
        if self.world > 1:
            vec = self.accelerator.reduce(vec, "sum")
        loss_bad, weights_bad = vec.tolist()
        if loss_bad:
            self.stop_nonfinite()
        if weights_bad:
            raise SSKDError(
                f"{self.out}: the model's weights are not finite after step {self.state['step']} (epoch "
                f"{self.state['epoch']}){self._phase_text()}; stopped without saving them{self._kept_text()}"
            )

    def stop_nonfinite(self) -> None:
        """Raise the one-line error for the first non-finite step (all ranks, with the same message)."""
        seen = []  # (code, term, value) of this rank's first non-finite values
        for keys, (first, values) in self._nf_first.items():
            for key, code, value in zip(keys, first.tolist(), values.tolist()):
                if code:
                    seen.append((code, key, value))
        if self.world > 1:
            from accelerate.utils import gather_object

            seen = gather_object(seen)
        if not seen:  # cannot happen (a rank flagged it); keep the message honest anyway
            raise SSKDError(
                f"{self.out}: a loss term became non-finite by step {self.state['step']}; stopped"
                f"{self._kept_text()}"
            )
        code = min(c for c, _, _ in seen)
        terms = sorted({(k, v) for c, k, v in seen if c == code}, key=lambda kv: kv[0])
        step, epoch = divmod(code, _EPOCH_CODE)
        text = ", ".join(f"{k}={v}" for k, v in dict(terms).items())
        raise SSKDError(
            f"{self.out}: the loss became non-finite at step {step} (epoch {epoch}){self._phase_text()}: "
            f"{text}; stopped{self._kept_text()}; lower the lr, or set run.nonfinite=skip to skip "
            "such steps"
        )

    def _phase_text(self) -> str:
        return f", phase {self.phase_name}" if self.phase_name else ""

    def _kept_text(self) -> str:
        if self.start is not None and self.start.active:
            back = "; the run it was to replace is put back" if self.start.replaced is not None else ""
            return f" before its first checkpoint: this run's files are removed{back}"
        last = self.out / runs.CHECKPOINTS / "last.pt"
        if self.last_step is not None:
            return f"; {last} (step {self.last_step}) holds the last good state, model.safetensors is not written"
        return ""


def claim_folder(spec: RunSpec, accelerator):
    """The main process locks the run folder and checks it may write there; every rank learns the verdict."""
    lock, error = None, None
    if accelerator.is_main_process:
        try:
            lock = runs.claim_run(spec.out, resume=spec.resume, overwrite=spec.overwrite)
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
    stage, path = run.stage, run.out / runs.CHECKPOINTS / "last.pt"
    if ckpt.get("stage") not in (None, stage):
        raise SSKDError(f"{path}: is a {ckpt['stage']!r} checkpoint, this command trains {stage!r}")
    fixed = {k.format(stage=stage) for k in FIXED_FOR_RESUME}
    sections = {
        stage,
        "data",
        "run",
        run.spec.method.section,
    }  # other stages' and methods' sections do not act here
    diffs = [
        d
        for d in diff_configs(ckpt.get("config", {}), run.cfg.to_dict())
        if d[0].split(".")[0] in sections and d[0] not in IGNORED_FOR_RESUME
    ]
    saved_info = ckpt.get("info") or {}
    for key in ("shards_sha256", "teacher_weights_sha256", "views"):
        if saved_info.get(key) and run.record.get(key) and saved_info[key] != run.record[key]:
            short = 12 if key.endswith("sha256") else None
            diffs.append((key, saved_info[key][:short], run.record[key][:short]))
            fixed.add(key)
    refused = [f"{k} was {a!r}, now {b!r}" for k, a, b in diffs if k in fixed]
    if refused:
        raise SSKDError(
            f"{run.out}: cannot resume: {'; '.join(refused)} (start a new --out, or --overwrite this run)"
        )
    if diffs:
        log.warning(
            "%s: resuming with changed settings: %s",
            run.out,
            ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in diffs),
        )


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
    old_batch = (ckpt.get("config", {}).get(run.stage) or {}).get("batch_size", run.st.batch_size)
    if run.state["batch"] and (old_world, old_batch) != (run.world, run.st.batch_size):
        # A rank's position in an epoch means other samples under another rank count or batch size.
        log.warning(
            "%s: the checkpoint stopped in epoch %d at batch %d with %d rank(s) x batch %d; with %d x %d "
            "that position means other samples, so epoch %d restarts from its first batch (its first "
            "%d batches are seen twice)",
            run.out,
            run.state["epoch"],
            run.state["batch"],
            old_world,
            old_batch,
            run.world,
            run.st.batch_size,
            run.state["epoch"],
            run.state["batch"],
        )
        run.state["batch"] = 0
    elif len(data_states) == run.world:
        run.resume_data = data_states[run.accelerator.process_index]
    run.last_step = run.state["step"]
    log.info(
        "resumed %s at step %d (epoch %d, batch %d)",
        run.out,
        run.state["step"],
        run.state["epoch"],
        run.state["batch"],
    )


def open_outputs(run: Run) -> None:
    """After every check passed: the run's start (an earlier run set aside), the resolved config
    (atomically), the data record, the metrics log, the progress bar."""
    if run.main:
        if run.start is not None:
            run.start.begin()  # the first write of a new run: nothing above this line wrote in its folder
        try:
            atomic.write_bytes(run.out / runs.CONFIG, dump_yaml(run.cfg).encode())
        except OSError as exc:
            raise SSKDError(atomic.write_error(run.out / runs.CONFIG, exc, "run config")) from None
        train = run.train_loader
        if train.subset_fraction < 1 or train.label_noise > 0:
            from pipelines.settings import write_record

            try:
                write_record(run.out, train)
            except OSError as exc:
                raise SSKDError(atomic.write_error(run.out / runs.DATA_RECORD, exc, "data record")) from None
    keep_until = (run.state["phase"], run.state["step"]) if run.spec.resume else None
    run.metrics = runs.MetricsLog(
        run.out, enabled=run.main, keep_until=keep_until, accelerator=run.accelerator
    )
    runs.start_trackers(
        run.accelerator,
        run.out,
        run.cfg.to_dict(),
        run.cfg.run.log_with,
        resume_step=run.metrics.tracker_step(*keep_until) if keep_until else None,
    )
    if run.main and run.cfg.run.progress:
        from tqdm.auto import tqdm

        run.bar = tqdm(
            total=run.total_steps,
            initial=run.state["step"],
            desc=run.stage,
            unit="step",
            dynamic_ncols=True,
        )


def train_step(run: Run, batch: dict[str, Any]) -> None:
    """Forward, backward and (every ``grad_accum`` micro-batches) an optimizer step; sums the terms."""
    accelerator, st = run.accelerator, run.st
    run.begin_micro_batch()
    with accelerator.accumulate(run.method):
        out = run.method(batch)
        accelerator.backward(out["loss"])
        anybad = run.note_terms(out)
        if st.clip_grad and accelerator.sync_gradients:
            accelerator.clip_grad_norm_(run.params, st.clip_grad)
        skip = run.skip_nonfinite and accelerator.sync_gradients and run.window_is_bad()
        if skip:
            run.skip_window()
        if not skip or accelerator.scaler is not None:  # fp16: the GradScaler skips a step whose gradients
            run.optimizer.step()  # are not finite (and keeps its own state right)
        run.optimizer.zero_grad(set_to_none=True)
        if accelerator.sync_gradients:
            run.end_window()
    run.add_terms(out, batch, anybad)


def run_epoch(run: Run, stop: StopFlag) -> None:
    """The current epoch from where it stands, to its end, to ``max_steps``, or to an agreed stop."""
    state = run.state
    epoch = state["epoch"]
    teacher = run.spec.teacher  # a cache serves a teacher's outputs by augmentation epoch: e mod E
    views_epoch = teacher.data_epoch(epoch) if teacher is not None else epoch
    following = None  # the views epoch read next, opened ahead by the loader (none after the last)
    if epoch + 1 < run.spec.st.epochs:
        following = teacher.data_epoch(epoch + 1) if teacher is not None else epoch + 1
    # Kept on the run: a reader stopped mid-epoch (max_steps) stays open, so the final checkpoint holds
    # its DALI position and a later --resume continues it instead of re-making the batches.
    run.batches = batches = run.train_loader.epoch(
        views_epoch, start_batch=state["batch"], resume_state=run.resume_data, next_epoch=following
    )
    run.resume_data = None
    run.core.set_epoch(epoch)
    for batch in batches:
        if teacher is not None:
            batch = teacher.batch(batch, views_epoch)
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
            raise Interrupted(
                f"stopped by {stop.request.describe(signum)} after step {state['step']} (epoch {epoch}, "
                f"batch {state['batch']}); {run.out}/checkpoints/last.pt holds it: rerun the same "
                "command with --resume to continue",
                signum,
                quiet=not run.main,
            )
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
    run.check_finite()  # the evaluation may have written best.pt; the weights exported are checked either way
    if state["skipped"] and run.main:
        log.warning(
            "%s: %d optimizer step(s) were skipped for a non-finite loss or gradients (run.nonfinite=skip)",
            run.out,
            state["skipped"],
        )
    if run.main:
        module = run.core.trainable_module()
        manifest = run.spec.manifest
        info = {
            "stage": run.stage,
            "steps": state["step"],
            "epochs_done": state["epoch"],
            **describe_model(module),
            "num_classes": manifest["num_classes"],
            "classes": manifest["classes"],
            **run.record,
            **run.core.export_info(),
        }
        if final is not None:
            info.update(top1=final["top1"], top5=final["top5"], best_top1=state["best_top1"])
        if state["skipped"]:
            info["skipped_steps"] = state["skipped"]
        runs.save_model(run.out, module, info)
    run.accelerator.wait_for_everyone()
    return dict(final or {}, world_size=run.world, rank=run.accelerator.process_index)


def train(spec: RunSpec) -> dict[str, Any]:
    """Run the stage ``spec`` describes (:func:`sskd.engine.prepare.prepare`, with its ``out``) to the end
    (or to ``max_steps``); returns the final evaluation.

    On SIGTERM or SIGINT the step in flight finishes, ``last.pt`` is written and :class:`Interrupted`
    is raised; ``--resume`` then continues exactly.
    """
    if spec.out is None:
        raise ValueError("train() needs a spec with a run folder: prepare(..., out=RUN)")
    accelerator = make_accelerator(
        spec.cfg.run.mixed_precision,
        spec.st.grad_accum,
        spec.cfg.data.device,
        find_unused_parameters=spec.method.has_phases,
        **runs.accelerator_trackers(spec.cfg.run.log_with, spec.out),
    )
    lock = claim_folder(spec, accelerator)
    # A new run (not a resume) can be undone until its first checkpoint: a start that fails on bad data,
    # a non-finite loss or a full disk leaves the folder as it was (an --overwrite'n run put back).
    start = runs.NewRun(spec.out) if accelerator.is_main_process and not spec.resume else None
    try:
        with StopRequest() as request:
            run = Run(spec, accelerator)  # the method from the run seed: the same weights on every rank
            run.start = start
            run.enter_phase()
            if spec.resume:
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
                    log.info(
                        "%s: pre-training phase %r done after %d steps",
                        run.out,
                        run.phase_name,
                        run.state["step"],
                    )
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
                if run.metrics is not None:
                    run.metrics.close()
    except BaseException:
        if start is not None and start.active:
            try:
                start.rollback()
            except Exception as exc:  # the first error is the one to report; say what could not be undone
                log.error(
                    "%s: could not undo this run's start (%s: %s); look at %s",
                    spec.out,
                    type(exc).__name__,
                    exc,
                    spec.out,
                )
        raise
    finally:
        if lock is not None:
            lock.release()


_NONFINITE = "__nonfinite__"  # in the reduced sums: some rank saw a non-finite term (stop mode)
_GOOD = "__good__"  # in the reduced sums: micro-batches whose terms were all finite (skip mode)
_EPOCH_CODE = 1 << 20  # a non-finite step is kept on the device as step * _EPOCH_CODE + epoch


def _reduce(sums: dict[str, torch.Tensor], accelerator, n_micro: int, seen: int) -> dict[str, float]:
    """Average the summed loss terms over micro-batches and ranks; one device sync for all of them.

    ``__nonfinite__`` comes back as a flag (> 0 on every rank when any rank saw a non-finite term);
    ``__good__`` (skip mode) is the count the terms are averaged over instead of ``n_micro``."""
    keys = sorted(sums)
    vec = torch.stack([torch.as_tensor(sums[k], device=accelerator.device).float() for k in keys])
    vec = accelerator.reduce(vec, "mean")
    values = vec.tolist()
    extra = {k: values[keys.index(k)] for k in (_NONFINITE, _GOOD) if k in sums}
    denom = extra.get(_GOOD, n_micro)
    # 6 significant digits, not decimals: some terms live near 1e-5 (PKT's) and would log as 1e-06
    rec = {
        k: float(f"{v / denom:.6g}") if denom else None
        for k, v in zip(keys, values)
        if k != "correct" and k not in extra
    }
    rec["train_top1"] = round(100.0 * values[keys.index("correct")] / max(1, seen), 3)
    if _NONFINITE in extra:
        rec[_NONFINITE] = extra[_NONFINITE]
    return rec
