"""``proxy-patterns bench memory``: what each way of managing proxies leaves in the store.

The paper's ownership experiment (``shared/paper-figures.md`` §3), scaled to 2 cores: stages
[4, 1] on a ``LocalCluster`` of 2 worker processes. Each repeat runs 4 map tasks producing
100 MB each, a reduce task turning them into 10 MB, and a final task turning that into 1 MB,
which the client reads; 4 repeats, one after the other. Five modes:

* ``no proxies`` — plain Dask: data lives in worker memory and moves between workers.
* ``default proxies`` — tasks return ProxyStore-style proxies; nothing is ever evicted.
* ``manual eviction`` — the same, and each consumer evicts its inputs after use; the client
  evicts the final result after reading it.
* ``owned`` — tasks return :func:`~proxy_patterns.ownership.owned` proxies and are
  :func:`~proxy_patterns.ownership.owned_task`\\ s: inputs are released when the consumer
  returns, the final result when the client releases it.
* ``graph-driven`` — plain task functions with the Dask plugin, which evicts a key when Dask
  forgets its task.

A sampler reads the store's bytes (the segments in a private shared-memory directory) and the
workers' RSS every 50 ms, and the store also after every change to it, so that no peak is
missed between two samples. Reported: peak and leftover store bytes and objects, peak RSS,
time.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from stat import S_ISDIR
from typing import Any

import numpy as np

from proxy_patterns.bench.report import print_table
from proxy_patterns.ownership import owned, owned_task, release
from proxy_patterns.proxy import key_of, proxy
from proxy_patterns.rendezvous import DirectoryWatcher
from proxy_patterns.shm import REFS_SUFFIX, SEGMENT_PREFIX, is_segment
from proxy_patterns.store import get_store

MB = 10**6
MODES = ("no proxies", "default proxies", "manual eviction", "owned", "graph-driven")
SAMPLE_INTERVAL = 0.05


@dataclass(frozen=True)
class Sizes:
    """Bytes of a map output, of the reduce output, of the final output; map tasks; repeats."""

    map_bytes: int
    reduce_bytes: int
    final_bytes: int
    maps: int = 4
    repeats: int = 4


FULL = Sizes(100 * MB, 10 * MB, 1 * MB)
QUICK = Sizes(10 * MB, 1 * MB, MB // 10, repeats=2)


# --- the workload's three task functions, in each mode's flavour --------------------------
def _map(i: int, nbytes: int) -> np.ndarray:
    return np.full(nbytes // 8, float(i))


def _reduce(parts: list[Any], nbytes: int) -> np.ndarray:
    out = np.zeros(nbytes // 8)
    for part in parts:
        out += np.asarray(part[: nbytes // 8])
    return out


def _final(x: Any, nbytes: int) -> np.ndarray:
    return np.asarray(x[: nbytes // 8]) * 2.0


def plain_map(i: int, nbytes: int) -> np.ndarray:
    """A map task of the modes without proxies of their own: its array, by value."""
    return _map(i, nbytes)


def plain_reduce(nbytes: int, *parts: Any) -> np.ndarray:
    """The reduce task of those modes: the sum of the map outputs, by value."""
    return _reduce(list(parts), nbytes)


def plain_final(x: Any, nbytes: int) -> np.ndarray:
    """The final task of those modes, by value."""
    return _final(x, nbytes)


def proxy_map(i: int, nbytes: int, spec: str) -> Any:
    """A map task of the proxy modes: its array put in the store, returned as a proxy."""
    return proxy(get_store(spec), _map(i, nbytes), keep_target=False)


def proxy_reduce(nbytes: int, spec: str, evict: bool, *parts: Any) -> Any:
    """The reduce task of the proxy modes; with ``evict`` (manual eviction) it evicts its
    inputs once it has read them."""
    out = proxy(get_store(spec), _reduce(list(parts), nbytes), keep_target=False)
    if evict:
        for part in parts:
            get_store(spec).evict(key_of(part))
    return out


def proxy_final(x: Any, nbytes: int, spec: str, evict: bool) -> Any:
    """The final task of the proxy modes; with ``evict`` it evicts its input."""
    out = proxy(get_store(spec), _final(x, nbytes), keep_target=False)
    if evict:
        get_store(spec).evict(key_of(x))
    return out


@owned_task
def owned_map(i: int, nbytes: int, spec: str) -> Any:
    """A map task of the ``owned`` mode: its array as an owned proxy, moved to the caller."""
    return owned(_map(i, nbytes), get_store(spec))


@owned_task
def owned_reduce(nbytes: int, spec: str, *parts: Any) -> Any:
    """The reduce task of the ``owned`` mode; its inputs are released when it returns."""
    return owned(_reduce(list(parts), nbytes), get_store(spec))


@owned_task
def owned_final(x: Any, nbytes: int, spec: str) -> Any:
    """The final task of the ``owned`` mode; its input is released when it returns."""
    return owned(_final(x, nbytes), get_store(spec))


def _submit_repeat(client: Any, mode: str, sizes: Sizes, spec: str, r: int) -> Any:
    """Submit one repeat of the workload in ``mode``; return only the final task's future.

    Like ``dask.compute`` of the final value, the client holds no intermediate future, so
    Dask releases each intermediate result as soon as its consumer is done.
    """
    s, n = sizes, sizes.maps
    seeds = range(r * n, (r + 1) * n)
    if mode in ("no proxies", "graph-driven"):
        maps = [client.submit(plain_map, i, s.map_bytes, pure=False) for i in seeds]
        reduced = client.submit(plain_reduce, s.reduce_bytes, *maps, pure=False)
        return client.submit(plain_final, reduced, s.final_bytes, pure=False)
    if mode == "owned":
        maps = [client.submit(owned_map, i, s.map_bytes, spec, pure=False) for i in seeds]
        reduced = client.submit(owned_reduce, s.reduce_bytes, spec, *maps, pure=False)
        return client.submit(owned_final, reduced, s.final_bytes, spec, pure=False)
    evict = mode == "manual eviction"
    maps = [client.submit(proxy_map, i, s.map_bytes, spec, pure=False) for i in seeds]
    reduced = client.submit(proxy_reduce, s.reduce_bytes, spec, evict, *maps, pure=False)
    return client.submit(proxy_final, reduced, s.final_bytes, spec, evict, pure=False)


def _repeat(client: Any, mode: str, sizes: Sizes, spec: str, r: int) -> float:
    """Run one repeat, read the final value (its first element), and let it go."""
    value = _submit_repeat(client, mode, sizes, spec, r).result()
    first = float(value[0])
    if mode == "owned":
        release(value)
    elif mode == "manual eviction":
        get_store(spec).evict(key_of(value))
    return first


@dataclass
class Trace:
    """Samples of one mode's run: seconds since start, store bytes, store objects, worker RSS."""

    times: list[float] = field(default_factory=list)
    store_bytes: list[int] = field(default_factory=list)
    store_objects: list[int] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)


