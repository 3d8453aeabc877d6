"""The Globus Compute plugin on the real path: the SDK's ``Executor``, a stand-in of the service
that refuses submissions over 10 MB, the endpoint's real engine that refuses results over
10 MiB (``proxy_patterns.bench.globus_offline``). What the plain executor cannot do, ours
does, with the same functions, and leaves the store empty; on shared memory and on a real
Redis."""

from __future__ import annotations

import functools
import gc
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from globus_compute_endpoint.engines.base import GlobusComputeEngineBase
from globus_compute_sdk.errors import TaskExecutionFailed
from globus_sdk import ComputeAPIError
from proxystore.store import Store

import proxy_patterns.plugins.globus_compute as globus_plugin
from conftest import assert_empty_and_close
from proxy_patterns.bench.globus_offline import (
    OfflineCompute,
    htex_engine,
    process_pool_engine,
    started,
)
from proxy_patterns.futures import ProxyFuture
from proxy_patterns.ownership import OwnedProxy
from proxy_patterns.plugins.globus_compute import (
    GlobusFuture,
    ProxiedExecutor,
    SubmissionTooLargeError,
    proxied,
    proxy_io,
)
from proxy_patterns.store import entries_left_after_eviction, get_store
from proxy_patterns.streams import StreamConsumer, StreamProducer

pytest_plugins = ["globus_helpers"]

BIG = 100_000_000


@dataclass
class Sample:
    name: str
    reads: bytes


def checksum(data: Any) -> int:
    """A function whose argument may be 100 MB (as array, bytes or a dataclass of bytes)."""
    if isinstance(data, Sample):
        data = data.reads
    return int(np.frombuffer(data, dtype=np.uint8)[::4096].sum())


def make_big(n: int) -> np.ndarray:
    return np.full(n, 3, dtype=np.uint8)


def stage(previous: Any) -> tuple[float, int]:
    """A stage of a chain: starts (its start time is returned), then reads the previous
    stage's result, a proxy future's proxy that waits for the value."""
    started = time.time()
    return started, previous[1] + 1


def produce_first(delay: float) -> tuple[float, int]:
    started = time.time()
    time.sleep(delay)  # the producing stage's work
    return started, 1


def fail(message: str) -> None:
    raise ValueError(message)


def set_future(future: ProxyFuture[Any], n: int) -> None:
    future.set_result(make_big(n))


def stream_items(topic: str, spec: str, count: int) -> int:
    with StreamProducer(topic, get_store(spec)) as producer:
        for i in range(count):
            producer.send(make_big(1_000_000) * 0 + i, metadata={"i": i})
    return count


def sampled_sum(array: Any) -> int:
    """Reads every 4096th element (a proxy resolves where it runs)."""
    return int(array[::4096].sum())


@proxy_io
def big_result(n: int) -> np.ndarray:
    return make_big(n)


@pytest.fixture(
    scope="module", params=["process_pool", pytest.param("htex", marks=pytest.mark.slow)]
)
def globus_engine(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GlobusComputeEngineBase]:
    """The endpoint's process pool, and its default engine (Parsl HTEX); three workers, so a
    chain of three functions can run at once."""
    make = process_pool_engine if request.param == "process_pool" else htex_engine
    with started(make(workers=3), tmp_path_factory.mktemp(request.param)) as engine:
        yield engine


@pytest.fixture(params=["shm", "redis"])
def spec(request: pytest.FixtureRequest, shm_dir: str) -> str:
    if request.param == "shm":
        return f"shm://{shm_dir}"
    return str(request.getfixturevalue("redis_url"))


@pytest.fixture
def store(spec: str) -> Iterator[Store[Any]]:
    s = get_store(spec)
    yield s
    gc.collect()  # futures of the test (they own their values) are gone
    assert entries_left_after_eviction(s, timeout=10) == 0
    assert_empty_and_close(s)


@pytest.fixture
def executor(globus_compute: OfflineCompute, spec: str, store: Store[Any]) -> ProxiedExecutor:
    return proxied(globus_compute.executor, store=spec)


@pytest.mark.parametrize(
    "argument",
    [
        pytest.param(lambda: make_big(BIG), id="ndarray"),
        pytest.param(lambda: bytes(BIG), id="bytes"),
        pytest.param(lambda: Sample("s1", bytes(BIG)), id="dataclass"),
    ],
)
def test_a_100_MB_argument_the_service_refuses_goes_through_the_store(
    executor: ProxiedExecutor, globus_compute: OfflineCompute, argument: Any
) -> None:
    value = argument()
    assert executor.submit(checksum, value).result(timeout=120) == checksum(value)
    assert max(globus_compute.service.submission_sizes) < 100_000  # only the proxy went


def test_the_plain_executor_refuses_what_ours_sends(globus_compute: OfflineCompute) -> None:
    with pytest.raises(ComputeAPIError) as refused:
        globus_compute.executor.submit(checksum, make_big(BIG)).result(timeout=120)
    assert refused.value.http_status == 413


