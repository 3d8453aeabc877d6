"""``proxy-patterns demo``: a Dask workload with large arguments and results, plain and proxied.

Each of ``tasks`` tasks is given its own array and returns a new one of the same size; a final
task reduces all results, and the client fetches one result. Plain Dask sends every argument
client -> scheduler -> worker and every fetched result through the scheduler. Through the store,
only proxies travel; workers put their results in the store and dependents resolve them
zero-copy. The table shows the time, the bytes the scheduler process read, and the keys left
in the store (every key is evicted once the workflow is done).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
from proxystore.proxy import Proxy

from proxy_patterns.bench.report import print_table
from proxy_patterns.proxy import key_of, proxy
from proxy_patterns.store import count_keys, get_store


def transform(x: np.ndarray) -> np.ndarray:
    """A task with a large argument and a result of the same size."""
    return np.asarray(np.sqrt(x) + 1.0)


def total(parts: list[np.ndarray]) -> float:
    """A task with many large arguments and a small result."""
    return float(sum(float(p.sum()) for p in parts))


def run_and_proxy(fn: Callable[..., Any], spec: str | None, *args: Any) -> Proxy[Any]:
    """Run ``fn`` in the worker and hand back its result as a proxy in the store."""
    return proxy(get_store(spec), fn(*args))


def _plain(client: Any, arrays: list[np.ndarray]) -> tuple[float, np.ndarray]:
    futures = [client.submit(transform, a, pure=False) for a in arrays]
    result = client.submit(total, futures, pure=False).result()
    first = futures[0].result()
    return result, first


def _proxied(client: Any, arrays: list[np.ndarray], spec: str | None) -> tuple[float, np.ndarray]:
    store = get_store(spec)
    inputs = [proxy(store, a) for a in arrays]
    futures = [client.submit(run_and_proxy, transform, spec, p, pure=False) for p in inputs]
    result = client.submit(total, futures, pure=False).result()
    first_proxy = futures[0].result()
    first = np.array(first_proxy)  # the client keeps a real array, not a view on the store
    for p in [*inputs, *client.gather(futures)]:
        store.evict(key_of(p))
    return result, first


def run_demo(store_spec: str | None = None, size_mb: int = 50, tasks: int = 8) -> None:
    """Run the workload plain and through the store; print the comparison table."""
    import dask
    from distributed import Client
    from tqdm import tqdm

    from proxy_patterns.bench.cluster import measured_cluster

    rng = np.random.default_rng(0)
    arrays = [rng.random(size_mb * 2**20 // 8) for _ in range(tasks)]
    store = get_store(store_spec)
    rows = []
    expected: tuple[float, np.ndarray] | None = None
    with tqdm(total=3, desc="demo", unit="step") as progress:
        progress.set_postfix_str("starting a 2-worker cluster")
        # Plain Dask warns about "Sending large graph" here; that is the point of the demo.
        with (
            dask.config.set({"distributed.admin.large-graph-warning-threshold": "10 GiB"}),
            measured_cluster(n_workers=2) as (address, probe),
            Client(address) as client,
        ):
            progress.update()
            for mode in ("plain Dask", "Dask + proxy-patterns store"):
                progress.set_postfix_str(mode)
                before, start = probe.bytes_read(), time.perf_counter()
                if mode == "plain Dask":
                    outcome = _plain(client, arrays)
                else:
                    outcome = _proxied(client, arrays, store_spec)
                elapsed = time.perf_counter() - start
                read = probe.bytes_read() - before
                if expected is None:
                    expected = outcome
                elif not (
                    np.isclose(outcome[0], expected[0]) and np.array_equal(outcome[1], expected[1])
                ):
                    raise AssertionError("proxied workflow returned a different result")
                rows.append([mode, f"{elapsed:.2f}", f"{read / 1e6:.2f}", str(count_keys(store))])
                progress.update()
    speedup = float(rows[0][1]) / float(rows[1][1])
    print(
        f"\n{tasks} tasks, each given a {size_mb} MB array and returning one; "
        f"store: {store.connector!r}"
    )
    print_table(["mode", "time (s)", "scheduler read (MB)", "store keys left"], rows)
    print(f"speed-up: {speedup:.1f}x")
