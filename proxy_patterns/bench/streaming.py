"""``proxy-patterns bench streaming``: a generator process streams items, a dispatcher turns
each into a task; items by value through a queue and the framework, against streamed proxies.

The paper's stream-scaling experiment (``shared/paper-figures.md`` §2) on one node. A generator
*process* makes one ``uint8`` array of ``d`` bytes (10 kB, 1 MB or 50 MB) and sends it ``n``
times, its first byte set to the step's number (mod 256) so that no two consecutive items are
alike. The dispatcher (this process) submits one task per item: it reads the item's first byte,
so a proxy is really resolved, then works :data:`SECONDS`. ``w`` workers run the tasks (1 or 2:
the machine has 2 cores), on Dask (``LocalCluster``, ``w`` processes of 1 thread) and on Parsl
(``HighThroughputExecutor``, ``w`` workers). Two modes:

* ``default`` — the generator puts the items in a plain :class:`multiprocessing.Queue`; the
  dispatcher gets each and passes it to the framework by value. Every byte goes generator →
  dispatcher → framework → worker.
* ``proxies`` — the generator is a :class:`~proxy_patterns.streams.StreamProducer` (work
  mode, ``max_in_flight`` = 4 ``w``), the dispatcher a
  :class:`~proxy_patterns.streams.StreamConsumer` whose
  :meth:`~proxy_patterns.streams.StreamConsumer.dispatch` submits the items' proxies: the
  bytes go generator → store → worker. (10 kB items are below the stream's threshold and
  travel inline through the broker.)

Throughput is ``n`` tasks over the time from the generator's first send to the last task's
result in the dispatcher; the ideal is ``w / s``. ``n`` is 15 ``w`` (3 s of work), and 5 ``w``
for ``default`` at 50 MB, which falls far behind the workers anyway. Each cluster is started
and warmed up (one untimed streamed round) once per framework and ``w``, then serves both modes
and every size. Both dispatchers let each framework future go as soon as its task is done (as
``dispatch`` does), as any long-running dispatcher must: a Dask future keeps its task's
argument on the worker, and with it the mapping of an item the stream evicted already, whose
pages then cannot be reused.

The store is a private directory of ``/dev/shm`` (or ``--redis URL``); after each streamed
run the keys left in it are counted (0 expected: every item is released when its task is
done, and a drained stream leaves no topic).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import functools
import multiprocessing
import queue
import shutil
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any

import numpy as np

from proxy_patterns.bench.report import print_table
from proxy_patterns.store import public_spec

KB, MB = 10**3, 10**6
SECONDS = 0.2
"""What each task works (sleeps) after reading its item."""
SIZES = (10 * KB, MB, 50 * MB)
WORKERS = (1, 2)
FRAMEWORKS = ("Dask", "Parsl")
TASKS_PER_WORKER = 15
"""Tasks per cell and worker: 3 s of work per cell, whatever ``w``."""
SATURATED_TASKS_PER_WORKER = 5
"""The same for ``default`` at 50 MB, which cannot keep up with the workers anyway."""
QUICK_TASKS_PER_WORKER = 4
QUICK_CELLS = (("Dask", 2, 10 * KB), ("Parsl", 2, MB), ("Dask", 2, 50 * MB))
"""``--quick``: one cell per size, both frameworks seen, every goal checked."""
IDEAL_FRACTION_GOAL = 0.95
NOISE = 0.01
"""How far apart repeats of one cell land when both modes run at the workers' pace (about
±0.5 % on 2 cores): the 10 kB goal, proxies not slower than default, is judged to within it."""
GENERATOR_TIMEOUT = 60.0
"""Seconds the dispatcher waits for an item, or for the generator to exit, before failing."""

Submit = Callable[[Any, float], Any]
"""Starts ``process_item(item, seconds)`` on a framework; returns its future."""


def process_item(item: Any, seconds: float) -> int:
    """The task: read the item's first byte (a proxy resolves here, on the worker), then work
    ``seconds``. Returns the byte, which says which item the task got."""
    first = int(item[0])
    time.sleep(seconds)
    return first


# --- the generator process ----------------------------------------------------------------


def _items(nbytes: int, tasks: int, started: ctypes.c_double) -> Iterator[np.ndarray]:
    """``tasks`` items of ``nbytes``: one array made up front, its first byte the step's number
    (mod 256) for each; the time of the first send goes to ``started``."""
    item = np.ones(nbytes, np.uint8)  # every page touched before the clock starts
    for step in range(tasks):
        item[0] = step % 256
        if step == 0:
            started.value = time.time()
        yield item


def generate_to_queue(
    items: multiprocessing.Queue[Any], nbytes: int, tasks: int, started: ctypes.c_double
) -> None:
    """The ``default`` generator: every item by value into ``items``, then None.

    The queue pickles in a background thread, so an item may carry a later step's first
    byte: the dispatcher does not check them in this mode.
    """
    for item in _items(nbytes, tasks, started):
        items.put(item)
    items.put(None)


def generate_to_stream(
    topic: str,
    store_spec: str,
    nbytes: int,
    tasks: int,
    max_in_flight: int,
    started: ctypes.c_double,
) -> None:
    """The ``proxies`` generator: every item to the stream ``topic`` (``send`` copies the item
    into the store, or inline into the broker, before it returns)."""
    from proxy_patterns.store import get_store
    from proxy_patterns.streams import StreamProducer

    with StreamProducer[np.ndarray](
        topic, get_store(store_spec), max_in_flight=max_in_flight
    ) as producer:
        for step, item in enumerate(_items(nbytes, tasks, started)):
            producer.send(item, metadata={"step": step})


@contextlib.contextmanager
def _generator(target: Callable[..., None], *args: Any) -> Iterator[BaseProcess]:
    """Run ``target(*args)`` in a fresh process (spawned: this one runs a cluster's threads);
    once the body is done, it must exit, and succeed."""
    process = multiprocessing.get_context("spawn").Process(target=target, args=args, daemon=True)
    process.start()
    body_done = False
    try:
        yield process
        body_done = True
    finally:
        process.join(GENERATOR_TIMEOUT if body_done else 0)
        if process.is_alive():
            process.kill()
            process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"the generator process failed (exit code {process.exitcode})")


def _started() -> ctypes.c_double:
    """Where the generator process writes the time of its first send."""
    started: ctypes.c_double = multiprocessing.get_context("spawn").RawValue(ctypes.c_double)
    return started


# --- the dispatcher -----------------------------------------------------------------------


def _released_when_done(future: Any) -> concurrent.futures.Future[Any]:
    """A future of ``future``'s result that does not keep ``future`` alive once it is done, so
    that the framework forgets the task (and its argument) as soon as it has finished."""
    result: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def settle(done: Any) -> None:
        try:
            result.set_result(done.result())
        except BaseException as error:  # the task's own error, for result() to raise
            result.set_exception(error)

    future.add_done_callback(settle)
    return result


def _received(items: multiprocessing.Queue[Any], generator: BaseProcess) -> Iterator[Any]:
    """The items of ``items`` up to the None that ends them; fails if the generator dies."""
    deadline = time.monotonic() + GENERATOR_TIMEOUT
    while True:
        try:
            item = items.get(timeout=1)
        except queue.Empty:
            if not generator.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the generator sent nothing for {GENERATOR_TIMEOUT} s or exited early "
                    f"(exit code {generator.exitcode})"
                ) from None
            continue
        if item is None:
            return
        deadline = time.monotonic() + GENERATOR_TIMEOUT
        yield item


@dataclass(frozen=True)
class Run:
    """One mode on one cell: tasks done, over the seconds from first send to last result."""

    tasks: int
    seconds: float
    keys_left: int | None = None
    """Entries left in the store after the run; None for ``default``, which uses none."""

    @property
    def throughput(self) -> float:
        return self.tasks / self.seconds


def run_default(submit: Submit, nbytes: int, tasks: int, seconds: float) -> Run:
    """Items by value through a queue, then through the framework."""
    started = _started()
    items: multiprocessing.Queue[Any] = multiprocessing.get_context("spawn").Queue()
    with _generator(generate_to_queue, items, nbytes, tasks, started) as generator:
        futures = [
            _released_when_done(submit(item, seconds)) for item in _received(items, generator)
        ]
        results = [f.result() for f in futures]
        finished = time.time()
    assert len(results) == tasks
    return Run(tasks, finished - started.value)


def run_proxies(
    submit: Submit, nbytes: int, tasks: int, seconds: float, store_spec: str, max_in_flight: int
) -> Run:
    """Items through a stream; the dispatcher hands their proxies to the framework."""
    from proxy_patterns.store import entries_left_after_eviction, get_store
    from proxy_patterns.streams import StreamConsumer

    store = get_store(store_spec)
    topic = f"bench-streaming-{uuid.uuid4().hex}"
    started = _started()
    # Joined before the generator starts: the clock, started by its first send, does not
    # include the consumer's set-up.
    with (
        StreamConsumer[Any](topic, store, auto_ack=False, timeout=GENERATOR_TIMEOUT) as consumer,
        _generator(generate_to_stream, topic, store_spec, nbytes, tasks, max_in_flight, started),
    ):
        results: list[int] = []
        consumer.dispatch(
            lambda item: submit(item, seconds), on_done=lambda done: results.append(done.result())
        )
        finished = time.time()
    # Each task read its own item: nothing lost, duplicated or mixed up on the way.
    assert sorted(results) == sorted(step % 256 for step in range(tasks)), results
    return Run(tasks, finished - started.value, entries_left_after_eviction(store, timeout=10))


# --- the frameworks -----------------------------------------------------------------------


@contextlib.contextmanager
def dask_cluster(workers: int) -> Iterator[Submit]:
    """A ``LocalCluster`` of ``workers`` processes of one thread."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
        warnings.catch_warnings(),
    ):
        # Plain Dask warns "Sending large graph" for 50 MB items by value: that is measured.
        warnings.filterwarnings("ignore", message="Sending large graph")
        yield functools.partial(client.submit, process_item, pure=False)


