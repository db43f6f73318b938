"""``sskd launch [ACCELERATE LAUNCH OPTIONS] COMMAND [ARGS]``: ``accelerate launch -m sskd COMMAND ...`` whose
own failures are one line.

``accelerate launch`` ends with a Python traceback whenever it stops: on Ctrl-C or SIGTERM (the elastic
agent's ``SignalException``, raised after it has passed the signal on to the ranks, which write their
checkpoint and stop) and whenever a rank fails (``ChildFailedError``, or ``CalledProcessError`` for one
process). The ranks have said what happened in their own line by then; this wrapper runs the same launcher
in-process (same options, same config files) and turns its ending into one line and an exit status:
128 + the signal when it was stopped, the failing rank's status otherwise.
"""

from __future__ import annotations

import signal
import sys

USAGE = "sskd launch [ACCELERATE LAUNCH OPTIONS] COMMAND [ARGS...]   (COMMAND: distill, train-teacher, ...)"


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def main(argv: list[str]) -> int:
    if not argv:
        print(f"usage: {USAGE}", file=sys.stderr)
        return 2
    from accelerate.commands.launch import launch_command, launch_command_parser

    parser = launch_command_parser()
    parser.prog = "sskd launch"
    parser.usage = USAGE
    args = parser.parse_args(argv)
    if not args.module and args.training_script != "sskd":  # `sskd launch ... distill ...`: the sskd command
        args.training_script_args = [args.training_script, *args.training_script_args]
        args.training_script, args.module = "sskd", True
    try:
        from torch.distributed.elastic.multiprocessing.api import SignalException
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    except ImportError:  # pragma: no cover (torch always has them)
        SignalException = ChildFailedError = ()  # noqa: N806
    import subprocess

    try:
        launch_command(args)
    except SignalException as exc:
        name = _signal_name(exc.sigval)
        print(
            f"sskd: the launcher got {name} and stopped its ranks (a training run writes checkpoints/last.pt "
            "first: rerun the same command with --resume to continue)",
            file=sys.stderr,
        )
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = failure.exitcode
        how = f"died by {failure.signal_name()}" if code < 0 else f"exited with status {code}"
        print(
            f"sskd: rank {rank} {how} (its own message is above); the launcher stopped the other ranks",
            file=sys.stderr,
        )
        return 128 - code if code < 0 else code or 1
    except subprocess.CalledProcessError as exc:  # one process, without torch.distributed's launcher
        code = exc.returncode
        how = f"died by {_signal_name(-code)}" if code < 0 else f"exited with status {code}"
        print(f"sskd: the command {how} (its own message is above)", file=sys.stderr)
        return 128 - code if code < 0 else code
    except KeyboardInterrupt:  # one process: Ctrl-C reached it too; it saves and stops on its own
        print(
            "sskd: interrupted (a training run writes checkpoints/last.pt first: rerun the same command with "
            "--resume to continue)",
            file=sys.stderr,
        )
        return 130
    return 0


def register(sub, fmt) -> None:
    """Listed in ``sskd --help``; ``sskd.cli.main`` hands ``sskd launch ...`` to :func:`main` unparsed."""
    sub.add_parser(
        "launch",
        help="accelerate launch -m sskd COMMAND ..., ending in one line (no launcher "
        "traceback on Ctrl-C, SIGTERM or a failed rank)",
        description=__doc__,
        formatter_class=fmt,
        add_help=False,
    )
