"""The offline Globus Compute harness (``proxy_patterns.bench.globus_offline``) behaves as the
cloud path does: real results and remote errors, the service's 10 MB submission limit, the
endpoint's 10 MiB result limit, and tasks that run side by side. Every test runs on the
endpoint's process pool and on its default engine (Parsl HTEX, marked slow)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import numpy as np
import pytest
from globus_compute_endpoint.engines.base import GlobusComputeEngineBase
from globus_compute_sdk import Executor
from globus_compute_sdk.errors import TaskExecutionFailed
from globus_sdk import ComputeAPIError

from proxy_patterns.bench.globus_offline import (
    REQUEST_SIZE_LIMIT,
    RESULT_SIZE_LIMIT,
    OfflineCompute,
    htex_engine,
    process_pool_engine,
    started,
)

pytest_plugins = ["globus_helpers"]

_NEAR_LIMIT = 7_000_000  # bytes that serialize (pickle, then base64) to ~9.3 MB: under both


def add_in_worker(x: int, y: int) -> tuple[int, int]:
    return x + y, os.getpid()


def fail_with(message: str) -> None:
    raise ValueError(message)


def length_of(data: bytes | np.ndarray) -> int:
    return len(data) if isinstance(data, bytes) else int(data.nbytes)


def zero_bytes(size: int) -> bytes:
    return bytes(size)


def sleep_in_worker(seconds: float) -> int:
    time.sleep(seconds)  # the workload itself, not a wait for something
    return os.getpid()


@pytest.fixture(
    scope="module", params=["process_pool", pytest.param("htex", marks=pytest.mark.slow)]
)
def globus_engine(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GlobusComputeEngineBase]:
    make = process_pool_engine if request.param == "process_pool" else htex_engine
    with started(make(workers=2), tmp_path_factory.mktemp(request.param)) as engine:
        yield engine


def test_a_function_runs_on_the_engine_and_its_result_comes_back(
    globus_executor: Executor,
) -> None:
    total, worker = globus_executor.submit(add_in_worker, 2, 3).result(timeout=60)
    assert total == 5
    assert worker != os.getpid()


def test_an_exception_in_the_function_comes_back_as_the_remote_error(
    globus_executor: Executor,
) -> None:
    future = globus_executor.submit(fail_with, "no such sample: 42")
    # As from the cloud: the SDK raises TaskExecutionFailed with the remote traceback, not the
    # function's exception type.
    with pytest.raises(TaskExecutionFailed, match="ValueError: no such sample: 42"):
        future.result(timeout=60)


def test_an_argument_over_10_MB_is_refused_by_the_service_with_413(
    globus_compute: OfflineCompute,
) -> None:
    executor = globus_compute.executor
    future = executor.submit(length_of, np.ones(100_000_000, dtype=np.uint8))
    with pytest.raises(ComputeAPIError) as refused:
        future.result(timeout=60)
    assert refused.value.http_status == 413
    assert refused.value.code == "TASK_PAYLOAD_TOO_LARGE"
    assert globus_compute.service.submission_sizes[-1] > 100_000_000
    # The SDK's executor stops after a refused submission: nothing more can be submitted.
    with pytest.raises(RuntimeError, match="is shutdown"):
        executor.submit(length_of, b"")


def test_a_result_over_10_MiB_fails_on_the_endpoint_with_max_result_size_exceeded(
    globus_executor: Executor,
) -> None:
    future = globus_executor.submit(zero_bytes, 100_000_000)
    with pytest.raises(TaskExecutionFailed, match="MaxResultSizeExceeded") as failed:
        future.result(timeout=120)
    assert f"{RESULT_SIZE_LIMIT})" in str(failed.value)  # the limit the endpoint applied


def test_an_argument_and_a_result_just_under_the_limits_go_through(
    globus_compute: OfflineCompute,
) -> None:
    executor = globus_compute.executor
    assert executor.submit(length_of, bytes(_NEAR_LIMIT)).result(timeout=60) == _NEAR_LIMIT
    assert 9_000_000 < globus_compute.service.submission_sizes[-1] <= REQUEST_SIZE_LIMIT
    assert len(executor.submit(zero_bytes, _NEAR_LIMIT).result(timeout=60)) == _NEAR_LIMIT


def test_tasks_run_side_by_side_on_two_workers(globus_executor: Executor) -> None:
    start = time.monotonic()
    futures = [globus_executor.submit(sleep_in_worker, 1.0) for _ in range(2)]
    workers = {future.result(timeout=60) for future in futures}
    elapsed = time.monotonic() - start
    assert len(workers) == 2
    assert 1.0 <= elapsed < 2.0
