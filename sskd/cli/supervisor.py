"""A supervisor for the commands that run native code (DALI's decoder, torch): the `sskd` process outlives
its work, so a death by a signal (a SIGSEGV on some input, the out-of-memory killer) is one line naming the
signal and the command, and the shards are checked for the sample it may come from.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

# The commands that train or decode (DALI, torch native code): run under a supervisor as the `sskd` command.
SUPERVISED = ("train-teacher", "train-ss-head", "distill", "cache")
SUPERVISED_ENV = "SSKD_SUPERVISED"  # set in the supervised child (and "0" by a user: no supervisor)
_CRASH_SIGNALS = {"SIGSEGV", "SIGBUS", "SIGILL", "SIGFPE", "SIGABRT"}


def supervised_command(args_in: list[str]) -> str | None:
    """The command to supervise, if this process should: the real console entry, not already a supervised
    child, not a rank of a launcher (the launcher names a rank's signal itself), not switched off."""
    if (
        os.name != "posix"
        or os.environ.get(SUPERVISED_ENV)
        or threading.current_thread() is not threading.main_thread()
    ):
        return None
    if any(k in os.environ for k in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID")):
        return None
    rest = [a for a in args_in if a not in ("-v", "--verbose")]
    return rest[0] if rest and rest[0] in SUPERVISED else None


def _option(args_in: list[str], name: str) -> str | None:
    for i, a in enumerate(args_in):
        if a == name and i + 1 < len(args_in):
            return args_in[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def _check_shards_after_crash(args_in: list[str], command: str) -> None:
    """Look for the corrupted sample a native crash may come from (shards.verify.check_samples, if present)."""
    folder = _option(args_in, "--shards")
    if not folder:
        return
    try:
        from shards import verify
    except Exception:  # noqa: BLE001 (best effort after a crash)
        return
    if not hasattr(verify, "check_samples"):
        print(f"sskd: `sskd shard verify {folder}` checks those shards", file=sys.stderr)
        return
    print(f"sskd: checking every sample of {folder} for the one the crash may come from ...", file=sys.stderr)
    try:
        problems = verify.check_samples(folder, split=None)
    except KeyboardInterrupt:
        return
    except Exception as exc:  # noqa: BLE001
        print(f"sskd: the check of {folder} failed: {exc}", file=sys.stderr)
        return
    for line in problems[:20]:
        print(f"sskd: {line}", file=sys.stderr)
    if len(problems) > 20:
        print(f"sskd: ... and {len(problems) - 20} more", file=sys.stderr)
    if problems:
        how = (  # a cache's batches, and so its chunks, follow the samples it keeps: it resumes only as begun
            "rerun with --skip-bad and a new --out (a cache begun without it does not resume with it)"
            if command == "cache"
            else "rerun with --resume --skip-bad"
        )
        print(f"sskd: {how} to leave such samples out (or rewrite the shards)", file=sys.stderr)
    else:
        print(
            f"sskd: no sample of {folder} is damaged (bytes, ids, labels): the crash does not come from the data",
            file=sys.stderr,
        )


def supervise(args_in: list[str], command: str) -> int:
    """Run ``sskd COMMAND ...`` as a child and outlive it: a death by a signal (a SIGSEGV in DALI's or torch's
    native code, the out-of-memory killer) is then one line naming the signal and the command, and the shards
    are checked for the sample it may come from, instead of a silent exit 139.

    The child inherits stdio and the environment; it runs in a process group of its own so a signal reaches
    it once, passed on from here (Ctrl-C, SIGTERM, SIGHUP; Ctrl-Z stops and resumes it with this process), and
    it gets SIGTERM if this process dies. Its exit status is this one's. ``SSKD_SUPERVISED=0`` turns this off.
    """
    import subprocess

    from sskd.core.stop import child_env, die_with_parent, stop_along

    env = {**child_env(), SUPERVISED_ENV: "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sskd", *args_in], env=env, preexec_fn=die_with_parent())
    forwarded: set[int] = set()

    def forward(signum, frame):
        forwarded.add(signum)
        if proc.poll() is None:
            proc.send_signal(signum)

    handled = {
        signal.SIGINT: forward,
        signal.SIGTERM: forward,
        signal.SIGHUP: forward,
        signal.SIGTSTP: stop_along(proc),
    }  # Ctrl-Z stops both, `fg` resumes both
    old = {s: signal.signal(s, h) for s, h in handled.items()}
    try:
        rc = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if rc >= 0:
        return rc
    try:
        name = signal.Signals(-rc).name
    except ValueError:
        name = f"signal {-rc}"
    if -rc in forwarded:  # it was stopped (outside a training step, where it would have saved first)
        print(
            f"sskd: {command} stopped by {name}; rerun it with --resume to continue from its last checkpoint",
            file=sys.stderr,
        )
        return 128 - rc
    why = {"SIGKILL": " (the kernel's out-of-memory killer, or kill -9)"}.get(name, "")
    if name in _CRASH_SIGNALS:
        why = " (a crash inside native code: DALI's decoder or torch)"
    print(
        f"sskd: error: `sskd {command}` died by {name}{why}; its last checkpoint is kept: rerun the same "
        "command with --resume",
        file=sys.stderr,
    )
    if name in _CRASH_SIGNALS:
        _check_shards_after_crash(args_in, command)
    return 128 - rc
