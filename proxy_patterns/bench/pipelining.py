"""``proxy-patterns bench pipelining``: a chain of tasks, sequential vs pipelined with futures.

The design of the paper's first experiment (``shared/paper-figures.md`` §1), scaled: a chain of
``N`` tasks, each working ``s`` seconds and handing ``d`` bytes to the next. A task does the
fraction ``f`` of its work before it needs its input.

* ``sequential`` — each task is submitted with the previous task's Dask future, so it starts
  when that task has finished; the data travels through Dask.
* ``sequential + proxies`` — the same with the Dask plugin: the data travels as proxies.
* ``pipelined`` — every task is submitted at once with a proxy of its input's
  :class:`~proxy_patterns.futures.ProxyFuture` and the future of its own output; a task
  starts at once and blocks only where it touches its input.
* ``pipelined in place`` — the same, each task writing its output into the store in place:
  it takes a :meth:`~proxy_patterns.futures.ProxyFuture.buffer` when it starts (as a producer
  that computes into its output does), fills it where ``pipelined`` builds its array, and
  publishes it without the copy into the store.

Ideal makespan of the pipelined chain: ``f*s + N*(1-f)*s``. A ``LocalCluster`` of 2 worker
processes runs it, with enough threads that every task of the chain can be running at once.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from proxy_patterns.bench.report import print_table

N = 8
SECONDS = 0.5
NBYTES = 10 * 10**6
FRACTIONS = (0.0, 0.2, 0.5, 0.8)


def sequential_stage(previous: np.ndarray | None, seconds: float, nbytes: int) -> np.ndarray:
    """One task of the sequential chain: all its work, then its output."""
    if previous is not None:
        assert float(previous[0]) >= 0
    time.sleep(seconds)
    return np.full(nbytes // 8, 1.0)


def pipelined_stage(
    previous: Any, output: Any, fraction: float, seconds: float, nbytes: int
) -> None:
    """One task of the pipelined chain: part of its work, its input, the rest, its output."""
    time.sleep(fraction * seconds)
    if previous is not None:
        assert float(previous[0]) >= 0  # touching the proxy waits for the value
    time.sleep((1 - fraction) * seconds)
    output.set_result(np.full(nbytes // 8, 1.0))


def pipelined_in_place_stage(
    previous: Any, output: Any, fraction: float, seconds: float, nbytes: int
) -> None:
    """:func:`pipelined_stage` writing its output in place in the store."""
    buffer = output.buffer(nbytes // 8, np.float64)
    time.sleep(fraction * seconds)
    if previous is not None:
        assert float(previous[0]) >= 0
    time.sleep((1 - fraction) * seconds)
    buffer.fill(1.0)
    output.set_result(buffer)


def ideal(fraction: float, n: int = N, seconds: float = SECONDS) -> float:
    """Makespan of a perfectly pipelined chain."""
    return fraction * seconds + n * (1 - fraction) * seconds


def run_sequential(client: Any, n: int, seconds: float, nbytes: int) -> float:
    """Makespan of the chain with each task waiting for the previous one."""
    start = time.perf_counter()
    future = None
    for _ in range(n):
        future = client.submit(sequential_stage, future, seconds, nbytes, pure=False)
    assert future is not None
    future.result()
    return time.perf_counter() - start


def run_pipelined(
    client: Any,
    fraction: float,
    n: int,
    seconds: float,
    nbytes: int,
    stage: Callable[..., None] = pipelined_stage,
) -> float:
    """Makespan of the chain with every task started at once on proxy futures."""
    from distributed import wait

    from proxy_patterns.futures import ProxyFuture

    outputs: list[ProxyFuture[np.ndarray]] = [ProxyFuture() for _ in range(n)]
    start = time.perf_counter()
    tasks = [
        client.submit(
            stage,
            outputs[i - 1].proxy() if i else None,
            outputs[i],
            fraction,
            seconds,
            nbytes,
            pure=False,
        )
        for i in range(n)
    ]
    last = outputs[-1].result()
    elapsed = time.perf_counter() - start
    assert last.nbytes == nbytes // 8 * 8
    wait(tasks)
    for output in outputs:
        output.evict()
    return elapsed


def _run_pipelined_for(
    client: Any,
    fraction: float,
    n: int,
    nbytes: int,
    stage: Callable[..., None],
    seconds: float,
) -> float:
    return run_pipelined(client, fraction, n, seconds, nbytes, stage)


PIPELINED_STAGES: dict[str, Callable[..., None]] = {
    "pipelined": pipelined_stage,
    "pipelined in place": pipelined_in_place_stage,
}


def _cluster(n: int) -> Any:
    from distributed import LocalCluster

    threads = -(-n // 2)
    return LocalCluster(
        n_workers=2, threads_per_worker=threads, processes=True, dashboard_address=None
    )


def measure(
    fractions: tuple[float, ...], n: int, seconds: float, nbytes: int, repeats: int
) -> dict[str, Any]:
    """Makespans (median of ``repeats``) of the four chains for each fraction."""
    from distributed import Client
    from tqdm import tqdm

    from proxy_patterns.plugins.dask import register

    progress = tqdm(total=2 * repeats + 2 * len(fractions) * repeats, desc="bench pipelining")

    def median(run: Callable[[float], float]) -> float:
        """Median makespan of ``run(seconds)`` after an untimed warm-up ``run(0)``."""
        run(0.0)
        times = []
        for _ in range(repeats):
            times.append(run(seconds))
            progress.update()
        return statistics.median(times)

    results: dict[str, Any] = {}
    with _cluster(n) as cluster, Client(cluster) as client:
        results["sequential"] = median(lambda s: run_sequential(client, n, s, nbytes))
        for name in PIPELINED_STAGES:
            results[name] = {}
        for f in fractions:  # the two side by side, under the same conditions
            for name, stage in PIPELINED_STAGES.items():
                run = functools.partial(_run_pipelined_for, client, f, n, nbytes, stage)
                results[name][f] = median(run)
    with _cluster(n) as cluster, Client(cluster) as client:
        register(client)
        results["sequential + proxies"] = median(lambda s: run_sequential(client, n, s, nbytes))
    progress.close()
    return results


def main(quick: bool = False, plot: str | None = None, redis: str | None = None) -> None:
    """Print the makespans against the ideal for each fraction; optionally plot them."""
    repeats = 1 if quick else 3
    results = measure(FRACTIONS, N, SECONDS, NBYTES, repeats)
    rows = []
    worst = dict.fromkeys(PIPELINED_STAGES, 0.0)
    for fraction in FRACTIONS:
        overheads = {}
        for name in PIPELINED_STAGES:
            overheads[name] = results[name][fraction] - ideal(fraction)
            worst[name] = max(worst[name], overheads[name])
        rows.append(
            [
                f"{fraction:.1f}",
                f"{results['sequential']:.3f}",
                f"{results['sequential + proxies']:.3f}",
                *(f"{results[name][fraction]:.3f}" for name in PIPELINED_STAGES),
                f"{ideal(fraction):.3f}",
                *(f"{overheads[name]:+.3f}" for name in PIPELINED_STAGES),
            ]
        )
    print(f"chain of {N} tasks, {SECONDS} s each, {NBYTES // 10**6} MB passed along")
    header = [
        "f",
        "sequential (s)",
        "sequential + proxies (s)",
        *(f"{name} (s)" for name in PIPELINED_STAGES),
        "ideal (s)",
        *(f"{name} - ideal (s)" for name in PIPELINED_STAGES),
    ]
    print_table(header, rows)
    for name in PIPELINED_STAGES:
        verdict = "met" if worst[name] <= 0.05 else "NOT met"
        print(
            f"goal: {name} within +0.05 s of ideal at every f: "
            f"worst {worst[name]:+.3f} s [{verdict}]"
        )
    if plot:
        _plot(results, plot)


def _plot(results: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    fractions = list(FRACTIONS)
    ax.plot(fractions, [results["sequential"]] * len(fractions), "s--", label="sequential")
    ax.plot(
        fractions,
        [results["sequential + proxies"]] * len(fractions),
        "^--",
        label="sequential + proxies",
    )
    for name, marker in zip(PIPELINED_STAGES, ("o-", "v-"), strict=True):
        ax.plot(fractions, [results[name][f] for f in fractions], marker, label=name)
    ax.plot(fractions, [ideal(f) for f in fractions], "k:", label="ideal")
    ax.set(xlabel="fraction f of a task done before it needs its input", ylabel="makespan (s)")
    ax.set_title(f"Task pipelining, chain of {N}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")
