"""Payload signing: with ``$PROXY_PATTERNS_HMAC_KEY`` set, a payload that is altered, unsigned
or signed with another key is refused before anything in it is unpickled, on every store and
for stream messages too."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from typing import Any

import numpy as np
import pytest
from proxystore.serialize import SerializationError
from proxystore.store import Store

from proxy_patterns.serialize import HMAC_KEY_ENV, PayloadSignatureError, deserialize, dumps
from proxy_patterns.shm import SharedMemoryConnector
from proxy_patterns.store import redis_client_of
from proxy_patterns.streams import StreamConsumer, StreamProducer

unpickled: list[str] = []


class Tripwire:
    """Records every unpickling: a refused payload must not reach it."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __reduce__(self) -> Any:
        return _unpickle_tripwire, (self.name,)


def _unpickle_tripwire(name: str) -> Tripwire:
    unpickled.append(name)
    return Tripwire(name)


@pytest.fixture(autouse=True)
def _fresh() -> None:
    unpickled.clear()


def test_a_signed_payload_round_trips_zero_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(HMAC_KEY_ENV, "s3cret")
    array = np.arange(100_000)
    payload = dumps(array).join()
    assert bytes(payload[:4]) == b"PPS1"
    back = deserialize(payload)
    assert np.array_equal(back, array)
    assert np.shares_memory(back, np.frombuffer(payload, dtype=np.uint8))


@pytest.mark.parametrize("where", ["pickle", "buffer", "mac"])
def test_an_altered_payload_is_refused_before_unpickling(
    monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    monkeypatch.setenv(HMAC_KEY_ENV, "s3cret")
    frames = dumps([Tripwire("a"), np.zeros(1000)])
    payload = frames.join()
    mac_at = 8 + 8 * len(frames.frames)  # magic and count, then one length per frame
    offset = {"pickle": len(frames.header) + 10, "buffer": len(payload) - 100, "mac": mac_at}[
        where
    ]
    payload[offset] ^= 0xFF
    with pytest.raises(PayloadSignatureError, match="HMAC check"):
        deserialize(payload)
    assert unpickled == []


def test_unsigned_and_foreign_payloads_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    unsigned = dumps(Tripwire("unsigned")).join()
    monkeypatch.setenv(HMAC_KEY_ENV, "other key")
    foreign = dumps(Tripwire("foreign")).join()
    monkeypatch.setenv(HMAC_KEY_ENV, "s3cret")
    with pytest.raises(PayloadSignatureError, match="not signed"):
        deserialize(unsigned)
    with pytest.raises(PayloadSignatureError, match="HMAC check"):
        deserialize(foreign)
    monkeypatch.delenv(HMAC_KEY_ENV)
    with pytest.raises(PayloadSignatureError, match=f"set \\${HMAC_KEY_ENV}"):
        deserialize(foreign)
    assert unpickled == []


def test_a_truncated_payload_is_a_clear_error() -> None:
    payload = dumps(np.zeros(10_000)).join()
    with pytest.raises(ValueError, match="truncated payload"):
        deserialize(payload[: len(payload) // 2])


def test_a_store_payload_planted_without_the_key_is_refused(
    store: Store[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another writer of the store (without the key) plants a payload under a key we read."""
    monkeypatch.setenv(HMAC_KEY_ENV, "s3cret")
    key = store.put(np.ones(10))
    assert np.array_equal(store.get(key), np.ones(10))
    planted = bytes(_unsigned(Tripwire("planted")))
    connector = store.connector
    client = redis_client_of(connector)
    if client is not None:
        client.set(key.redis_key, planted)
    elif isinstance(connector, SharedMemoryConnector):  # written over, its size kept
        with open(connector.path(key), "r+b") as f:
            f.write(planted)
    else:  # a FileConnector's file of the key
        with open(os.path.join(connector.store_dir, key.filename), "wb") as f:
            f.write(planted)
    with pytest.raises(SerializationError) as refused:  # ProxyStore's, around ours
        store.get(key)
    assert isinstance(refused.value.__cause__, PayloadSignatureError)
    assert unpickled == []
    store.evict(key)


def _unsigned(obj: Any) -> bytearray:
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(HMAC_KEY_ENV, raising=False)
        return dumps(obj).join()


def test_stream_messages_are_signed_too(
    shm_store: Store[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(HMAC_KEY_ENV, "s3cret")
    consumer = StreamConsumer[Any]("signed", shm_store, timeout=30)
    with StreamProducer[Any]("signed", shm_store) as producer:
        producer.send({"small": 1})
        producer.send(np.ones(100_000))
    assert next(consumer) == {"small": 1}
    assert float(next(consumer).sum()) == 100_000.0  # read before the next take releases it
    assert next(consumer, None) is None
    consumer.close()


def test_a_process_without_the_key_cannot_read_what_a_signing_process_wrote(
    shm_store: Store[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(HMAC_KEY_ENV, "s3cret")
    key = shm_store.put(np.ones(10))
    code = (
        "import sys, proxy_patterns.store as s\n"
        "from proxy_patterns.serialize import PayloadSignatureError\n"
        "from proxy_patterns.shm import SharedMemoryKey\n"
        "store = s.get_store(sys.argv[1])\n"
        "try:\n"
        "    store.get(SharedMemoryKey(sys.argv[2], int(sys.argv[3])))\n"
        "except Exception as e:  # ProxyStore's SerializationError, around ours\n"
        "    assert isinstance(e.__cause__, PayloadSignatureError)\n"
        "    print('refused:', e.__cause__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != HMAC_KEY_ENV}
    spec = f"shm://{shm_store.connector.directory}"
    out = subprocess.run(
        [sys.executable, "-c", code, spec, key.name, str(key.nbytes)],
        cwd=tempfile.gettempdir(),
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.startswith("refused: payload is signed, and this process has no key")
    shm_store.evict(key)