def _store_usage(directory: str) -> tuple[int, int]:
    """(bytes, objects) in ``directory``. Bytes: of each file once, however many names it has
    (a segment being published is briefly both its temporary and its final name). Objects:
    the segments (:func:`~proxy_patterns.shm.is_segment`), not claims or temporary files.
    Reference records are directories, also while they are built under a temporary name:
    neither."""
    sizes: dict[int, int] = {}
    objects = 0
    for name in os.listdir(directory):
        if name.startswith(SEGMENT_PREFIX) and not name.endswith(REFS_SUFFIX):
            try:
                stat = os.stat(os.path.join(directory, name))
            except FileNotFoundError:
                continue
            if not S_ISDIR(stat.st_mode):
                sizes[stat.st_ino] = stat.st_size
                objects += is_segment(name)
    return sum(sizes.values()), objects


class Sampler:
    """Samples the store and the workers' RSS in a thread (see :meth:`_run`)."""

    def __init__(self, directory: str, pids: list[int]) -> None:
        import psutil

        self.directory = directory
        self.processes = [psutil.Process(pid) for pid in pids]
        self.trace = Trace()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._start = time.perf_counter()

    def _sample(self) -> None:
        nbytes, objects = _store_usage(self.directory)
        self.trace.times.append(time.perf_counter() - self._start)
        self.trace.store_bytes.append(nbytes)
        self.trace.store_objects.append(objects)
        self.trace.rss.append(sum(p.memory_info().rss for p in self.processes))

    def _run(self) -> None:
        # Every SAMPLE_INTERVAL, and also right after each change to the store directory:
        # a peak shorter than the interval is not missed.
        watcher = DirectoryWatcher.of(self.directory, deletes=True)

        def changed_since(generation: int) -> Callable[[], bool]:
            return lambda: watcher.generation != generation

        seen = watcher.generation
        while not self._stop.is_set():
            with watcher.changed:
                watcher.changed.wait_for(changed_since(seen), SAMPLE_INTERVAL)
                seen = watcher.generation
            self._sample()

    def __enter__(self) -> Sampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


