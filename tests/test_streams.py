"""Streaming queues on both brokers (shared memory, a real Redis): producers and consumers in
other processes, work-queue and broadcast modes, acks and release, back-pressure, every kind
of item, and dispatch to Dask and Parsl. Every test leaves the store empty, the broker's own
keys included. Process-killing tests are in ``test_stream_faults.py``.
"""

from __future__ import annotations

import concurrent.futures
import functools
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import parsl
import pytest
import task_objects
from distributed import Client, LocalCluster
from parsl import Config, HighThroughputExecutor
from parsl.dataflow.dflow import DataFlowKernel
from parsl.providers import LocalProvider
from proxystore.proxy import extract, is_resolved
from proxystore.store import Store

from parsl_helpers import HTEX, stream_item_app
from proxy_patterns.futures import ProxyFuture
from proxy_patterns.plugins.dask import register, unregister
from proxy_patterns.proxy import is_proxy, key_of
from proxy_patterns.serialize import dumps
from proxy_patterns.store import count_entries, entries_left_after_eviction, get_store
from proxy_patterns.streams import (
    DEFAULT_THRESHOLD,
    StreamConsumer,
    StreamEndedError,
    StreamFullError,
    StreamProducer,
    StreamTimeoutError,
)
from stream_helpers import (
    Children,
    checked,
    consume,
    consume_holding,
    is_large,
    item,
    items,
    items_stored,
    new_topic,
    produce,
)

pytestmark = [
    pytest.mark.parametrize("store_spec", ["shm", "redis"], indirect=True),
    pytest.mark.timeout(120),
]

N = 12
"""Items per producer: 6 large, 6 small."""
LARGE_ITEMS = sum(is_large(i) for i in range(N))


def _ids(name: str, count: int = N) -> list[tuple[str, int]]:
    return [(name, i) for i in range(count)]


def _send(store: Store[Any], topic: str, count: int = N, **options: Any) -> None:
    with StreamProducer[np.ndarray](topic, store, **options) as producer:
        for i in range(count):
            producer.send(item(i), metadata={"producer": "test", "i": i})


def _not_ended(consumer: StreamConsumer[Any]) -> None:
    """The consumer finds no item, and no end, in half a second: the stream goes on."""
    timeout, consumer.timeout = consumer.timeout, 0.5
    with pytest.raises(StreamTimeoutError, match=consumer.topic):
        consumer.next_item()
    consumer.timeout = timeout


# --- many producers -------------------------------------------------------------------------
def test_two_producer_processes_one_consumer(
    store_spec: str, store: Store[Any], children: Children
) -> None:
    """Every item arrives exactly once, in each producer's order; the stream ends once, when
    the second producer closes, not when the first does."""
    topic = new_topic()
    consumer = StreamConsumer[Any](topic, store, timeout=30)
    b_opened, b_sent, b_close = children.event(), children.event(), children.event()
    b = children.start(produce, store_spec, topic, "b", N, b_opened, b_sent, b_close)
    assert b_opened.wait(60)
    children.start(produce, store_spec, topic, "a", N).result()  # sent all, and closed
    assert b_sent.wait(60)
    got = [checked(consumer.next_item()) for _ in range(2 * N)]
    assert sorted(got) == _ids("a") + _ids("b")
    assert [i for name, i in got if name == "a"] == list(range(N))
    assert [i for name, i in got if name == "b"] == list(range(N))
    _not_ended(consumer)  # a closed, b not yet
    b_close.set()
    b.result()
    with pytest.raises(StopIteration):
        consumer.next_item()
    with pytest.raises(StopIteration):  # ended, and stays so
        consumer.next_item()
    consumer.close()


def test_producers_2_waits_for_a_second_producer_that_opens_late(
    store_spec: str, store: Store[Any], children: Children
) -> None:
    """The first producer says two will come: its close does not end the stream (a consumer
    subscribed before either), and the second can still open after it."""
    topic = new_topic()
    consumer = StreamConsumer[Any](topic, store, timeout=30)
    children.start(produce, store_spec, topic, "a", N, None, None, None, 2).result()
    assert [checked(consumer.next_item()) for _ in range(N)] == _ids("a")
    _not_ended(consumer)
    children.start(produce, store_spec, topic, "b", N).result()
    assert [checked(got) for got in items(consumer)] == _ids("b")
    consumer.close()


