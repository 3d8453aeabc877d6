"""The Dask plugin on real clusters: results are right, the scheduler never carries the bytes,
and every key the plugin creates is evicted when Dask forgets the tasks that use it.

Clusters are ``LocalCluster``s with two worker processes of one thread, shared by the tests of
this module (one per store spec: the scheduler and worker plugins are registered idempotently,
so the first registration on a cluster fixes the store its scheduler evicts from). Each test
gets its own client with the plugin registered, and must leave the store empty; tests that
need a cluster of their own (shutdown, retiring a worker, measuring the scheduler) start one.
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
import shutil
import signal
import tempfile
import threading
import time
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import dask.bag as db
import dask.dataframe as dd
import numpy as np
import pandas as pd
import psutil
import pytest
import task_objects
from dask.base import tokenize
from dask.sizeof import sizeof
from distributed import Client, Future, LocalCluster, wait
from proxystore.proxy import ProxyResolveError
from proxystore.store import Store, unregister_store
from proxystore.store.exceptions import ProxyResolveMissingKeyError
from task_objects import fingerprint

from conftest import assert_empty_and_close
from dask_helpers import (
    CountingFactory,
    DaskOnly,
    MiB,
    PausesPickling,
    Signal,
    SlowFactory,
    Unpicklable,
    array,
    dask_only,
    dd_concat,
    double,
    filled,
    filled_when,
    fingerprint_first,
    frame,
    identity,
    in_list,
    inc,
    pickled_when,
    poll_for,
    raises,
    result_shaped,
    scaled_head,
    total,
    wait_until,
)
from proxy_patterns.bench.cluster import measured_cluster
from proxy_patterns.plugins.dask import (
    PLUGIN_NAME,
    DaskProxyPlugin,
    register,
    unregister,
)
from proxy_patterns.proxy import OpaqueProxy, is_proxy, key_of, proxy
from proxy_patterns.records import ref_table_for
from proxy_patterns.shm import SEGMENT_PREFIX, SharedMemoryConnector, SharedMemoryKey
from proxy_patterns.store import count_entries, count_objects, get_store, redis_client_of

pytestmark = pytest.mark.timeout(120)

THRESHOLD = "1 MiB"
N_WORKERS = 2
LARGE_GRAPH = "Sending large graph"


# --- clusters and stores ------------------------------------------------------------------
def _start_cluster() -> LocalCluster:
    return LocalCluster(
        n_workers=N_WORKERS,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",  # never the default port, which another process may hold
    )


def _purge(store: Store[Any]) -> None:
    """Delete whatever is left in ``store`` so that one failure does not fail the next tests."""
    connector = store.connector
    if isinstance(connector, SharedMemoryConnector):
        for name in os.listdir(connector.directory):
            path = os.path.join(connector.directory, name)
            if name.startswith(SEGMENT_PREFIX) and os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            elif name.startswith(SEGMENT_PREFIX):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
    else:
        redis_client_of(connector).flushdb()  # type: ignore[union-attr]


class _Clusters:
    """One cluster per store spec, started on first use, closed with the module."""

    def __init__(self) -> None:
        self._clusters: dict[str, LocalCluster] = {}

    def get(self, spec: str) -> LocalCluster:
        if spec not in self._clusters:
            self._clusters[spec] = _start_cluster()
        return self._clusters[spec]

    def close(self) -> None:
        for spec, cluster in self._clusters.items():
            cluster.close()
            store = get_store(spec)
            _purge(store)
            unregister_store(store.name)
            store.close()


@pytest.fixture(scope="module")
def module_shm_spec() -> Iterator[str]:
    """A private tmpfs directory for the module: key counts only see this module's keys."""
    path = tempfile.mkdtemp(prefix="pp-test-dask-", dir="/dev/shm")
    yield f"shm://{path}"
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def clusters(module_shm_spec: str) -> Iterator[_Clusters]:
    """The shared clusters (closed before the module's store directory is removed)."""
    pool = _Clusters()
    yield pool
    pool.close()


@dataclass
class Env:
    """A client with the plugin registered on a shared cluster, and the plugin's store."""

    kind: str
    spec: str
    cluster: LocalCluster
    client: Client
    plugin: DaskProxyPlugin
    store: Store[Any]

    def keys(self) -> int:
        return count_objects(self.store)

    def stats(self) -> dict[str, int]:
        return self.plugin.stats()

    def workers(self) -> list[str]:
        return sorted(self.client.scheduler_info()["workers"])

    def wait_keys(self, n: int, timeout: float = 10) -> None:
        gc.collect()  # futures caught in reference cycles are released only by the collector
        wait_until(
            lambda: self.keys() == n,
            timeout,
            message=lambda: f"expected {n} keys in {self.spec}, found {self.keys()}",
        )

    def wait_empty(self, timeout: float = 10) -> None:
        self.wait_keys(0, timeout)


@pytest.fixture
def env(
    request: pytest.FixtureRequest, clusters: _Clusters, module_shm_spec: str
) -> Iterator[Env]:
    """A new client with the plugin (threshold 1 MiB) on the cluster of the store ``param``
    (``shm`` by default, ``redis``); the store must be empty when the test ends."""
    kind = getattr(request, "param", "shm")
    spec = module_shm_spec if kind == "shm" else str(request.getfixturevalue("redis_url"))
    cluster = clusters.get(spec)
    client = Client(cluster)
    client.wait_for_workers(N_WORKERS, timeout=30)
    store = get_store(spec)
    assert count_entries(store) == 0, "the store is not empty before the test"
    plugin = register(client, threshold=THRESHOLD, store=spec)
    yield Env(kind, spec, cluster, client, plugin, store)

    gc.collect()
    emptied = poll_for(lambda: count_entries(store) == 0, timeout=15)
    left = count_entries(store)
    client.close()
    if not emptied:
        _purge(store)
        pytest.fail(f"{left} entries left in {spec} after the test")


