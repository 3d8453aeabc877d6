"""Faults with real processes: a Dask worker SIGKILLed while it runs a task whose arguments are
proxies, or while it holds a proxied result another task needs. Dask recomputes, the results
are right, and every key (of the dead attempt too) is freed: 0 entries left, on shared memory
and on Redis."""

from __future__ import annotations

import gc
import os
import signal
import tempfile
from collections.abc import Iterator

import pytest
from distributed import Client, LocalCluster

from conftest import assert_empty_and_close
from dask_helpers import Signal, array, total_when, wait_until
from proxy_patterns.plugins.dask import register
from proxy_patterns.store import count_objects, entries_left_after_eviction, get_store

MiB = 2**20


@pytest.fixture(params=["shm", "redis"])
def spec(request: pytest.FixtureRequest, shm_dir: str) -> str:
    if request.param == "shm":
        return f"shm://{shm_dir}"
    return str(request.getfixturevalue("redis_url"))


@pytest.fixture
def client(spec: str) -> Iterator[Client]:
    """Two worker processes under nannies (a killed worker is restarted), with the plugin."""
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        register(client, threshold="1 MiB", store=spec)
        yield client
    store = get_store(spec)
    gc.collect()
    assert entries_left_after_eviction(store, timeout=20) == 0
    assert_empty_and_close(store)


def _kill_worker_running(client: Client, key: str) -> str:
    """SIGKILL the worker process that runs task ``key``; return its address."""
    processing = wait_until(
        lambda: [w for w, keys in client.processing().items() if key in keys], timeout=30
    )
    victim = processing[0]
    pid = client.run(os.getpid, workers=[victim])[victim]
    os.kill(pid, signal.SIGKILL)
    return str(victim)


def test_a_worker_killed_while_running_a_task_with_proxied_arguments(client: Client) -> None:
    signals = tempfile.mkdtemp(prefix="pp-signals-")
    started, go = Signal(signals), Signal(signals)
    x = array(20 * MiB, seed=1)
    future = client.submit(total_when, x, started, go, pure=False)
    started.wait()
    _kill_worker_running(client, future.key)
    go.set()  # the retry, on a live worker, runs to its end
    assert future.result(timeout=120) == float(x.sum())
    del future


def test_a_worker_killed_holding_a_proxied_result_another_task_needs(
    client: Client, spec: str
) -> None:
    signals = tempfile.mkdtemp(prefix="pp-signals-")
    started, go = Signal(signals), Signal(signals)
    first, second = sorted(client.scheduler_info()["workers"])
    a = client.submit(array, 20 * MiB, 2, workers=[first], pure=False)
    b = client.submit(total_when, a, started, go, workers=[second], pure=False)
    started.wait()  # b runs on the second worker: a left the first one through the store
    assert count_objects(get_store(spec)) >= 1
    pid = client.run(os.getpid, workers=[first])[first]
    os.kill(pid, signal.SIGKILL)  # a's worker dies; its result lives on in the store
    go.set()
    assert b.result(timeout=120) == float(array(20 * MiB, 2).sum())
    c = client.submit(total_when, a, started, go, pure=False)  # a is needed again
    assert c.result(timeout=120) == float(array(20 * MiB, 2).sum())
    del a, b, c
