"""``proxy-patterns bench dask``: plain Dask against Dask with the proxy plugin, same workloads.

A ``LocalCluster`` with 2 worker processes of 1 thread each, a fresh one per mode (plain, the
plugin on shared memory, on a huge-page tmpfs when one is mounted, and on Redis when a
redis-server is available):

* ``a`` — 10 independent tasks, each given its own 100 MB array and returning 100 MB, gathered;
* ``b`` — one 100 MB array passed to 20 tasks (``submit`` each), small results gathered;
* ``c`` — a dask.array of 2 GB in 100 MB chunks, persisted, then summed;
* ``d`` — 2000 tiny tasks, one ``submit`` each, gathered.

Each workload runs once untimed (on a fresh machine the first touch of memory is several times
slower, for every mode alike; with the plugin, later puts also reuse the pages of segments the
run before evicted), then ``repeats`` times per mode (5; the median is reported, so that the
slower runs right after the warm-up and the machine's noise weigh less). After each
run the store must drain to zero keys; the table shows the keys left.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from proxy_patterns.bench.report import print_table

MB = 10**6


def double(x: np.ndarray) -> np.ndarray:
    """Task of workload a: a large argument, a large result."""
    return x * 2.0


def total(x: np.ndarray) -> float:
    """Task of workload b: a large argument, a small result."""
    return float(x.sum())


def inc(i: int) -> int:
    """Task of workload d."""
    return i + 1


@dataclass
class Workload:
    """One named workload: ``prepare`` builds its inputs (untimed), ``run`` is timed."""

    name: str
    description: str
    prepare: Callable[[float], Any]
    run: Callable[[Any, Any], Any]


def _arrays(scale: float, count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.random(int(100 * MB * scale) // 8) for _ in range(count)]


def _run_a(client: Any, arrays: list[np.ndarray]) -> Any:
    results = client.gather([client.submit(double, x, pure=False) for x in arrays])
    assert all(float(r[0]) == 2 * float(x[0]) for r, x in zip(results, arrays, strict=True))
    return results


def _run_b(client: Any, arrays: list[np.ndarray]) -> Any:
    futures = [client.submit(total, arrays[0], pure=False) for _ in range(20)]
    results = client.gather(futures)
    assert np.allclose(results, results[0])
    return results


def _run_c(client: Any, scale: float) -> Any:
    import dask.array as da
    from distributed import wait

    chunk = int(100 * MB * scale) // 8
    x = da.random.random(20 * chunk, chunks=chunk).persist()  # real data: 20 chunks in memory
    wait(x)
    result = x.sum().compute()
    assert 0.4 * 20 * chunk < result < 0.6 * 20 * chunk
    return result


def _run_d(client: Any, count: int) -> Any:
    results = client.gather([client.submit(inc, i, pure=False) for i in range(count)])
    assert results[-1] == count
    return results


WORKLOADS = [
    Workload("a", "10 tasks x own 100 MB arg -> 100 MB", lambda s: _arrays(s, 10), _run_a),
    Workload("b", "one 100 MB arg -> 20 tasks", lambda s: _arrays(s, 1), _run_b),
    Workload("c", "dask.array 2 GB, 100 MB chunks: persist + sum", lambda s: s, _run_c),
    Workload("d", "2000 tiny tasks", lambda s: 2000, _run_d),
]


def measure_mode(
    store_spec: str | None, inputs: dict[str, Any], repeats: int, progress: Any
) -> dict[str, tuple[float, int]]:
    """Median seconds and keys left per workload, on a fresh cluster (plugin if a spec)."""
    from distributed import Client, LocalCluster

    from proxy_patterns.plugins.dask import register
    from proxy_patterns.store import get_store, keys_left_after_eviction

    results: dict[str, tuple[float, int]] = {}
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        store = None
        if store_spec is not None:
            register(client, store=store_spec)
            store = get_store(store_spec)
        for workload in WORKLOADS:
            workload.run(client, inputs[workload.name])  # warm-up: first touch of VM memory
            if store is not None:
                keys_left_after_eviction(store)
            times, left = [], 0
            for _ in range(repeats):
                start = time.perf_counter()
                out = workload.run(client, inputs[workload.name])
                times.append(time.perf_counter() - start)
                del out
                left = keys_left_after_eviction(store) if store is not None else 0
                progress.update()
            results[workload.name] = (statistics.median(times), left)
    return results


def main(quick: bool = False, plot: str | None = None, redis: str | None = None) -> None:
    """Run every workload plain and with the plugin; print the table and the goals."""
    import contextlib
    import warnings

    from tqdm import tqdm

    from proxy_patterns.bench.redis_server import local_redis_server, redis_server_binary
    from proxy_patterns.shm import huge_page_directories

    scale = 0.2 if quick else 1.0
    repeats = 1 if quick else 5
    inputs = {w.name: w.prepare(scale) for w in WORKLOADS}
    with contextlib.ExitStack() as stack:
        modes: dict[str, str | None] = {"plain": None, "shm": "shm"}
        huge = huge_page_directories()
        if huge:
            modes["shm-huge"] = f"shm://{huge[0]}"
        if redis is None and redis_server_binary() is not None:
            redis = stack.enter_context(local_redis_server())
        if redis is not None:
            modes["redis"] = redis
        progress = stack.enter_context(
            tqdm(total=len(modes) * len(WORKLOADS) * repeats, desc="bench dask", leave=False)
        )
        # Plain Dask warns "Sending large graph" on workloads a and b: that is what is measured.
        warnings.filterwarnings("ignore", message="Sending large graph")
        measured = {
            mode: measure_mode(spec, inputs, repeats, progress) for mode, spec in modes.items()
        }
    _report(measured, quick)
    if plot:
        _plot(measured, plot)


def _report(measured: dict[str, dict[str, tuple[float, int]]], quick: bool) -> None:
    plugin_modes = [m for m in measured if m != "plain"]
    header = ["workload", "plain Dask (s)"]
    header += [f"plugin {m} (s)" for m in plugin_modes]
    header += [f"speed-up {m}" for m in plugin_modes] + ["keys left"]
    rows = []
    for w in WORKLOADS:
        plain = measured["plain"][w.name][0]
        row = [f"{w.name}: {w.description}", f"{plain:.3f}"]
        row += [f"{measured[m][w.name][0]:.3f}" for m in plugin_modes]
        row += [f"{plain / measured[m][w.name][0]:.2f}x" for m in plugin_modes]
        row.append(", ".join(f"{m}={measured[m][w.name][1]}" for m in plugin_modes))
        rows.append(row)
    if quick:
        print("(--quick: data sizes x0.2, one repeat)")
    print_table(header, rows)
    goals = {"a": 5.0, "b": 5.0, "d": 0.95}
    for mode in [m for m in plugin_modes if m.startswith("shm")]:
        for name, goal in goals.items():
            ratio = measured["plain"][name][0] / measured[mode][name][0]
            verdict = "met" if ratio >= goal else "NOT met"
            print(
                f"goal: {name} with the plugin ({mode}) >= {goal}x plain: {ratio:.2f}x [{verdict}]"
            )
    left = sum(v[1] for m in plugin_modes for v in measured[m].values())
    verdict = "met" if not left else "NOT met"
    print(f"goal: store empty after each workload: {left} keys left [{verdict}]")


def _plot(measured: dict[str, dict[str, tuple[float, int]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(measured)
    for i, (mode, results) in enumerate(measured.items()):
        xs = [j + i * width for j in range(len(WORKLOADS))]
        ax.bar(xs, [results[w.name][0] for w in WORKLOADS], width, label=mode)
    ax.set_xticks([j + width * (len(measured) - 1) / 2 for j in range(len(WORKLOADS))])
    ax.set_xticklabels([w.name for w in WORKLOADS])
    ax.set(ylabel="seconds (median)", yscale="log", title="Dask: plain vs proxy plugin")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")