def _segments(store: Store[Any]) -> list[SharedMemoryKey]:
    """The keys of the objects in a shared-memory store, read from its directory."""
    directory = store.connector.directory  # type: ignore[attr-defined]
    return [
        SharedMemoryKey(name, os.stat(os.path.join(directory, name)).st_size)
        for name in os.listdir(directory)
        if name.startswith(SEGMENT_PREFIX) and os.path.isfile(os.path.join(directory, name))
    ]


def _task_state(key: Any, dask_scheduler: Any) -> str | None:
    """For ``run_on_scheduler``: the state of task ``key``, None if the scheduler forgot it."""
    ts = dask_scheduler.tasks.get(key)
    return None if ts is None else str(ts.state)


# --- 1. every way of submitting work -------------------------------------------------------
def _check_submit(client: Client) -> None:
    x = array(3 * MiB)
    f = client.submit(double, x)
    r = f.result()
    assert type(r) is np.ndarray
    np.testing.assert_array_equal(r, x * 2)


def _check_map(client: Client) -> None:
    xs = [array(2 * MiB, seed=i) for i in range(4)]
    futures = client.map(double, xs)
    for x, r in zip(xs, client.gather(futures), strict=True):
        assert type(r) is np.ndarray
        np.testing.assert_array_equal(r, x * 2)


def _check_delayed(client: Client) -> None:
    x = array(3 * MiB)
    doubled = dask.delayed(double)(x)
    summed = dask.delayed(total)(doubled)
    r, s = dask.compute(doubled, summed)
    assert type(r) is np.ndarray
    np.testing.assert_array_equal(r, x * 2)
    assert s == pytest.approx(2 * x.sum())