# --- many consumers -------------------------------------------------------------------------
def test_two_consumer_processes_in_work_mode_partition_the_items(
    store_spec: str, store: Store[Any], children: Children
) -> None:
    topic = new_topic()
    subscribed = [children.event() for _ in range(2)]
    both_took_one = children.barrier(2)  # so that neither takes everything alone
    consumers = [
        children.start(consume, store_spec, topic, "work", event, both_took_one)
        for event in subscribed
    ]
    assert all(event.wait(60) for event in subscribed)
    _send(store, topic, 4 * N)
    first, second = (c.result() for c in consumers)
    assert first and second
    assert not set(first) & set(second)
    assert sorted(first + second) == _ids("test", 4 * N)
    assert first == sorted(first) and second == sorted(second)  # each in sending order


def test_broadcast_every_consumer_sees_every_item_evicted_once_both_acked(
    store_spec: str, store: Store[Any], children: Children
) -> None:
    topic = new_topic()
    subscribed = [children.event() for _ in range(2)]
    took, ack = children.queue(), children.event()
    eager = children.start(consume, store_spec, topic, "broadcast", subscribed[0], None)
    holding = children.start(consume_holding, store_spec, topic, N, subscribed[1], took, ack)
    assert all(event.wait(60) for event in subscribed)
    _send(store, topic, mode="broadcast")
    assert eager.result() == _ids("test")  # consumed and acked every item, and left
    keys = took.get(timeout=60)
    assert len(keys) == LARGE_ITEMS
    assert all(store.exists(key) for key in keys), "evicted while a consumer still held it"
    ack.set()
    assert holding.result() == _ids("test")
    assert not any(store.exists(key) for key in keys)


# --- back-pressure --------------------------------------------------------------------------
@pytest.mark.parametrize("bound", ["items", "bytes"])
def test_back_pressure_blocks_send_until_an_ack(store: Store[Any], bound: str) -> None:
    """With 2 items un-acked, ``send`` blocks (taking an item is not enough) and resumes on
    the ack; with ``timeout`` it raises StreamFullError naming the stream."""
    topic = new_topic()
    nbytes = dumps(item(0)).nbytes
    limit: dict[str, Any] = (
        {"max_in_flight": 2} if bound == "items" else {"max_bytes_in_flight": int(2.5 * nbytes)}
    )
    consumer = StreamConsumer[Any](topic, store, auto_ack=False, timeout=10)
    producer = StreamProducer[np.ndarray](topic, store, **limit)
    for i in range(2):
        producer.send(item(2 * i), metadata={"producer": "test", "i": 2 * i})
    third_sent = threading.Event()

    def send_third() -> None:
        producer.send(item(4), metadata={"producer": "test", "i": 4})
        third_sent.set()

    sender = threading.Thread(target=send_third, daemon=True)
    sender.start()
    assert not third_sent.wait(0.5), "send did not block with 2 items un-acked"
    first = consumer.next_item()
    assert not third_sent.wait(0.3), "send went on when an item was taken, not acked"
    first.ack()
    assert third_sent.wait(10), "send did not resume when the consumer acked"
    sender.join()

    impatient = StreamProducer[np.ndarray](topic, store, timeout=0.2, **limit)
    start = time.monotonic()
    with pytest.raises(StreamFullError, match=f"stream '{topic}' stayed full for 0.2 s"):
        impatient.send(item(6))
    assert time.monotonic() - start >= 0.2
    impatient.close()
    producer.close()
    rest = []
    for got in items(consumer):
        rest.append(checked(got))
        got.ack()
    assert rest == [("test", 2), ("test", 4)]
    consumer.close()


