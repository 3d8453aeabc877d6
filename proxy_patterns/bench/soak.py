"""``proxy-patterns bench soak``: everything at once, for minutes; nothing lost, nothing leaked.

Issue 16's load test, scaled to a 2-core node. A ``LocalCluster`` of 2 worker processes of
1 thread each, with the Dask plugin registered (threshold 1 MiB), runs for ``duration``
seconds (:data:`DURATION`; ``--quick``: :data:`QUICK_DURATION`) all of:

* :data:`CLIENT_THREADS` client threads, each keeping :data:`IN_FLIGHT` tasks in flight:
  arguments of every type the plugins proxy (:data:`KINDS`: arrays, ``bytes``, ``str``, a
  dataclass of ``bytes``, a dict of ``bytes``, a list of records, a pandas frame with an object
  column), of a size drawn from :data:`SIZE_CLASSES` (mostly small, some up to 50 MB). Each task
  fingerprints its argument (:func:`fingerprint`) and, for some, returns it (a large result);
  the thread checks both against the fingerprint it computed before submitting.
* a stream with 2 producer threads and 2 consumers, each consumer dispatching its items to
  tasks on the same client (``StreamConsumer(auto_ack=False).dispatch``); every item sent must
  be processed exactly once, with the right content;
* a thread passing owned proxies to tasks: an owner, two borrows to two tasks (one returns an
  owned result made on its worker), the owner released at once.

Then the same client threads alone on a fresh cluster without the plugin (plain Dask), for the
latency comparison. Latency is submit → result in the client thread (the argument is built and
fingerprinted before the clock starts), per size class.

Leaks are judged once the soak has stopped and the store has settled: evictions follow Dask's
release of tasks asynchronously, and the shared-memory store keeps evicted segments of 1 MiB or
more as *spares* for :data:`~proxy_patterns.shm.SPARE_IDLE_SECONDS` before removing them. Worker
RSS is read after ``gc.collect()`` and ``malloc_trim(0)`` on the workers, at the start (after a
warm-up task of each kind and size class, so that imports and pools count in the baseline) and
at the end, as Dask's documentation advises for reading unmanaged memory; plain Dask's workers
grow too, so the plugin's growth is judged against theirs (:data:`RSS_MARGIN`). ``/dev/shm`` use is
the whole filesystem's (``statvfs``): on a shared machine other users' work shows in it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import math
import os
import random
import shutil
import tempfile
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from proxy_patterns.bench.report import print_table
from proxy_patterns.ownership import BaseRefProxy, borrow, owned, owned_task, release
from proxy_patterns.store import entries_left_after_eviction, get_store, public_spec

KB, MB, MiB = 10**3, 10**6, 2**20
DURATION = 120.0
"""Seconds each soak runs (the proxies one, then the plain one)."""
QUICK_DURATION = 15.0
CLIENT_THREADS = 8
IN_FLIGHT = 4
"""Tasks each client thread keeps in flight."""
THRESHOLD = "1 MiB"
SIZE_CLASSES: dict[str, tuple[int, int, float]] = {
    "small": (1 * KB, 256 * KB, 0.80),
    "medium": (2 * MB, 8 * MB, 0.15),
    "large": (20 * MB, 50 * MB, 0.05),
}
"""Name -> (smallest, largest serialized size, share of tasks); sizes log-uniform within a
class. Small ones stay below the threshold (by value, with or without the plugin)."""
GIVE_BACK = 0.2
"""Share of tasks that return their argument (a result as large as the argument)."""
STREAM_ITEM_SIZES = (8 * KB, 1 * MB, 10 * MB)
"""Items' sizes, in turn: 8 kB travel inline through the broker, the others by proxy."""
STREAM_MAX_IN_FLIGHT = 8
OWNED_SIZES = (1 * MB, 10 * MB)
TOLERANCE = 64 * MiB
"""How far above its baseline ``/dev/shm`` use may end."""
RSS_MARGIN = 32 * MiB
"""How much more worker RSS may grow with the plugin than with plain Dask in the same soak.

Plain Dask's workers end about 47 MiB above their baseline themselves (its logs and caches
fill). With the plugin, the stream and owned proxies, the growth levels off about 18 MiB higher
(their imports, caches and pools): measured here +37 MiB after 20 s, +65 MiB after 120 s and
+64 MiB after 180 s. A leak grows with the soak's length and passes this margin."""
SETTLE_TIMEOUT = 60.0
"""Seconds to wait for the store to drain and spares to go once a soak has stopped."""
TIMEOUT = 60.0
"""Seconds any one wait (for a task's result, a stream's item, room in the stream) may last
before it counts as an error: a hang fails the soak instead of stalling it."""


