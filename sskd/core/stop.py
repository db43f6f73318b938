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
notices its parent changed and stops like on SIGTERM. The same holds for a command that ``sskd sweep``
(or the CLI's supervisor) started: :func:`die_with_parent` makes the kernel send it SIGTERM when its parent
dies (Linux ``PR_SET_PDEATHSIG``; elsewhere the parent check above, via ``SSKD_PARENT_PID``), so a
SIGKILLed sweep leaves no orphan holding a run's lock.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_LAUNCHER_ENV = (
    "TORCHELASTIC_RUN_ID",
    "LOCAL_RANK",
)  # set for the ranks `accelerate launch` / torchrun start
PARENT_ENV = "SSKD_PARENT_PID"  # set by sskd's own parents (sweep, supervisor) for the commands they start
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int | None = None, sig: int = signal.SIGTERM, own_group: bool = True):
    """A ``preexec_fn`` for :class:`subprocess.Popen`: the child gets ``sig`` when its parent dies.

    Linux ``prctl(PR_SET_PDEATHSIG)``, kept across ``exec``, so a launcher started this way gets it too and
    passes it on to its ranks (elsewhere the child's own parent check, :class:`StopRequest`, does it). A parent
    that died between ``fork`` and the ``prctl`` is caught by comparing ``getppid()`` with ``parent_pid``
    right after. ``own_group``: the child also gets a process group of its own (``setpgid``), so that a
    Ctrl-C at the terminal reaches it once, through its parent, rather than twice.
    """
    prctl = None
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            prctl = ctypes.CDLL(None, use_errno=True).prctl
            prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        except (OSError, AttributeError):
            prctl = None
    parent = os.getpid() if parent_pid is None else parent_pid

    def preexec() -> None:  # runs in the forked child before exec: nothing allocation-heavy here
        if own_group:
            os.setpgid(0, 0)
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
            if os.getppid() != parent:
                os.kill(os.getpid(), int(sig))

    return preexec


def stop_along(proc):
    """A SIGTSTP handler for a parent whose child runs in a process group of its own: Ctrl-Z stops the child,
    then the parent; ``fg`` (SIGCONT) resumes the parent, which resumes the child. (SIGTSTP rather than
    SIGSTOP: a child that is itself such a parent passes it on the same way.)"""

    def handler(signum, frame) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTSTP)
        signal.signal(signal.SIGTSTP, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTSTP)  # stops here until SIGCONT
        signal.signal(signal.SIGTSTP, handler)
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)

    return handler


def child_env(env: dict | None = None) -> dict:
    """The environment for a command started by this process (names it as the parent to watch)."""
    return {**(os.environ if env is None else env), PARENT_ENV: str(os.getpid())}


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
        watch = any(k in os.environ for k in _LAUNCHER_ENV) or os.environ.get(PARENT_ENV) == str(os.getppid())
        self._parent = os.getppid() if watch else None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.signum = self.signum or signum
        log.warning(
            "%s received: stopping after the current step (checkpoint first)", signal.Signals(signum).name
        )

    def poll(self) -> int | None:
        """The signal to stop for, if any; a dead launcher counts as SIGTERM."""
        if self.signum is None and self._parent is not None and os.getppid() != self._parent:
            log.warning(
                "the parent process (pid %d: launcher, sweep or supervisor) is gone: stopping after the "
                "current step",
                self._parent,
            )
            self.signum, self.orphaned = signal.SIGTERM, True
        return self.signum

    def describe(self, signum: int) -> str:
        """What stopped the job, for its last line."""
        return "the death of its parent process" if self.orphaned else signal.Signals(signum).name

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
