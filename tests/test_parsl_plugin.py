"""The Parsl option on a real HighThroughputExecutor (LocalProvider, 2 workers) beside a
ThreadPoolExecutor that stays untouched."""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import parsl
import psutil
import pytest
from parsl import Config, HighThroughputExecutor, ThreadPoolExecutor
from parsl.dataflow.dflow import DataFlowKernel
from parsl.providers import LocalProvider
from parsl.serialize.errors import SerializationError

from dask_helpers import poll_for
from parsl_helpers import (
    HTEX,
    THREADS,
    Large,
    cached_total,
    double,
    fails_once,
    filled,
    frame_rows,
    large_total,
    received_as,
    threads_received_as,
    total,
    waits_for,
)
from proxy_patterns.futures import ProxyFuture
from proxy_patterns.plugins.parsl import ParslProxyPlugin, proxied
from proxy_patterns.proxy import is_proxy
from proxy_patterns.store import count_keys, get_store

MiB = 2**20


@pytest.fixture(scope="module")
def shm_spec(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    import shutil
    import tempfile

    directory = tempfile.mkdtemp(prefix="pp-test-parsl-", dir="/dev/shm")
    yield f"shm://{directory}"
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def dfk(shm_spec: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DataFlowKernel]:
    """One DataFlowKernel for the module: HTEX proxied (2 workers), threads not."""
    htex = HighThroughputExecutor(
        label=HTEX,
        address="127.0.0.1",
        max_workers_per_node=2,
        provider=LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1),
    )
    threads = ThreadPoolExecutor(label=THREADS, max_threads=2)
    config = Config(
        executors=[proxied(htex, threshold="1 MiB", store=shm_spec), proxied(threads)],
        run_dir=str(tmp_path_factory.mktemp("runinfo")),
        retries=1,
    )
    # pytest keeps every captured log record, and Parsl logs AppFutures as arguments: records
    # would keep results alive that the tests check are evicted. Parsl's own log file stays.
    parsl_logger = logging.getLogger("parsl")
    parsl_logger.propagate = False
    kernel = parsl.load(config)
    total(1.0).result(timeout=120)  # the workers are up
    yield kernel
    kernel.cleanup()
    parsl.clear()
    parsl_logger.propagate = True
    assert count_keys(get_store(shm_spec)) == 0, "keys left after DataFlowKernel.cleanup()"


@pytest.fixture
def store(dfk: DataFlowKernel, shm_spec: str) -> Iterator[Any]:
    """The executor's store; every key must be gone once the test dropped its futures."""
    s = get_store(shm_spec)
    assert count_keys(s) == 0
    yield s
    _complete_another_task()
    assert poll_for(lambda: count_keys(s) == 0, timeout=10), f"{count_keys(s)} keys left"


def _complete_another_task() -> None:
    """Parsl keeps the record of the last task it completed alive until another completes,
    and a record holds its resolved arguments and the futures it depended on: run one more."""
    total(np.ones(1)).result()
    gc.collect()


def _plugin(dfk: DataFlowKernel) -> ParslProxyPlugin:
    plugin = dfk.executors[HTEX].proxy_patterns  # type: ignore[attr-defined]
    assert isinstance(plugin, ParslProxyPlugin)
    return plugin


