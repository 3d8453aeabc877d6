"""Bad input gets one clear error that names the cause, leaves nothing partial in the store, and
does not disturb other work: unpicklable items, objects whose pickling raises, a proxy whose
store does not exist where it is resolved."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
import threading
from typing import Any

import numpy as np
import pytest
from proxystore.store import Store

from proxy_patterns.proxy import key_of, proxy
from proxy_patterns.store import count_entries, get_store
from proxy_patterns.streams import StreamConsumer, StreamProducer


class BrokenReduce:
    """An object whose pickling raises (a handle to something that cannot travel)."""

    def __reduce__(self) -> Any:
        raise RuntimeError("this sensor handle cannot be sent")


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        (threading.Lock(), TypeError, "lock"),
        (BrokenReduce(), RuntimeError, "sensor handle cannot be sent"),
        ([np.ones(100_000), threading.Lock()], TypeError, "lock"),  # large, and unpicklable
    ],
    ids=["lock", "reduce-raises", "large-list-with-a-lock"],
)
def test_an_item_that_cannot_be_serialized_is_refused_and_the_stream_goes_on(
    store: Store[Any], bad: Any, error: type[Exception], message: str
) -> None:
    if store.connector.__class__.__name__ == "FileConnector":
        pytest.skip("streams need a shared-memory or Redis store")
    consumer = StreamConsumer[Any]("bad-items", store, timeout=30)
    with StreamProducer[Any]("bad-items", store) as producer:
        topic_only = count_entries(store)  # its directory, or its keys
        with pytest.raises(error, match=message):
            producer.send(bad)
        assert count_entries(store) == topic_only  # nothing partial
        producer.send(np.full(100_000, 7))
    assert [int(item[0]) for item in consumer] == [7]
    consumer.close()


def test_a_proxy_whose_store_is_missing_where_it_is_resolved_names_it(
    tmp_path: Any,
) -> None:
    directory = tempfile.mkdtemp(prefix="pp-test-moved-", dir="/dev/shm")
    store = get_store(f"shm://{directory}")
    p = proxy(store, np.ones(10), keep_target=False)
    moved = directory + "-elsewhere"
    os.rename(directory, moved)  # on the worker's host, this store is not there
    try:
        code = (
            "import pickle, sys\n"
            "p = pickle.loads(sys.stdin.buffer.read())\n"
            "try:\n"
            "    p.sum()\n"
            "except Exception as e:\n"
            "    print(type(e).__name__, e)\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code],
            input=pickle.dumps(p),
            cwd=tempfile.gettempdir(),
            capture_output=True,
            check=True,
        ).stdout.decode()
        assert out.startswith("FileNotFoundError") and directory in out
    finally:
        os.rename(moved, directory)
        store.evict(key_of(p))
        assert count_entries(store) == 0
        store.close()
        os.rmdir(directory)
