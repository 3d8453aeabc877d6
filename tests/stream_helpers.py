"""Processes and items for the stream tests (``test_streams.py``, ``test_stream_faults.py``).

The functions that play producers and consumers in other processes live here, in an
importable module, so that ``spawn`` children load them by reference. Each item says who sent
it in its metadata and is a float array filled with its index: even items are large (through
the store), odd ones small (inline through the broker), so every test sees both paths.
"""

from __future__ import annotations

import multiprocessing
import threading
import uuid
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
from proxystore.store import Store

from proxy_patterns.brokers import Mode
from proxy_patterns.liveness import start_time
from proxy_patterns.proxy import is_proxy
from proxy_patterns.store import LEASE_PREFIX, count_objects, get_store, redis_client_of
from proxy_patterns.streams import StreamConsumer, StreamItem, StreamProducer

LARGE_FLOATS = 50_000
"""400 kB: above the streams' default threshold (64 KiB), so the item goes to the store."""
SMALL_FLOATS = 16
"""Below it: the item travels inline through the broker."""
REDIS_STREAM_PREFIX = b"proxy-patterns:stream:"
"""The Redis broker's own keys (see :mod:`proxy_patterns.brokers.redis`)."""

ItemId = tuple[str, int]
"""(producer, index) of an item, from its metadata."""

_spawn = multiprocessing.get_context("spawn")


def new_topic() -> str:
    """A topic of one test (the Redis server is shared by the session)."""
    return f"topic-{uuid.uuid4().hex[:8]}"


def is_large(i: int) -> bool:
    return i % 2 == 0


def item(i: int) -> np.ndarray:
    return np.full(LARGE_FLOATS if is_large(i) else SMALL_FLOATS, float(i))


def checked(got: StreamItem[Any]) -> ItemId:
    """The id of an item a consumer received, once its value was checked against its
    metadata: a proxy of the array if it is large, the array itself if it is small."""
    producer, i = got.metadata["producer"], got.metadata["i"]
    assert is_proxy(got.value) == is_large(i), f"item {i} of {producer}: {type(got.value)}"
    value = np.asarray(got.value)
    assert value.shape == item(i).shape and (value == i).all(), f"item {i} of {producer}"
    return producer, i


def items(consumer: StreamConsumer[Any]) -> Iterator[StreamItem[Any]]:
    """The consumer's items with their metadata, until the stream ends."""
    while True:
        try:
            yield consumer.next_item()
        except StopIteration:
            return


def items_stored(store: Store[Any]) -> int:
    """Items whose data is in the store: its objects, not the brokers' own keys."""
    client = redis_client_of(store.connector)
    broker_keys = 0 if client is None else len(client.keys(REDIS_STREAM_PREFIX + b"*"))
    return count_objects(store) - broker_keys


