"""``proxy-patterns bench dask``: plain Dask against Dask with the proxy plugin, same workloads.

A ``LocalCluster`` with 2 worker processes of 1 thread each, a fresh one per mode (plain, the
plugin on shared memory, on a huge-page tmpfs when one is mounted, and on Redis when a
redis-server is available):

* ``a`` — 10 independent tasks, each given its own 100 MB array and returning 100 MB, gathered;
* ``b`` — one 100 MB array passed to 20 tasks (``submit`` each), small results gathered;
* ``c`` — a dask.array of 2 GB in 100 MB chunks, persisted, then summed;
* ``d`` — 2000 tiny tasks, one ``submit`` each, gathered;
* ``e`` — 16 tasks, each given a dataclass holding 50 MB of ``bytes`` and returning one, then
  one task reading all 16 results: objects ``dask.sizeof`` cannot size. Also run with
  ProxyStore used by hand, as its documentation shows (``Store`` over a ``FileConnector`` on
  ``/dev/shm``; each argument and result proxied explicitly, evicted after), a user's way of
  doing without the plugin.

With the plugin on shared memory, the client-side time of one ``submit`` of a 50 MB object
is measured against its floor: one ``pickle.dumps`` of the object plus one write of those bytes
into the store.

Each workload runs once untimed (on a fresh machine the first touch of memory is several times
slower, for every mode alike; with the plugin, later puts also reuse the pages of segments the
run before evicted), then ``repeats`` times per mode (5; the median is reported, so that the
slower runs right after the warm-up and the machine's noise weigh less). After each
run the store must drain to zero entries (:func:`~proxy_patterns.store.count_entries`:
objects, records, claims); the table shows the entries left.
"""

from __future__ import annotations

import functools
import pickle
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from proxy_patterns.bench.report import print_table

MB = 10**6
BY_HAND = "proxystore-by-hand"
"""The mode in which workload e proxies by hand with ProxyStore (the others do not run)."""


@dataclass
class Record:
    """What workload e passes: a dataclass of raw bytes (``dask.sizeof``: 56 bytes)."""

    raw: bytes


def rotated(record: Any) -> Record:
    """Task of workload e: a large record in, a new large record out."""
    raw = record.raw
    return Record(raw[1:] + raw[:1])


def first_bytes(records: list[Any]) -> int:
    """Task of workload e: read all the results (one byte of each)."""
    return sum(r.raw[0] for r in records)


def rotated_by_hand(p: Any, store_config: Any) -> Any:
    """``rotated`` as ProxyStore's documentation writes it: the task gets a proxy and returns
    a proxy it makes itself."""
    from proxystore.store import get_or_create_store

    store = get_or_create_store(store_config, register=True)
    return store.proxy(rotated(p))


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


def _records(scale: float) -> list[Record]:
    rng = random.Random(0)
    return [Record(rng.randbytes(int(50 * MB * scale))) for _ in range(16)]


def _run_e(client: Any, records: list[Record]) -> Any:
    results = [client.submit(rotated, r, pure=False) for r in records]
    total = client.submit(first_bytes, results, pure=False).result()
    assert total == sum(r.raw[1] for r in records)
    return total


def _run_e_by_hand(client: Any, records: list[Record], store: Any) -> Any:
    from proxystore.store.utils import get_key

    config = store.config()
    arguments = [store.proxy(r) for r in records]
    results = client.gather([client.submit(rotated_by_hand, p, config) for p in arguments])
    total = client.submit(first_bytes, results, pure=False).result()
    assert total == sum(r.raw[1] for r in records)
    for p in arguments + results:
        store.evict(get_key(p))
    return total


WORKLOADS = [
    Workload("a", "10 tasks x own 100 MB arg -> 100 MB", lambda s: _arrays(s, 10), _run_a),
    Workload("b", "one 100 MB arg -> 20 tasks", lambda s: _arrays(s, 1), _run_b),
    Workload("c", "dask.array 2 GB, 100 MB chunks: persist + sum", lambda s: s, _run_c),
    Workload("d", "2000 tiny tasks", lambda s: 2000, _run_d),
    Workload("e", "16 tasks x own 50 MB dataclass -> 50 MB; 1 reads all", _records, _run_e),
]