def test_a_100_MB_result_comes_back_through_the_store(
    executor: ProxiedExecutor, globus_compute: OfflineCompute
) -> None:
    with pytest.raises(TaskExecutionFailed, match="MaxResultSizeExceeded"):
        globus_compute.executor.submit(make_big, BIG).result(timeout=120)  # plain
    result = executor.submit(make_big, BIG).result(timeout=120)
    assert type(result) is np.ndarray
    assert result.nbytes == BIG
    assert int(result[::4096].sum()) == 3 * len(range(0, BIG, 4096))


def test_a_chain_of_three_linked_by_futures_starts_at_once(executor: ProxiedExecutor) -> None:
    a = executor.submit(produce_first, 2.0)
    b = executor.submit(stage, a)  # Globus futures cannot be arguments; ours can
    c = executor.submit(stage, b)
    assert isinstance(b, GlobusFuture)
    c_started, c_total = c.result(timeout=60)
    a_started, _ = a.result()
    b_started, b_total = b.result()
    assert (b_total, c_total) == (2, 3)
    # All three started before a finished (its 2 s of work): b and c waited only to read.
    assert max(b_started, c_started) - a_started < 1.0


def test_a_failed_function_fails_its_future_and_the_functions_passed_it(
    executor: ProxiedExecutor,
) -> None:
    a = executor.submit(fail, "no such sample")
    b = executor.submit(stage, a)
    with pytest.raises(TaskExecutionFailed, match="ValueError: no such sample"):
        a.result(timeout=60)
    with pytest.raises(TaskExecutionFailed, match="ValueError: no such sample"):
        b.result(timeout=60)


def test_one_argument_passed_to_many_functions_is_put_once(executor: ProxiedExecutor) -> None:
    data = make_big(20_000_000)
    futures = [executor.submit(checksum, data) for _ in range(3)]
    assert [f.result(timeout=120) for f in futures] == [checksum(data)] * 3
    assert executor.arguments.bytes_put < 2 * data.nbytes
    assert executor.keys_held() == 0


def test_an_oversized_submission_is_refused_before_the_service_stops_the_executor(
    executor: ProxiedExecutor,
) -> None:
    halves = [bytes(900_000) for _ in range(15)]  # each under the 1 MiB threshold
    with pytest.raises(SubmissionTooLargeError, match="lower the threshold"):
        executor.submit(len, *halves)
    assert executor.submit(len, b"xy").result(timeout=60) == 2  # the executor still works


def test_shared_memory_of_another_host_fails_at_once_with_what_to_configure(
    globus_compute: OfflineCompute, shm_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = get_store(f"shm://{shm_dir}")
    monkeypatch.setattr(globus_plugin, "host_identity", lambda: "laptop/0000")
    executor = proxied(globus_compute.executor, store=f"shm://{shm_dir}")
    with pytest.raises(TaskExecutionFailed, match=r"StoreUnreachableError.*laptop.*redis://"):
        executor.submit(checksum, make_big(BIG)).result(timeout=120)
    del executor
    gc.collect()
    assert entries_left_after_eviction(store, timeout=10) == 0
    assert_empty_and_close(store)


def test_inside_functions_futures_streams_and_owned_results_work(
    globus_compute: OfflineCompute, spec: str, store: Store[Any]
) -> None:
    plain = globus_compute.executor
    future: ProxyFuture[np.ndarray] = ProxyFuture(store)
    plain.submit(set_future, future, 2_000_000).result(timeout=60)
    assert int(future.result(timeout=10).sum()) == 6_000_000
    del future

    consumer = StreamConsumer("globus-items", store, timeout=60)
    sent = plain.submit(stream_items, "globus-items", spec, 3)
    assert [int(item[0]) for item in consumer] == [0, 1, 2]
    consumer.close()
    assert sent.result(timeout=60) == 3

    result = plain.submit(big_result, BIG).result(timeout=120)  # over the 10 MiB result limit
    assert isinstance(result, OwnedProxy)
    assert int(result[::4096].sum()) == 3 * len(range(0, BIG, 4096))
    del result


def test_map_and_shutdown_as_concurrent_futures(executor: ProxiedExecutor) -> None:
    results = executor.map(checksum, [bytes(10), make_big(2_000_000)], timeout=60)
    assert list(results) == [0, checksum(make_big(2_000_000))]
    executor.shutdown()
    assert executor.keys_held() == 0


def test_a_stream_dispatched_to_globus_compute(
    executor: ProxiedExecutor, store: Store[Any]
) -> None:
    """Items over the service's limit go producer -> store -> endpoint: only proxies pass the
    dispatcher and the service."""
    consumer = StreamConsumer[Any]("to-globus", store, auto_ack=False, timeout=60)
    with StreamProducer[Any]("to-globus", store) as producer:
        for i in range(3):
            producer.send(np.full(20_000_000, i, dtype=np.uint8))
    results: list[int] = []
    tasks = consumer.dispatch(
        functools.partial(executor.submit, sampled_sum),
        on_done=lambda done: results.append(done.result()),
    )
    consumer.close()
    assert tasks == 3
    assert sorted(results) == [i * len(range(0, 20_000_000, 4096)) for i in range(3)]