def _check_array_from_array_reduced(client: Client) -> None:
    x = array(8 * MiB)
    a = da.from_array(x, chunks=x.size // 4)  # 2 MiB chunks: arguments and results proxied
    # One compute: a second one on the same collection races with the release of the first
    # (see test_argument_resubmitted_while_its_previous_use_is_released).
    summed, mean = dask.compute((a * 2).sum(), a.mean())
    assert summed == pytest.approx(2 * x.sum())
    assert mean == pytest.approx(x.mean())


def _check_array_from_array(client: Client) -> None:
    x = array(8 * MiB)
    a = da.from_array(x, chunks=x.size // 4)
    r = (a + 1).compute()
    assert type(r) is np.ndarray
    np.testing.assert_array_equal(r, x + 1)


def _check_array_ones_persist(client: Client) -> None:
    chunk = 2 * MiB // 8
    y = da.ones(4 * chunk, chunks=chunk).persist()  # four 2 MiB chunks held by workers
    wait(y)
    for _ in range(2):  # a persisted collection computed twice
        assert y.sum().compute() == 4 * chunk
        r = (y * 3).compute()
        assert type(r) is np.ndarray
        np.testing.assert_array_equal(r, np.full(4 * chunk, 3.0))


def _frame(n: int = 300_000) -> pd.DataFrame:
    return pd.DataFrame({"a": np.arange(n, dtype=float), "b": array(8 * n, seed=1)})


def _check_dataframe_reduced(client: Client) -> None:
    pdf = _frame()  # 2.4 MB per column
    ddf = dd.from_pandas(pdf, npartitions=2)
    summed, largest = dask.compute(ddf.a.sum(), (ddf.b * 2).max())  # one compute (see above)
    assert summed == pytest.approx(pdf.a.sum())
    assert largest == pytest.approx(2 * pdf.b.max())


def _check_dataframe(client: Client) -> None:
    pdf = _frame()
    ddf = dd.from_pandas(pdf, npartitions=2)
    pd.testing.assert_frame_equal((ddf * 2).compute(), pdf * 2)


def _check_bag_reduced(client: Client) -> None:
    items = [array(2 * MiB, seed=i) for i in range(4)]
    bag = db.from_sequence(items, npartitions=2).map(double)
    assert bag.map(total).compute() == pytest.approx([2 * x.sum() for x in items])


def _check_bag(client: Client) -> None:
    items = [array(2 * MiB, seed=i) for i in range(4)]
    results = db.from_sequence(items, npartitions=2).map(double).compute()
    assert [type(r) for r in results] == [np.ndarray] * 4
    for x, r in zip(items, results, strict=True):
        np.testing.assert_array_equal(r, x * 2)


def _check_client_compute(client: Client) -> None:
    x = array(3 * MiB)
    doubled, summed = client.compute([dask.delayed(double)(x), dask.delayed(total)(x)])
    r = doubled.result()
    assert type(r) is np.ndarray
    np.testing.assert_array_equal(r, x * 2)
    assert summed.result() == pytest.approx(x.sum())


def _check_client_persist(client: Client) -> None:
    x = array(3 * MiB)
    doubled = client.persist(dask.delayed(double)(x))
    chunk = 2 * MiB // 8
    ones = client.persist(da.ones(4 * chunk, chunks=chunk) * 2)
    for _ in range(2):  # persisted, then computed twice
        np.testing.assert_array_equal(doubled.compute(), x * 2)
        assert dask.delayed(total)(doubled).compute() == pytest.approx(2 * x.sum())
        assert ones.sum().compute() == 8 * chunk


WORKLOADS: dict[str, Callable[[Client], None]] = {
    "submit": _check_submit,
    "map": _check_map,
    "delayed": _check_delayed,
    "array_from_array_reduced": _check_array_from_array_reduced,
    "array_from_array": _check_array_from_array,
    "array_ones_persist": _check_array_ones_persist,
    "dataframe_from_pandas_reduced": _check_dataframe_reduced,
    "dataframe_from_pandas": _check_dataframe,
    "bag_reduced": _check_bag_reduced,
    "bag": _check_bag,
    "client_compute": _check_client_compute,
    "client_persist": _check_client_persist,
}
REDIS_WORKLOADS = ["submit", "map", "delayed", "array_from_array_reduced", "array_from_array"]
REDIS_WORKLOADS += ["array_ones_persist"]

# What a proxy whose key was evicted raises: on the client, or from a worker (wrapped).
RESOLVE_ERRORS = (ProxyResolveError, ProxyResolveMissingKeyError)


def _workload_params() -> list[Any]:
    pairs = [("shm", w) for w in WORKLOADS] + [("redis", w) for w in REDIS_WORKLOADS]
    return [pytest.param(kind, w) for kind, w in pairs]


@pytest.mark.parametrize(("env", "workload"), _workload_params(), indirect=["env"])
def test_workload_gives_correct_results_and_empties_store(env: Env, workload: str) -> None:
    before = env.stats()["bytes_proxied"]
    WORKLOADS[workload](env.client)
    assert env.stats()["bytes_proxied"] > before, "the plugin proxied nothing: test is void"
    env.wait_empty()


@pytest.mark.parametrize("wrap", ["identity", "in_list"])
def test_result_that_returns_its_dependency_outlives_it(env: Env, wrap: str) -> None:
    """Minimal form of the failures of ``(da.from_array(x) + 1).compute()`` (dask.array turns
    ``+ 1`` into an alias task) and ``bag.compute()`` (its finalize puts the partitions' items
    into one list): a result that is its dependency's proxy, not a copy."""
    n = 2 * MiB // 8
    f = env.client.submit(filled, n, 6.0)
    g = env.client.submit(identity if wrap == "identity" else in_list, f)
    wait(g)
    key = f.key
    del f
    gc.collect()
    wait_until(
        lambda: env.client.run_on_scheduler(_task_state, key) in ("released", None),
        message="the dependency is released (its result dropped)",
    )
    r = g.result()
    np.testing.assert_array_equal(r if wrap == "identity" else r[0], np.full(n, 6.0))
    del g, r
    env.wait_empty()


def test_dask_type_dispatch_on_large_pandas_results(env: Env) -> None:
    """``dask.dataframe.methods.concat`` dispatches on ``type(partition)``, which a proxy
    would fail: tasks get the partitions themselves, though they travel by proxy."""
    a, b = env.workers()
    before = env.stats()["bytes_proxied"]
    n = 200_000  # 3.2 MB per partition
    parts = [env.client.submit(frame, n, start, workers=[a]) for start in (0, n)]
    joined = env.client.submit(dd_concat, parts, workers=[b])
    expected = pd.concat([frame(n, 0), frame(n, n)])
    pd.testing.assert_frame_equal(joined.result(), expected)
    assert env.stats()["bytes_proxied"] - before >= 2 * 2 * n * 8
    del parts, joined
    env.wait_empty()


def test_scattered_array_stays_with_dask(env: Env) -> None:
    """``client.scatter`` places data on a worker on purpose: it is neither intercepted nor
    proxied (a worker's result proxying only applies to results it computed)."""
    x = array(3 * MiB)
    before = env.stats()["bytes_proxied"]
    [scattered] = env.client.scatter([x])
    assert env.client.submit(total, scattered).result() == pytest.approx(x.sum())
    r = scattered.result()
    assert type(r) is np.ndarray
    np.testing.assert_array_equal(r, x)
    assert env.stats()["bytes_proxied"] == before and env.keys() == 0
    del scattered, r
    env.wait_empty()


# --- 2. arguments --------------------------------------------------------------------------
# Dask warns when a graph it sends is larger than this: lowered below the objects' size, the
# warning tells whether the bytes went into the graph.
SMALL_GRAPHS = {"distributed.admin.large-graph-warning-threshold": "1MB"}


def _submitted(client: Client, how: str, func: Callable[..., Any], obj: Any) -> Any:
    """``func(obj)`` run on the cluster by ``submit``, ``map`` or ``delayed``."""
    if how == "submit":
        return client.submit(func, obj, pure=False).result()
    if how == "map":
        return client.gather(client.map(func, [obj], pure=False))[0]
    return dask.delayed(func)(obj).compute()


def test_plain_dask_puts_such_arguments_in_the_graph(env: Env) -> None:
    """The control for the test below: without the plugin, Dask warns."""
    obj = task_objects.make("dataclass", 1)
    with (
        dask.config.set(SMALL_GRAPHS),
        Client(env.cluster) as plain,
        pytest.warns(UserWarning, match=LARGE_GRAPH),
    ):
        assert plain.submit(fingerprint, obj, pure=False).result() == fingerprint(obj)


@pytest.mark.parametrize("how", ["submit", "map", "delayed"])
@pytest.mark.parametrize("case", task_objects.CASES)
def test_every_kind_of_argument_is_proxied_and_arrives_as_itself(
    env: Env, case: str, how: str
) -> None:
    obj = task_objects.make(case, 1)
    before = env.stats()["bytes_proxied"]
    with dask.config.set(SMALL_GRAPHS), warnings.catch_warnings():
        warnings.filterwarnings("error", message=LARGE_GRAPH)
        assert _submitted(env.client, how, fingerprint, obj) == fingerprint(obj)
    assert env.stats()["bytes_proxied"] - before > MiB
    env.wait_empty()


def _made(client: Client, how: str, case: str, worker: str) -> Future[Any]:
    """A future of ``task_objects.make(case, 2)`` run on ``worker``, by submit, map or delayed."""
    if how == "submit":
        return client.submit(task_objects.make, case, 2, workers=[worker])
    if how == "map":
        return client.map(task_objects.make, [case], [2], workers=[worker])[0]
    with dask.annotate(workers=[worker]):
        return client.compute(dask.delayed(task_objects.make)(case, 2))


@pytest.mark.parametrize("how", ["submit", "map", "delayed"])
@pytest.mark.parametrize("case", task_objects.CASES)
def test_every_kind_of_result_is_proxied_and_read_as_itself(env: Env, case: str, how: str) -> None:
    a, b = env.workers()
    expected = task_objects.make(case, 2)
    before = env.stats()["bytes_proxied"]
    f = _made(env.client, how, case, a)
    dependents = [env.client.submit(fingerprint, f, workers=[w], pure=False) for w in (a, b, b)]
    assert env.client.gather(dependents) == [fingerprint(expected)] * 3
    result = f.result()
    assert not is_proxy(result) and type(result) is type(expected)
    assert fingerprint(result) == fingerprint(expected)
    assert MiB < env.stats()["bytes_proxied"] - before < 1.5 * task_objects.NBYTES  # put once
    del f, dependents, result
    env.wait_empty()


def test_large_argument_warns_without_plugin_but_not_with_it(env: Env) -> None:
    x = array(100 * 10**6)
    with Client(env.cluster) as plain, pytest.warns(UserWarning, match=LARGE_GRAPH):
        f = plain.submit(total, x, pure=False)
        assert f.result() == pytest.approx(x.sum())
        del f
    before = env.stats()["bytes_proxied"]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=LARGE_GRAPH)
        f = env.client.submit(total, x, pure=False)
    assert f.result() == pytest.approx(x.sum())
    assert env.stats()["bytes_proxied"] - before >= x.nbytes
    del f
    env.wait_empty()


def test_argument_shared_by_20_submits_is_put_once(env: Env) -> None:
    x = array(8 * MiB)
    n = 2 * MiB // 8  # each task returns a 2 MiB slice of x, scaled: a proxied result
    before = env.stats()["bytes_proxied"]
    futures = [env.client.submit(scaled_head, x, i, n, pure=False) for i in range(20)]
    for i, r in enumerate(env.client.gather(futures)):
        np.testing.assert_array_equal(r, x[:n] * i)
    del r
    assert env.keys() == 1 + 20  # one argument key, one key per result
    expected = x.nbytes + 20 * n * 8  # 48 MiB; 200 MiB more if x were put per submit
    proxied = env.stats()["bytes_proxied"] - before
    assert expected <= proxied < expected + x.nbytes / 2
    del futures
    env.wait_empty()


def test_argument_resubmitted_while_its_previous_use_is_released(env: Env) -> None:
    """Submitting the same array in a loop (``f = submit(g, x, other); f.result(); del f``)
    failed about once in ten iterations when ``other`` was large: the release of the previous
    task reached the scheduler while the client was still pickling (putting ``other``) the new
    graph, which had already chosen ``x``'s existing proxy. Here the previous future is
    released at that very point of the pickling, which makes it deterministic."""
    x = array(4 * MiB)
    previous = [env.client.submit(total, x, pure=False)]
    assert previous[0].result() == pytest.approx(x.sum())
    previous_key = previous[0].key
    [x_key] = _segments(env.store)
    later = [env.client.submit(total, array(2 * MiB, seed=1), pure=False)]
    wait(later)
    [later_key] = {*_segments(env.store)} - {x_key}
    kept: list[bool] = []

    def release_previous() -> None:
        previous.clear()
        gc.collect()
        wait_until(
            lambda: env.client.run_on_scheduler(_task_state, previous_key) is None,
            message="the scheduler forgets the previous task",
        )
        # A task released after it, in the same ordered channel, whose argument nothing else
        # uses: once that argument is evicted, the plugin has decided about x too.
        later.clear()
        gc.collect()
        wait_until(lambda: not env.store.exists(later_key), message="the later argument goes")
        kept.append(env.store.exists(x_key))

    f = env.client.submit(total, x, PausesPickling(release_previous), pure=False)
    assert kept == [True], "x was evicted while a graph carrying it was being submitted"
    assert f.result(timeout=30) == pytest.approx(x.sum())
    del f
    env.wait_empty()


@pytest.mark.parametrize("env", ["redis"], indirect=True)
def test_argument_lost_by_the_store_is_put_again(env: Env) -> None:
    """A store that lost its data (redis-server restarted empty) while a future that carried
    an argument is still held: the same argument submitted again is put again, never handed
    out under the lost key (issue 16, found by a fault probe)."""
    x = array(2 * MiB)
    held = env.client.submit(total, x, pure=False)
    assert held.result() == pytest.approx(x.sum())
    client = redis_client_of(env.store.connector)
    assert client is not None
    client.flushdb()  # as a restart without persistence leaves it
    again = env.client.submit(total, x, pure=False)
    assert again.result(timeout=30) == pytest.approx(x.sum())
    del held, again
    env.wait_empty()


def test_argument_mutated_in_place_is_sent_with_its_new_contents(env: Env) -> None:
    x = np.zeros(MiB // 4)  # 2 MiB
    f1 = env.client.submit(total, x, pure=False)
    assert f1.result() == 0
    x += 1
    f2 = env.client.submit(total, x, pure=False)
    assert f2.result() == x.size  # plain Dask: the graph holds x as it was at submit time
    del f1, f2
    env.wait_empty()


def test_collection_computed_again_while_first_result_is_held_empties_store(env: Env) -> None:
    x = array(3 * MiB)
    summed = dask.delayed(total)(x)
    f1 = env.client.compute(summed)
    assert f1.result() == pytest.approx(x.sum())
    f2 = env.client.compute(summed)  # same key, still held by f1
    assert f2.result() == pytest.approx(x.sum())
    del f1, f2
    env.wait_empty(timeout=5)


# --- 3. the scheduler never receives the bytes ----------------------------------------------
@pytest.fixture(scope="module")
def measured(module_shm_spec: str) -> Iterator[tuple[str, Any]]:
    """A cluster whose scheduler is a process of its own, with a byte counter (closed before
    the module's store directory is removed)."""
    with measured_cluster(n_workers=2) as (address, probe):
        yield address, probe


def test_scheduler_never_reads_argument_bytes(
    measured: tuple[str, Any], module_shm_spec: str
) -> None:
    address, probe = measured
    store = get_store(module_shm_spec)
    arrays = [array(20 * MiB, seed=i) for i in range(5)]

    def bytes_read_by_scheduler(client: Client) -> int:
        start = probe.bytes_read()
        futures = [client.submit(total, x, pure=False) for x in arrays]
        assert client.gather(futures) == pytest.approx([x.sum() for x in arrays])
        return probe.bytes_read() - start

    with Client(address) as plain, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=LARGE_GRAPH)
        plain_bytes = bytes_read_by_scheduler(plain)
    with Client(address) as client:
        register(client, threshold=THRESHOLD, store=module_shm_spec)
        plugin_bytes = bytes_read_by_scheduler(client)
        wait_until(lambda: count_entries(store) == 0, message="store empty")
    assert plain_bytes > 100 * 10**6
    assert plugin_bytes < 1 * 10**6


def test_scheduler_memory_stays_flat(measured: tuple[str, Any], module_shm_spec: str) -> None:
    address, _ = measured
    store = get_store(module_shm_spec)
    arrays = [array(50 * 10**6, seed=i) for i in range(10)]

    def scheduler_growth(client: Client) -> int:
        scheduler = psutil.Process(client.run_on_scheduler(os.getpid))
        start = scheduler.memory_info().rss
        futures = [client.submit(total, x, pure=False) for x in arrays]
        assert client.gather(futures) == pytest.approx([x.sum() for x in arrays])
        return int(scheduler.memory_info().rss - start)  # futures (and run_specs) still alive

    with Client(address) as client:
        register(client, threshold=THRESHOLD, store=module_shm_spec)
        plugin_growth = scheduler_growth(client)
        wait_until(lambda: count_entries(store) == 0, message="store empty")
    with Client(address) as plain, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=LARGE_GRAPH)
        plain_growth = scheduler_growth(plain)
    assert plugin_growth < 50 * 10**6
    assert plain_growth > 200 * 10**6, "the measurement cannot see the arguments: test is void"


