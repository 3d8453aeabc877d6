"""Streams whose producers or consumers are SIGKILLed, on both brokers: nothing is lost, a
consumer sees a lost producer as an error, not a hang, and the store ends empty.

On Redis a dead process is seen once its lease expires (``rendezvous.LEASE``, 5 s); on shared
memory at once. Every consumer in the test's process has a ``timeout``, so a bug fails a test
rather than hangs it.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
from proxystore.store import Store

from dask_helpers import wait_until
from proxy_patterns.rendezvous import ProducerLostError
from proxy_patterns.store import count_entries
from proxy_patterns.streams import (
    StreamConsumer,
    StreamEndedError,
    StreamProducer,
    delete_stream,
)
from stream_helpers import (
    Children,
    checked,
    item,
    items,
    new_topic,
    seen_dead,
    send_and_hang,
    take_and_hang,
)

pytestmark = [
    pytest.mark.parametrize("store_spec", ["shm", "redis"], indirect=True),
    pytest.mark.timeout(120),
]

N = 10
TAKEN = 3
"""Items the consumer that is killed holds, un-acked."""


def _send(producer: StreamProducer[np.ndarray], indexes: range) -> None:
    for i in indexes:
        producer.send(item(i), metadata={"producer": "test", "i": i})


@pytest.mark.parametrize("killed", ["mid-stream", "after-the-end"])
def test_a_killed_consumers_items_go_to_another_consumer(
    store_spec: str, store: Store[Any], children: Children, killed: str
) -> None:
    """A work-mode consumer holding un-acked items is SIGKILLed, while the producer still
    sends or after it closed: another consumer gets every item once, and nothing stays."""
    topic = new_topic()
    producer = StreamProducer[np.ndarray](topic, store)
    _send(producer, range(N))
    took = children.queue()
    doomed = children.start(take_and_hang, store_spec, topic, TAKEN, took)
    taken = took.get(timeout=60)
    assert len(taken) == TAKEN
    if killed == "after-the-end":
        producer.close()
    doomed.kill()
    survivor = StreamConsumer[Any](topic, store, timeout=30)
    got = [checked(survivor.next_item()) for _ in range(N)]
    assert sorted(got) == [("test", i) for i in range(N)]
    assert set(taken) <= set(got)
    if killed == "mid-stream":
        _send(producer, range(N, N + 2))
        producer.close()
        got += [checked(more) for more in items(survivor)]
        assert sorted(got) == [("test", i) for i in range(N + 2)]
    else:
        with pytest.raises(StopIteration):
            survivor.next_item()
    survivor.close()


def test_a_killed_broadcast_consumer_leaves_nothing_behind(
    store_spec: str, store: Store[Any], children: Children
) -> None:
    """A broadcast consumer SIGKILLed holding un-acked items after the stream's end: the other
    consumer still gets every item, and once it left, the dead one's group and items are gone
    too."""
    topic = new_topic()
    survivor = StreamConsumer[Any](topic, store, mode="broadcast", timeout=30)
    took, subscribed = children.queue(), children.event()
    doomed = children.start(take_and_hang, store_spec, topic, TAKEN, took, "broadcast", subscribed)
    assert subscribed.wait(60)
    with StreamProducer[np.ndarray](topic, store, mode="broadcast") as producer:
        _send(producer, range(N))
    assert len(took.get(timeout=60)) == TAKEN
    doomed.kill()
    assert [checked(got) for got in items(survivor)] == [("test", i) for i in range(N)]
    wait_until(lambda: seen_dead(store, doomed), timeout=15, message="the lease expired")
    survivor.close()


def test_a_killed_producer_is_an_error_for_consumers_not_a_hang(
    store_spec: str, store: Store[Any], children: Children
) -> None:
    """Consumers get every item the producer sent, then ProducerLostError naming the stream;
    and the stream, which can never end normally, leaves nothing once they left."""
    topic = new_topic()
    consumer = StreamConsumer[Any](topic, store, timeout=30)
    sent = children.event()
    doomed = children.start(send_and_hang, store_spec, topic, N, sent)
    assert sent.wait(60)
    doomed.kill()
    got = [checked(consumer.next_item()) for _ in range(N)]
    assert got == [("doomed", i) for i in range(N)]
    start = time.monotonic()
    with pytest.raises(ProducerLostError, match=f"of stream '{topic}' died without closing it"):
        consumer.next_item()
    assert time.monotonic() - start < 15  # measured: 0.5 s on shared memory, 5 s on Redis
    consumer.close()


def test_delete_stream_discards_what_a_crashed_run_left(
    store_spec: str, store: Store[Any], children: Children
) -> None:
    """A run ended its stream, and its consumer died holding items: a new run's producer is
    refused, with the way out in the message; ``delete_stream`` releases every item, queued
    or pending, and the topic starts again."""
    topic = new_topic()
    with StreamProducer[np.ndarray](topic, store) as producer:
        _send(producer, range(N))
    took = children.queue()
    doomed = children.start(take_and_hang, store_spec, topic, TAKEN, took)
    assert len(took.get(timeout=60)) == TAKEN
    doomed.kill()
    with pytest.raises(StreamEndedError, match="delete_stream"):
        StreamProducer[np.ndarray](topic, store)
    delete_stream(topic, store)
    assert count_entries(store) == 0
    with StreamProducer[np.ndarray](topic, store) as producer:
        _send(producer, range(2))
    with StreamConsumer[Any](topic, store, timeout=10) as consumer:
        assert [checked(got) for got in items(consumer)] == [("test", 0), ("test", 1)]