@dataclass
class Result:
    """One mode's figures."""

    mode: str
    seconds: float
    peak_bytes: int
    peak_objects: int
    left_bytes: int
    left_objects: int
    peak_rss: int
    trace: Trace


def _settled(directory: str, timeout: float) -> tuple[int, int]:
    """Store usage once evictions that follow the run asynchronously are done: the first
    reading that stays the same for half a second (or the last one after ``timeout``)."""
    deadline = time.monotonic() + timeout
    last = _store_usage(directory)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = _store_usage(directory)
        if now == last:
            return now
        last = now
    return last


def run_mode(mode: str, sizes: Sizes) -> Result:
    """Run the workload in ``mode`` on a fresh cluster and private store directory."""
    from distributed import Client, LocalCluster

    from proxy_patterns.plugins.dask import register

    directory = tempfile.mkdtemp(prefix="pp-bench-memory-", dir="/dev/shm")
    spec = f"shm://{directory}"
    try:
        with (
            LocalCluster(
                n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
            ) as cluster,
            Client(cluster) as client,
        ):
            if mode == "graph-driven":
                register(client, store=spec)
            pids = list(client.run(os.getpid).values())
            with Sampler(directory, pids) as sampler:
                start = time.perf_counter()
                for r in range(sizes.repeats):
                    expected = 2.0 * sum(range(r * sizes.maps, (r + 1) * sizes.maps))
                    assert _repeat(client, mode, sizes, spec, r) == expected
                seconds = time.perf_counter() - start
                left_bytes, left_objects = _settled(directory, timeout=10)
            trace = sampler.trace
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return Result(
        mode,
        seconds,
        max(trace.store_bytes),
        max(trace.store_objects),
        left_bytes,
        left_objects,
        max(trace.rss),
        trace,
    )


def measure(sizes: Sizes, modes: tuple[str, ...] = MODES) -> list[Result]:
    """Each mode once, one after the other (never two clusters at a time)."""
    from tqdm import tqdm

    return [run_mode(mode, sizes) for mode in tqdm(modes, desc="bench memory")]


def _mb(nbytes: int) -> str:
    return f"{nbytes / MB:.1f}"


def report(results: list[Result], sizes: Sizes) -> bool:
    """Print the table and the goal's verdict; True if the goal is met."""
    print(
        f"stages [{sizes.maps}, 1], {_mb(sizes.map_bytes)} -> {_mb(sizes.reduce_bytes)} -> "
        f"{_mb(sizes.final_bytes)} MB, {sizes.repeats} repeats, 2 workers"
    )
    header = [
        "mode",
        "peak store MB",
        "peak objects",
        "left MB",
        "left objects",
        "peak worker RSS MB",
        "time s",
    ]
    rows = [
        [
            r.mode,
            _mb(r.peak_bytes),
            str(r.peak_objects),
            _mb(r.left_bytes),
            str(r.left_objects),
            _mb(r.peak_rss),
            f"{r.seconds:.2f}",
        ]
        for r in results
    ]
    print_table(header, rows)
    by_mode = {r.mode: r for r in results}
    manual = by_mode["manual eviction"].peak_bytes
    met = all(
        by_mode[m].left_bytes == 0 and by_mode[m].peak_bytes <= manual
        for m in ("owned", "graph-driven")
    )
    print(
        "goal: owned and graph-driven leave 0 bytes with peak <= manual eviction's "
        f"({_mb(manual)} MB) [{'met' if met else 'NOT met'}]"
    )
    return met


def main(quick: bool = False, plot: str | None = None, redis: str | None = None) -> None:
    """Run every mode, print the table; optionally plot memory over time."""
    sizes = QUICK if quick else FULL
    results = measure(sizes)
    report(results, sizes)
    if plot:
        _plot(results, plot)


def _plot(results: list[Result], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (store_ax, rss_ax) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for r in results:
        store_ax.plot(r.trace.times, [b / MB for b in r.trace.store_bytes], label=r.mode)
        rss_ax.plot(r.trace.times, [b / MB for b in r.trace.rss], label=r.mode)
    store_ax.set(ylabel="store (MB)", title="Memory over time, stages [4, 1] x 4 repeats")
    rss_ax.set(xlabel="time (s)", ylabel="workers' RSS (MB)")
    store_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")