# --- 4. results ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("env", "shape"),
    [("shm", s) for s in ("array", "list", "tuple", "dict")]
    + [("redis", "array")]
    + [("shm", "namedtuple")],
    indirect=["env"],
)
def test_large_result_is_stored_by_worker_and_gathered_as_real_array(env: Env, shape: str) -> None:
    n = 2 * MiB // 8
    before = env.stats()["bytes_proxied"]
    f = env.client.submit(result_shaped, shape, n)
    for _ in range(2):  # a result can be gathered again
        result = f.result()
        assert type(result) is type(result_shaped(shape, 1))
        values = _arrays_in(result)
        assert len(values) == (1 if shape == "array" else 2)
        for value, expected in zip(values, (1.0, 2.0), strict=False):
            assert type(value) is np.ndarray, f"got a {type(value).__name__}"
            np.testing.assert_array_equal(value, np.full(n, expected))
            assert value.flags.writeable
            value[0] = -1.0  # writable, and the stored copy is untouched (checked next round)
    proxied = env.stats()["bytes_proxied"] - before
    assert proxied >= len(values) * n * 8
    assert env.keys() == 1  # a container is put whole
    del f, result, values, value
    env.wait_empty()


def _arrays_in(result: Any) -> list[Any]:
    if isinstance(result, np.ndarray):
        return [result]
    return list(result.values() if isinstance(result, dict) else result)


