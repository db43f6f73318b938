"""``sskd bench shuffle``: the command line of :mod:`sskd.bench.shuffle`."""

from __future__ import annotations

from sskd.core.errors import SSKDError

_DOC = "``sskd bench shuffle``: how much the training order changes between epochs, against an ideal shuffle.\n\nThree figures over E epochs at W ranks (batch B per rank):\n\n- ``rank_change``: the share of samples on another rank than in the epoch before (ideal 1 - 1/W);\n- ``position_corr``: the Spearman correlation of a sample's position in its rank's stream between\n  consecutive epochs (ideal 0: where a sample comes in an epoch carries over nothing);\n- ``neighbours``: the distinct in-batch neighbours a sample meets over the E epochs (mean over probe\n  samples), beside the same count under an ideal global shuffle (``neighbours_ideal``).\n\nOn real shards the order is the one DALI produces (a pipeline that reads only each sample's id, no\ndecoding); on a folder that holds only a ``manifest.json`` (or with ``--layout N:S``) it is simulated\nwith the very functions that decide the real order (:mod:`pipelines.order`). ``--legacy`` also\nmeasures the order before :mod:`pipelines.order` (a fixed shard list, DALI's by-count sharding with\n``stick_to_shard`` and its 1,024-sample shuffle buffer): real on real shards; on a manifest alone\napproximated by a local window shuffle of the same size.\n"


def cmd_bench_shuffle(args) -> int:
    from sskd.bench.shuffle import run
    from sskd.core import atomic

    if args.ranks < 1 or args.epochs < 2 or args.batch_size < 2:
        raise SSKDError("--ranks must be >= 1, --epochs >= 2 and --batch-size >= 2")
    if bool(args.shards) == bool(args.layout):
        raise SSKDError("give --shards DIR or --layout SAMPLES:SHARDS (one of them)")
    res = run(
        args.shards,
        args.layout,
        args.ranks,
        args.epochs,
        args.batch_size,
        seed=args.seed,
        n_probes=args.probes,
        legacy=args.legacy,
        progress=lambda s: print(s, flush=True),
    )
    print(
        f"{res['source']} ({res['mode']}): {res['samples']:,} samples in {res['shards']:,} shards, "
        f"{res['world_size']} ranks, {res['epochs']} epochs, batch {res['batch_size']} per rank"
    )
    rows = [("this order", res["rank_change"], res["position_corr"], res["neighbours"])]
    if "legacy" in res:
        lg = res["legacy"]
        rows.append((f"before ({lg['mode']})", lg["rank_change"], lg["position_corr"], lg["neighbours"]))
    rows.append(
        (
            "ideal global shuffle",
            res["rank_change_ideal"],
            res["position_corr_ideal"],
            res["neighbours_ideal"],
        )
    )
    print(f"{'order':<44} {'rank change':>11} {'position corr':>13} {'neighbours':>10}")
    for name, a, b, c in rows:
        print(f"{name:<44} {a:>11.3f} {b:>13.3f} {c:>10.1f}")
    print("targets: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in res["targets"].items()))
    if args.json:
        atomic.write_json(args.json, res)
    return 0


def register_bench(bench_sub, fmt) -> None:
    p = bench_sub.add_parser(
        "shuffle",
        help="how the training order changes across epochs and ranks vs an ideal shuffle",
        description=_DOC,
        formatter_class=fmt,
        epilog="examples:\n  sskd bench shuffle --shards data/shards/digits --ranks 2 --epochs 4 --legacy\n"
        "  sskd bench shuffle --layout 1281167:1024 --ranks 8 --epochs 10 --batch-size 32 "
        "--json shuffle-w8.json",
    )
    p.add_argument(
        "--shards",
        help="shard folder (measured through DALI) or a folder with only its manifest.json (simulated)",
    )
    p.add_argument(
        "--layout", help="SAMPLES:SHARDS: simulate equal shards without any folder (1281167:1024 = ImageNet)"
    )
    p.add_argument("--ranks", type=int, default=8, help="world size W")
    p.add_argument("--epochs", type=int, default=10, help="epochs E (consecutive pairs are compared)")
    p.add_argument("--batch-size", type=int, default=32, help="batch per rank (for the neighbours)")
    p.add_argument("--seed", type=int, default=0, help="plan seed")
    p.add_argument("--probes", type=int, default=2000, help="samples whose distinct neighbours are counted")
    p.add_argument(
        "--legacy", action="store_true", help="also measure the order before per-epoch permutations"
    )
    p.add_argument(
        "--json",
        help="write rank_change, rank_change_ideal, position_corr, neighbours, neighbours_ideal, ... here",
    )
    p.set_defaults(func=cmd_bench_shuffle)
