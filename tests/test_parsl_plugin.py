r"""The Parsl option on a real HighThroughputExecutor (LocalProvider, 2 workers) beside a
ThreadPoolExecutor that stays untouched.

Apps receive real objects and ``AppFuture.result()`` is the real object, as without the
plugin; the bytes go through the store. Parsl's log records (which hold ``AppFuture``\ s and
their arguments) are kept for the whole module by a handler that never lets go of them, as
pytest's log capture or a notebook's handler may: eviction must not depend on them.
"""

from __future__ import annotations

import logging
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import parsl
import psutil
import pytest
import task_objects
from parsl import Config, HighThroughputExecutor, ThreadPoolExecutor
from parsl.dataflow.dflow import DataFlowKernel
from parsl.dataflow.errors import DependencyError
from parsl.dataflow.states import States
from parsl.providers import LocalProvider
from parsl.serialize.errors import SerializationError

from dask_helpers import poll_for, wait_until
from parsl_helpers import (
    HTEX,
    THREADS,
    Large,
    cached_length,
    double,
    fails_once,
    fails_with,
    filled,
    fingerprint_app,
    fingerprint_when,
    frame_rows,
    large_total,
    make_app,
    make_when,
    received_as,
    text,
    threads_received_as,
    total,
    waits_for,
)
from proxy_patterns.futures import ProxyFuture
from proxy_patterns.plugins.parsl import ParslProxyPlugin, proxied
from proxy_patterns.proxy import is_proxy
from proxy_patterns.store import count_entries, get_store

MiB = 2**20


