"""The ``sskd`` command: a thin layer over library functions.

Each subcommand lives in its own module, which exposes ``register(subparsers)``; that function adds
its parser and sets ``func`` (called with the parsed args, returning an exit status). Modules keep
their heavy imports (torch, DALI) inside ``func`` so ``sskd --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from sskd import __version__
from sskd.cli import (
    analyze,
    bench_distill,
    bench_shuffle,
    bench_train,
    cache,
    export,
    launch,
    report,
    shard,
    sweep,
    train,
    views,
)
from sskd.cli.supervisor import supervised_command
from sskd.core.errors import SSKDError
from sskd.core.stop import Interrupted

# Every command, in the order a user meets them: name -> (the module that registers it, its one-line help).
# `sskd --help` lists them from this table without importing any command's dependencies (torch, DALI):
# only the command being run is registered in full (tests/test_cli.py checks both stay in step).
COMMANDS = {
    "shard": (shard, "write webdataset shards (+ DALI indexes) from a dataset; verify them"),
    "views": (views, "show the views of chosen samples (PNG grid) and save their tensors"),
    "train-teacher": (train, "stage 1: train the teacher (CE; or HSSAKD's joint teacher)"),
    "train-ss-head": (train, "stage 2: the teacher's method-specific part on its frozen backbone"),
    "distill": (train, "train a student with a method (sskd, kd, ce, hssakd, ...; `sskd methods`)"),
    "methods": (train, "list the registered methods: what each is, its paper, teacher and cache"),
    "models": (train, "list the architectures: parameters and the feature tensors each returns"),
    "evaluate": (train, "top-1 / top-5 of a trained model"),
    "export": (
        export,
        "export a run's classifier (ONNX, TorchScript, safetensors), checked against the run's model",
    ),
    "demo": (train, "SSKD and HSSAKD on scikit-learn's digits, in minutes on a CPU"),
    "cache": (
        cache,
        "run the frozen teacher once over E epochs of views; store the outputs a student method uses",
    ),
    "sweep": (sweep, "a grid of methods x pairs x seeds x data settings, resumable"),
    "report": (report, "tables and pictures of one or more sweeps: mean ± std, paired Δ to CE/KD"),
    "analyze": (analyze, "analyse trained runs: teacher-student KL and CKA, t-SNE, selective transfer"),
    "launch": (
        launch,
        "accelerate launch -m sskd COMMAND ..., ending in one line (no launcher traceback on Ctrl-C, "
        "SIGTERM or a failed rank)",
    ),
    "bench": (None, "side-by-side benchmarks (pipeline, distill, train, shuffle, cache)"),
}
# The modules that add a benchmark under `sskd bench`.
BENCH_MODULES = (views, bench_shuffle, bench_distill, bench_train, cache)

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


def build_parser(command: str | None = "*") -> argparse.ArgumentParser:
    """The ``sskd`` parser. ``command``: the one command to register in full (the others get their name
    and help line only, so building it imports nothing heavy); ``"*"``: every command (tests, sweeps);
    None: none (``sskd --help``)."""
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
    full = {m for name, (m, _) in COMMANDS.items() if command in ("*", name) and m is not None}
    registered: set = set()
    for name, (module, help_text) in COMMANDS.items():
        if module in full:
            if module not in registered:
                module.register(sub, _Formatter)
                registered.add(module)
        elif name == "bench" and command in ("*", "bench"):
            bench = sub.add_parser(
                "bench",
                help=help_text,
                description="Benchmarks that measure several variants in one run and print their ratios.",
                epilog="example:\n  sskd bench pipeline --shards data/shards/digits --json bench.json",
                formatter_class=_Formatter,
            )
            bench_sub = bench.add_subparsers(dest="bench", metavar="BENCHMARK")
            for bench_module in BENCH_MODULES:
                bench_module.register_bench(bench_sub, _Formatter)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _command_of(argv: list[str]) -> str | None:
    """The command a command line runs: its first word that is not an option (None: no command)."""
    for word in argv:
        if not word.startswith("-"):
            return word
    return None


def os_error_line(exc: OSError) -> str:
    """An OSError as one line: the file(s) it names and the system's reason (disk full, read-only, ...)."""
    from sskd.core.atomic import os_error_reason

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
        from sskd.cli.supervisor import supervise

        return supervise(args_in, command)
    if args_in[:1] == ["launch"]:  # accelerate's own options follow: not parsed here
        return _guarded(lambda: launch.main(args_in[1:]))
    try:
        parser = build_parser(_command_of(args_in))  # that command's dependencies only
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
