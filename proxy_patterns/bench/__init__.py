"""Benchmarks: each compares a plain baseline with proxy-patterns in the same run."""

from __future__ import annotations

import importlib

BENCHMARKS = {
    "store": "proxy_patterns.bench.store",
    "dask": "proxy_patterns.bench.dask_plugin",
    "pipelining": "proxy_patterns.bench.pipelining",
    "memory": "proxy_patterns.bench.memory",
    "parsl": "proxy_patterns.bench.parsl_plugin",
    "streaming": "proxy_patterns.bench.streaming",
    "globus": "proxy_patterns.bench.globus",
    "soak": "proxy_patterns.bench.soak",
    "multinode": "proxy_patterns.bench.multinode",
}


def run_benchmark(name: str, *, quick: bool, plot: str | None, redis: str | None) -> None:
    """Run benchmark ``name``: it prints its table, and draws it to ``plot`` if given."""
    module = importlib.import_module(BENCHMARKS[name])
    module.main(quick=quick, plot=plot, redis=redis)