def test_an_item_larger_than_the_byte_bound_goes_when_nothing_is_in_flight(
    store: Store[Any],
) -> None:
    topic = new_topic()
    consumer = StreamConsumer[Any](topic, store, timeout=10)
    limit = dumps(item(0)).nbytes // 2
    _send(store, topic, 1, max_bytes_in_flight=limit, timeout=5)
    assert [checked(got) for got in items(consumer)] == [("test", 0)]
    consumer.close()


# --- every kind of item ---------------------------------------------------------------------
def _send_every_case(spec: str, topic: str, threshold: str) -> None:
    with StreamProducer[Any](topic, get_store(spec), threshold=threshold) as producer:
        for seed, case in enumerate(task_objects.CASES):
            producer.send(task_objects.make(case, seed), metadata={"case": case, "seed": seed})


@pytest.mark.parametrize("size", ["large", "small"])
def test_every_kind_of_item(
    store_spec: str, store: Store[Any], children: Children, size: str
) -> None:
    """Objects of every type the plugins proxy, sent from another process: large ones arrive
    as proxies of the object in the store, small ones (under a 16 MiB threshold here) inline
    as the object itself."""
    topic = new_topic()
    consumer = StreamConsumer[Any](topic, store, timeout=30)
    threshold = DEFAULT_THRESHOLD if size == "large" else "16 MiB"
    producer = children.start(_send_every_case, store_spec, topic, threshold)
    cases = []
    for got in items(consumer):
        case, seed = got.metadata["case"], got.metadata["seed"]
        expected = task_objects.make(case, seed)
        assert is_proxy(got.value) == (size == "large"), case
        value = extract(got.value) if size == "large" else got.value
        assert type(value) is type(expected), case
        assert task_objects.fingerprint(value) == task_objects.fingerprint(expected), case
        assert got.nbytes >= task_objects.NBYTES // 2, case
        cases.append(case)
    assert cases == list(task_objects.CASES)
    producer.result()
    consumer.close()


# --- what a consumer does with its items ------------------------------------------------------
def _refuse_to_load(payload: bytes) -> None:
    raise AssertionError("an item the filter skipped was deserialized")


class _Unloadable:
    """Pickles, but fails to unpickle: a consumer that skips it must not deserialize it."""

    def __init__(self, nbytes: int) -> None:
        self.payload = bytes(nbytes)

    def __reduce__(self) -> tuple[Any, ...]:
        return _refuse_to_load, (self.payload,)


def test_filter_skips_items_without_resolving_them_and_releases_them(
    store: Store[Any],
) -> None:
    topic = new_topic()
    sent: list[tuple[Any, bool]] = [
        (_Unloadable(10**6), False),
        (item(0), True),
        (_Unloadable(100), False),  # small: inline
        (item(1), True),
        (item(2), False),
    ]
    with StreamProducer[Any](topic, store) as producer:
        for i, (obj, keep) in enumerate(sent):
            producer.send(obj, metadata={"producer": "test", "i": i, "keep": keep})
    consumer = StreamConsumer[Any](
        topic, store, filter=lambda metadata: metadata["keep"], auto_ack=False, timeout=10
    )
    assert items_stored(store) == 3
    first = consumer.next_item()
    assert first.metadata["i"] == 1 and not is_resolved(first.value)
    assert items_stored(store) == 2, "the skipped item was not released"
    second = consumer.next_item()
    assert second.metadata["i"] == 3
    with pytest.raises(StopIteration):
        consumer.next_item()
    assert items_stored(store) == 1  # only the item taken and not acked yet
    assert float(first.value[0]) == 0.0
    first.ack()
    second.ack()
    consumer.close()


def test_next_object_and_auto_ack(store: Store[Any]) -> None:
    """``next_object`` gives the object, not a proxy; each item is released when the next one
    is taken, and the last one at close."""
    topic = new_topic()
    _send(store, topic, 5)  # items 0, 2 and 4 are large
    consumer = StreamConsumer[Any](topic, store, timeout=10)
    first = consumer.next_object()
    assert type(first) is np.ndarray and first.shape == (item(0).size,) and first[0] == 0
    assert items_stored(store) == 3
    assert consumer.next_object()[0] == 1  # item 0 released
    assert items_stored(store) == 2
    assert consumer.next_object()[0] == 2
    consumer.close()  # item 2 released; 3 and 4 stay queued for another consumer
    assert items_stored(store) == 1
    with StreamConsumer[Any](topic, store, timeout=10) as other:
        assert [checked(got) for got in items(other)] == [("test", 3), ("test", 4)]
    assert count_entries(store) == 0


