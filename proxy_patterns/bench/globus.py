"""``proxy-patterns bench globus``: a 1000-Genomes-like workflow on Globus Compute, cut below the
service's limits as users do today, against whole data through the store with futures chaining
the stages.

The paper's Globus Compute case (``shared/paper-figures.md``: 1000 Genomes, 1.32 to 1.57x),
scaled down to one machine. Five chunks of 20 MB of genotypes (``uint8``, one row per variant,
one column per sample: 0, 1 or 2 alternate alleles) go through three stages:

1. :func:`call_mutations`, per chunk: classifies each carrier's call by its variant's allele
   frequency and flags mutations clustered within blocks of :data:`BLOCK` variants (~0.3 s,
   returns an array of the chunk's size);
2. :func:`merge` of the five: the most notable call of every window of :data:`WINDOW`
   variants, the chunks' windows in order (a quarter of the input: 25 MB);
3. two analyses of the merged calls, each a few hundred bytes: :func:`mutation_overlap`
   between populations and :func:`frequency_spectrum`.

Both modes use the real SDK ``Executor`` and the endpoint's real ``ProcessPoolEngine``
(:data:`WORKERS` workers), through a local stand-in of the cloud service that enforces its
10 MB limit on a submission; the engine enforces the 10 MiB limit on a result
(:mod:`proxy_patterns.bench.globus_offline`):

* ``plain`` — what a user must do to stay under the limits: each chunk is cut into pieces of
  at most :data:`MAX_ARRAY` bytes (cuts fall between blocks, so the results are the same);
  the client waits for every stage's results (Globus futures cannot be arguments), which come
  back through the service, and submits them again, in pieces, to the next stage: the merge
  runs per piece and the client joins the merged pieces; the analyses run per piece of the
  merged calls and the client adds their partial results up. The executor sends one task per
  request (``batch_size = 1``: the SDK would otherwise put several pieces in one request, over
  the limit).
* ``proxies`` — :func:`~proxy_patterns.plugins.globus_compute.proxied`: whole chunks as
  arguments, the futures of stage 1 passed to the merge and the merge's future to the
  analyses; everything is submitted at once, and only proxies and the analyses' small results
  go through the service.

The SDK's client-side rate limit is lifted on both executors (``api_burst_limit = 1``: it
counts only requests of fewer tasks than that, so none): by default it holds each request
after 4 in 16 s for up to 5 s, which would add minutes to ``plain``'s one-task requests.
Nothing crosses a network here, but the stand-in's share of the work (reading each request,
handing its task to the engine, sending results back) runs in the client's process, on the same
cores as the workers, where the cloud runs it on its own machines.

The makespan runs from the first submission to the last result in the client (median of
:data:`REPEATS` runs, after an untimed warm-up run of each mode on small chunks). Also
reported: requests and bytes the service received and sent back, and the entries left in the
store once the ``proxies`` futures are dropped (0 expected). The store is a private directory of
``/dev/shm`` (or ``--redis URL``), removed at the end. ``--plot`` draws the tasks of each stage
over time, in both modes.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import itertools
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from proxy_patterns.bench.report import print_table
from proxy_patterns.store import public_spec

if TYPE_CHECKING:
    from globus_compute_sdk import Executor as ComputeExecutor
    from matplotlib.figure import Figure

    from proxy_patterns.bench.globus_offline import ComputeServiceStandIn

MB = 10**6
CHUNKS = 5
CHUNK_BYTES = 20 * MB
QUICK_CHUNK_BYTES = 12 * MB
WARM_UP_CHUNK_BYTES = MB
SAMPLES = 2500
"""Columns of a chunk: the individuals (the 1000 Genomes project has 2504)."""
BLOCK = 32
"""Variants whose clustered mutations :func:`call_mutations` counts together; ``plain`` cuts
chunks between blocks."""
WINDOW = 4
"""Variants :func:`merge` reduces to one row."""
POPULATIONS = 5
"""Groups of consecutive samples whose rare mutations :func:`mutation_overlap` compares."""
FREQUENCY_BOUNDS = (0.001, 0.01, 0.05, 0.2)
"""Allele frequencies that separate the call classes: a call is of class 1 (common) to 5
(rarer than 0.1 %)."""
RARE_CLASS = 4
CLUSTERED, HOMOZYGOUS_RUN = 8, 16
"""Flags added to a call's class."""
SPECTRUM_BINS = 20
MAX_ARRAY = 7_000_000
"""Largest array ``plain`` sends in one submission or gets back as one result: pickled and
base64-encoded it is 9.4 MB, under both the service's 10 MB and the endpoint's 10 MiB."""
WORKERS = 3
REPEATS = 3
SPEEDUP_GOAL = 1.3
STAGES = ("call mutations", "merge", "mutation overlap", "frequency spectrum")