# --- processes ------------------------------------------------------------------------------
def _report(conn: Connection, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        conn.send(("returned", fn(*args)))
    except BaseException as e:  # the test reports what the child raised
        conn.send(("raised", f"{type(e).__name__}: {e}"))


class Child:
    """``fn(*args)`` running in a new ``spawn`` process; :meth:`result` is what it returned."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self.name = fn.__name__
        self._conn, child_end = _spawn.Pipe(duplex=False)
        self.process = _spawn.Process(target=_report, args=(child_end, fn, args), daemon=True)
        self.process.start()
        child_end.close()
        assert self.process.pid is not None
        self.tag = f"{self.process.pid}-{start_time(self.process.pid)}"
        """The process's :func:`~proxy_patterns.liveness.process_tag`."""

    def result(self, timeout: float = 60) -> Any:
        """What ``fn`` returned; AssertionError if it raised, died or took longer."""
        if not self._conn.poll(timeout):
            raise AssertionError(f"{self.name} returned nothing within {timeout} s")
        try:
            status, value = self._conn.recv()
        except EOFError:
            self.process.join(timeout)
            raise AssertionError(f"{self.name} died (exit code {self.process.exitcode})") from None
        self.process.join(timeout)
        if status == "raised":
            raise AssertionError(f"{self.name} (process {self.process.pid}) raised {value}")
        return value

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to close anything."""
        self.process.kill()
        self.process.join(30)


def seen_dead(store: Store[Any], child: Child) -> bool:
    """Whether the store sees the killed ``child`` dead: at once on shared memory; on Redis
    once its lease expired (``rendezvous.LEASE`` seconds after its last renewal)."""
    client = redis_client_of(store.connector)
    return client is None or not client.keys(f"{LEASE_PREFIX}{child.tag}-*")


class Children:
    """The processes a test started; those still running at its end are killed."""

    def __init__(self) -> None:
        self._started: list[Child] = []

    def start(self, fn: Callable[..., Any], *args: Any) -> Child:
        child = Child(fn, *args)
        self._started.append(child)
        return child

    def event(self) -> Any:
        """An event the test's children can wait for or set."""
        return _spawn.Event()

    def queue(self) -> Any:
        return _spawn.Queue()

    def barrier(self, parties: int) -> Any:
        return _spawn.Barrier(parties)

    def kill_all(self) -> None:
        for child in self._started:
            if child.process.is_alive():
                child.kill()


def wait_until_killed() -> None:
    threading.Event().wait()


# --- roles played in other processes ------------------------------------------------------
def produce(
    spec: str,
    topic: str,
    name: str,
    count: int,
    opened: Any = None,
    sent: Any = None,
    close: Any = None,
    producers: int | None = None,
) -> None:
    """Send ``count`` items as producer ``name``, setting ``opened`` once registered and
    ``sent`` once done; then wait for ``close``."""
    with StreamProducer[np.ndarray](topic, get_store(spec), producers=producers) as producer:
        if opened is not None:
            opened.set()
        for i in range(count):
            producer.send(item(i), metadata={"producer": name, "i": i})
        if sent is not None:
            sent.set()
        if close is not None:
            assert close.wait(60), "the test never said to close"


def send_and_hang(spec: str, topic: str, count: int, sent: Any) -> None:
    """Send ``count`` items, say so, and never close: the test kills this process."""
    producer = StreamProducer[np.ndarray](topic, get_store(spec))
    for i in range(count):
        producer.send(item(i), metadata={"producer": "doomed", "i": i})
    sent.set()
    wait_until_killed()


def consume(
    spec: str, topic: str, mode: Mode, subscribed: Any, both_took_one: Any
) -> list[ItemId]:
    """Consume the stream to its end (auto-ack), after saying it subscribed; with
    ``both_took_one``, wait for the other consumer to take an item before taking more."""
    with StreamConsumer[Any](topic, get_store(spec), mode=mode, timeout=30) as consumer:
        subscribed.set()
        seen = []
        for got in items(consumer):
            seen.append(checked(got))
            if both_took_one is not None and len(seen) == 1:
                both_took_one.wait(30)
        return seen


def consume_holding(
    spec: str, topic: str, count: int, subscribed: Any, took: Any, ack: Any
) -> list[ItemId]:
    """In broadcast mode, take ``count`` items without acking them, put their store keys in
    ``took``, ack them once ``ack`` is set, and consume the rest."""
    from proxy_patterns.proxy import key_of

    with StreamConsumer[Any](
        topic, get_store(spec), mode="broadcast", auto_ack=False, timeout=30
    ) as consumer:
        subscribed.set()
        held = [consumer.next_item() for _ in range(count)]
        seen = [checked(got) for got in held]
        took.put([key_of(got.value) for got in held if is_proxy(got.value)])
        assert ack.wait(60), "the test never said to ack"
        for got in held:
            got.ack()
        for got in items(consumer):
            seen.append(checked(got))
            got.ack()
        return seen


def take_and_hang(
    spec: str, topic: str, count: int, took: Any, mode: Mode = "work", subscribed: Any = None
) -> None:
    """Take ``count`` items without acking them, report their ids, and hang: the test kills
    this process. Sets ``subscribed`` once it is."""
    consumer = StreamConsumer[Any](topic, get_store(spec), mode=mode, auto_ack=False, timeout=30)
    if subscribed is not None:
        subscribed.set()
    took.put([checked(consumer.next_item()) for _ in range(count)])
    wait_until_killed()
