"""Streaming queues: items' bytes go to the store, only keys through the broker.

A :class:`StreamProducer` puts each item it sends in the store and queues a small message
(the key, and the item's metadata) on the topic's broker (:mod:`proxy_patterns.brokers`: the
store's own shared memory on one node, its Redis server on many). A :class:`StreamConsumer`
yields proxies of the items, so a dispatcher hands them to tasks without touching the bytes:
they go from the producer's process to the worker through the store, once. Items whose
serialized size is at most ``threshold`` travel inline through the broker instead, as the
objects themselves: a small item is cheaper sent than put.

The API follows ProxyStore's ``proxystore.stream`` (``send(obj, metadata=...)``,
``next_object()``, filters on metadata), and adds what it lacks:

- **Many producers**: the stream ends once every producer closed (``producers=N`` says to
  wait for N), not when the first one does.
- **Modes**: ``work`` (each item to exactly one consumer: a work queue) or ``broadcast``
  (each item to every consumer subscribed when it was sent).
- **Acks and release**: an item's data is held, by the ownership records of
  :mod:`proxy_patterns.records`, for each group that must see it, and released when the
  group's consumer acks it: explicitly (``ack``), at the next item (``auto_ack``), or when the
  task it was dispatched to finishes (:func:`dispatch`). A drained, closed stream leaves nothing
  in the store.
- **Consumers that die**: their un-acked items go to another consumer of their group.
- **Back-pressure**: ``max_in_flight`` (items and/or bytes not yet acked) makes ``send`` block,
  up to ``timeout``, instead of filling the store.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from proxystore.proxy import extract
from proxystore.store import Store
from proxystore.store.factory import StoreFactory

from proxy_patterns.brokers import Broker, Membership, Mode, StreamEndedError, broker_for
from proxy_patterns.proxy import OpaqueProxy, is_proxy
from proxy_patterns.records import ReferenceInvalidError, ref_table_for
from proxy_patterns.rendezvous import LIVENESS_INTERVAL, ProducerLostError
from proxy_patterns.serialize import deserialize, dumps
from proxy_patterns.sizes import as_bytes
from proxy_patterns.store import get_store, put

T = TypeVar("T")

__all__ = [
    "Mode",
    "ProducerLostError",
    "StreamConsumer",
    "StreamEndedError",
    "StreamFullError",
    "StreamItem",
    "StreamProducer",
    "StreamTimeoutError",
    "delete_stream",
]

DEFAULT_THRESHOLD = "64 KiB"
"""Items larger than this (serialized) go to the store; smaller ones through the broker."""
BACK_PRESSURE_POLL = 0.005
"""Seconds between checks of a full stream's room while ``send`` waits."""


class StreamFullError(TimeoutError):
    """``send`` waited ``timeout`` seconds for room under ``max_in_flight`` and found none."""


class StreamTimeoutError(TimeoutError):
    """A consumer waited ``timeout`` seconds for an item and none came."""


@dataclass(frozen=True)
class _Message:
    """What travels through the broker for one item and one group."""

    metadata: dict[str, Any]
    nbytes: int
    key: Any = None
    """The item's store key; None when the item travels inline."""
    holder: str | None = None
    """The hold that keeps the item in the store for this group."""
    inline: bytes | None = None