# --- the workflow's functions (they run on the endpoint) ----------------------------------


def call_mutations(genotypes: np.ndarray) -> np.ndarray:
    """Stage 1: each call's class (0 for no alternate allele, else 1 for a common variant to 5
    for a very rare one), flagged :data:`CLUSTERED` when its sample carries more than 3
    mutations so far in its block of :data:`BLOCK` variants, and :data:`HOMOZYGOUS_RUN` for a
    second homozygous call in a block."""
    samples = genotypes.shape[1]
    carriers = genotypes > 0
    frequency = genotypes.sum(axis=1, dtype=np.uint32) / (2 * samples)
    classes = (len(FREQUENCY_BOUNDS) + 1 - np.digitize(frequency, FREQUENCY_BOUNDS)).astype(
        np.uint8
    )
    calls = np.where(carriers, classes[:, None], np.uint8(0))
    for mask, flag, more_than in ((carriers, CLUSTERED, 3), (genotypes == 2, HOMOZYGOUS_RUN, 1)):
        so_far = np.cumsum(mask.reshape(-1, BLOCK, samples), axis=1, dtype=np.uint16)
        calls[(so_far.reshape(genotypes.shape) > more_than) & mask] |= flag
    return calls


def merge(*calls: np.ndarray) -> np.ndarray:
    """Stage 2: the largest call of every window of :data:`WINDOW` variants, the windows of
    ``calls`` in order."""
    return np.concatenate([c.reshape(-1, WINDOW, c.shape[1]).max(axis=1) for c in calls])


def mutation_overlap(merged: np.ndarray) -> np.ndarray:
    """Stage 3: for each pair of populations, the windows where both have a sample with a rare
    call (a symmetric matrix of counts)."""
    rare = (merged & 7) >= RARE_CLASS
    in_population = np.asarray(rare.reshape(len(merged), POPULATIONS, -1).any(axis=2), np.int64)
    overlap: np.ndarray = in_population.T @ in_population
    return overlap


def frequency_spectrum(merged: np.ndarray) -> np.ndarray:
    """Stage 3: how many windows have each fraction of the samples carrying a mutation (a
    histogram of :data:`SPECTRUM_BINS` bins)."""
    carrying = np.count_nonzero(merged, axis=1) / merged.shape[1]
    counts, _ = np.histogram(carrying, bins=SPECTRUM_BINS, range=(0.0, 1.0))
    return counts


def make_chunks(count: int, nbytes: int, seed: int = 1000) -> list[np.ndarray]:
    """``count`` chunks of ``nbytes`` (whole blocks) of genotypes, each variant's alternate
    allele frequency drawn from a beta distribution: mostly rare variants, as in people."""
    rng = np.random.default_rng(seed)
    variants = nbytes // SAMPLES // BLOCK * BLOCK
    chunks = []
    for _ in range(count):
        threshold = (rng.beta(0.3, 3.0, variants) * 256).astype(np.uint8)[:, None]
        alleles = [rng.integers(0, 256, (variants, SAMPLES), np.uint8) < threshold for _ in "ab"]
        chunks.append(alleles[0].astype(np.uint8) + alleles[1])
    return chunks


# --- what ran when ------------------------------------------------------------------------


@dataclass(frozen=True)
class Span:
    """One task's run on a worker, in seconds since the client's first submission."""

    stage: str
    start: float
    end: float


