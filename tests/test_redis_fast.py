"""The Redis store's transfer path on a real redis-server: values read straight into one
writable buffer, written frame by frame. Every type round-trips, small and large; the sizes
where the reader changes course (its first read, the buffer kind) are exact; evicted and
missing keys are None; a value whose writer died part-way is never seen; values larger than
the server takes are refused up front with an error saying so."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import pytest
import redis
from proxystore.connectors.redis import RedisKey
from proxystore.store import Store

from conftest import assert_empty_and_close
from proxy_patterns import redis_wire
from proxy_patterns.bench.redis_server import local_redis_server
from proxy_patterns.redis_connector import SecureRedisConnector
from proxy_patterns.serialize import HMAC_KEY_ENV
from proxy_patterns.store import count_entries, get_store, put, redis_client_of

LARGE = 30 << 20


@dataclasses.dataclass
class Record:
    name: str
    values: list[float]


def objects(nbytes: int) -> dict[str, Any]:
    """One object of each kind, each of about ``nbytes``."""
    rng = np.random.default_rng(7)
    rows = max(nbytes // 64, 4)
    return {
        "array": rng.standard_normal(nbytes // 8),
        "bytes": rng.bytes(nbytes),
        "str": "é" * (nbytes // 2),
        "dataclass": Record("r", [1.5] * max(nbytes // 9, 1)),
        # Many small Python objects cost their pickling, not their bytes: fewer of them.
        "records": {i: Record(f"r{i}", [float(i)]) for i in range(max(nbytes // 2000, 2))},
        "frame": pd.DataFrame({"x": np.arange(rows), "label": [f"row {i}" for i in range(rows)]}),
    }


def equal(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray):
        return bool(np.array_equal(a, b))
    if isinstance(a, pd.DataFrame):
        return bool(a.equals(b))
    return bool(a == b)


@pytest.fixture
def redis_store(redis_url: str) -> Iterator[Store[Any]]:
    store = get_store(redis_url)
    assert isinstance(store.connector, SecureRedisConnector)
    yield store
    assert_empty_and_close(store)


@pytest.mark.parametrize("nbytes", [1000, LARGE], ids=["small", "30MB"])
def test_every_kind_round_trips(redis_store: Store[Any], nbytes: int) -> None:
    for name, obj in objects(nbytes).items():
        for key in (put(redis_store, obj), redis_store.put(obj)):  # frames, and joined bytes
            back = redis_store.get(key)
            assert type(back) is type(obj) and equal(back, obj), name
            redis_store.evict(key)


def test_a_resolved_array_is_the_received_buffer_not_a_copy(
    redis_store: Store[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    received: list[Any] = []

    def recorded(nbytes: int) -> Any:
        received.append(value_buffer(nbytes))
        return received[-1]

    value_buffer = redis_wire.value_buffer
    monkeypatch.setattr(redis_wire, "value_buffer", recorded)
    array = np.arange(LARGE // 8, dtype=np.float64)
    key = put(redis_store, array)
    back = redis_store.get(key)
    assert np.shares_memory(back, np.frombuffer(received[-1], dtype=np.uint8))
    back[0] = -1  # writable, and the store's value is untouched
    assert redis_store.get(key)[0] == 0
    redis_store.evict(key)


# Where the reader changes course: the end of its first read (a reply's header line and the
# start of the value arrive together), and the size from which buffers are mapped in at once.
_FIRST_READ = redis_wire._READ_SIZE - len(b"$65536\r\n") - 2
_BOUNDARIES = [0, 1, _FIRST_READ - 1, _FIRST_READ, _FIRST_READ + 1, redis_wire._READ_SIZE]
_BOUNDARIES += [redis_wire._POPULATE_FROM + d for d in (-1, 0, 1)]


@pytest.mark.parametrize("nbytes", _BOUNDARIES)
def test_values_at_the_readers_boundaries(redis_url: str, nbytes: int) -> None:
    connector = get_store(redis_url).connector
    value = os.urandom(nbytes)
    key = connector.put(value)
    assert bytes(connector.get(key)) == value
    missing = RedisKey("never-put")
    batch = connector.get_batch([key, missing, key])
    assert [None if v is None else bytes(v) for v in batch] == [value, None, value]
    connector.evict(key)
    assert connector.get(key) is None
    assert_empty_and_close(get_store(redis_url))


def test_a_batch_of_many_small_and_large_values_in_one_round_trip(
    redis_store: Store[Any],
) -> None:
    values = [os.urandom(n) for n in (3, 70_000, 5, 2 << 20, 0, 17)] * 5
    connector = redis_store.connector
    keys = connector.put_batch(values)
    assert [bytes(v) for v in connector.get_batch(keys)] == values
    assert connector.get_batch([]) == []
    for key in keys:
        connector.evict(key)


def test_a_signed_payload(redis_store: Store[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(HMAC_KEY_ENV, "s3cret")
    array = np.arange(LARGE // 8)
    key = put(redis_store, array)
    client = redis_client_of(redis_store.connector)
    assert client is not None and client.getrange(key.redis_key, 0, 3) == b"PPS1"
    assert np.array_equal(redis_store.get(key), array)
    redis_store.evict(key)


def test_evict_leaves_nothing_and_gets_none(redis_store: Store[Any]) -> None:
    keys = [put(redis_store, obj) for obj in objects(LARGE // 10).values()]
    assert count_entries(redis_store) == len(keys)
    for key in keys:
        redis_store.evict(key)
        assert redis_store.get(key) is None and not redis_store.exists(key)
    assert count_entries(redis_store) == 0
    assert redis_store.connector.get_batch(keys) == [None] * len(keys)


_HALF_A_SET = """
import socket, sys
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])))
key, nbytes = sys.argv[3].encode(), int(sys.argv[4])
sock.sendall(b"*3\\r\\n$3\\r\\nSET\\r\\n$%d\\r\\n%s\\r\\n$%d\\r\\n" % (len(key), key, nbytes))
sock.sendall(bytes(nbytes // 2))
print("half sent", flush=True)
sys.stdin.read()
"""


def test_a_writer_killed_part_way_leaves_no_value(redis_store: Store[Any]) -> None:
    connector = redis_store.connector
    assert isinstance(connector, SecureRedisConnector)
    key = connector.new_key()
    where = (connector.hostname, str(connector.port), key.redis_key, str(LARGE))
    writer = subprocess.Popen(
        [sys.executable, "-c", _HALF_A_SET, *where],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=tempfile.gettempdir(),
    )
    assert writer.stdout is not None
    assert writer.stdout.readline() == "half sent\n"
    assert connector.get(key) is None  # the server holds the half, as no value
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert connector.get(key) is None and not connector.exists(key)
    assert count_entries(redis_store) == 0


def test_a_reply_cut_short_is_an_error_never_a_shorter_value() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(b"$5\r\nabc")
        theirs.close()
        with pytest.raises(redis.ConnectionError, match="closed the connection mid-reply"):
            redis_wire.BulkReader(ours).bulk()


def test_a_value_larger_than_the_server_takes_is_refused_before_it_is_sent() -> None:
    with local_redis_server(arguments=["--proto-max-bulk-len", "1mb"]) as url:
        store = get_store(url)
        with pytest.raises(ValueError, match="proto-max-bulk-len"):
            put(store, bytes(2 << 20))
        key = put(store, bytes(1 << 19))  # the connection is still good
        assert store.get(key) == bytes(1 << 19)
        store.evict(key)
        assert_empty_and_close(store)
