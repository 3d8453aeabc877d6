"""Brokers: where a stream's messages wait between its producers and its consumers.

A message is small: an item's store key, the holder that keeps the item alive for one group,
and the item's metadata (or, for a small item, the item itself). The bytes of large items
never pass a broker.

Every broker has the same model, that of Redis streams and Kafka:

- A topic has *groups*. Each group receives every message sent while it exists; within a
  group, each message goes to exactly one consumer. A ``work`` stream has one group, kept with
  the topic, which all its consumers share (a work queue); a ``broadcast`` stream gives every
  consumer a group of its own (each sees every item sent while it is subscribed).
- A consumer *takes* a message into its pending set, and *acks* it when done. A consumer that
  leaves (or dies) without acking gives its pending messages back to the group's queue, so
  another consumer gets them: nothing is lost.
- The stream *ends* once every producer that registered has closed (and as many as a producer
  said to expect); a consumer then sees the end once its group's queue is drained and no other
  consumer of the group holds un-acked items (they would come back if it died). A producer
  that died without closing counts as closed, and the end is then :class:`ProducerLostError`:
  every item that was sent is delivered, and nobody waits for ever.
- A topic is removed once it ended (or was never produced to) and its queues are drained and
  no consumer is left: a finished stream leaves nothing behind.

:class:`~proxy_patterns.brokers.shm.SharedMemoryBroker` keeps topics as directories in the
shared-memory store (one node, no server); :class:`~proxy_patterns.brokers.redis.RedisBroker`
as lists in the Redis store (many nodes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple, Protocol

from proxystore.store import Store

from proxy_patterns.records import RefTable, ref_table_for
from proxy_patterns.rendezvous import ProducerLostError
from proxy_patterns.shm import SharedMemoryConnector
from proxy_patterns.store import redis_client_of

Mode = Literal["work", "broadcast"]
"""How a stream's items reach its consumers: each to one consumer, or each to every consumer."""
MODES: tuple[Mode, ...] = ("work", "broadcast")
WORK_GROUP = "work"
"""The one group of a ``work`` stream."""

Discard = Callable[[bytes], None]
"""Called with every message a broker throws away unread (its group is gone), so that the
item's hold for that group is dropped."""

__all__ = ["MODES", "WORK_GROUP", "Broker", "Discard", "Membership", "Mode", "ProducerLostError"]


class StreamEndedError(RuntimeError):
    """A producer tried to join a stream whose producers have all closed."""


class Membership(NamedTuple):
    """A consumer's place in a topic: its group, and its own name within it."""

    group: str
    consumer: str


class Broker(Protocol):
    """The queues of one topic, shared by every process of its producers and consumers.

    ``payloads_for`` in :meth:`publish` is called with the leases of the groups that will
    receive the message (while none can join or leave) and returns the payload for each: the
    item's holds are taken for exactly the groups that get it.
    """

    table: RefTable

    def add_producer(self, mode: Mode, producers: int | None) -> str:
        """Register a producer (creating the topic if needed); return its name.

        ``producers`` is how many producers must close before the stream ends. Raises
        ValueError if the topic exists with another mode, StreamEndedError if it ended.
        """
        ...

    def remove_producer(self, producer: str) -> None:
        """``producer`` closed; once every producer did, the stream ends."""
        ...

    def publish(
        self, name: str, nbytes: int, payloads_for: Callable[[dict[str, str]], dict[str, bytes]]
    ) -> None:
        """Queue a message (``name``, holding ``nbytes`` of data) in every group."""
        ...

    def unconsumed(self) -> tuple[int, int]:
        """Messages, and their bytes, that the slowest group has not acked yet."""
        ...

    def join(self, mode: Mode) -> Membership:
        """Register a consumer (creating the topic if needed)."""
        ...

    def take(self, member: Membership, timeout: float) -> tuple[Any, bytes] | None:
        """The next message for ``member``, as (handle to ack it, payload), now pending;
        None if none came within ``timeout`` seconds. Raises StopIteration once the stream
        ended and the group's queue is empty (ProducerLostError if a producer was lost)."""
        ...

    def ack(self, member: Membership, handle: Any) -> bool:
        """``member`` is done with the message ``handle`` names; False if the message was no
        longer ``member``'s (given back to the queue meanwhile: its hold stays for whoever
        takes it)."""
        ...

    def recover(self, member: Membership) -> None:
        """Give the pending messages of dead consumers of ``member``'s group back to the
        group's queue, and count dead producers as lost: the stream ends once every producer
        closed or was lost, and :meth:`take` then raises ProducerLostError, not
        StopIteration."""
        ...

    def leave(self, member: Membership) -> None:
        """Unregister ``member``: its pending messages go back to the group's queue, or, for
        a broadcast group, the group goes (its messages to ``discard``)."""
        ...

    def delete(self) -> None:
        """Remove the topic whatever its state, its messages to ``discard``."""
        ...


def broker_for(store: Store[Any], topic: str, discard: Discard) -> Broker:
    """The broker of ``topic`` on ``store``: in its shared memory, or in its Redis server."""
    connector = store.connector
    if isinstance(connector, SharedMemoryConnector) and connector.serves_other_hosts:
        raise TypeError(
            "streams across hosts need a Redis store (store='redis://host:port'): the "
            "topology store moves objects between hosts, not a stream's queues"
        )
    table = ref_table_for(store)
    if isinstance(connector, SharedMemoryConnector):
        from proxy_patterns.brokers.shm import SharedMemoryBroker

        return SharedMemoryBroker(connector, table, topic, discard)
    client = redis_client_of(connector)
    if client is not None:
        from proxy_patterns.brokers.redis import RedisBroker

        return RedisBroker(client, table, topic, discard)
    raise TypeError(f"streams need a shared-memory or Redis store, not {type(connector).__name__}")


def stream_ended(topic: str) -> StreamEndedError:
    """The error a producer joining an ended, not yet drained stream gets."""
    return StreamEndedError(
        f"stream {topic!r} has ended (all its producers closed) but is not drained: consume "
        "it, or discard it with proxy_patterns.streams.delete_stream(topic, store); to have "
        "a stream wait for producers that open late, pass producers=N to the first producer"
    )


def check_mode(topic: str, mode: str, existing: str) -> None:
    """Raise a clear error if ``topic`` exists with another mode than ``mode``."""
    if mode not in MODES:
        raise ValueError(f"a stream's mode is 'work' or 'broadcast', not {mode!r}")
    if existing != mode:
        raise ValueError(
            f"stream {topic!r} is a {existing!r} stream; open it with mode={existing!r} "
            f"(or use another topic)"
        )


def producer_lost(topic: str, producer: str) -> ProducerLostError:
    """The error consumers see when a producer died without closing the stream."""
    return ProducerLostError(
        f"producer {producer} of stream {topic!r} died without closing it: every item it sent "
        "was delivered, but the stream cannot end normally"
    )