# --- what the tasks get -------------------------------------------------------------------


@dataclass
class Payload:
    """A dataclass holding raw bytes (``dask.sizeof`` calls it 56 bytes whatever it holds)."""

    tag: int
    raw: bytes


def _raw(tag: int, nbytes: int) -> bytes:
    """``nbytes`` that differ for each ``tag`` (so that the plugin's dedup never merges two
    arguments), cheap to make."""
    return tag.to_bytes(8, "little") * (nbytes // 8) + b"x" * (nbytes % 8)


def _records(tag: int, nbytes: int) -> list[dict[str, Any]]:
    blob = 1000
    return [{"i": tag + i, "blob": _raw(tag + i, blob)} for i in range(max(1, nbytes // blob))]


def _frame(tag: int, nbytes: int) -> Any:
    import pandas as pd

    width = 1000
    n = max(1, nbytes // width)
    names = pd.Series([f"{tag + i:0{width}d}" for i in range(n)], dtype=object)
    return pd.DataFrame({"i": np.arange(n, dtype=np.int64) + tag, "name": names})


KINDS: dict[str, Callable[[int, int], Any]] = {
    "ndarray": lambda tag, n: np.arange(max(1, n // 8), dtype=np.int64) + tag,
    "bytes": _raw,
    "str": lambda tag, n: _raw(tag, n).hex()[:n],
    "dataclass": lambda tag, n: Payload(tag, _raw(tag, n)),
    "dict": lambda tag, n: {"tag": tag, "head": _raw(tag, 100), "body": _raw(tag + 1, n)},
    "records": _records,
    "dataframe": _frame,
}
"""Name -> a function of (a unique tag, about how many bytes serialized) making an argument."""


def fingerprint(x: Any) -> tuple[Any, ...]:
    """The type of ``x``, its size and a checksum of its content: what a task computes from its
    argument and what the client computed before submitting it."""
    import pandas as pd

    name = type(x).__name__
    if isinstance(x, np.ndarray):
        return name, x.size, int(x.sum())
    if isinstance(x, bytes):
        return name, len(x), zlib.crc32(x)
    if isinstance(x, str):
        return name, len(x), zlib.crc32(x.encode())
    if isinstance(x, Payload):
        return name, x.tag, len(x.raw), zlib.crc32(x.raw)
    if isinstance(x, dict):
        return name, x["tag"], zlib.crc32(x["head"]), len(x["body"]), zlib.crc32(x["body"])
    if isinstance(x, list):
        return name, len(x), sum(r["i"] for r in x), sum(zlib.crc32(r["blob"]) for r in x)
    if isinstance(x, pd.DataFrame):
        return name, len(x), int(x["i"].sum()), zlib.crc32("".join(x["name"]).encode())
    raise TypeError(f"no fingerprint for a {name}")


def examine(x: Any, give_back: bool) -> tuple[tuple[Any, ...], Any]:
    """Task of the client threads: the argument's fingerprint, and the argument itself if
    ``give_back`` (a large result), else None."""
    return fingerprint(x), x if give_back else None


def stream_task(x: Any) -> tuple[int, int, int]:
    """Task of a stream's item (``np.arange(m) + tag``): its tag, length and sum."""
    return int(x[0]), int(x.size), int(x.sum())


def _arange_sum(tag: int, size: int) -> int:
    return size * (size - 1) // 2 + tag * size


@owned_task
def owned_total(x: Any) -> int:
    """Task given a borrow: the sum of the owned array (the borrow is released on return)."""
    return int(np.sum(x))


@owned_task
def owned_doubled(x: Any, store_spec: str) -> Any:
    """Task given a borrow: twice the array, as an owned object made on the worker (it moves
    to the client with the result)."""
    return owned(x * 2, get_store(store_spec))


def trim_memory() -> int:
    """Run on each worker before its RSS is read: free what Python and glibc hold but do not
    use, so that RSS measures what is live."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return os.getpid()


# --- the load -----------------------------------------------------------------------------


@dataclass
class Tally:
    """What one soak's threads did (each thread appends; ``list.append`` is atomic)."""

    latencies: dict[str, list[float]] = field(
        default_factory=lambda: {name: [] for name in SIZE_CLASSES}
    )
    errors: list[str] = field(default_factory=list)
    stream_sent: list[int] = field(default_factory=list)
    stream_done: list[int] = field(default_factory=list)
    owned_rounds: list[int] = field(default_factory=list)

    @property
    def tasks(self) -> int:
        return sum(map(len, self.latencies.values()))

    def error(self, what: str) -> None:
        self.errors.append(what)


def _size_class(rng: random.Random) -> tuple[str, int]:
    names = list(SIZE_CLASSES)
    name = rng.choices(names, [SIZE_CLASSES[n][2] for n in names])[0]
    low, high, _ = SIZE_CLASSES[name]
    return name, int(math.exp(rng.uniform(math.log(low), math.log(high))))


def _tags(start: int) -> Iterator[int]:
    """Unique tags for thread ``start``: 10**4 of them, 10**5 apart (records and frames use
    ``tag + i`` for their rows, fewer than 10**5), before the next thread's. Small enough that
    the int64 sum of a 50 MB ``arange`` plus a tag cannot overflow."""
    for k in range(1, 10**4):
        yield start * 10**9 + k * 10**5
    raise RuntimeError(f"thread {start} ran out of tags")


def client_thread(client: Any, index: int, stop: threading.Event, tally: Tally) -> None:
    """Submit tasks with :data:`IN_FLIGHT` in flight until ``stop``; check every result."""
    from distributed import wait

    rng = random.Random(index)
    tags = _tags(index)
    kinds = list(KINDS)
    in_flight: dict[Any, tuple[str, float, tuple[Any, ...], bool]] = {}
    while not stop.is_set() or in_flight:
        while not stop.is_set() and len(in_flight) < IN_FLIGHT:
            kind = rng.choice(kinds)
            size_class, nbytes = _size_class(rng)
            argument = KINDS[kind](next(tags), nbytes)
            expected = fingerprint(argument)
            give_back = rng.random() < GIVE_BACK
            start = time.perf_counter()
            try:
                future = client.submit(examine, argument, give_back, pure=False)
            except Exception as error:
                tally.error(f"submit of a {size_class} {kind}: {error!r}")
                continue
            in_flight[future] = (size_class, start, expected, give_back)
            del argument
        done, _ = wait(list(in_flight), timeout=TIMEOUT, return_when="FIRST_COMPLETED")
        for future in done:
            size_class, start, expected, give_back = in_flight.pop(future)
            try:
                got, returned = future.result()
            except Exception as error:
                tally.error(f"{size_class} task: {error!r}")
                continue
            tally.latencies[size_class].append(time.perf_counter() - start)
            if got != expected:
                tally.error(f"{size_class} task saw {got[:2]}, expected {expected[:2]}")
            elif give_back and fingerprint(returned) != expected:
                tally.error(f"{size_class} task returned a different {expected[0]}")


def stream_producer(
    topic: str, store_spec: str, index: int, stop: threading.Event, tally: Tally
) -> None:
    """Send items of :data:`STREAM_ITEM_SIZES` in turn until ``stop``, then close."""
    from proxy_patterns.streams import StreamProducer

    with StreamProducer[np.ndarray](
        topic,
        get_store(store_spec),
        producers=2,
        max_in_flight=STREAM_MAX_IN_FLIGHT,
        timeout=TIMEOUT,
    ) as producer:
        for sequence, tag in enumerate(_tags(100 + index)):
            if stop.is_set():
                break
            nbytes = STREAM_ITEM_SIZES[sequence % len(STREAM_ITEM_SIZES)]
            producer.send(np.arange(nbytes // 8, dtype=np.int64) + tag)
            tally.stream_sent.append(tag)


def stream_consumer(client: Any, consumer: Any, tally: Tally) -> None:
    """Dispatch every item of the stream to a task until it ends; check each result."""

    def check(future: Any) -> None:
        try:
            tag, size, total = future.result()
        except Exception as error:
            tally.error(f"stream task: {error!r}")
            return
        if total != _arange_sum(tag, size):
            tally.error(f"stream item {tag}: sum {total}, expected {_arange_sum(tag, size)}")
        tally.stream_done.append(tag)

    with consumer:
        consumer.dispatch(functools.partial(client.submit, stream_task, pure=False), on_done=check)


def owned_thread(client: Any, store_spec: str, stop: threading.Event, tally: Tally) -> None:
    """Until ``stop``: own an array, lend it to two tasks, release it at once; one task
    returns an owned result, released once checked."""
    store = get_store(store_spec)
    for round_, tag in enumerate(_tags(200)):
        if stop.is_set():
            break
        size = OWNED_SIZES[round_ % len(OWNED_SIZES)] // 8
        owner = owned(np.arange(size, dtype=np.int64) + tag, store)
        total = client.submit(owned_total, borrow(owner), pure=False)
        doubled = client.submit(owned_doubled, borrow(owner), store_spec, pure=False)
        release(owner)
        try:
            result = doubled.result(TIMEOUT)
            if int(total.result(TIMEOUT)) != _arange_sum(tag, size):
                tally.error(f"owned {tag}: wrong sum")
            if int(np.sum(result)) != 2 * _arange_sum(tag, size):
                tally.error(f"owned {tag}: wrong doubled sum")
            if issubclass(type(result), BaseRefProxy):  # not isinstance: it would resolve
                release(result)
        except Exception as error:
            tally.error(f"owned {tag}: {error!r}")
        del total, doubled
        tally.owned_rounds.append(tag)


def _guarded(tally: Tally, target: Callable[..., None], *args: Any) -> threading.Thread:
    """A started thread running ``target(*args)``; an exception it raises counts as an error."""

    def run() -> None:
        try:
            target(*args)
        except Exception as error:
            tally.error(f"{target.__name__}: {error!r}")

    thread = threading.Thread(target=run, name=target.__name__, daemon=True)
    thread.start()
    return thread


WARM_UP_SIZES = (1 * KB, 2 * MB)
"""One below the threshold and one above: every code path runs, every module is imported."""


def _warm_up(client: Any) -> None:
    """A task of each kind and of :data:`WARM_UP_SIZES`, so that imports and pools are in the
    workers' baseline."""
    for kind, make in KINDS.items():
        for nbytes in WARM_UP_SIZES:
            argument = make(1, nbytes)
            got, _ = client.submit(examine, argument, True, pure=False).result()
            assert got == fingerprint(argument), kind


# --- measuring ----------------------------------------------------------------------------


def shm_used() -> int:
    """Bytes in use on ``/dev/shm``, by everyone."""
    stat = os.statvfs("/dev/shm")
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize


def worker_rss(client: Any) -> int:
    """Total RSS of the workers, once each has collected garbage and trimmed its heap."""
    import psutil

    pids = client.run(trim_memory).values()
    return sum(psutil.Process(pid).memory_info().rss for pid in pids)


def _settled_shm(directory: str | None) -> int:
    """``/dev/shm`` use once the store's directory (if on shared memory) has no spares left:
    they go :data:`~proxy_patterns.shm.SPARE_IDLE_SECONDS` after their last use (read after
    :data:`SETTLE_TIMEOUT` if some stay)."""
    from proxy_patterns.shm import SPARE_PREFIX

    deadline = time.monotonic() + SETTLE_TIMEOUT
    while directory is not None and time.monotonic() < deadline:
        if not any(name.startswith(SPARE_PREFIX) for name in os.listdir(directory)):
            break
        time.sleep(0.5)
    return shm_used()


@dataclass(frozen=True)
class Soak:
    """One soak's figures."""

    mode: str
    seconds: float
    tally: Tally
    keys_left: int | None
    rss: tuple[int, int]
    shm: tuple[int, int]

    def percentile(self, size_class: str, q: float) -> float | None:
        samples = self.tally.latencies[size_class]
        return float(np.percentile(samples, q)) if samples else None


@contextlib.contextmanager
def _cluster() -> Iterator[Any]:
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
        warnings.catch_warnings(),
    ):
        # Plain Dask warns "Sending large graph" for 50 MB arguments by value: that is measured.
        warnings.filterwarnings("ignore", message="Sending large graph")
        yield client


def run_soak(duration: float, store_spec: str | None, directory: str | None = None) -> Soak:
    """Soak a fresh cluster for ``duration`` seconds: with the plugin, a stream and owned
    proxies on ``store_spec`` (whose shm directory, if any, is ``directory``), or, with None,
    the client threads alone on plain Dask."""
    from proxy_patterns.streams import StreamConsumer

    tally = Tally()
    stop = threading.Event()
    shm_start = shm_used()  # before the warm-up: its evicted segments may stay a while as spares
    with _cluster() as client:
        if store_spec is not None:
            from proxy_patterns.plugins.dask import register

            register(client, threshold=THRESHOLD, store=store_spec)
        _warm_up(client)
        rss_start = worker_rss(client)
        threads = [
            _guarded(tally, client_thread, client, i, stop, tally) for i in range(CLIENT_THREADS)
        ]
        if store_spec is not None:
            topic = f"bench-soak-{os.getpid()}-{time.time_ns()}"
            store = get_store(store_spec)
            # Joined before the producers start, so that no item waits for a consumer.
            consumers = [
                StreamConsumer[Any](topic, store, auto_ack=False, timeout=TIMEOUT)
                for _ in range(2)
            ]
            threads += [_guarded(tally, stream_consumer, client, c, tally) for c in consumers]
            threads += [
                _guarded(tally, stream_producer, topic, store_spec, i, stop, tally)
                for i in range(2)
            ]
            threads.append(_guarded(tally, owned_thread, client, store_spec, stop, tally))
        started = time.perf_counter()
        stop.wait(duration)
        stop.set()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - started
        keys_left = None
        if store_spec is not None:
            keys_left = entries_left_after_eviction(get_store(store_spec), SETTLE_TIMEOUT)
            sent, done = sorted(tally.stream_sent), sorted(tally.stream_done)
            if sent != done:
                lost, extra = set(sent) - set(done), len(done) - len(set(done))
                tally.error(f"stream: {len(lost)} items never processed, {extra} twice")
        shm_end = _settled_shm(directory)
        rss_end = worker_rss(client)
    mode = "plain Dask" if store_spec is None else "Dask + plugin, stream, owned"
    return Soak(mode, seconds, tally, keys_left, (rss_start, rss_end), (shm_start, shm_end))


def measure(duration: float, redis: str | None = None) -> list[Soak]:
    """The soak with proxies (on ``redis`` or a private directory of ``/dev/shm``), then the
    same client threads on plain Dask."""
    directory = None
    if redis is None:
        directory = tempfile.mkdtemp(prefix="pp-bench-soak-", dir="/dev/shm")
    try:
        store_spec = redis or f"shm://{directory}"
        print(f"store: {public_spec(store_spec)}; {duration:.0f} s per soak", flush=True)
        return [run_soak(duration, store_spec, directory), run_soak(duration, None)]
    finally:
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)


# --- the report ---------------------------------------------------------------------------


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.0f}"


def _mib(nbytes: int) -> str:
    return f"{nbytes / MiB:.0f}"


def _growth(pair: tuple[int, int]) -> int:
    return pair[1] - pair[0]


def report(soaks: list[Soak]) -> None:
    """Print the tables and the goals."""
    proxies, plain = soaks
    rows = [
        [
            size_class,
            f"{low // KB} kB-{high // KB} kB" if high < MB else f"{low // MB}-{high // MB} MB",
            str(len(proxies.tally.latencies[size_class])),
            _ms(proxies.percentile(size_class, 50)),
            _ms(proxies.percentile(size_class, 99)),
            str(len(plain.tally.latencies[size_class])),
            _ms(plain.percentile(size_class, 50)),
            _ms(plain.percentile(size_class, 99)),
        ]
        for size_class, (low, high, _) in SIZE_CLASSES.items()
    ]
    print(
        f"{CLIENT_THREADS} client threads x {IN_FLIGHT} tasks in flight; latency: submit -> "
        "result (ms); the proxies soak also runs the stream and the owned proxies"
    )
    print_table(
        [
            "size class",
            "sizes",
            "proxies tasks",
            "proxies p50",
            "proxies p99",
            "plain tasks",
            "plain p50",
            "plain p99",
        ],
        rows,
    )
    print_table(
        [
            "mode",
            "seconds",
            "tasks",
            "stream items",
            "owned rounds",
            "errors",
            "keys left",
            "worker RSS start/end MiB",
            "/dev/shm start/end MiB",
        ],
        [
            [
                s.mode,
                f"{s.seconds:.0f}",
                str(s.tally.tasks),
                str(len(s.tally.stream_done)),
                str(len(s.tally.owned_rounds)),
                str(len(s.tally.errors)),
                "-" if s.keys_left is None else str(s.keys_left),
                f"{_mib(s.rss[0])}/{_mib(s.rss[1])}",
                f"{_mib(s.shm[0])}/{_mib(s.shm[1])}",
            ]
            for s in soaks
        ],
    )
    for s in soaks:
        for error in s.tally.errors[:5]:
            print(f"error ({s.mode}): {error}")

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    errors = sum(len(s.tally.errors) for s in soaks)
    print(f"goal: 0 errors: {errors} [{verdict(errors == 0)}]")
    left = proxies.keys_left
    print(f"goal: 0 keys left in the store: {left} [{verdict(not left)}]")
    limit = f"+{TOLERANCE // MiB} MiB"
    rss = _growth(proxies.rss) - _growth(plain.rss)
    print(
        f"goal: worker RSS growth within plain Dask's (+{RSS_MARGIN // MiB} MiB): "
        f"{_growth(proxies.rss) / MiB:+.0f} MiB against {_growth(plain.rss) / MiB:+.0f} MiB "
        f"[{verdict(rss <= RSS_MARGIN)}]"
    )
    shm = max(_growth(s.shm) for s in soaks)
    print(
        f"goal: /dev/shm back to baseline ({limit}): worst {shm / MiB:+.0f} MiB "
        f"[{verdict(shm <= TOLERANCE)}]"
    )


def main(quick: bool = False, plot: str | None = None, redis: str | None = None) -> None:
    """Soak with proxies, then plain; print the tables and goals."""
    soaks = measure(QUICK_DURATION if quick else DURATION, redis)
    report(soaks)
    if plot:
        plot_latencies(soaks, plot)


def plot_latencies(soaks: list[Soak], path: str) -> None:
    """p50 and p99 latency of each size class, both modes side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    classes = list(SIZE_CLASSES)
    width = 0.2
    for i, (s, q) in enumerate((s, q) for s in soaks for q in (50, 99)):
        ms = [1000 * (s.percentile(c, q) or 0.0) for c in classes]
        offsets = [x + (i - 1.5) * width for x in range(len(classes))]
        ax.bar(offsets, ms, width, label=f"{s.mode}, p{q}")
    ax.set_xticks(range(len(classes)), classes)
    ax.set(xlabel="size class", ylabel="submit -> result (ms)")
    ax.set_title(f"Soak: {CLIENT_THREADS} client threads x {IN_FLIGHT} tasks in flight")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")
