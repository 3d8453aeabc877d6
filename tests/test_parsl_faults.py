"""Faults under Parsl HTEX with the plugin, with real processes: a worker, or its manager,
SIGKILLed while running an app whose argument is a proxy. Parsl retries the app, the result is
right, and the store is empty afterwards."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import parsl
import pytest
from parsl.config import Config
from parsl.dataflow.dflow import DataFlowKernel
from parsl.executors import HighThroughputExecutor
from parsl.providers import LocalProvider

from parsl_helpers import HTEX, dies_once, total
from proxy_patterns.liveness import process_tag
from proxy_patterns.plugins.parsl import proxied
from proxy_patterns.records import ref_table_for
from proxy_patterns.store import (
    count_entries,
    count_objects,
    entries_left_after_eviction,
    get_store,
)

MiB = 2**20


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="pp-test-parsl-faults-", dir="/dev/shm")
    yield f"shm://{path}"
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def dfk(spec: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DataFlowKernel]:
    """HTEX (2 workers, proxied), quick to notice a lost manager, with one retry per app."""
    htex = HighThroughputExecutor(
        label=HTEX,
        address="127.0.0.1",
        max_workers_per_node=2,
        heartbeat_period=1,
        heartbeat_threshold=4,
        block_error_handler=False,  # a killed manager is our fault, not a broken executor
        provider=LocalProvider(init_blocks=1, min_blocks=1, max_blocks=2),
    )
    config = Config(
        executors=[proxied(htex, threshold="1 MiB", store=spec)],
        run_dir=str(tmp_path_factory.mktemp("runinfo")),
        retries=1,
        strategy_period=1,
    )
    kernel = parsl.load(config)
    total(1.0).result(timeout=120)  # the workers are up
    yield kernel
    kernel.cleanup()
    parsl.clear()
    assert count_entries(get_store(spec)) == 0


@pytest.mark.parametrize("what", ["worker", "manager"])
def test_a_killed_worker_or_manager_is_retried_and_leaves_no_keys(
    dfk: DataFlowKernel, spec: str, tmp_path: Path, what: str
) -> None:
    x = np.ones(4 * MiB // 8)
    future = dies_once(x, str(tmp_path / "marker"), what)
    assert future.result(timeout=180) == float(x.size)
    assert (tmp_path / "marker").exists()  # the first attempt did die
    del future
    assert entries_left_after_eviction(get_store(spec), timeout=20) == 0


def test_a_worker_killed_after_putting_its_result_does_not_pin_it(spec: str) -> None:
    """The worker's part of the plugin puts a large result, then its process is killed before
    the result reaches the submitting process: the key goes with the worker's lease, at the
    next sweep, not when the submitting process (this one) exits."""
    code = (
        "import os, signal, sys\n"
        "from proxy_patterns.plugins.parsl import _ProxyingApp\n"
        "from proxy_patterns.policy import ProxyPolicy\n"
        "from proxy_patterns.store import spec_owned_by\n"
        "import numpy as np\n"
        "spec = spec_owned_by(sys.argv[1], sys.argv[2])  # as the plugin sends it\n"
        "app = _ProxyingApp(np.ones, ProxyPolicy('1 MiB'), spec)\n"
        "result = app(2 * 2**20 // 8)\n"
        "assert result.created, result\n"
        "os.kill(os.getpid(), signal.SIGKILL)  # before anything is sent\n"
    )
    store = get_store(spec)
    killed = subprocess.run(
        [sys.executable, "-c", code, spec, process_tag()], cwd=tempfile.gettempdir()
    )
    assert killed.returncode == -signal.SIGKILL
    assert count_objects(store) == 1  # put, and never delivered
    ref_table_for(store).sweep()
    assert count_entries(store) == 0