@contextlib.contextmanager
def parsl_executor(workers: int) -> Iterator[Submit]:
    """A ``HighThroughputExecutor`` of ``workers`` workers on this node, in its own
    DataFlowKernel."""
    import parsl
    from parsl import Config, HighThroughputExecutor, python_app
    from parsl.providers import LocalProvider

    from proxy_patterns.bench.parsl_plugin import put_interpreter_scripts_on_path

    put_interpreter_scripts_on_path()
    label = "htex-streaming"
    htex = HighThroughputExecutor(
        label=label,
        address="127.0.0.1",
        max_workers_per_node=workers,
        provider=LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1),  # type: ignore[no-untyped-call]
    )
    app = python_app(executors=[label])(process_item)
    with tempfile.TemporaryDirectory(prefix="pp-bench-streaming-") as run_dir:
        dfk = parsl.load(Config(executors=[htex], run_dir=run_dir, initialize_logging=False))
        try:
            yield app
        finally:
            dfk.cleanup()
            parsl.clear()


CLUSTERS: dict[str, Callable[[int], contextlib.AbstractContextManager[Submit]]] = {
    "Dask": dask_cluster,
    "Parsl": parsl_executor,
}


# --- the benchmark ------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One row: a framework with ``workers`` workers, items of ``nbytes``, and both modes."""

    framework: str
    workers: int
    nbytes: int
    default: Run
    proxies: Run

    @property
    def ideal(self) -> float:
        return self.workers / SECONDS

    @property
    def fraction_of_ideal(self) -> float:
        return self.proxies.throughput / self.ideal

    @property
    def speedup(self) -> float:
        return self.proxies.throughput / self.default.throughput


