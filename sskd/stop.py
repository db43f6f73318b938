"""Stopping cleanly: SIGTERM, SIGINT and a vanished launcher become a request to stop after the step.

SLURM sends SIGTERM at a time limit and on preemption (then SIGKILL after ``KillWait``, 30 s by
default); ``accelerate launch`` forwards it to every rank. A long job must not die mid-step: the
handler only records the request, the loop finishes the step in flight, writes its checkpoint and
raises :class:`Interrupted`, which the CLI turns into one line and exit status 128 + signal. A second
Ctrl-C interrupts at once.

Ranks must stop after the *same* step or the checkpoint's collectives hang, so under several ranks
:class:`StopFlag` agrees on the request with an all-reduce (MAX) that is started after step n and read
after step n + 1: no rank waits for it and every rank stops after the same step.

A rank whose launcher was SIGKILLed is re-parented and would go on writing into the run folder; it
notices its parent changed and stops like on SIGTERM.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_LAUNCHER_ENV = ("TORCHELASTIC_RUN_ID", "LOCAL_RANK")  # set for the ranks `accelerate launch` / torchrun start


class Interrupted(Exception):
    """The job stopped on a signal after saving its work; ``code`` is the exit status (128 + signal)."""

    def __init__(self, message: str, signum: int, quiet: bool = False):
        super().__init__(message)
        self.code = 128 + signum
        self.quiet = quiet  # ranks other than the main one exit without repeating the line


class StopRequest:
    """Installs the handlers while active; ``signum`` is the first signal received (or None)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.orphaned = False  # the launcher died (its ranks were re-parented)
        self._old: dict[int, object] = {}
        self._parent = os.getppid() if any(k in os.environ for k in _LAUNCHER_ENV) else None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.signum = self.signum or signum
        log.warning("%s received: stopping after the current step (checkpoint first)", signal.Signals(signum).name)

    def poll(self) -> int | None:
        """The signal to stop for, if any; a dead launcher counts as SIGTERM."""
        if self.signum is None and self._parent is not None and os.getppid() != self._parent:
            log.warning("the launcher (pid %d) is gone: stopping after the current step", self._parent)
            self.signum, self.orphaned = signal.SIGTERM, True
        return self.signum

    def describe(self, signum: int) -> str:
        """What stopped the job, for its last line."""
        return "the launcher's death" if self.orphaned else signal.Signals(signum).name

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()


class StopFlag:
    """The stop decision every rank agrees on, one step late, without waiting for the network."""

    def __init__(self, request: StopRequest, num_processes: int):
        self.request = request
        self.world = num_processes
        self._group = None
        self._work = None
        self._buf = None
        if num_processes > 1:
            import torch.distributed as dist

            # Its own gloo group: a CPU tensor, so reading it never syncs a GPU stream; created once by all.
            self._group = dist.new_group(backend="gloo")

    def should_stop(self) -> int | None:
        """Call once per optimizer step on every rank; returns the signal to stop for (same on all ranks)."""
        local = self.request.poll()
        if self.world == 1:
            return local
        import torch
        import torch.distributed as dist

        agreed = None
        if self._work is not None:
            self._work.wait()
            agreed = int(self._buf.item()) or None
        self._buf = torch.tensor([local or 0], dtype=torch.int64)
        self._work = dist.all_reduce(self._buf, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        return agreed

    def close(self) -> None:
        """Wait for the pending all-reduce (every rank calls this after its last step)."""
        if self._work is not None:
            self._work.wait()
            self._work = None