def test_explicit_ack_by_value_or_item(store: Store[Any]) -> None:
    topic = new_topic()
    _send(store, topic, 5)
    consumer = StreamConsumer[Any](topic, store, auto_ack=False, timeout=10)
    values = [next(consumer) for _ in range(3)]  # proxies of 0 and 2, array 1
    assert items_stored(store) == 3
    consumer.ack(values[2])
    assert items_stored(store) == 2
    with pytest.raises(KeyError, match="no un-acked item"):
        consumer.ack(item(1))  # equal, but not what the consumer yielded
    consumer.ack(values[1])
    consumer.ack(values[0])
    assert items_stored(store) == 1  # item 4, still queued
    last = [consumer.next_item() for _ in range(2)]
    with pytest.raises(StopIteration):
        next(consumer)
    for got in last:
        got.ack()
        got.ack()  # idempotent
    consumer.close()


def test_close_without_ack_gives_items_back_to_the_queue(store: Store[Any]) -> None:
    topic = new_topic()
    _send(store, topic, 4)
    quitter = StreamConsumer[Any](topic, store, auto_ack=False, timeout=10)
    taken = [quitter.next_item() for _ in range(3)]
    keys = [key_of(got.value) for got in taken if is_proxy(got.value)]
    quitter.close()
    assert all(store.exists(key) for key in keys)
    with StreamConsumer[Any](topic, store, timeout=10) as other:
        assert sorted(checked(got) for got in items(other)) == _ids("test", 4)
    assert not any(store.exists(key) for key in keys)


# --- misuse ---------------------------------------------------------------------------------
def test_mode_mismatch_names_the_topic(store: Store[Any]) -> None:
    work, broadcast = new_topic(), new_topic()
    producer = StreamProducer[Any](work, store)
    with pytest.raises(ValueError, match=f"stream '{work}' is a 'work' stream"):
        StreamConsumer[Any](work, store, mode="broadcast")
    producer.close()
    consumer = StreamConsumer[Any](broadcast, store, mode="broadcast", timeout=10)
    with pytest.raises(ValueError, match=f"stream '{broadcast}' is a 'broadcast' stream"):
        StreamProducer[Any](broadcast, store, mode="work")
    with StreamProducer[Any](broadcast, store, mode="broadcast") as right:
        right.send("hello", metadata={})
    assert next(consumer) == "hello"
    consumer.close()


def test_unknown_mode_is_refused_and_leaves_nothing(store: Store[Any]) -> None:
    topic = new_topic()
    with pytest.raises(ValueError, match="'work' or 'broadcast', not 'fanout'"):
        StreamProducer[Any](topic, store, mode="fanout")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'work' or 'broadcast', not 'fanout'"):
        StreamConsumer[Any](topic, store, mode="fanout")  # type: ignore[arg-type]
    assert count_entries(store) == 0


def test_an_ended_stream_not_yet_drained_refuses_a_new_producer(store: Store[Any]) -> None:
    topic = new_topic()
    _send(store, topic, 2)
    with pytest.raises(StreamEndedError, match=f"stream '{topic}' has ended"):
        StreamProducer[Any](topic, store)
    with StreamConsumer[Any](topic, store, timeout=10) as consumer:
        assert [checked(got) for got in items(consumer)] == _ids("test", 2)
    assert count_entries(store) == 0  # drained: the topic is gone, and can start again
    _send(store, topic, 1)
    with StreamConsumer[Any](topic, store, timeout=10) as consumer:
        assert [checked(got) for got in items(consumer)] == _ids("test", 1)