class StageTask:
    """A stage's function as submitted: runs it, then appends when it ran to ``log``, a file
    of this host that every worker appends to (one short line per task: atomic).

    A span starts once the task has its arguments; a task given a future's proxy (``proxies``)
    starts at once and waits where it reads it, so its span includes that wait.
    """

    def __init__(self, stage: str, function: Callable[..., Any], log: str) -> None:
        self.stage = stage
        self.function = function
        self.log = log
        self.__name__ = function.__name__  # the SDK registers functions by name

    def __call__(self, *args: Any) -> Any:
        start = time.time()
        result = self.function(*args)
        with open(self.log, "a") as log:
            log.write(f"{self.stage}\t{start}\t{time.time()}\n")
        return result


class Workflow:
    """The workflow's stages as submitted, each task logging its span to ``log``."""

    def __init__(self, log: str) -> None:
        self.log = log
        self.call_mutations = StageTask(STAGES[0], call_mutations, log)
        self.merge = StageTask(STAGES[1], merge, log)
        self.mutation_overlap = StageTask(STAGES[2], mutation_overlap, log)
        self.frequency_spectrum = StageTask(STAGES[3], frequency_spectrum, log)

    def spans(self, since: float) -> list[Span]:
        """Spans logged since the log was last cleared, relative to ``since``."""
        with open(self.log) as log:
            fields = [line.split("\t") for line in log]
        return sorted(
            (
                Span(stage, float(start) - since, float(end) - since)
                for stage, start, end in fields
            ),
            key=lambda span: (STAGES.index(span.stage), span.start),
        )

    def clear(self) -> None:
        with open(self.log, "w"):
            pass


# --- the two modes ------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What one run of the workflow produced, and when its first submission was made."""

    overlap: np.ndarray
    spectrum: np.ndarray
    started: float
    finished: float
    tasks: int