@dataclass
class StreamItem(Generic[T]):
    """An item as a consumer receives it: a proxy of it (or, small, the item itself), its
    metadata and its size; ``ack()`` when done with it (see :class:`StreamConsumer`)."""

    value: T
    metadata: dict[str, Any]
    nbytes: int
    _ack: Callable[[], None] = field(repr=False)
    _acked: bool = field(default=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def ack(self) -> None:
        """Done with the item: release its data (for this consumer's group). Idempotent."""
        with self._lock:
            if self._acked:
                return
            self._acked = True
        self._ack()

    @property
    def acked(self) -> bool:
        """Whether :meth:`ack` was called."""
        return self._acked


def _dumps(message: _Message) -> bytes:
    """A message as the broker carries it: in the store's own format, so that with a signing
    key (see :mod:`proxy_patterns.serialize`) a message someone else wrote is refused."""
    return bytes(dumps(message).join())


def _loads(payload: bytes) -> _Message:
    message = deserialize(payload)
    if not isinstance(message, _Message):
        raise TypeError(f"not a stream message: {type(message).__name__}")
    return message


def _release(store: Store[Any], message: _Message) -> None:
    """Drop a message's hold on its item (the item goes once no group holds it)."""
    if message.key is not None and message.holder is not None:
        # Already dropped: a consumer that died between its drop and its ack.
        with contextlib.suppress(ReferenceInvalidError):
            ref_table_for(store).drop(message.key, message.holder)


def _broker(store: Store[Any], topic: str) -> Broker:
    def discard(payload: bytes) -> None:
        _release(store, _loads(payload))

    return broker_for(store, topic, discard)


class StreamProducer(Generic[T]):
    """Sends items to a topic: each one's bytes to the store, a message to the broker.

    Args:
        topic: The stream's name, shared by its producers and consumers.
        store: Where items go (default: :func:`~proxy_patterns.store.get_store`). Its broker
            carries the messages: shared memory on one node, Redis across nodes.
        mode: ``"work"`` or ``"broadcast"`` (see :class:`StreamConsumer`); every producer and
            consumer of a topic must agree.
        producers: How many producers must close before the stream ends (default: it ends
            once every producer that registered closed).
        threshold: Items of at most this serialized size travel inline through the broker.
        max_in_flight: Bound on the items not yet acked (the slowest group's); ``send``
            blocks while it is reached.
        max_bytes_in_flight: The same bound in bytes of data.
        timeout: Seconds ``send`` waits for room before raising :class:`StreamFullError`
            (None: for ever).
    """

    def __init__(
        self,
        topic: str,
        store: Store[Any] | None = None,
        *,
        mode: Mode = "work",
        producers: int | None = None,
        threshold: int | str = DEFAULT_THRESHOLD,
        max_in_flight: int | None = None,
        max_bytes_in_flight: int | str | None = None,
        timeout: float | None = None,
    ) -> None:
        self.topic = topic
        self.store = store or get_store()
        self.threshold = as_bytes(threshold, "threshold")
        self.max_in_flight = max_in_flight
        self.max_bytes_in_flight = (
            None
            if max_bytes_in_flight is None
            else as_bytes(max_bytes_in_flight, "max_bytes_in_flight")
        )
        self.timeout = timeout
        self._broker = _broker(self.store, topic)
        self._name: str | None = self._broker.add_producer(mode, producers)
        self._sequence = itertools.count()
        self._lock = threading.Lock()

    def __enter__(self) -> StreamProducer[T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"StreamProducer({self.topic!r}, store={self.store.name!r})"

    def send(self, obj: T, metadata: dict[str, Any] | None = None) -> None:
        """Send ``obj`` (any picklable object) with ``metadata`` (a small dict consumers can
        filter on without resolving the item). Blocks while the stream is full."""
        if self._name is None:
            raise RuntimeError(f"{self!r} is closed")
        frames = dumps(obj)
        nbytes = frames.nbytes
        self._wait_for_room(nbytes)
        metadata = dict(metadata or {})
        with self._lock:
            name = f"{time.time_ns():020d}-{self._name}-{next(self._sequence):09d}"

        def payloads_for(leases: dict[str, str]) -> dict[str, bytes]:
            if not leases:
                return {}  # a broadcast stream nobody subscribes to: the item goes nowhere
            if nbytes <= self.threshold:
                inline = _dumps(_Message(metadata, nbytes, inline=bytes(frames.join())))
                return dict.fromkeys(leases, inline)
            key = put(self.store, obj, frames)
            holders = ref_table_for(self.store).create_held(key, list(leases.values()))
            return {
                group: _dumps(_Message(metadata, nbytes, key, holder))
                for group, holder in zip(leases, holders, strict=True)
            }

        self._broker.publish(name, nbytes, payloads_for)

    def _wait_for_room(self, nbytes: int) -> None:
        if self.max_in_flight is None and self.max_bytes_in_flight is None:
            return
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            items, in_flight = self._broker.unconsumed()
            full_items = self.max_in_flight is not None and items >= self.max_in_flight
            full_bytes = (
                self.max_bytes_in_flight is not None
                and in_flight > 0
                and in_flight + nbytes > self.max_bytes_in_flight
            )
            if not (full_items or full_bytes):
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise StreamFullError(
                    f"stream {self.topic!r} stayed full for {self.timeout} s ({items} items, "
                    f"{in_flight} bytes not yet acked; max_in_flight={self.max_in_flight}, "
                    f"max_bytes_in_flight={self.max_bytes_in_flight}): are its consumers "
                    "running and acking?"
                )
            time.sleep(BACK_PRESSURE_POLL)

    def flush(self) -> None:
        """Nothing to do: every ``send`` has reached the broker when it returns (kept for
        ProxyStore's API)."""

    def close(self) -> None:
        """Close this producer; the stream ends once every producer closed. Idempotent."""
        if self._name is not None:
            name, self._name = self._name, None
            self._broker.remove_producer(name)


class StreamConsumer(Generic[T]):
    """Receives a topic's items, as proxies; an iterator that stops at the stream's end.

    In ``work`` mode the consumers of a topic share its items, each item to exactly one of
    them; in ``broadcast`` mode each consumer receives every item sent while it is
    subscribed. Large items are yielded as proxies of the object in the store (pass them to
    tasks: only the key travels); items of at most the producer's threshold as themselves.

    An item is released (for this consumer's group) when acked. With ``auto_ack`` (default)
    an item is acked when the next one is taken or the consumer closes, as Kafka commits;
    without, call :meth:`ack`, or hand the items to :func:`dispatch`. Items a consumer had not
    acked when it closed or died go to another consumer of its group.

    Args:
        topic: The stream's name.
        store: The store the producers use (default: :func:`~proxy_patterns.store.get_store`).
        mode: ``"work"`` or ``"broadcast"``.
        filter: Called with an item's metadata; items it returns False for are skipped (and
            acked) without resolving them.
        auto_ack: Ack each item when the next one is taken, and at close.
        timeout: Seconds to wait for an item before raising :class:`StreamTimeoutError`
            (None: for ever).
    """

    def __init__(
        self,
        topic: str,
        store: Store[Any] | None = None,
        *,
        mode: Mode = "work",
        filter: Callable[[dict[str, Any]], bool] | None = None,
        auto_ack: bool = True,
        timeout: float | None = None,
    ) -> None:
        self.topic = topic
        self.store = store or get_store()
        self.filter = filter
        self.auto_ack = auto_ack
        self.timeout = timeout
        self._broker = _broker(self.store, topic)
        self._member: Membership | None = self._broker.join(mode)
        self._unacked: dict[int, StreamItem[Any]] = {}
        self._dispatched: set[int] = set()  # ids of items handed to tasks
        self._producer_lost = False
        self._changed = threading.Condition()

    def __enter__(self) -> StreamConsumer[T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"StreamConsumer({self.topic!r}, store={self.store.name!r})"

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        return self.next_item().value

    def next_object(self) -> T:
        """The next item, resolved (the object itself, zero-copy from shared memory)."""
        value: Any = self.next_item().value
        return extract(value) if is_proxy(value) else value  # type: ignore[no-any-return]

    def next_item(self) -> StreamItem[T]:
        """The next item with its metadata (raises StopIteration at the stream's end)."""
        member = self._member
        if member is None:
            raise RuntimeError(f"{self!r} is closed")
        if self.auto_ack:
            self._ack_all()
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise StreamTimeoutError(
                    f"no item of stream {self.topic!r} came within {self.timeout} s"
                )
            wait = LIVENESS_INTERVAL if remaining is None else min(remaining, LIVENESS_INTERVAL)
            try:
                taken = self._broker.take(member, wait)
            except ProducerLostError:
                self._producer_lost = True
                raise
            if taken is None:
                self._broker.recover(member)
                continue
            handle, payload = taken
            message: _Message = _loads(payload)
            if self.filter is not None and not self.filter(message.metadata):
                self._settle(member, handle, message)  # unread: an inline item too
                continue
            item = self._item(member, handle, message)
            with self._changed:
                self._unacked[id(item)] = item
            return item

    def _item(self, member: Membership, handle: Any, message: _Message) -> StreamItem[T]:
        value: Any
        if message.inline is not None:
            value = deserialize(bytearray(message.inline))
        else:
            factory: StoreFactory[Any, Any] = StoreFactory(
                message.key, store_config=self.store.config()
            )
            value = OpaqueProxy(factory)

        def ack() -> None:
            self._settle(member, handle, message)
            with self._changed:
                self._unacked.pop(id(item), None)
                self._changed.notify_all()

        item = StreamItem(value, message.metadata, message.nbytes, ack)
        return item

    def _settle(self, member: Membership, handle: Any, message: _Message) -> None:
        """Ack ``message`` with the broker and drop its hold on the item. The message is ours
        to settle only if it is still pending for us: a consumer that closed first gave it
        back to the queue, and its hold went with it."""
        if self._broker.ack(member, handle):
            _release(self.store, message)

    def ack(self, value: Any) -> None:
        """Done with ``value`` (an item this consumer yielded, or its :class:`StreamItem`)."""
        if isinstance(value, StreamItem):
            value.ack()
            return
        with self._changed:
            item = next((i for i in self._unacked.values() if i.value is value), None)
        if item is None:
            raise KeyError(f"{type(value).__name__} object is no un-acked item of {self!r}")
        item.ack()

    def _ack_all(self) -> None:
        with self._changed:
            items = list(self._unacked.values())
        for item in items:
            item.ack()

    def close(self) -> None:
        """Leave the stream. With ``auto_ack`` the last item is acked; without, the items not
        acked go back to the queue for another consumer, once the tasks :meth:`dispatch`
        gave items to are done. Idempotent."""
        if self._member is None:
            return
        if self.auto_ack:
            self._ack_all()
        with self._changed:
            self._changed.wait_for(lambda: not self._dispatched.intersection(self._unacked))
        member, self._member = self._member, None
        self._broker.leave(member)
        if self._producer_lost:
            # An item the lost producer was putting when it died has a record but no message:
            # held by the stream, it goes once the stream does.
            ref_table_for(self.store).sweep()

    def dispatch(
        self,
        submit: Callable[[Any], Any],
        *,
        batch_size: int = 1,
        on_done: Callable[[Any], object] | None = None,
    ) -> int:
        """Consume the stream, submitting one task per item (or per ``batch_size`` items, as a
        list); return how many tasks ran, once the stream has ended and they are all done.

        ``submit(value)`` starts a task and returns its future, which must have
        ``add_done_callback`` (as Dask's, Parsl's and ``concurrent.futures``' do):
        ``functools.partial(client.submit, fn)`` on a Dask client, a Parsl app itself, or an
        executor's ``submit`` with the function bound. ``on_done(future)`` is called with each
        future as its task finishes (to gather results, or send them on a stream).

        Each item is acked when its task is done, so its data lives exactly as long as the task
        needs it, and ``max_in_flight`` bounds the tasks in flight. A future is kept only while
        its task runs: a framework keeps a task's arguments (a Dask worker, the item's mapping)
        while its future lives, and a stream may never end. The dispatcher never resolves an
        item: only proxies pass through it. Pick items with the consumer's ``filter``.
        """
        if self.auto_ack:
            raise ValueError(
                "dispatch acks each item when its task is done: open the consumer with "
                "auto_ack=False"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        running: dict[int, Any] = {}  # futures of tasks not done yet
        errors: list[BaseException] = []
        submitted = 0

        def submit_batch(batch: list[StreamItem[Any]]) -> None:
            ids = [id(item) for item in batch]
            with self._changed:
                self._dispatched.update(ids)

            def settle(future: Any) -> None:
                try:
                    if on_done is not None:
                        on_done(future)
                except BaseException as error:  # raised by dispatch, once every task is done
                    errors.append(error)
                for item in batch:
                    item.ack()
                with self._changed:
                    self._dispatched.difference_update(ids)
                    running.pop(id(future), None)
                    self._changed.notify_all()

            values = [item.value for item in batch]
            try:
                future = submit(values if batch_size > 1 else values[0])
            except BaseException:
                with self._changed:  # not acked: close() gives them back to the queue
                    self._dispatched.difference_update(ids)
                raise
            with self._changed:
                running[id(future)] = future
            future.add_done_callback(settle)

        batch: list[StreamItem[Any]] = []
        while True:
            try:
                batch.append(self.next_item())
            except StopIteration:
                break
            if len(batch) == batch_size:
                submit_batch(batch)
                submitted += 1
                batch = []
        if batch:
            submit_batch(batch)
            submitted += 1
        with self._changed:
            self._changed.wait_for(lambda: not running)
        if errors:
            raise errors[0]
        return submitted


def delete_stream(topic: str, store: Store[Any] | None = None) -> None:
    """Remove ``topic`` whatever its state, releasing every item still queued or pending:
    a stream left behind by a crashed run, which a new producer refuses to reopen while it has
    items (see :class:`StreamEndedError`). Its producers and consumers must be gone."""
    store = store or get_store()
    _broker(store, topic).delete()