def test_a_consumer_that_gives_up_leaves_nothing(store: Store[Any]) -> None:
    """A consumer that times out on a topic nobody produced to leaves no topic behind."""
    topic = new_topic()
    consumer = StreamConsumer[Any](topic, store, timeout=0.2)
    with pytest.raises(StreamTimeoutError, match=f"stream '{topic}'"):
        consumer.next_item()
    consumer.close()
    assert count_entries(store) == 0


# --- dispatch -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dask_clusters() -> Iterator[dict[str, LocalCluster]]:
    """A cluster per store kind (the first plugin registration fixes a scheduler's store)."""
    clusters: dict[str, LocalCluster] = {}
    yield clusters
    for cluster in clusters.values():
        cluster.close()


def _dispatched(
    store: Store[Any],
    store_spec: str,
    children: Children,
    submit_with_gate: Any,
) -> list[Any]:
    """Stream N items from another process into ``consumer.dispatch``; each task waits for a
    gate. While they wait, every item is held; once they end, none is. Returns the results,
    in submission order."""
    topic = new_topic()
    gate: ProxyFuture[bool] = ProxyFuture(store)
    received: list[Any] = []
    all_submitted = threading.Event()
    results: dict[int, Any] = {}
    order: dict[int, int] = {}  # id of a future -> its submission number

    def submit(value: Any) -> Any:
        received.append(value)
        future = submit_with_gate(value, gate.proxy())
        order[id(future)] = len(received) - 1
        if len(received) == N:
            all_submitted.set()
        return future

    def collect(future: Any) -> None:
        results[order[id(future)]] = future.result()

    consumer = StreamConsumer[Any](topic, store, auto_ack=False, timeout=60)
    children.start(produce, store_spec, topic, "p", N).result()
    with concurrent.futures.ThreadPoolExecutor(1) as dispatcher:
        dispatched = dispatcher.submit(consumer.dispatch, submit, on_done=collect)
        assert all_submitted.wait(60)
        keys = [key_of(value) for value in received if is_proxy(value)]
        assert len(keys) == LARGE_ITEMS
        assert all(store.exists(key) for key in keys), "an item was released before its task"
        assert not any(is_resolved(value) for value in received if is_proxy(value))
        assert not dispatched.done()  # it returns once every task is done
        gate.set_result(True)
        assert dispatched.result(timeout=60) == N
    assert not any(store.exists(key) for key in keys), "an item outlived its task"
    consumer.close()
    gate.evict()
    assert entries_left_after_eviction(store, timeout=15) == 0
    return [results[i] for i in range(N)]


def _expected_results() -> list[tuple[bool, int, float]]:
    return [(is_large(i), item(i).size, float(i)) for i in range(N)]


@pytest.mark.parametrize("plugin", [False, True], ids=["plain", "plugin"])
def test_dispatch_to_dask(
    store_spec: str,
    store: Store[Any],
    children: Children,
    dask_clusters: dict[str, LocalCluster],
    plugin: bool,
) -> None:
    """Tasks receive large items as proxies (the client never resolves them), results are
    right, and each item is released when its task ends, with or without the Dask plugin."""
    if store_spec not in dask_clusters:
        dask_clusters[store_spec] = LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        )
    with Client(dask_clusters[store_spec]) as client:
        if plugin:
            register(client, threshold="1 MiB", store=store_spec)
        submit = functools.partial(client.submit, task_objects.stream_item)
        assert _dispatched(store, store_spec, children, submit) == _expected_results()
        if plugin:
            unregister(client)


@pytest.fixture(scope="module")
def htex(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DataFlowKernel]:
    """A plain HighThroughputExecutor with 2 workers (no proxy-patterns plugin)."""
    executor = HighThroughputExecutor(
        label=HTEX,
        address="127.0.0.1",
        max_workers_per_node=2,
        provider=LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1),
    )
    kernel = parsl.load(Config(executors=[executor], run_dir=str(tmp_path_factory.mktemp("run"))))
    yield kernel
    kernel.cleanup()
    parsl.clear()


def test_dispatch_to_parsl(
    store_spec: str, store: Store[Any], children: Children, htex: DataFlowKernel
) -> None:
    results = _dispatched(store, store_spec, children, stream_item_app)
    assert results == _expected_results()