def _tasks(mode: str, workers: int, nbytes: int, quick: bool) -> int:
    if quick:
        return QUICK_TASKS_PER_WORKER * workers
    if mode == "default" and nbytes >= 50 * MB:
        return SATURATED_TASKS_PER_WORKER * workers
    return TASKS_PER_WORKER * workers


def measure(plan: dict[tuple[str, int], list[int]], store_spec: str, quick: bool) -> list[Cell]:
    """Run every size of ``plan[(framework, workers)]`` in both modes on one cluster each."""
    from tqdm import tqdm

    cells = []
    progress = tqdm(total=2 * sum(map(len, plan.values())), desc="bench streaming", leave=False)
    for (framework, workers), sizes in plan.items():
        max_in_flight = 4 * workers
        with CLUSTERS[framework](workers) as submit:
            run_proxies(submit, MB, 2 * workers, 0.0, store_spec, max_in_flight)  # warm-up
            for nbytes in sizes:
                default = run_default(
                    submit, nbytes, _tasks("default", workers, nbytes, quick), SECONDS
                )
                progress.update()
                tasks = _tasks("proxies", workers, nbytes, quick)
                proxies = run_proxies(submit, nbytes, tasks, SECONDS, store_spec, max_in_flight)
                progress.update()
                cells.append(Cell(framework, workers, nbytes, default, proxies))
    progress.close()
    return cells


