"""``proxy-patterns demo``: a Dask workload with large arguments and results, plain and proxied.

Each of ``tasks`` tasks is given its own array and returns a new one of the same size; a final
task reduces all results, and the client fetches one result. The same code runs twice on one
2-worker cluster: first plain (every argument goes client -> scheduler -> worker), then after
``proxy_patterns.plugins.dask.register(client)`` (only proxies travel; workers put their
results in the store and dependents read it zero-copy). The table shows the time, the bytes the
scheduler process read, and the entries left in the store once the futures are released
(:func:`~proxy_patterns.store.count_entries`: objects, records, claims).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from proxy_patterns.bench.report import print_table
from proxy_patterns.store import TOPOLOGY_SPEC, entries_left_after_eviction, get_store

if TYPE_CHECKING:
    from proxy_patterns.bench.cluster import SchedulerProbe
    from proxy_patterns.simhosts import Host


def transform(x: np.ndarray) -> np.ndarray:
    """A task with a large argument and a result of the same size."""
    return np.asarray(np.sqrt(x) + 1.0)


def total(parts: list[np.ndarray]) -> float:
    """A task with many large arguments and a small result."""
    return float(sum(float(p.sum()) for p in parts))


def workload(client: Any, arrays: list[np.ndarray]) -> tuple[float, np.ndarray]:
    """The user's code: the same with and without the plugin."""
    futures = [client.submit(transform, a, pure=False) for a in arrays]
    result = client.submit(total, futures, pure=False).result()
    first = futures[0].result()
    return result, first


@contextlib.contextmanager
def _cluster(hosts: int) -> Iterator[tuple[str, SchedulerProbe, Callable[[], list[int]]]]:
    """A 2-worker cluster on this machine, or one worker on each of ``hosts`` simulated hosts;
    yields its address, a probe of its scheduler and a function counting the entries left in
    each host's default store (once evictions are done)."""
    from proxy_patterns.bench.cluster import (
        SchedulerProbe,
        measured_cluster,
        simulated_dask_cluster,
    )
    from proxy_patterns.simhosts import namespaces_available, simulated_hosts

    if hosts == 1:
        with measured_cluster(n_workers=2) as (address, probe):
            yield address, probe, lambda: [entries_left_after_eviction(get_store())]
        return
    reason = namespaces_available()
    if reason is not None:
        raise RuntimeError(f"--hosts {hosts} simulates hosts on this machine, and {reason}")
    with simulated_hosts(hosts) as simulated, simulated_dask_cluster(simulated) as cluster:

        def left() -> list[int]:
            # The default store's directory is of the same name on every host.
            store = get_store(TOPOLOGY_SPEC)
            return [entries_left_after_eviction(store)] + [
                _left_on(host) for host in simulated[1:]
            ]

        yield cluster.address, SchedulerProbe(cluster.address), left


def _left_on(host: Host, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while (left := host.count_entries()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def run_demo(
    store_spec: str | None = None, size_mb: int = 50, tasks: int = 8, hosts: int = 1
) -> None:
    """Run the workload plain and with the plugin; print the comparison table.

    With ``hosts`` > 1 the cluster has one worker on each of that many hosts simulated on this
    machine (:mod:`proxy_patterns.simhosts`: root and namespaces needed), and the plugin picks
    the topology store by itself (unless ``store_spec`` names one).
    """
    import dask
    from distributed import Client
    from tqdm import tqdm

    from proxy_patterns.plugins.dask import register

    rng = np.random.default_rng(0)
    arrays = [rng.random(size_mb * 2**20 // 8) for _ in range(tasks)]
    rows = []
    expected: tuple[float, np.ndarray] | None = None
    where = "a 2-worker cluster" if hosts == 1 else f"a worker on each of {hosts} simulated hosts"
    plugin = None
    with tqdm(total=4, desc="demo", unit="step") as progress:
        progress.set_postfix_str(f"starting {where}")
        # Plain Dask warns about "Sending large graph" here; that is the point of the demo.
        with (
            dask.config.set({"distributed.admin.large-graph-warning-threshold": "10 GiB"}),
            _cluster(hosts) as (address, probe, entries_left),
            Client(address) as client,
        ):
            progress.update()
            progress.set_postfix_str("warm-up (first touch of memory is slow on a new machine)")
            workload(client, arrays)
            progress.update()
            for mode in ("plain Dask", "Dask + proxy-patterns plugin"):
                progress.set_postfix_str(mode)
                if mode != "plain Dask":
                    plugin = register(client, store=store_spec)
                before, start = probe.bytes_read(), time.perf_counter()
                outcome = workload(client, arrays)
                elapsed = time.perf_counter() - start
                read = probe.bytes_read() - before
                if expected is None:
                    expected = outcome
                elif not (
                    np.isclose(outcome[0], expected[0]) and np.array_equal(outcome[1], expected[1])
                ):
                    raise AssertionError("proxied workflow returned a different result")
                del outcome
                left = entries_left()
                rows.append(
                    [mode, f"{elapsed:.2f}", f"{read / 1e6:.2f}", " / ".join(map(str, left))]
                )
                progress.update()
    speedup = float(rows[0][1]) / float(rows[1][1])
    store = plugin.store if plugin is not None else get_store(store_spec)
    print(
        f"\n{tasks} tasks, each given a {size_mb} MB array and returning one, on {where}; "
        f"store: {store.connector!r}"
    )
    left_header = "store entries left" if hosts == 1 else "store entries left (each host)"
    print_table(["mode", "time (s)", "scheduler read (MB)", left_header], rows)
    print(f"speed-up: {speedup:.1f}x")