@pytest.mark.parametrize("env", ["shm", "redis"], indirect=True)
def test_result_read_by_dependents_on_every_worker(env: Env) -> None:
    a, b = env.workers()
    n = 2 * MiB // 8
    f = env.client.submit(filled, n, 3.0, workers=[a])
    dependents = [env.client.submit(total, f, i, workers=[w]) for i, w in enumerate([a, b, b])]
    assert env.client.gather(dependents) == [3.0 * n] * 3
    # The client reads the result after its dependents ran, twice.
    for _ in range(2):
        [r] = env.client.gather([f])
        np.testing.assert_array_equal(r, np.full(n, 3.0))
    assert env.keys() == 1
    del f, dependents, r
    env.wait_empty()


def test_result_is_put_only_when_it_leaves_its_worker(env: Env) -> None:
    a, b = env.workers()
    n = 2 * MiB // 8
    before = env.stats()["bytes_proxied"]
    f = env.client.submit(filled, n, 3.0, workers=[a])
    assert env.client.submit(total, f, 0, workers=[a]).result() == 3.0 * n
    assert env.keys() == 0 and env.stats()["bytes_proxied"] == before  # it stayed on a
    assert env.client.submit(total, f, 1, workers=[b]).result() == 3.0 * n
    assert env.keys() == 1  # it moved to b as a proxy...
    np.testing.assert_array_equal(f.result(), np.full(n, 3.0))
    proxied = env.stats()["bytes_proxied"] - before
    assert n * 8 <= proxied < n * 8 + 4096  # ...put once (with its framing), also for the client
    del f
    env.wait_empty()


def test_a_worker_serves_requests_while_it_puts_a_result(env: Env, tmp_path: Any) -> None:
    """Result puts run off the worker's event loop: while one is in progress (here, held up
    in the pickling of the result), the worker still answers the client."""
    started, go = Signal(str(tmp_path)), Signal(str(tmp_path))
    f = env.client.submit(pickled_when, 2 * MiB, started, go, pure=False)
    wait(f)
    [worker] = env.client.who_has([f])[f.key]
    gathered: list[Any] = []
    gathering = threading.Thread(target=lambda g=f: gathered.append(g.result()), daemon=True)
    gathering.start()  # the result leaves its worker: it is put in the store first
    started.wait()
    answered = threading.Event()
    threading.Thread(
        target=lambda: (env.client.run(os.getpid, workers=[worker]), answered.set()),
        daemon=True,
    ).start()
    try:
        assert answered.wait(30), "the worker did not answer while it put a result"
    finally:
        go.set()
    gathering.join(30)
    assert gathered == [bytes(2 * MiB)]  # the put finished, and the value is the object's
    del f
    env.wait_empty()


