"""ProxyFuture: write-once, event-driven, exceptions and cancellation across processes."""

from __future__ import annotations

import gc
import multiprocessing
import os
import pickle
import signal
import threading
import time
from concurrent.futures import CancelledError, InvalidStateError
from typing import Any

import numpy as np
import pytest
from proxystore.proxy import Proxy, extract
from proxystore.store import Store

from dask_helpers import Signal, wait_until
from proxy_patterns.futures import ProxyFuture
from proxy_patterns.rendezvous import ProducerLostError
from proxy_patterns.store import count_entries
from waiters import waiting_on, wake_only_on_events


class MissionAborted(Exception):
    """A user exception class that must reach consumers as itself."""


def _resolve_in_child(p: Proxy[Any], conn: Any, events_only: bool) -> None:
    if events_only:
        wake_only_on_events()
    try:
        conn.send(("ok", float(np.asarray(extract(p)).sum())))
    except BaseException as e:  # the consumer reports what it raised
        conn.send(("raised", type(e), str(e)))


def _start_consumer(p: Proxy[Any], events_only: bool = False) -> tuple[Any, Any]:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_resolve_in_child, args=(p, child, events_only), daemon=True)
    proc.start()
    return proc, parent


@pytest.mark.parametrize("store_spec", ["shm", "redis"], indirect=True)
def test_consumers_before_and_after_the_producer(store: Store[Any]) -> None:
    """Consumers blocked on the value are woken by its set, not by polling (theirs is an hour
    apart); a consumer that comes after the set reads it at once."""
    fut: ProxyFuture[np.ndarray] = ProxyFuture(store)
    early = [_start_consumer(fut.proxy(), events_only=True) for _ in range(2)]
    wait_until(
        lambda: waiting_on(store, fut.key, [proc.pid for proc, _ in early]) == 2,
        timeout=60,
        message="both consumers wait on the value",
    )
    fut.set_result(np.ones(1000))
    late = _start_consumer(fut.proxy())
    for proc, conn in [*early, late]:
        assert conn.poll(30), "a consumer waiting on the value was not woken by its set"
        assert conn.recv() == ("ok", 1000.0)
        proc.join(30)
    fut.evict()


@pytest.mark.parametrize("store_spec", ["shm", "redis"], indirect=True)
def test_write_once(store: Store[Any]) -> None:
    fut: ProxyFuture[int] = ProxyFuture(store)
    fut.set_result(1)
    with pytest.raises(InvalidStateError, match="already set"):
        fut.set_result(2)
    with pytest.raises(InvalidStateError):
        fut.set_exception(ValueError())
    assert not fut.cancel()
    assert fut.result() == 1 and extract(fut.proxy()) == 1
    fut.evict()


@pytest.mark.parametrize("store_spec", ["shm", "redis"], indirect=True)
def test_exception_reaches_consumers_as_itself(store: Store[Any]) -> None:
    fut: ProxyFuture[Any] = ProxyFuture(store)
    proc, conn = _start_consumer(fut.proxy())
    fut.set_exception(MissionAborted("fuel low"))
    assert conn.recv() == ("raised", MissionAborted, "fuel low")
    proc.join(30)
    with pytest.raises(MissionAborted, match="fuel low"):
        fut.result()
    assert isinstance(fut.exception(), MissionAborted)
    fut.evict()


def test_cancel(shm_store: Store[Any]) -> None:
    fut: ProxyFuture[Any] = ProxyFuture(shm_store)
    assert fut.cancel() and fut.cancelled() and fut.done()
    with pytest.raises(CancelledError):
        extract(pickle.loads(pickle.dumps(fut.proxy())))
    fut.evict()


def test_timeout(shm_store: Store[Any]) -> None:
    fut: ProxyFuture[Any] = ProxyFuture(shm_store, timeout=0.2)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"not set within 0\.2 s"):
        extract(fut.proxy())
    assert 0.2 <= time.monotonic() - start < 2  # measured: 0.20 s
    with pytest.raises(TimeoutError):
        fut.result(timeout=0.1)
    fut.evict()


def test_done_callbacks(shm_store: Store[Any]) -> None:
    fut: ProxyFuture[int] = ProxyFuture(shm_store)
    called = threading.Event()
    seen: list[int] = []
    fut.add_done_callback(lambda f: (seen.append(f.result()), called.set()))
    assert not fut.done()
    fut.set_result(7)
    assert called.wait(5) and seen == [7]
    fut.evict()


def _set(fut: ProxyFuture[Any], value: Any) -> None:
    fut.set_result(value)


def _hang_until_killed(fut: ProxyFuture[Any], conn: Any) -> None:
    conn.send("claimed")  # unpickling the future made this process its producer
    conn.recv()  # nothing is sent: it waits until it is killed


def test_a_task_can_receive_and_set_the_future(shm_store: Store[Any]) -> None:
    fut: ProxyFuture[str] = ProxyFuture(shm_store)
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_set, args=(fut, "from another process"))
    proc.start()
    assert fut.result(timeout=30) == "from another process"
    proc.join(30)
    fut.evict()


@pytest.mark.parametrize("store_spec", ["shm", "redis"], indirect=True)
def test_dead_producer_is_an_error_not_a_hang(store: Store[Any]) -> None:
    fut: ProxyFuture[Any] = ProxyFuture(store)
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    producer = ctx.Process(target=_hang_until_killed, args=(fut, child))
    producer.start()
    assert parent.recv() == "claimed"
    consumer, conn = _start_consumer(fut.proxy())
    os.kill(producer.pid, signal.SIGKILL)
    producer.join(30)
    assert conn.poll(120), "the consumer of a dead producer hung"  # measured: 3 s, 8 s (Redis)
    status, kind, _ = conn.recv()
    consumer.join(30)
    assert (status, kind) == ("raised", ProducerLostError)
    fut.evict()