def cut(array: np.ndarray, max_bytes: int = MAX_ARRAY, rows: int = 1) -> list[np.ndarray]:
    """``array`` in as few pieces of at most ``max_bytes`` as can be, of nearly equal sizes,
    cut between groups of ``rows`` rows (views: nothing is copied)."""
    groups = len(array) // rows
    per_piece = max(1, max_bytes // (array[:rows].nbytes))
    bounds = np.linspace(0, groups, math.ceil(groups / per_piece) + 1).round().astype(int)
    return [array[a * rows : b * rows] for a, b in itertools.pairwise(bounds)]


def batches(arrays: Sequence[np.ndarray], max_bytes: int = MAX_ARRAY) -> list[list[np.ndarray]]:
    """``arrays`` in order, grouped into as few submissions of at most ``max_bytes`` as can
    be."""
    grouped: list[list[np.ndarray]] = [[]]
    for array in arrays:
        if grouped[-1] and sum(a.nbytes for a in grouped[-1]) + array.nbytes > max_bytes:
            grouped.append([])
        grouped[-1].append(array)
    return grouped


def run_plain(executor: Executor, workflow: Workflow, chunks: Sequence[np.ndarray]) -> Outcome:
    """Every argument and result under the service's limits, each stage's results gathered by
    the client before the next stage is submitted."""
    started = time.time()
    pieces = [piece for chunk in chunks for piece in cut(chunk, rows=BLOCK)]
    calls = _gather([executor.submit(workflow.call_mutations, piece) for piece in pieces])
    merged_pieces = _gather([executor.submit(workflow.merge, *b) for b in batches(calls)])
    merged = np.concatenate(merged_pieces)  # too large to come back from one task
    parts = cut(merged)
    partial_overlaps = [executor.submit(workflow.mutation_overlap, part) for part in parts]
    partial_spectra = [executor.submit(workflow.frequency_spectrum, part) for part in parts]
    overlap = np.sum(_gather(partial_overlaps), axis=0)
    spectrum = np.sum(_gather(partial_spectra), axis=0)
    tasks = len(pieces) + len(merged_pieces) + 2 * len(parts)
    return Outcome(overlap, spectrum, started, time.time(), tasks)


def run_proxies(executor: Executor, workflow: Workflow, chunks: Sequence[np.ndarray]) -> Outcome:
    """Whole chunks through the store, every stage submitted at once, linked by futures."""
    started = time.time()
    calls = [executor.submit(workflow.call_mutations, chunk) for chunk in chunks]
    merged = executor.submit(workflow.merge, *calls)
    overlap = executor.submit(workflow.mutation_overlap, merged)
    spectrum = executor.submit(workflow.frequency_spectrum, merged)
    outcome = Outcome(overlap.result(), spectrum.result(), started, time.time(), len(calls) + 3)
    wait([*calls, merged])  # done by now (their values were read); their spans are logged
    return outcome


def _gather(futures: Sequence[Future[Any]]) -> list[Any]:
    return [future.result() for future in futures]


Mode = Callable[[Executor, Workflow, Sequence[np.ndarray]], Outcome]


# --- the benchmark ------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One timed run of a mode."""

    outcome: Outcome
    spans: list[Span]
    requests: int
    bytes_submitted: int
    bytes_returned: int
    keys_left: int | None
    """Entries left in the store once the run's futures were dropped; None for ``plain``."""

    @property
    def makespan(self) -> float:
        return self.outcome.finished - self.outcome.started


def _run(
    mode: Mode,
    executor: Executor,
    workflow: Workflow,
    chunks: Sequence[np.ndarray],
    service: ComputeServiceStandIn,
    count_entries: Callable[[], int] | None,
) -> Run:
    workflow.clear()
    requests, returned = len(service.submission_sizes), len(service.result_sizes)
    outcome = mode(executor, workflow, chunks)
    gc.collect()  # the run's futures, which own the values in the store, are gone
    return Run(
        outcome,
        workflow.spans(outcome.started),
        len(service.submission_sizes) - requests,
        sum(service.submission_sizes[requests:]),
        sum(service.result_sizes[returned:]),
        None if count_entries is None else count_entries(),
    )


@contextlib.contextmanager
def _store_spec(redis: str | None) -> Iterator[str]:
    """The store spec: ``redis``, else a private directory of ``/dev/shm``, removed after."""
    if redis is not None:
        yield redis
        return
    directory = tempfile.mkdtemp(prefix="pp-bench-globus-", dir="/dev/shm")
    try:
        yield f"shm://{directory}"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def lift_rate_limit(executor: ComputeExecutor) -> None:
    """Let the SDK ``executor`` send requests without its client-side pauses (see the module
    docstring)."""
    executor.api_burst_limit = 1


def measure(
    chunks: Sequence[np.ndarray], repeats: int, store_spec: str
) -> tuple[list[Run], list[Run]]:
    """``repeats`` timed runs of each mode on one engine, each after an untimed warm-up."""
    from tqdm import tqdm

    from proxy_patterns.bench.globus_offline import (
        offline_globus_compute,
        process_pool_engine,
        started,
    )
    from proxy_patterns.plugins.globus_compute import proxied
    from proxy_patterns.store import entries_left_after_eviction

    small = make_chunks(CHUNKS, WARM_UP_CHUNK_BYTES)
    progress = tqdm(total=2 * repeats, desc="bench globus", leave=False)
    with (
        tempfile.TemporaryDirectory(prefix="pp-bench-globus-") as run_dir,
        started(process_pool_engine(WORKERS), run_dir) as engine,
    ):
        workflow = Workflow(os.path.join(run_dir, "spans.log"))
        with offline_globus_compute(engine) as compute:
            lift_rate_limit(compute.executor)
            compute.executor.batch_size = 1  # one piece per request: two are over 10 MB
            run_plain(compute.executor, workflow, small)  # warm-up
            plain = []
            for _ in range(repeats):
                plain.append(
                    _run(run_plain, compute.executor, workflow, chunks, compute.service, None)
                )
                progress.update()
        with offline_globus_compute(engine) as compute:
            lift_rate_limit(compute.executor)
            with proxied(compute.executor, store=store_spec) as executor:
                run_proxies(executor, workflow, small)  # warm-up
                left = functools.partial(entries_left_after_eviction, executor.store, 10)
                proxies = []
                for _ in range(repeats):
                    proxies.append(
                        _run(run_proxies, executor, workflow, chunks, compute.service, left)
                    )
                    progress.update()
    progress.close()
    return plain, proxies


def check_same_results(plain: Outcome, proxies: Outcome) -> None:
    """Both modes computed the same analyses (the cuts fall where they change nothing)."""
    if not (
        np.array_equal(plain.overlap, proxies.overlap)
        and np.array_equal(plain.spectrum, proxies.spectrum)
    ):
        raise RuntimeError(
            "plain and proxies computed different analyses: "
            f"{plain.overlap.tolist()} {plain.spectrum.tolist()} against "
            f"{proxies.overlap.tolist()} {proxies.spectrum.tolist()}"
        )


def _median_run(runs: Sequence[Run]) -> Run:
    return sorted(runs, key=lambda run: run.makespan)[len(runs) // 2]


def report(chunks: Sequence[np.ndarray], plain: Sequence[Run], proxies: Sequence[Run]) -> None:
    """Print the table and the goals."""
    header = [
        "mode",
        "tasks",
        "makespan (s)",
        "requests to the service",
        "MB submitted",
        "MB of results",
        "keys left",
    ]
    rows = []
    for mode, runs in (("plain", plain), ("proxies", proxies)):
        run = _median_run(runs)
        keys_left = [r.keys_left for r in runs if r.keys_left is not None]
        rows.append(
            [
                mode,
                str(run.outcome.tasks),
                f"{run.makespan:.2f}",
                str(run.requests),
                f"{run.bytes_submitted / MB:.2f}",
                f"{run.bytes_returned / MB:.2f}",
                str(max(keys_left)) if keys_left else "-",
            ]
        )
    nbytes = chunks[0].nbytes
    print(
        f"{len(chunks)} chunks x {nbytes // MB} MB of genotypes -> {len(chunks)} x call mutations"
        f" -> merge -> 2 analyses; ProcessPoolEngine, {WORKERS} workers; median of {len(plain)}"
        " run(s), first submission to last result"
    )
    print_table(header, rows)
    speedup = _median_run(plain).makespan / _median_run(proxies).makespan
    print(f"speed-up (plain / proxies): {speedup:.2f}x")
    verdict = "met" if speedup >= SPEEDUP_GOAL else "NOT met"
    print(f"goal: proxies >= {SPEEDUP_GOAL}x faster than plain: {speedup:.2f}x [{verdict}]")
    left = sum(run.keys_left or 0 for run in proxies)
    verdict = "met" if not left else "NOT met"
    print(f"goal: 0 keys left in the store after each proxies run: {left} [{verdict}]")


def main(quick: bool = False, plot: str | None = None, redis: str | None = None) -> None:
    """Run both modes (smaller chunks, one run each with ``quick``); print the table and goals."""
    chunks = make_chunks(CHUNKS, QUICK_CHUNK_BYTES if quick else CHUNK_BYTES)
    with _store_spec(redis) as store_spec:
        print(f"store: {public_spec(store_spec)}")
        plain, proxies = measure(chunks, 1 if quick else REPEATS, store_spec)
    for run in (*plain, *proxies):
        check_same_results(plain[0].outcome, run.outcome)
    report(chunks, plain, proxies)
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        timelines = {
            f"{mode}: {run.makespan:.2f} s": run.spans
            for mode, run in (("plain", _median_run(plain)), ("proxies", _median_run(proxies)))
        }
        timeline_figure(timelines).savefig(plot, dpi=120)
        print(f"plot written to {plot}")


def timeline_figure(timelines: Mapping[str, Sequence[Span]]) -> Figure:
    """The tasks of each stage over time, one bar per task on its own row, one panel per
    timeline (``title: spans``), on a shared time axis."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    heights = [max(1.5, 0.22 * len(spans)) for spans in timelines.values()]
    fig, axes = plt.subplots(
        len(timelines),
        1,
        figsize=(8, 1.2 + sum(heights)),
        sharex=True,
        squeeze=False,
        gridspec_kw={"height_ratios": heights},
    )
    colors = {stage: f"C{i}" for i, stage in enumerate(STAGES)}
    for ax, (title, spans) in zip(axes[:, 0], timelines.items(), strict=True):
        for row, span in enumerate(spans):
            color = colors[span.stage]  # the edge keeps tasks of a few ms visible
            ax.barh(row, span.end - span.start, left=span.start, color=color, edgecolor=color)
        ax.set_ylim(len(spans) - 0.4, -0.6)
        ax.set_yticks([])
        ax.set_ylabel("tasks")
        ax.set_title(title, loc="left", fontsize="medium")
    axes[-1, 0].set_xlabel("seconds since the first submission")
    handles = [Patch(color=color, label=stage) for stage, color in colors.items()]
    axes[0, 0].legend(handles=handles, fontsize="small", loc="upper right")
    fig.tight_layout()
    return fig
