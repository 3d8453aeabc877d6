"""``proxy-patterns bench store``: put and resolve throughput of the stores, against memcpy.

Backends, each put then resolved through a *fresh* proxy (pickled and unpickled, as a worker
receives it; no store cache):

* ``shm`` — this package's shared-memory store on ``/dev/shm`` (pickle-5 frames, mapped on
  resolve), whose puts reuse the pages of the segments evicted before them; ``shm-fresh`` —
  the same keeping no spare segments, so every put allocates new pages; and ``shm-huge`` —
  the same as ``shm`` on a huge-page tmpfs, when one is mounted (see
  :func:`proxy_patterns.shm.huge_page_directories`);
* ``file`` — ProxyStore's ``FileConnector`` on ``/dev/shm`` with its default serializer;
* ``redis`` — ProxyStore's ``RedisConnector`` with its default serializer, on a local server;
* ``pickle`` — no store: ``pickle.dumps`` and ``loads`` in memory (the in-band copy a
  framework makes anyway).

``memcpy`` is one ``numpy.copyto`` of the same bytes into freshly allocated memory, the cost
that any put which copies the object once must pay at least.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from proxystore.proxy import extract
from proxystore.store import Store

from proxy_patterns.bench.report import print_table
from proxy_patterns.proxy import key_of, proxy
from proxy_patterns.shm import huge_page_directories
from proxy_patterns.store import get_store

SIZES = [10**3, 10**6, 10**7, 10**8, 5 * 10**8]
QUICK_SIZES = [10**3, 10**6, 10**8]
GOAL_SIZE = 10**8


@dataclass
class Result:
    """Median times of one backend at one size."""

    backend: str
    nbytes: int
    put_s: float
    resolve_s: float


def _median_time(
    action: Callable[[], Any], repeats: int, after: Callable[[Any], None] = lambda _: None
) -> float:
    """Median time of ``action``; ``after`` runs untimed on its result (e.g. an eviction)."""
    after(action())  # warm-up: the first touch of new memory is slow on a fresh VM
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = action()
        times.append(time.perf_counter() - start)
        after(result)
    return statistics.median(times)


def _measure_store(name: str, store: Store[Any], obj: np.ndarray, repeats: int) -> Result:
    """Steady state of a workflow: each object is evicted (untimed) before the next put."""

    def put() -> Any:
        return key_of(proxy(store, obj) if name.startswith("shm") else store.proxy(obj))

    put_s = _median_time(put, repeats, after=store.evict)
    key = put()
    wire = pickle.dumps(store.proxy_from_key(key))

    def resolve() -> None:
        got = extract(pickle.loads(wire))
        assert got.nbytes == obj.nbytes

    resolve_s = _median_time(resolve, repeats)
    store.evict(key)
    return Result(name, obj.nbytes, put_s, resolve_s)


def _measure_pickle(obj: np.ndarray, repeats: int) -> Result:
    data = pickle.dumps(obj, protocol=5)
    put_s = _median_time(lambda: pickle.dumps(obj, protocol=5), repeats)
    resolve_s = _median_time(lambda: pickle.loads(data), repeats)
    return Result("pickle", obj.nbytes, put_s, resolve_s)


def _memcpy_s(obj: np.ndarray, repeats: int) -> float:
    return _median_time(lambda: np.copyto(np.empty_like(obj), obj), repeats)


@contextlib.contextmanager
def _stores(redis: str | None) -> Iterator[dict[str, Store[Any]]]:
    from proxystore.connectors.file import FileConnector

    from proxy_patterns.bench.redis_server import local_redis_server, redis_server_binary

    directory = tempfile.mkdtemp(prefix="pp-bench-", dir="/dev/shm")
    os.mkdir(f"{directory}/fresh")  # apart, so that it never finds the other store's spares
    stores: dict[str, Store[Any]] = {
        "shm": get_store(f"shm://{directory}"),
        "shm-fresh": get_store(f"shm://{directory}/fresh?spare_bytes=0"),
    }
    huge = huge_page_directories()
    if huge:
        stores["shm-huge"] = get_store(f"shm://{huge[0]}")
    stores["file"] = Store("bench-file", FileConnector(f"{directory}/file"), cache_size=0)
    with contextlib.ExitStack() as stack:
        if redis is None and redis_server_binary() is not None:
            redis = stack.enter_context(local_redis_server())
        if redis is not None:
            from proxystore.connectors.redis import RedisConnector

            url = redis.removeprefix("redis://").split(":")
            stores["redis"] = Store(
                "bench-redis", RedisConnector(url[0], int(url[1])), cache_size=0
            )
        try:
            yield stores
        finally:
            for name, store in stores.items():
                if name != "shm-huge":  # a shared mount: evictions emptied it already
                    store.close()
            shutil.rmtree(directory, ignore_errors=True)


def _fmt_size(nbytes: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if nbytes >= scale:
            return f"{nbytes / scale:g} {unit}"
    return f"{nbytes} B"


def run(quick: bool = False, redis: str | None = None) -> tuple[list[Result], dict[int, float]]:
    """Measure every backend at every size; return the results and memcpy time per size."""
    from tqdm import tqdm

    sizes = QUICK_SIZES if quick else SIZES
    results: list[Result] = []
    memcpy: dict[int, float] = {}
    with _stores(redis) as stores:
        steps = tqdm(total=len(sizes) * (len(stores) + 2), desc="bench store", leave=False)
        for nbytes in sizes:
            obj = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
            repeats = 3 if quick or nbytes >= 10**8 else 7
            memcpy[nbytes] = _memcpy_s(obj, repeats)
            steps.update()
            for name, store in stores.items():
                if name == "redis" and nbytes > 10**8:
                    steps.update()  # redis-server refuses values over 512 MB; skip the big one
                    continue
                results.append(_measure_store(name, store, obj, repeats))
                steps.update()
            results.append(_measure_pickle(obj, repeats))
            steps.update()
        steps.close()
    return results, memcpy


def main(quick: bool = False, plot: str | None = None, redis: str | None = None) -> None:
    """Print the throughput table and the goals at 100 MB; optionally plot it."""
    results, memcpy = run(quick=quick, redis=redis)
    rows = [
        [
            _fmt_size(r.nbytes),
            r.backend,
            f"{r.put_s * 1e3:.3f}",
            f"{r.resolve_s * 1e3:.3f}",
            f"{r.nbytes / r.put_s / 1e9:.2f}",
            f"{r.put_s / memcpy[r.nbytes]:.2f}",
        ]
        for r in results
    ]
    print_table(["size", "backend", "put ms", "resolve ms", "put GB/s", "put / memcpy"], rows)
    by = {(r.backend, r.nbytes): r for r in results}
    if ("shm", GOAL_SIZE) in by:
        print(f"memcpy of 100 MB into fresh memory: {memcpy[GOAL_SIZE] * 1e3:.1f} ms")
        file = by["file", GOAL_SIZE]
        for name in ("shm", "shm-fresh", "shm-huge"):
            if (name, GOAL_SIZE) not in by:
                continue
            shm = by[name, GOAL_SIZE]
            speedup = file.resolve_s / shm.resolve_s
            ratio = shm.put_s / memcpy[GOAL_SIZE]
            print(
                f"goal ({name}): resolve 100 MB >= 100x faster than FileConnector: "
                f"{speedup:.0f}x [{'met' if speedup >= 100 else 'NOT met'}]"
            )
            print(
                f"goal ({name}): put 100 MB within 2x of one memcpy: {ratio:.2f}x "
                f"[{'met' if ratio <= 2 else 'NOT met'}]"
            )
    if plot:
        _plot(results, memcpy, plot)


def _plot(results: list[Result], memcpy: dict[int, float], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for ax, attr, title in ((axes[0], "put_s", "put"), (axes[1], "resolve_s", "resolve")):
        for backend in dict.fromkeys(r.backend for r in results):
            points = [(r.nbytes, getattr(r, attr)) for r in results if r.backend == backend]
            ax.plot(*zip(*points, strict=True), marker="o", label=backend)
        ax.plot(list(memcpy), list(memcpy.values()), "k--", label="memcpy")
        ax.set(xscale="log", yscale="log", xlabel="object size (bytes)", ylabel="seconds")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")