class KeepsRecords(logging.Handler):
    """A handler that keeps every record it sees, with the objects logged as arguments."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def shm_spec(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    import shutil
    import tempfile

    directory = tempfile.mkdtemp(prefix="pp-test-parsl-", dir="/dev/shm")
    yield f"shm://{directory}"
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def kept_records() -> Iterator[KeepsRecords]:
    """Every Parsl log record of the module, kept (with their AppFutures) until it ends."""
    handler = KeepsRecords()
    parsl_logger = logging.getLogger("parsl")
    level = parsl_logger.level
    parsl_logger.addHandler(handler)
    parsl_logger.setLevel(logging.DEBUG)
    yield handler
    parsl_logger.removeHandler(handler)
    parsl_logger.setLevel(level)


@pytest.fixture(scope="module")
def dfk(
    shm_spec: str, tmp_path_factory: pytest.TempPathFactory, kept_records: KeepsRecords
) -> Iterator[DataFlowKernel]:
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
    kernel = parsl.load(config)
    total(1.0).result(timeout=120)  # the workers are up
    yield kernel
    kernel.cleanup()
    parsl.clear()
    assert count_entries(get_store(shm_spec)) == 0, "entries left after DataFlowKernel.cleanup()"


@pytest.fixture
def store(dfk: DataFlowKernel, shm_spec: str, kept_records: KeepsRecords) -> Iterator[Any]:
    """The executor's store; every key must be gone once the test's apps are done, whatever
    the test still holds (its AppFutures, results, and the records kept of them)."""
    s = get_store(shm_spec)
    assert count_entries(s) == 0
    yield s
    assert kept_records.records, "no Parsl record was kept: the test cannot see their effect"
    assert poll_for(lambda: count_entries(s) == 0, timeout=10), f"{count_entries(s)} entries left"


def _plugin(dfk: DataFlowKernel) -> ParslProxyPlugin:
    plugin = dfk.executors[HTEX].proxy_patterns  # type: ignore[attr-defined]
    assert isinstance(plugin, ParslProxyPlugin)
    return plugin


def _proxied_bytes(dfk: DataFlowKernel) -> int:
    return _plugin(dfk).stats()["bytes_proxied"]


def test_the_executor_keeps_its_class_and_threads_stay_untouched(dfk: DataFlowKernel) -> None:
    assert type(dfk.executors[HTEX]) is HighThroughputExecutor
    assert not hasattr(dfk.executors[THREADS], "proxy_patterns")
    x = np.ones(2 * MiB // 8)
    assert threads_received_as(x).result() == ("ndarray", False)
    with pytest.raises(ValueError, match="already proxied"):
        proxied(dfk.executors[HTEX])


def test_large_arguments_travel_as_proxies_put_once(dfk: DataFlowKernel, store: Any) -> None:
    x = np.arange(2 * MiB // 8, dtype=float)
    before = _proxied_bytes(dfk)
    assert received_as(np.ones(10)).result() == ("ndarray", False)
    assert _proxied_bytes(dfk) == before  # small: by value
    gate: ProxyFuture[bool] = ProxyFuture(store)
    holding = fingerprint_when(gate.proxy(), x)  # holds x until the gate is set
    futures = [total(x) for _ in range(20)]
    wait_until(lambda: all(f.task_record["status"] != States.pending for f in futures))
    gate.set_result(True)
    assert [f.result() for f in futures] == [float(x.sum())] * 20
    assert holding.result() == task_objects.fingerprint(x)
    assert x.nbytes <= _proxied_bytes(dfk) - before < 2 * x.nbytes  # put once
    gate.evict()


@pytest.mark.parametrize("case", task_objects.CASES)
def test_every_kind_of_argument_is_proxied_and_arrives_as_itself(
    dfk: DataFlowKernel, store: Any, case: str
) -> None:
    obj = task_objects.make(case, seed=1)
    before = _proxied_bytes(dfk)
    assert fingerprint_app(obj).result() == task_objects.fingerprint(obj)
    assert _proxied_bytes(dfk) - before > MiB  # through the store, not the interchange


@pytest.mark.parametrize("case", task_objects.CASES)
def test_every_kind_of_result_is_proxied_and_read_as_itself(
    dfk: DataFlowKernel, store: Any, case: str
) -> None:
    expected = task_objects.make(case, seed=2)
    before = _proxied_bytes(dfk)
    gate: ProxyFuture[bool] = ProxyFuture(store)
    f = make_when(gate.proxy(), case, 2)
    # Three dependent apps (on both workers) wait for it; they get the proxy it comes as.
    dependents = [fingerprint_app(f) for _ in range(3)]
    gate.set_result(True)
    result = f.result()
    assert not is_proxy(result) and type(result) is type(expected)
    assert task_objects.fingerprint(result) == task_objects.fingerprint(expected)
    assert [d.result() for d in dependents] == [task_objects.fingerprint(expected)] * 3
    delivered = _proxied_bytes(dfk) - before
    assert MiB < delivered < 1.5 * task_objects.NBYTES, "the result was put more than once"
    gate.evict()


def test_a_result_passed_on_later_is_put_again_once(dfk: DataFlowKernel, store: Any) -> None:
    f = make_app("bytes", 3)
    result = f.result()
    assert zlib.crc32(result) == zlib.crc32(task_objects.make("bytes", 3))  # buffer protocol
    before = _proxied_bytes(dfk)
    gate: ProxyFuture[bool] = ProxyFuture(store)
    later = [fingerprint_when(gate.proxy(), f), fingerprint_app(result), fingerprint_app(f)]
    wait_until(lambda: all(app.task_record["status"] != States.pending for app in later))
    gate.set_result(True)  # the first app held the argument while the others were submitted
    assert [d.result() for d in later] == [task_objects.fingerprint(result)] * 3
    assert _proxied_bytes(dfk) - before < 1.5 * task_objects.NBYTES
    gate.evict()


def test_results_are_real_objects_evicted_while_their_futures_live(
    dfk: DataFlowKernel, store: Any
) -> None:
    f = filled(2 * MiB // 8, 3.0)
    result = f.result()
    assert type(result) is np.ndarray and float(result.sum()) == 3.0 * 2 * MiB // 8
    assert received_as(f).result() == ("ndarray", False)  # passed on, it arrives as itself
    # The future, the result and Parsl's records of both are all alive: the key goes anyway
    # (on shared memory the result stays a valid mapping).
    assert poll_for(lambda: count_entries(store) == 0, timeout=10)
    assert float(result.sum()) == 3.0 * 2 * MiB // 8 and f.done()


def test_a_chain_passes_proxies_along(dfk: DataFlowKernel, store: Any) -> None:
    n = 2 * MiB // 8
    before = _proxied_bytes(dfk)
    f = filled(n, 1.0)
    for _ in range(4):
        f = double(f)
    assert float(total(f).result()) == 16.0 * n
    assert _proxied_bytes(dfk) - before < 5.5 * n * 8  # each result put once, never again
    assert _plugin(dfk).keys_held() <= 2


def test_an_app_that_raises_leaves_nothing(dfk: DataFlowKernel, store: Any) -> None:
    x = task_objects.make("dataclass", seed=4)
    with pytest.raises(ValueError, match="on purpose"):
        fails_with(x, "on purpose").result()
    dependent = fingerprint_app(fails_with(x, "again"))  # its dependency failed
    with pytest.raises(DependencyError):
        dependent.result()


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


def test_app_caching_sees_the_real_result(dfk: DataFlowKernel, store: Any) -> None:
    f = text(2 * MiB)
    first = cached_length(f).result()
    again = cached_length(f)  # the same result object: a cache hit, as without the plugin
    assert first == again.result() == 2 * MiB
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
    assert "could not put argument 1 (a Large: " in str(raised.value.__cause__)


def test_what_only_parsl_can_serialize_goes_by_value(dfk: DataFlowKernel, store: Any) -> None:
    # pickle cannot take a lock, Parsl's dill can: the argument goes as plain Parsl sends it.
    assert large_total(Large(threading.Lock())).result() == float(2**20)


def test_one_dataframe_to_200_apps_is_not_multiplied(dfk: DataFlowKernel, store: Any) -> None:
    """Parsl issue #1187: one 80 MB DataFrame passed to many apps exhausted memory."""
    df = pd.DataFrame({"a": np.arange(10 * 10**6, dtype=float)})  # 80 MB
    interchange = psutil.Process(dfk.executors[HTEX].interchange_proc.pid)  # type: ignore[attr-defined]
    before = interchange.memory_info().rss
    futures = [frame_rows(df) for _ in range(200)]
    assert count_entries(store) <= 2  # put once
    assert {f.result(timeout=300) for f in futures} == {len(df)}
    assert interchange.memory_info().rss - before < 20 * 2**20  # the bytes never went through