def _size(nbytes: int) -> str:
    return f"{nbytes // MB} MB" if nbytes >= MB else f"{nbytes // KB} kB"


def report(cells: list[Cell]) -> None:
    """Print the table and the goals."""
    header = [
        "framework",
        "w",
        "item size",
        "default (tasks/s)",
        "proxies (tasks/s)",
        "ideal (tasks/s)",
        "proxies % of ideal",
        "proxies / default",
        "keys left",
    ]
    rows = [
        [
            c.framework,
            str(c.workers),
            _size(c.nbytes),
            f"{c.default.throughput:.2f}",
            f"{c.proxies.throughput:.2f}",
            f"{c.ideal:.2f}",
            f"{100 * c.fraction_of_ideal:.1f}",
            f"{c.speedup:.2f}x",
            str(c.proxies.keys_left),
        ]
        for c in cells
    ]
    print(f"one task of {SECONDS} s per item; throughput: first item sent to last result")
    print_table(header, rows)
    large = [c.fraction_of_ideal for c in cells if c.nbytes >= MB]
    if large:
        worst = min(large)
        verdict = "met" if worst >= IDEAL_FRACTION_GOAL else "NOT met"
        what = "proxies >= 95 % of ideal at 1 MB and 50 MB"
        print(f"goal: {what}: worst {100 * worst:.1f} % [{verdict}]")
    small = [c.speedup for c in cells if c.nbytes < MB]
    if small:
        worst = min(small)
        verdict = "met" if worst >= 1.0 - NOISE else "NOT met"
        what = f"proxies >= 1.0x default at 10 kB (to within {NOISE:.0%} noise)"
        print(f"goal: {what}: worst {worst:.2f}x [{verdict}]")
    left = sum(c.proxies.keys_left or 0 for c in cells)
    verdict = "met" if not left else "NOT met"
    print(f"goal: 0 keys left in the store after each streamed run: {left} [{verdict}]")


def main(quick: bool = False, plot: str | None = None, redis: str | None = None) -> None:
    """Measure both modes on every cell (a few with ``quick``); print the table and goals."""
    plan: dict[tuple[str, int], list[int]] = {}
    if quick:
        for framework, workers, nbytes in QUICK_CELLS:
            plan.setdefault((framework, workers), []).append(nbytes)
    else:
        for framework in FRAMEWORKS:
            for workers in WORKERS:
                plan[(framework, workers)] = list(SIZES)
    directory = None
    if redis is None:
        directory = tempfile.mkdtemp(prefix="pp-bench-streaming-", dir="/dev/shm")
    try:
        store_spec = redis or f"shm://{directory}"
        print(f"store: {public_spec(store_spec)}")
        cells = measure(plan, store_spec, quick)
    finally:
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
    report(cells)
    if plot:
        _plot(cells, plot)


def _plot(cells: list[Cell], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frameworks = [f for f in FRAMEWORKS if any(c.framework == f for c in cells)]
    fig, axes = plt.subplots(
        1, len(frameworks), figsize=(5 * len(frameworks), 3.8), squeeze=False, sharey=True
    )
    for ax, framework in zip(axes[0], frameworks, strict=True):
        for i, workers in enumerate(WORKERS):
            mine = [c for c in cells if c.framework == framework and c.workers == workers]
            if not mine:
                continue
            color = f"C{i}"
            sizes = [c.nbytes for c in mine]
            ax.plot(
                sizes,
                [c.proxies.throughput for c in mine],
                "o-",
                color=color,
                label=f"proxies, w={workers}",
            )
            ax.plot(
                sizes,
                [c.default.throughput for c in mine],
                "s--",
                color=color,
                label=f"default, w={workers}",
            )
            ax.axhline(workers / SECONDS, color=color, linestyle=":", label=f"ideal, w={workers}")
        ax.set_xscale("log")
        ax.set_yscale("log")  # default at 50 MB runs at a tenth of the workers' pace
        ax.set_xticks(list(SIZES), [_size(n) for n in SIZES])
        ax.set(xlabel="item size", title=framework)
        ax.legend(fontsize="small")
    axes[0][0].set_ylabel("tasks per second")
    fig.suptitle(f"Streaming: one task of {SECONDS} s per item")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")
