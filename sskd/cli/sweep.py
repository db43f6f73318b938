"""``sskd sweep``: the command line of :mod:`sskd.experiments.sweep`."""

from __future__ import annotations

from pathlib import Path

from sskd.core import atomic
from sskd.core.errors import SSKDError
from sskd.experiments import sweep
from sskd.experiments.sweep import PlannedRun, _status, estimate, execute, inside, load_spec, plan


def cmd_sweep(args) -> int:
    out = Path(args.out)
    spec = load_spec(args.spec)
    runs = plan(spec, out)
    for run in runs:  # what a spec names (labels, settings, architectures) stays under --out
        if not inside(run.folder, out):
            raise SSKDError(
                f"{args.spec}: the run folder {run.folder} lies outside --out {out}; rename what "
                "the spec puts into it (a label, setting or architecture)"
            )
    cache: dict = {}
    parser = _build_parser()

    def resolve(run: PlannedRun):
        """The run as its command line resolves it (defaults, YAML, flags, ``--set``), its teacher left out."""
        from sskd.engine.prepare import prepare

        cfg = _resolve_config(parser.parse_args([*run.args, "--out", str(run.folder)]), run.stage)
        return prepare(cfg, run.stage, without_teacher=True)

    for run in runs:  # resolves every run: a typo in the spec fails here, before any training
        try:
            run.steps, run.images = estimate(resolve(run), cache)
        except SSKDError as exc:
            raise SSKDError(f"{args.spec}: {run.folder.relative_to(out)}: {exc}") from None
    if args.dry_run:
        print(f"{'run':<62} {'status':<8} {'steps':>7} {'images':>10}")
        for run in runs:
            print(
                f"{str(run.folder.relative_to(out)):<62} {_status(run):<8} {run.steps:>7,} {run.images:>10,}"
            )
        todo = [r for r in runs if _status(r) != "done"]
        print(
            f"{len(runs)} runs ({len(todo)} to do): {sum(r.steps for r in todo):,} steps, "
            f"{sum(r.images for r in todo):,} images still to train (one process each; a launcher's ranks "
            "share them)"
        )
        return 0
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(out / "spec.yaml", Path(args.spec).read_bytes())
    atomic.write_json(
        out / "plan.json",
        {
            "name": spec.name,
            "settings": list(spec.settings),
            "seeds": spec.seeds,
            "methods": [m.label for m in spec.methods],
            "runs": [
                {"kind": r.kind, "folder": str(r.folder.relative_to(out)), "steps": r.steps, **r.meta}
                for r in runs
            ],
        },
    )
    return execute(runs, args.launcher, keep_going=args.keep_going, progress=not args.no_progress)


EXAMPLE_SPEC = """\
spec (YAML):
  shards: data/shards/digits
  pairs: [{teacher: resnet20, student: resnet8}]
  methods: [ce, kd, sskd, hssakd]           # or {name: dkd, label: dkd-ls, set: {dkd.standardize: true}}
  seeds: [0, 1, 2]
  settings:                                 # name -> config overrides for the students of that setting
    full: {}
    few25: {data.subset_fraction: 0.25}
    noisy40: {data.label_noise: 0.4}
    # compact: {cache: compact}             # students read a teacher cache at this level (exact, compact, LEVEL)
  set: {teacher.epochs: 12, ss_head.epochs: 4, student.epochs: 6}   # every run
  # config: sskd/configs/cifar100/resnet32x4-resnet8x4.yaml          # a recipe under every run
  # teacher_seed: 0

examples:
  sskd sweep sskd/configs/sweeps/digits.yaml --out sweeps/digits --dry-run
  sskd sweep sskd/configs/sweeps/digits.yaml --out sweeps/digits
  sskd sweep spec.yaml --out sweeps/x --launcher "sskd launch --config_file launch/accelerate/multi_gpu.yaml"
  sskd report sweeps/digits --out sweeps/digits/report.md --json sweeps/digits/report.json
  sskd sweep sskd/configs/sweeps/digits-cache.yaml --out sweeps/digits-cache
  sskd report sweeps/digits-cache --versus exact --out sweeps/digits-cache/report.md
"""


def register(sub, fmt) -> None:
    p = sub.add_parser(
        "sweep",
        help="a grid of methods x pairs x seeds x data settings, resumable",
        description=sweep.__doc__.split("\n\n")[0] + "\n\nTeachers train once on the full clean data "
        "and are shared; settings act on the students. A rerun skips finished runs and resumes "
        "an interrupted one.",
        epilog=EXAMPLE_SPEC,
        formatter_class=fmt,
    )
    p.add_argument("spec", help="sweep spec (YAML; keys below)")
    p.add_argument("--out", required=True, help="sweep folder (teachers/, runs/, plan.json)")
    p.add_argument(
        "--dry-run", action="store_true", help="list the runs, their status and steps; train nothing"
    )
    p.add_argument(
        "--launcher",
        help='run every command under this prefix, e.g. "sskd launch --config_file '
        'launch/accelerate/multi_gpu.yaml" (default: this Python, one process)',
    )
    p.add_argument(
        "--keep-going",
        action="store_true",
        help="after a failed run, go on with the runs that do not depend on it (default: stop)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sweep)


def _build_parser():
    from sskd.cli import build_parser

    return build_parser()


def _resolve_config(args, stage):
    from sskd.cli.train import resolve_config

    return resolve_config(args, stage)
