"""The ``proxy-patterns`` command: ``demo``, ``bench NAME`` and ``clean``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from proxy_patterns.extras import ExtraNotInstalledError, requires_extra
from proxy_patterns.shm import DEFAULT_DIRECTORY, remove_stale_segments


def _clean(args: argparse.Namespace) -> int:
    if args.store is not None:  # any store with reference records: shared memory or Redis
        from proxy_patterns.records import ref_table_for
        from proxy_patterns.store import count_entries, get_store

        with requires_extra("redis", "proxy-patterns clean --store"):
            store = get_store(args.store)
            before = count_entries(store)
            ref_table_for(store).sweep()  # (a Redis table sweeps when it is made, too)
        print(f"{args.store}: {before} entries before the sweep, {count_entries(store)} after")
        return 0
    removed = remove_stale_segments(args.directory) if os.path.isdir(args.directory) else []
    for name in removed:
        print(f"removed {name}")
    print(f"{len(removed)} stale segment(s) removed from {args.directory}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    with requires_extra("dask", "proxy-patterns demo"):
        from proxy_patterns.bench.demo import run_demo

        run_demo(store_spec=args.store, size_mb=args.size_mb, tasks=args.tasks, hosts=args.hosts)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from proxy_patterns.bench import run_benchmark

    # Every benchmark's needs (its framework, numpy, plots) are in the one extra.
    with requires_extra("bench", f"proxy-patterns bench {args.name}"):
        run_benchmark(args.name, quick=args.quick, plot=args.plot, redis=args.redis)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command line, one sub-command per job."""
    from proxy_patterns.bench import BENCHMARKS

    parser = argparse.ArgumentParser(
        prog="proxy-patterns",
        description="Move large task data by reference in Dask, Parsl and Globus Compute.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="plain Dask vs Dask through the store, on this node")
    demo.add_argument(
        "--store", default=None, help="store spec (default: $PROXY_PATTERNS_STORE or shm)"
    )
    demo.add_argument("--size-mb", type=int, default=50, help="size of each argument and result")
    demo.add_argument("--tasks", type=int, default=8, help="number of tasks")
    demo.add_argument(
        "--hosts",
        type=int,
        default=1,
        help="run one worker on each of this many hosts simulated on this machine (as root: "
        "each with its own /dev/shm); the plugin then picks the topology store",
    )
    demo.set_defaults(run=_demo)

    bench = commands.add_parser("bench", help="run a benchmark and print its table")
    bench.add_argument("name", choices=sorted(BENCHMARKS))
    bench.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    bench.add_argument("--plot", metavar="FILE", help="also draw the results to a PNG file")
    bench.add_argument(
        "--redis",
        metavar="URL",
        help="redis://host:port to include (default: start a local "
        "redis-server if one is installed, else skip Redis)",
    )
    bench.set_defaults(run=_bench)

    clean = commands.add_parser("clean", help="remove what killed processes left behind")
    clean.add_argument("--directory", default=DEFAULT_DIRECTORY, help="tmpfs directory")
    clean.add_argument(
        "--store",
        metavar="SPEC",
        help="a store spec (redis://host:port, shm:///dir): evict the objects whose holders "
        "all died, instead of cleaning --directory",
    )
    clean.set_defaults(run=_clean)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``proxy-patterns``."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except ExtraNotInstalledError as error:  # a missing extra is a usage error, as argparse's
        print(f"proxy-patterns: error: {error}", file=sys.stderr)
        return 2