def test_result_the_store_cannot_take_leaves_by_value(env: Env) -> None:
    f = env.client.submit(dask_only, 2 * MiB // 8)
    r = f.result()
    assert type(r) is DaskOnly and r.data.sum() == 2 * MiB // 8
    assert env.keys() == 0
    failed = [msg for _, msg in env.client.get_scheduler_logs() if str(f.key) in msg]
    assert not failed, "the transfer failed at first (the result was recomputed)"
    del f, r
    env.wait_empty()


# --- 5. eviction ---------------------------------------------------------------------------
def test_a_task_that_raises_leaves_nothing(env: Env) -> None:
    """Read with ``exception()``: a future whose ``result()`` raised is kept alive by its own
    exception's traceback until the client closes (dask/distributed#6310), and its key with
    it, as Dask keeps the task's arguments."""
    x = task_objects.make("dataclass", 5)
    f = env.client.submit(raises, x, "on purpose")
    dependent = env.client.submit(fingerprint, f)
    assert "on purpose" in str(f.exception()) and "on purpose" in str(dependent.exception())
    del f, dependent
    env.wait_empty()


def test_an_argument_that_cannot_be_resolved_fails_its_task_and_leaves_nothing(
    env: Env, tmp_path: Any
) -> None:
    x = task_objects.make("bytes", 6)
    go = Signal(str(tmp_path))
    gate = env.client.submit(filled_when, go, 1, 0.0)  # the task waits for it
    f = env.client.submit(fingerprint_first, x, gate)
    [key] = _segments(env.store)
    env.store.evict(key)  # as if someone removed it meanwhile
    go.set()
    with pytest.raises(RESOLVE_ERRORS, match=key.name):
        f.result()
    del f, gate
    env.wait_empty()
    # The erred task, and with it the scheduler's hold on the (now empty) record, lives until
    # the client closes: a future whose result() raised stays referenced (dask/distributed#6310).
    env.client.close()


def test_a_cancelled_task_leaves_nothing(env: Env, tmp_path: Any) -> None:
    x = task_objects.make("plain-object", 7)
    go = Signal(str(tmp_path))
    gate = env.client.submit(filled_when, go, 1, 0.0)
    f = env.client.submit(fingerprint_first, x, gate)
    assert env.keys() == 1
    env.client.cancel([f, gate])
    go.set()  # the gate's worker thread is free again
    del f, gate
    env.wait_empty()


@pytest.mark.parametrize("env", ["shm", "redis"], indirect=True)
def test_deleting_future_evicts_its_keys(env: Env) -> None:
    x = array(3 * MiB)
    before = env.stats()
    f = env.client.submit(double, x)
    np.testing.assert_array_equal(f.result(), x * 2)
    assert env.keys() == 2  # the argument and the result
    del f
    env.wait_empty()
    wait_until(
        lambda: env.stats()["keys_evicted"] - before["keys_evicted"] == 2,
        message="the scheduler counts both keys evicted",
    )
    assert env.stats()["keys_live"] == before["keys_live"]
    assert env.stats()["bytes_live"] == before["bytes_live"]


def _scrape(cluster: LocalCluster) -> dict[str, float]:
    """The plugin's samples on the scheduler's Prometheus endpoint."""
    port = cluster.scheduler.http_server.port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line.startswith("dask_scheduler_proxy_patterns_"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_counters_are_prometheus_metrics(env: Env) -> None:
    before = _scrape(env.cluster)
    assert set(before) == {
        "dask_scheduler_proxy_patterns_proxied_bytes_total",
        "dask_scheduler_proxy_patterns_evicted_keys_total",
        "dask_scheduler_proxy_patterns_live_keys",
        "dask_scheduler_proxy_patterns_live_bytes",
    }
    x = array(3 * MiB)
    f = env.client.submit(double, x)
    f.result()
    # The worker reports the result it put asynchronously (a scheduler event).
    during = wait_until(
        lambda: (s := _scrape(env.cluster))["dask_scheduler_proxy_patterns_live_keys"] == 2 and s
    )
    assert during["dask_scheduler_proxy_patterns_live_bytes"] >= 2 * x.nbytes
    proxied = "dask_scheduler_proxy_patterns_proxied_bytes_total"
    assert during[proxied] - before[proxied] >= 2 * x.nbytes
    del f
    env.wait_empty()
    evicted = "dask_scheduler_proxy_patterns_evicted_keys_total"
    wait_until(lambda: _scrape(env.cluster)[evicted] - before[evicted] == 2)
    assert _scrape(env.cluster)["dask_scheduler_proxy_patterns_live_keys"] == 0


_KILLED_CLIENT = """
import os, sys
import numpy as np
from distributed import Client
from proxy_patterns.plugins.dask import register
client = Client(sys.argv[1])
register(client, threshold="1 MiB", store=sys.argv[2])
future = client.submit(np.sum, np.ones(2**18), pure=False)  # a 2 MiB argument
future.result()
print(client.id, flush=True)
os.kill(os.getpid(), 9)  # with its future and the key it holds
"""


def test_a_killed_client_is_forgotten_quietly_with_its_keys(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """A dead client is normal operation: the scheduler forgets its tasks, their keys are
    evicted, and nothing is logged as critical (issue 16, found by a fault probe)."""
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-c", _KILLED_CLIENT, env.cluster.scheduler_address, env.spec],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tempfile.gettempdir(),  # not the repository: its source tree has no plugins/ there
    )
    client_id = run.stdout.strip()
    assert run.returncode == -signal.SIGKILL and client_id, run.stderr
    with caplog.at_level("INFO", logger="distributed"):
        wait_until(
            lambda: client_id not in env.client.run_on_scheduler(_client_ids),
            message="the scheduler notices the client is gone",
        )
        env.wait_empty()
    assert f"Remove client {client_id}" in caplog.text  # the scheduler's logs are seen here
    assert not [r for r in caplog.records if r.levelname == "CRITICAL"], caplog.text


def _client_ids(dask_scheduler: Any) -> list[str]:
    return list(dask_scheduler.clients)


@pytest.mark.parametrize("env", ["shm", "redis"], indirect=True)
def test_closing_client_with_futures_outstanding_empties_store(env: Env, tmp_path: Any) -> None:
    n = 2 * MiB // 8
    x = array(3 * MiB)
    go = Signal(str(tmp_path))
    futures = [
        env.client.submit(double, x),
        env.client.submit(filled, n, 2.0),
        env.client.submit(filled_when, go, n, 1.0),  # still running at the close
    ]
    env.client.gather(futures[:2])  # results are put in the store when they leave a worker
    assert env.keys() >= 3  # the argument and two results
    env.client.close()
    go.set()
    env.wait_empty()


@pytest.mark.parametrize("kind", ["shm", "redis"])
def test_keys_held_by_a_killed_scheduler_are_freed(
    request: pytest.FixtureRequest, kind: str, shm_dir: str
) -> None:
    """The scheduler holds keys as one holder in their records, leased by its process: killed,
    it cannot drop them, and the next sweep of the store (run by every process that starts
    on it, and by ``proxy-patterns clean``) evicts them once the lease is gone."""
    spec = f"shm://{shm_dir}" if kind == "shm" else str(request.getfixturevalue("redis_url"))
    store = get_store(spec)
    table = ref_table_for(store)
    try:
        with measured_cluster() as (address, _), Client(address) as client:
            register(client, threshold=THRESHOLD, store=spec)
            x = array(3 * MiB)
            f = client.submit(double, x)
            np.testing.assert_array_equal(f.result(), x * 2)
            wait_until(lambda: count_objects(store) == 2)  # held: the scheduler took them
            scheduler = psutil.Process(client.run_on_scheduler(os.getpid))
            scheduler.kill()
            scheduler.wait(30)
            assert count_objects(store) == 2  # nobody left to drop them

            def swept() -> bool:
                table.sweep()
                return count_entries(store) == 0

            wait_until(swept, timeout=30, message="the sweep evicts the dead scheduler's keys")
            del f
    finally:
        assert_empty_and_close(store)


def test_shutting_down_cluster_empties_store(module_shm_spec: str) -> None:
    store = get_store(module_shm_spec)
    n = 2 * MiB // 8
    with _start_cluster() as cluster:
        client = Client(cluster)
        register(client, threshold=THRESHOLD, store=module_shm_spec)
        x = array(3 * MiB)
        futures = [client.submit(double, x), client.submit(filled, n, 1.0)]
        client.gather(futures)
        assert count_objects(store) == 3
    try:
        wait_until(lambda: count_entries(store) == 0, message="store empty after shutdown")
    finally:
        client.close()
        _purge(store)


@pytest.mark.parametrize("how", ["restart_workers", "kill"])
def test_result_on_lost_worker_is_recomputed(env: Env, how: str) -> None:
    n = 2 * MiB // 8
    f = env.client.submit(filled, n, 5.0)
    f.result()  # served once: the worker now holds a proxy of it
    env.wait_keys(1)
    [holder] = env.client.who_has([f])[f.key]
    if how == "restart_workers":
        env.client.restart_workers([holder])
    else:  # no clean exit: the worker's own segments are not removed by itself
        pid = env.client.run(os.getpid, workers=[holder])[holder]
        os.kill(pid, signal.SIGKILL)
    r = f.result(timeout=60)
    assert type(r) is np.ndarray
    np.testing.assert_array_equal(r, np.full(n, 5.0))
    env.wait_keys(1)  # the lost result's key is gone, the recomputed one is live
    del f, r
    env.wait_empty()


def test_result_moved_off_retired_worker_still_resolves(module_shm_spec: str) -> None:
    store = get_store(module_shm_spec)
    n = 2 * MiB // 8
    with _start_cluster() as cluster, Client(cluster) as client:
        try:
            register(client, threshold=THRESHOLD, store=module_shm_spec)
            a, b = sorted(client.scheduler_info()["workers"])
            f = client.submit(filled, n, 7.0, workers=[a], allow_other_workers=True)
            wait(f)
            pid = client.run(os.getpid, workers=[a])[a]
            client.retire_workers([a])  # Dask moves the result to b first
            wait_until(lambda: not psutil.pid_exists(pid), message="retired worker exited")
            assert client.who_has([f])[f.key] == (b,)
            np.testing.assert_array_equal(f.result(timeout=30), np.full(n, 7.0))
            assert client.submit(total, f, workers=[b]).result(timeout=30) == 7.0 * n
        finally:
            client.close()
            _purge(store)


# --- 6. proxies stay opaque to Dask --------------------------------------------------------


def _unresolved(factory: Callable[[], Any], value: Any) -> OpaqueProxy[Any]:
    """An OpaqueProxy that knows its target's class (like the plugin's own proxies)."""
    p: OpaqueProxy[Any] = OpaqueProxy(factory, cache_defaults=True, target=value)
    del p.__proxy_wrapped__
    return p


def test_sizeof_of_proxy_is_small(env: Env) -> None:
    x = array(8 * MiB)
    p = proxy(env.store, x, keep_target=False)
    try:
        assert sizeof(p) <= 1024
        assert not p.__proxy_resolved__
        counting = CountingFactory(x)
        assert sizeof(_unresolved(counting, x)) <= 1024
        assert counting.calls == 0
    finally:
        env.store.evict(key_of(p))


@pytest.mark.parametrize(
    "how",
    [
        "cached_class",
        "factory_only",
    ],
)
def test_tokenize_of_proxy_does_not_resolve(env: Env, how: str) -> None:
    factory = CountingFactory(array(8 * MiB))
    p = OpaqueProxy(factory) if how == "factory_only" else _unresolved(factory, factory.value)
    assert tokenize(p) == tokenize(p)
    assert factory.calls == 0


@pytest.mark.parametrize(
    "how",
    [
        "factory_only",
        "submit",
        "submit_impure",
        "delayed",
    ],
)
def test_submit_with_blocking_proxy_argument_returns_at_once(env: Env, how: str) -> None:
    seconds = 3.0
    value = np.arange(10.0)
    factory = SlowFactory(value, seconds)
    p = OpaqueProxy(factory) if how == "factory_only" else _unresolved(factory, value)
    start = time.monotonic()
    if how == "delayed":
        f = env.client.compute(dask.delayed(total)(p))
    else:
        f = env.client.submit(total, p, pure=how != "submit_impure")
    elapsed = time.monotonic() - start
    assert elapsed < 1, f"submit took {elapsed:.1f} s: the proxy was resolved"
    assert factory.calls == 0
    # The workers resolve it at once; a resolve in the scheduler (this process) would take 3 s.
    assert f.result(timeout=seconds - 0.5) == value.sum()
    del f


# --- 7. below the threshold ----------------------------------------------------------------
def test_small_tasks_are_untouched(env: Env) -> None:
    before = env.stats()["bytes_proxied"]
    futures = [env.client.submit(inc, i) for i in range(200)]
    assert env.client.gather(futures) == list(range(1, 201))
    assert env.stats()["bytes_proxied"] == before
    assert env.keys() == 0
    del futures


def test_graphs_sent_keep_no_pickling_buffers_alive(env: Env) -> None:
    """Dask keeps what it sent to the scheduler for a while: what the plugin hands it must be
    no bigger than what Dask itself would have made (a view on a pickling buffer kept that
    whole buffer alive, and slowed tiny tasks by a growing heap)."""

    def buffers() -> int:
        gc.collect()
        return sum(isinstance(o, io.BytesIO) for o in gc.get_objects())

    env.client.gather([env.client.submit(inc, i, pure=False) for i in range(10)])
    before = buffers()
    futures = [env.client.submit(inc, i, pure=False) for i in range(200)]
    env.client.gather(futures)
    x = array(2 * MiB)
    futures += [env.client.submit(total, x, i, pure=False) for i in range(20)]
    env.client.gather(futures)
    assert buffers() - before < 10
    del futures
    env.wait_empty()


# --- 8. pickling failures -------------------------------------------------------------------
def test_unpicklable_argument_raises_and_leaves_store_empty(env: Env) -> None:
    x = array(4 * MiB)
    with pytest.raises(TypeError, match="lock"):
        env.client.submit(total, x, threading.Lock())
    assert env.keys() == 0
    with pytest.raises(TypeError, match="Unpicklable"):
        # fails only after x was put in the store
        env.client.submit(total, x, Unpicklable())
    assert env.keys() == 0
    # The client is still usable, and x is put again.
    f = env.client.submit(total, x)
    assert f.result() == pytest.approx(x.sum())
    assert env.keys() == 1
    del f
    env.wait_empty()


# --- 9. unregister --------------------------------------------------------------------------
def test_unregister_restores_plain_arguments(env: Env) -> None:
    x = array(20 * MiB)
    f = env.client.submit(total, x)
    assert f.result() == pytest.approx(x.sum())
    del f
    env.wait_empty()
    unregister(env.client)
    before = env.stats()["bytes_proxied"]
    with pytest.warns(UserWarning, match=LARGE_GRAPH):
        f = env.client.submit(total, x, pure=False)
    assert f.result() == pytest.approx(x.sum())
    assert env.stats()["bytes_proxied"] == before
    assert env.keys() == 0
    del f
    with pytest.raises(ValueError, match="not registered"):
        unregister(env.client)
    # Registering again turns it back on.
    register(env.client, threshold=THRESHOLD, store=env.spec)
    f = env.client.submit(total, x, pure=False)
    assert f.result() == pytest.approx(x.sum())
    assert env.stats()["bytes_proxied"] - before >= x.nbytes
    del f
    env.wait_empty()


def test_unregister_restores_plain_results(env: Env) -> None:
    unregister(env.client)
    before = env.stats()["bytes_proxied"]
    n = 2 * MiB // 8
    f = env.client.submit(filled, n, 4.0)
    r = f.result()
    assert type(r) is np.ndarray, f"got a {type(r).__name__}"
    assert env.stats()["bytes_proxied"] == before
    del f, r
    env.wait_empty()


# --- 10. configuration ----------------------------------------------------------------------
@pytest.mark.parametrize(("threshold", "proxied"), [("100 MiB", False), ("10 MiB", True)])
def test_threshold_from_dask_config(env: Env, threshold: str, proxied: bool) -> None:
    x = array(50 * 10**6)
    config = {"proxy-patterns.threshold": threshold, "proxy-patterns.store": env.spec}
    with dask.config.set(config), Client(env.cluster) as client, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=LARGE_GRAPH)
        plugin = register(client)
        before = plugin.stats()["bytes_proxied"]
        f = client.submit(total, x, pure=False)
        assert f.result() == pytest.approx(x.sum())
        grown = plugin.stats()["bytes_proxied"] - before
        assert env.keys() == int(proxied)
        del f
    assert (grown >= x.nbytes) if proxied else (grown == 0)
    env.wait_empty()


def test_registered_once_per_client(env: Env) -> None:
    with pytest.raises(ValueError, match="already registered"):
        register(env.client, threshold=THRESHOLD, store=env.spec)
    assert PLUGIN_NAME in env.client.run_on_scheduler(
        lambda dask_scheduler: list(dask_scheduler.plugins)
    )


def test_lazy_results_are_proxies_that_keep_their_key(env: Env) -> None:
    """``resolve_results=False``: results come back as proxies, resolved on first use; each
    holds its task's future, so the key outlives ``compute()`` dropping its futures."""
    unregister(env.client)
    register(env.client, threshold=THRESHOLD, store=env.spec, resolve_results=False)
    n = 2 * MiB // 8
    f = env.client.submit(filled, n, 3.0)
    lazy = f.result()
    assert is_proxy(lazy) and not lazy.__proxy_resolved__
    assert is_proxy(env.client.gather({"a": f})["a"])  # gather's dicts are walked too
    (computed,) = dask.compute(dask.delayed(filled)(n, 5.0))  # its futures are gone already
    del f
    gc.collect()
    # A result released after them, in the same ordered channel, is evicted: by then the
    # releases above were handled, and both keys must still be held by the proxies alone.
    later_key = key_of(env.client.submit(filled, n, 7.0, pure=False).result())
    gc.collect()
    wait_until(lambda: not env.store.exists(later_key), message="the later result goes")
    assert env.keys() == 2
    assert float(lazy.sum()) == 3.0 * n and float(computed[0]) == 5.0
    del lazy, computed
    env.wait_empty()