@dataclass
class Measured:
    """One mode's results: median seconds and entries left per workload; with the plugin on
    shared memory, also the median time of one submit of a record and of its floor."""

    workloads: dict[str, tuple[float, int]]
    submit_and_floor: tuple[float, float] | None = None


def measure_mode(
    store_spec: str | None, inputs: dict[str, Any], repeats: int, progress: Any
) -> Measured:
    """Run the workloads on a fresh cluster: plain, with the plugin (``store_spec`` a spec), or
    ProxyStore by hand (:data:`BY_HAND`, workload e only)."""
    import tempfile

    from distributed import Client, LocalCluster
    from proxystore.connectors.file import FileConnector
    from proxystore.store import Store

    from proxy_patterns.plugins.dask import register
    from proxy_patterns.store import entries_left_after_eviction, get_store

    results: dict[str, tuple[float, int]] = {}
    submit_and_floor = None
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
        tempfile.TemporaryDirectory(dir="/dev/shm", prefix="pp-bench-by-hand-") as directory,
    ):
        store: Any = None
        workloads = WORKLOADS
        runs = {w.name: functools.partial(w.run, client) for w in WORKLOADS}
        if store_spec == BY_HAND:
            store = Store("pp-bench-by-hand", FileConnector(directory), register=True)
            workloads = [w for w in WORKLOADS if w.name == "e"]
            runs = {"e": functools.partial(_run_e_by_hand, client, store=store)}
        elif store_spec is not None:
            register(client, store=store_spec)
            store = get_store(store_spec)
        for workload in workloads:
            run = runs[workload.name]
            run(inputs[workload.name])  # warm-up: first touch of VM memory
            if store is not None:
                entries_left_after_eviction(store)
            times, left = [], 0
            for _ in range(repeats):
                start = time.perf_counter()
                out = run(inputs[workload.name])
                times.append(time.perf_counter() - start)
                del out
                left = entries_left_after_eviction(store) if store is not None else 0
                progress.update()
            results[workload.name] = (statistics.median(times), left)
        if store_spec == "shm":
            submit_and_floor = (
                _submit_seconds(client, store, inputs["e"], repeats),
                _dumps_and_write_seconds(store, inputs["e"], repeats),
            )
        if store_spec == BY_HAND:
            store.close()
    return Measured(results, submit_and_floor)


def _submit_seconds(client: Any, store: Any, records: list[Record], repeats: int) -> float:
    """Median client-side time of one ``submit`` of a 50 MB record (a distinct one each),
    each after the previous one's keys were evicted (as for the floor, below)."""
    from distributed import wait

    from proxy_patterns.store import entries_left_after_eviction

    times = []
    for record in records[:repeats]:
        start = time.perf_counter()
        future = client.submit(rotated, record, pure=False)
        times.append(time.perf_counter() - start)
        wait(future)
        del future
        entries_left_after_eviction(store)
    return statistics.median(times)


def _dumps_and_write_seconds(store: Any, records: list[Record], repeats: int) -> float:
    """The floor of a ``submit``: one ``pickle.dumps`` of a record plus one write of its bytes
    into the store (into pages that evicted segments left, as the plugin's puts reuse)."""
    from proxy_patterns.store import entries_left_after_eviction

    entries_left_after_eviction(store)
    times = []
    for record in records[:repeats]:
        start = time.perf_counter()
        data = pickle.dumps(record, protocol=5)
        key = store.connector.put(data)
        times.append(time.perf_counter() - start)
        store.connector.evict(key)
    return statistics.median(times)


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
        modes: dict[str, str | None] = {"plain": None, "shm": "shm", BY_HAND: BY_HAND}
        huge = huge_page_directories()
        if huge:
            modes["shm-huge"] = f"shm://{huge[0]}"
        if redis is None and redis_server_binary() is not None:
            redis = stack.enter_context(local_redis_server())
        if redis is not None:
            modes["redis"] = redis
        runs = (len(modes) - 1) * len(WORKLOADS) * repeats + repeats  # by hand: e only
        progress = stack.enter_context(tqdm(total=runs, desc="bench dask", leave=False))
        # Plain Dask warns "Sending large graph" on workloads a and b: that is what is measured.
        warnings.filterwarnings("ignore", message="Sending large graph")
        measured = {
            mode: measure_mode(spec, inputs, repeats, progress) for mode, spec in modes.items()
        }
    _report(measured, quick)
    if plot:
        _plot(measured, plot)