def test_the_executor_keeps_its_class_and_threads_stay_untouched(dfk: DataFlowKernel) -> None:
    assert type(dfk.executors[HTEX]) is HighThroughputExecutor
    assert not hasattr(dfk.executors[THREADS], "proxy_patterns")
    x = np.ones(2 * MiB // 8)
    assert threads_received_as(x).result() == ("ndarray", False)
    with pytest.raises(ValueError, match="already proxied"):
        proxied(dfk.executors[HTEX])


def test_large_arguments_travel_as_proxies_put_once(dfk: DataFlowKernel, store: Any) -> None:
    x = np.arange(2 * MiB // 8, dtype=float)
    small = np.ones(10)
    assert received_as(x).result() == ("ndarray", True)
    assert received_as(small).result() == ("ndarray", False)
    futures = [total(x) for _ in range(20)]
    assert count_keys(store) <= 2  # one object (and its record), whatever the number of apps
    assert [f.result() for f in futures] == [float(x.sum())] * 20


def test_results_are_proxies_that_behave_as_the_object(dfk: DataFlowKernel, store: Any) -> None:
    f = filled(2 * MiB // 8, 3.0)
    result = f.result()
    assert is_proxy(result) and isinstance(result, np.ndarray)
    assert float(result.sum()) == 3.0 * 2 * MiB // 8
    assert received_as(f).result() == ("ndarray", True)  # passed on, it stays a proxy
    del f, result
    _complete_another_task()
    assert poll_for(lambda: count_keys(store) == 0, timeout=10)


def test_a_chain_passes_proxies_along(dfk: DataFlowKernel, store: Any) -> None:
    f = filled(2 * MiB // 8, 1.0)
    for _ in range(4):
        f = double(f)
    assert float(total(f).result()) == 16.0 * 2 * MiB // 8
    assert _plugin(dfk).keys_held() <= 5


def test_a_proxy_future_argument_does_not_delay_dispatch(dfk: DataFlowKernel, store: Any) -> None:
    value: ProxyFuture[np.ndarray] = ProxyFuture(store)
    started: ProxyFuture[bool] = ProxyFuture(store)
    app = waits_for(value.proxy(), started)
    assert started.result(timeout=60)  # the app runs while the value does not exist
    assert not app.done()
    value.set_result(np.ones(100))
    assert app.result(timeout=60) == 100.0
    value.evict()
    started.evict()


def test_a_retried_app_gets_its_arguments_again(
    dfk: DataFlowKernel, store: Any, tmp_path: Path
) -> None:
    x = np.ones(2 * MiB // 8)
    assert fails_once(x, str(tmp_path / "marker")).result() == float(x.size)


def test_app_caching_hashes_a_proxy_by_key(dfk: DataFlowKernel, store: Any) -> None:
    f = filled(2 * MiB // 8, 2.0)
    first = cached_total(f).result()
    again = cached_total(f)  # the same result proxy: a cache hit, found without resolving it
    assert first == again.result() == 2.0 * 2 * MiB // 8
    assert not f.result().__proxy_resolved__
    assert again.task_record["from_memo"]
    del f, first, again
    dfk.memoizer.close()  # the cache holds results; a fresh one for the next tests
    dfk.memoizer.start(run_dir=dfk.run_dir, config_run_dir=dfk.config.run_dir)


def test_an_unpicklable_argument_fails_clearly_and_leaves_nothing(
    dfk: DataFlowKernel, store: Any
) -> None:
    x = np.ones(2 * MiB // 8)
    with pytest.raises(SerializationError, match="function total") as raised:
        total(x, Large(i for i in range(3))).result()  # a generator: nobody can send it
    assert "could not put argument 1 (a Large)" in str(raised.value.__cause__)


def test_what_only_parsl_can_serialize_goes_by_value(dfk: DataFlowKernel, store: Any) -> None:
    # pickle cannot take a lock, Parsl's dill can: the argument goes as plain Parsl sends it.
    assert large_total(Large(threading.Lock())).result() == float(2**20)


def test_one_dataframe_to_200_apps_is_not_multiplied(dfk: DataFlowKernel, store: Any) -> None:
    """Parsl issue #1187: one 80 MB DataFrame passed to many apps exhausted memory."""
    df = pd.DataFrame({"a": np.arange(10 * 10**6, dtype=float)})  # 80 MB
    interchange = psutil.Process(dfk.executors[HTEX].interchange_proc.pid)  # type: ignore[attr-defined]
    before = interchange.memory_info().rss
    futures = [frame_rows(df) for _ in range(200)]
    assert count_keys(store) <= 2  # put once
    assert {f.result(timeout=300) for f in futures} == {len(df)}
    assert interchange.memory_info().rss - before < 20 * 2**20  # the bytes never went through
