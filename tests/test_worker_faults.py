"""Faults with real processes: a Dask worker SIGKILLed while it runs a task whose arguments are
proxies, or while it holds a proxied result another task needs. Dask recomputes, the results
are right, and every key (of the dead attempt too) is freed: 0 entries left, on shared memory
and on Redis."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest
from distributed import Client, LocalCluster

from conftest import assert_empty_and_close
from dask_helpers import Signal, array, total_when, wait_until
from proxy_patterns.liveness import process_tag
from proxy_patterns.plugins.dask import register
from proxy_patterns.records import ref_table_for
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


def test_a_worker_killed_after_putting_a_result_does_not_pin_it(shm_dir: str) -> None:
    """The worker's part of the plugin puts a large result and records it, then its process is
    killed before the scheduler hears of it: the key goes with the worker's lease, at the next
    sweep (which the scheduler runs when it loses a worker), not when the scheduler exits."""
    spec = f"shm://{shm_dir}"
    code = (
        "import os, signal, sys\n"
        "import numpy as np\n"
        "from proxy_patterns.plugins.dask.worker import ProxyWorkerPlugin\n"
        "from proxy_patterns.policy import ProxyPolicy\n"
        "from proxy_patterns.records import ref_table_for\n"
        "from proxy_patterns.store import get_store, spec_owned_by\n"
        "plugin = ProxyWorkerPlugin(ProxyPolicy('1 MiB'), sys.argv[1])\n"
        "plugin.store = get_store(spec_owned_by(sys.argv[1], sys.argv[2]))  # as setup() does\n"
        "plugin.table = ref_table_for(plugin.store)\n"
        "_, created = plugin._put_and_record(np.ones(2**20))\n"
        "assert created, created\n"
        "os.kill(os.getpid(), signal.SIGKILL)  # before the event reaches the scheduler\n"
    )
    store = get_store(spec)
    killed = subprocess.run(
        [sys.executable, "-c", code, spec, process_tag()], cwd=tempfile.gettempdir()
    )
    assert killed.returncode == -signal.SIGKILL
    assert count_objects(store) == 1
    ref_table_for(store).sweep()
    assert_empty_and_close(store)