def _report(measured: dict[str, Measured], quick: bool) -> None:
    plugin_modes = [m for m in measured if m not in ("plain", BY_HAND)]
    header = ["workload", "plain Dask (s)"]
    header += [f"plugin {m} (s)" for m in plugin_modes] + [f"{BY_HAND} (s)"]
    header += [f"speed-up {m}" for m in plugin_modes] + ["entries left"]
    rows = []
    for w in WORKLOADS:
        plain = measured["plain"].workloads[w.name][0]
        by_hand = measured[BY_HAND].workloads.get(w.name)
        row = [f"{w.name}: {w.description}", f"{plain:.3f}"]
        row += [f"{measured[m].workloads[w.name][0]:.3f}" for m in plugin_modes]
        row += ["-" if by_hand is None else f"{by_hand[0]:.3f}"]
        row += [f"{plain / measured[m].workloads[w.name][0]:.2f}x" for m in plugin_modes]
        entries_left = [f"{m}={measured[m].workloads[w.name][1]}" for m in plugin_modes]
        if by_hand is not None:
            entries_left.append(f"by hand={by_hand[1]}")
        row.append(", ".join(entries_left))
        rows.append(row)
    if quick:
        print("(--quick: data sizes x0.2, one repeat)")
    print_table(header, rows)
    goals = {"a": 5.0, "b": 5.0, "d": 0.95, "e": 2.0}
    for mode in [m for m in plugin_modes if m.startswith("shm")]:
        seconds = measured[mode].workloads
        for name, goal in goals.items():
            ratio = measured["plain"].workloads[name][0] / seconds[name][0]
            _goal(f"{name} with the plugin ({mode}) >= {goal}x plain", ratio, goal)
        ratio = measured[BY_HAND].workloads["e"][0] / seconds["e"][0]
        _goal(f"e with the plugin ({mode}) >= 1.3x ProxyStore by hand", ratio, 1.3)
    submit_and_floor = measured["shm"].submit_and_floor
    assert submit_and_floor is not None
    submit, floor = submit_and_floor
    size = "10 MB" if quick else "50 MB"
    print(
        f"submit of one {size} record (plugin shm): {submit * 1000:.1f} ms; "
        f"pickle.dumps + one write into the store: {floor * 1000:.1f} ms"
    )
    verdict = "met" if submit <= 1.2 * floor else "NOT met"
    print(f"goal: submit <= 1.2x (pickle.dumps + write): {submit / floor:.2f}x [{verdict}]")
    left = sum(v[1] for m in measured.values() for v in m.workloads.values())
    verdict = "met" if not left else "NOT met"
    print(f"goal: store empty after each workload: {left} entries left [{verdict}]")


def _goal(what: str, ratio: float, goal: float) -> None:
    print(f"goal: {what}: {ratio:.2f}x [{'met' if ratio >= goal else 'NOT met'}]")


def _plot(measured: dict[str, Measured], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(measured)
    for i, (mode, m) in enumerate(measured.items()):
        results = m.workloads
        xs = [j + i * width for j, w in enumerate(WORKLOADS) if w.name in results]
        heights = [results[w.name][0] for w in WORKLOADS if w.name in results]
        ax.bar(xs, heights, width, label=mode)
    ax.set_xticks([j + width * (len(measured) - 1) / 2 for j in range(len(WORKLOADS))])
    ax.set_xticklabels([w.name for w in WORKLOADS])
    ax.set(ylabel="seconds (median)", yscale="log", title="Dask: plain vs proxy plugin")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")
