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

import time
from typing import Any

import numpy as np

from proxy_patterns.bench.report import print_table
from proxy_patterns.store import entries_left_after_eviction, get_store


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


def run_demo(store_spec: str | None = None, size_mb: int = 50, tasks: int = 8) -> None:
    """Run the workload plain and with the plugin; print the comparison table."""
    import dask
    from distributed import Client
    from tqdm import tqdm

    from proxy_patterns.bench.cluster import measured_cluster
    from proxy_patterns.plugins.dask import register

    rng = np.random.default_rng(0)
    arrays = [rng.random(size_mb * 2**20 // 8) for _ in range(tasks)]
    store = get_store(store_spec)
    rows = []
    expected: tuple[float, np.ndarray] | None = None
    with tqdm(total=4, desc="demo", unit="step") as progress:
        progress.set_postfix_str("starting a 2-worker cluster")
        # Plain Dask warns about "Sending large graph" here; that is the point of the demo.
        with (
            dask.config.set({"distributed.admin.large-graph-warning-threshold": "10 GiB"}),
            measured_cluster(n_workers=2) as (address, probe),
            Client(address) as client,
        ):
            progress.update()
            progress.set_postfix_str("warm-up (first touch of memory is slow on a new machine)")
            workload(client, arrays)
            progress.update()
            for mode in ("plain Dask", "Dask + proxy-patterns plugin"):
                progress.set_postfix_str(mode)
                if mode != "plain Dask":
                    register(client, store=store_spec)
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
                rows.append(
                    [
                        mode,
                        f"{elapsed:.2f}",
                        f"{read / 1e6:.2f}",
                        str(entries_left_after_eviction(store)),
                    ]
                )
                progress.update()
    speedup = float(rows[0][1]) / float(rows[1][1])
    print(
        f"\n{tasks} tasks, each given a {size_mb} MB array and returning one; "
        f"store: {store.connector!r}"
    )
    print_table(["mode", "time (s)", "scheduler read (MB)", "store entries left"], rows)
    print(f"speed-up: {speedup:.1f}x")
