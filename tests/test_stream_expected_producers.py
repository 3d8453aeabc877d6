"""``StreamProducer(producers=N)``: the stream ends once N producers closed, whoever opened
the topic first.

Tasks that each send one result and close (a DeepDriveMD-like results stream, see
``notebooks/streaming.ipynb``) need it: the driver's consumer, joined before any task runs,
opens the topic first.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from proxystore.store import Store

from proxy_patterns.streams import StreamConsumer, StreamProducer


@pytest.mark.parametrize("store_spec", ["shm", "redis"], indirect=True)
def test_producers_n_holds_when_a_consumer_opened_the_topic(store: Store[Any]) -> None:
    topic = f"results-{uuid.uuid4().hex}"
    consumer = StreamConsumer[int](topic, store, timeout=30)
    try:
        for task in range(3):  # one short-lived producer per task, one after the other
            with StreamProducer[int](topic, store, producers=3) as producer:
                producer.send(task)
    finally:
        received = list(consumer)  # drained either way, so that the store is left empty
        consumer.close()
    assert received == [0, 1, 2]
