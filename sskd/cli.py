"""The ``sskd`` command: a thin layer over library functions.

Each subcommand lives in its own module, which exposes ``register(subparsers)``; that function adds
its parser and sets ``func`` (called with the parsed args, returning an exit status). Modules keep
their heavy imports (torch, DALI) inside ``func`` so ``sskd --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading

from sskd import __version__
from sskd.errors import SSKDError
from sskd.stop import Interrupted
from sskd.supervisor import supervised_command

# (module, description) in the order a user meets them; each module registers one or more commands.
COMMAND_MODULES = [
    "shards.cli",  # shard imagefolder|cifar100|digits|verify
    "pipelines.cli",  # views; bench pipeline
    "pipelines.shuffle_bench",  # bench shuffle
    "sskd.commands",  # train-teacher, train-ss-head, distill, evaluate, demo
    "sskd.cache_cli",  # cache; bench distill
    "sskd.sweep",  # sweep
    "sskd.report",  # report
    "sskd.analyze_cli",  # analyze similarity|tsne|selection
    "sskd.bench_train",  # bench train
    "sskd.launch",  # launch (accelerate launch -m sskd, ending in one line)
]

EPILOG = """\
typical session:
  sskd shard digits data/shards/digits                  # the embedded default dataset, no download
  sskd views --shards data/shards/digits --epoch 0 --n 4 --out views.png
  sskd demo --out demo-out                         # teacher, SS head, CE/KD/SSKD students, results table
  sskd sweep sskd/configs/sweeps/digits.yaml --out sweeps/digits   # methods x settings x seeds
  sskd report sweeps/digits --out sweeps/digits/report.md          # mean ± std, paired deltas, plots
multi-GPU / multi-node: sskd launch --config_file launch/accelerate/multi_gpu.yaml distill ...
  (= accelerate launch ... -m sskd distill ..., its Ctrl-C and failures in one line)
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps example epilogs as written and shows a default only where there is one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, [], argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sskd",
        description="Knowledge distillation meets self-supervision (SSKD), fed by DALI pipelines over "
        "webdataset shards and trained with Accelerate.",
        epilog=EPILOG,
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"sskd {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = []
    for name in COMMAND_MODULES:
        try:
            modules.append(importlib.import_module(name))
        except ModuleNotFoundError as exc:  # a command whose module is not written yet
            if exc.name != name:
                raise
    for module in modules:
        if hasattr(module, "register"):
            module.register(sub, _Formatter)
    bench = sub.add_parser(
        "bench",
        help="side-by-side benchmarks (pipeline, distill, train, shuffle)",
        description="Benchmarks that measure several variants in one run and print their ratios.",
        epilog="example:\n  sskd bench pipeline --shards data/shards/digits --json bench.json",
        formatter_class=_Formatter,
    )
    bench_sub = bench.add_subparsers(dest="bench", metavar="BENCHMARK")
    for module in modules:
        if hasattr(module, "register_bench"):
            module.register_bench(bench_sub, _Formatter)
    return parser


def os_error_line(exc: OSError) -> str:
    """An OSError as one line: the file(s) it names and the system's reason (disk full, read-only, ...)."""
    from sskd.atomic import os_error_reason

    if exc.filename is None:
        return os_error_reason(exc)
    where = (
        os.fsdecode(exc.filename)
        if isinstance(exc.filename, (str, bytes, os.PathLike))
        else str(exc.filename)
    )
    if exc.filename2 is not None:
        where += f" -> {os.fsdecode(exc.filename2)}"
    return f"{where}: {os_error_reason(exc)}"


def main(argv: list[str] | None = None) -> int:
    if hasattr(signal, "SIGXFSZ") and threading.current_thread() is threading.main_thread():
        signal.signal(
            signal.SIGXFSZ, signal.SIG_IGN
        )  # a file-size limit fails the write (EFBIG) instead of killing us
    args_in = sys.argv[1:] if argv is None else list(argv)
    command = (
        supervised_command(args_in) if argv is None else None
    )  # the console entry only, not in-process calls
    if command:
        from sskd.supervisor import supervise

        return supervise(args_in, command)
    if args_in[:1] == ["launch"]:  # accelerate's own options follow: not parsed here
        from sskd import launch

        return _guarded(lambda: launch.main(args_in[1:]))
    try:
        parser = build_parser()  # imports the method plug-ins (their --method choices)
    except SSKDError as exc:
        print(f"sskd: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="[sskd] %(message)s",
        stream=sys.stderr,
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return _guarded(lambda: args.func(args))


def _guarded(func) -> int:
    """Run a command; what escapes it becomes one line and an exit status."""
    try:
        return int(func() or 0)
    except SSKDError as exc:
        print(f"sskd: error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        if not exc.quiet:
            print(f"sskd: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("sskd: interrupted (completed work is kept; rerun with --resume to continue)", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `sskd methods | head`: the reader has gone; nothing to say to it
        sys.stderr.close()
        return 0
    except (
        OSError
    ) as exc:  # disk full, file-size limit, read-only folder, permissions: the file and the reason
        logging.getLogger("sskd").debug("OSError", exc_info=True)
        print(f"sskd: error: {os_error_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
