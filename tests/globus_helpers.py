"""Pytest fixtures for Globus Compute offline: the real SDK ``Executor`` through a stand-in of the
web service, tasks run by a real endpoint engine (the harness itself, and why it fits the cloud
path, is :mod:`proxy_patterns.bench.globus_offline`).

Test modules use the fixtures with ``pytest_plugins = ["globus_helpers"]``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from globus_compute_endpoint.engines.base import GlobusComputeEngineBase
from globus_compute_sdk import Executor

from proxy_patterns.bench.globus_offline import (
    OfflineCompute,
    offline_globus_compute,
    process_pool_engine,
    started,
)


@pytest.fixture(scope="module")
def globus_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GlobusComputeEngineBase]:
    """A started 2-worker ``ProcessPoolEngine``, shared by a module's tests (override this
    fixture in a module to run its tests on another engine)."""
    with started(process_pool_engine(workers=2), tmp_path_factory.mktemp("endpoint")) as engine:
        yield engine


@pytest.fixture
def globus_compute(globus_engine: GlobusComputeEngineBase) -> Iterator[OfflineCompute]:
    """A real ``Executor`` whose tasks run on ``globus_engine``, through the stand-in service."""
    with offline_globus_compute(globus_engine) as compute:
        yield compute


@pytest.fixture
def globus_executor(globus_compute: OfflineCompute) -> Executor:
    """The executor of :func:`globus_compute`."""
    return globus_compute.executor