def test_future_needs_a_store_that_can_wait(tmp_path: Any) -> None:
    from proxy_patterns.store import get_store

    with pytest.raises(TypeError, match="shared-memory or Redis"):
        ProxyFuture(get_store(f"file://{tmp_path}"))


# --- with Dask ---------------------------------------------------------------------------
def _consume(p: Any) -> float:
    return float(np.asarray(p).sum())


def _produce(fut: ProxyFuture[np.ndarray], n: int) -> None:
    fut.set_result(np.ones(n))


def _produce_when(go: Signal, fut: ProxyFuture[np.ndarray], n: int) -> None:
    go.wait()
    _produce(fut, n)


@pytest.mark.timeout(60)  # a submit that resolved the proxy would wait for ever
@pytest.mark.parametrize("with_plugin", [False, True], ids=["plain", "plugin"])
def test_dask_submit_of_an_unset_future_returns_at_once(
    shm_dir: str, shm_store: Store[Any], with_plugin: bool
) -> None:
    from distributed import Client, LocalCluster

    from proxy_patterns.plugins.dask import register

    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        if with_plugin:
            register(client, store=f"shm://{shm_dir}")
        fut: ProxyFuture[np.ndarray] = ProxyFuture(shm_store)
        # Returns although the value is set only afterwards: pure, so tokenized, not resolved.
        consumer = client.submit(_consume, fut.proxy())
        producer = client.submit(_produce, fut, 2_000_000, pure=False)
        assert consumer.result(timeout=30) == 2_000_000.0
        producer.result(timeout=30)
        fut.evict()


@pytest.mark.parametrize("store_spec", ["shm", "redis"], indirect=True)
def test_the_value_lives_while_the_future_or_a_local_proxy_does(store: Store[Any]) -> None:
    fut: ProxyFuture[np.ndarray] = ProxyFuture(store)
    p = fut.proxy()
    fut.set_result(np.ones(10))
    del fut
    gc.collect()
    assert float(np.sum(p)) == 10.0  # the proxy keeps its future
    assert count_entries(store) > 0
    del p
    gc.collect()
    assert count_entries(store) == 0  # nothing can read it any more: evicted with its claim


def test_setting_a_released_future_is_an_error(shm_store: Store[Any]) -> None:
    fut: ProxyFuture[int] = ProxyFuture(shm_store)
    producer_copy = pickle.loads(pickle.dumps(fut))  # as a producer task receives it
    del fut
    gc.collect()
    with pytest.raises(InvalidStateError, match="was released"):
        producer_copy.set_result(1)
    assert count_entries(shm_store) == 0


def test_with_the_dask_plugin_a_graph_holds_the_future(
    shm_dir: str, shm_store: Store[Any], tmp_path: Any
) -> None:
    """The client drops its future right after submitting: the tasks that carry it hold its
    key until Dask forgets them; then it is evicted without an explicit evict()."""
    from distributed import Client, LocalCluster

    from proxy_patterns.plugins.dask import register

    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        register(client, store=f"shm://{shm_dir}")
        fut: ProxyFuture[np.ndarray] = ProxyFuture(shm_store)
        go = Signal(str(tmp_path))
        consumer = client.submit(_consume, fut.proxy())
        producer = client.submit(_produce_when, go, fut, 2_000_000, pure=False)
        del fut
        gc.collect()
        go.set()  # the producer sets the value only now that the client's future is gone
        assert consumer.result(timeout=30) == 2_000_000.0
        producer.result(timeout=30)
        assert count_entries(shm_store) > 0  # the futures still hold the tasks, and so the key
        del consumer, producer
        wait_until(lambda: count_entries(shm_store) == 0, message="the tasks' release evicts it")


# --- with Globus Compute -------------------------------------------------------------------
GLOBUS_COMPUTE_PAYLOAD_LIMIT = 10 * 2**20  # the web service refuses larger task payloads


@pytest.mark.timeout(60)  # a serialization that resolved the proxy would wait for ever
def test_globus_compute_submission_of_an_unset_future_returns_at_once(
    shm_store: Store[Any],
) -> None:
    """The SDK's own batch serialization (what ``Executor.submit`` sends) takes the proxy of
    a value that does not exist yet, without resolving it; the endpoint side resolves it."""
    import uuid

    from globus_compute_sdk.sdk.batch import Batch
    from globus_compute_sdk.serialize import ComputeSerializer

    fut: ProxyFuture[np.ndarray] = ProxyFuture(shm_store)
    batch = Batch(task_group_id=None)
    batch.add(uuid.uuid4(), args=(fut.proxy(),))  # a resolve would wait for ever: set later
    [[payload]] = batch.tasks.values()
    assert len(payload) < 10_000 < GLOBUS_COMPUTE_PAYLOAD_LIMIT
    fut.set_result(np.ones(2 * GLOBUS_COMPUTE_PAYLOAD_LIMIT // 8))  # twice what it could carry
    serde = ComputeSerializer()  # the endpoint's side, also the SDK's
    args, kwargs = (serde.deserialize(b) for b in serde.unpack_buffers(payload))
    assert kwargs == {}
    assert float(np.asarray(args[0]).sum()) == 2 * GLOBUS_COMPUTE_PAYLOAD_LIMIT // 8
    del args
    fut.evict()
