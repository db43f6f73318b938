"""``sskd report``: the command line of :mod:`sskd.experiments.report`."""

from __future__ import annotations

from pathlib import Path

from sskd.core import atomic
from sskd.core.errors import SSKDError
from sskd.experiments import report as _mod
from sskd.experiments.report import _plots, collect, render, summarise


def cmd_report(args) -> int:
    out = Path(args.out)
    found = collect(args.dirs)
    rows = summarise(found, versus=args.versus)
    if not rows:
        raise SSKDError(f"{', '.join(args.dirs)}: no finished student run to report")
    if args.versus is not None and args.versus not in {r["setting"] for r in rows}:
        settings = ", ".join(dict.fromkeys(r["setting"] for r in rows))
        raise SSKDError(f"--versus {args.versus}: no finished run in that setting (settings: {settings})")
    out.parent.mkdir(parents=True, exist_ok=True)
    pictures = [] if args.no_plots else _plots(rows, out.parent, out.stem)
    atomic.write_bytes(out, render(rows, found, args.dirs, pictures, out, args.versus).encode())
    if args.json:
        atomic.write_json(
            args.json,
            {
                "rows": [
                    {k: v for k, v in r.items() if k != "curve"}
                    | {"curve": {str(e): v for e, v in r["curve"].items()}}
                    for r in rows
                ]
            },
        )
    print(
        f"{out}: {len(rows)} rows from {sum(r['n'] for r in rows)} runs"
        + (f"; pictures {', '.join(p.name for p in pictures)}" if pictures else "")
    )
    return 0


def register(sub, fmt) -> None:
    p = sub.add_parser(
        "report",
        help="tables and pictures of one or more sweeps: mean ± std, paired Δ to CE/KD",
        description=_mod.__doc__,
        formatter_class=fmt,
        epilog="example:\n  sskd report sweeps/digits --out sweeps/digits/report.md "
        "--json sweeps/digits/report.json\n"
        "  sskd report sweeps/digits-cache --versus exact --out sweeps/digits-cache/report.md",
    )
    p.add_argument("dirs", nargs="+", metavar="DIR", help="folders written by `sskd sweep`")
    p.add_argument("--out", required=True, help="markdown report to write (PNGs go beside it)")
    p.add_argument(
        "--json",
        help='also write the rows as JSON: {"rows": [{setting, method, teacher, student, n, '
        "top1_mean, top1_std, top5_mean, top5_std, best_top1_mean, delta_ce, delta_kd, ...}]}",
    )
    p.add_argument(
        "--versus",
        metavar="SETTING",
        help="also give every other setting's paired difference to the same method and pair in SETTING "
        "(mean [95%% t interval] over the seeds both ran; JSON: delta_versus)",
    )
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.set_defaults(func=cmd_report)
