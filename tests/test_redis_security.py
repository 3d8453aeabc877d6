"""Redis stores that ask for credentials, a database number or TLS, on real servers: a
redis-server with a password and an ACL user, behind a real TLS endpoint. The password never
travels with a proxy, nor shows in a name, a repr, a config or an error."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import ssl
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pytest
import redis
from distributed import Client, LocalCluster

from conftest import assert_empty_and_close
from proxy_patterns import StoreAccessError, StoreUnavailableError
from proxy_patterns.bench.redis_server import local_redis_server
from proxy_patterns.plugins.dask import register
from proxy_patterns.proxy import key_of, proxy
from proxy_patterns.redis_connector import PASSWORD_ENV, SecureRedisConnector
from proxy_patterns.store import count_entries, get_store
from proxy_patterns.streams import StreamConsumer, StreamProducer

PASSWORD = "t0p-s3cret"
ALICE = ("alice", "al1ce-pw")


@pytest.fixture(scope="module")
def secured() -> Iterator[tuple[str, int]]:
    """A redis-server that needs a password (default user) or alice's (an ACL user)."""
    user, password = ALICE
    acl = ("--user", user, "on", f">{password}", "~*", "&*", "+@all")
    with local_redis_server(password=PASSWORD, arguments=acl) as url:
        parsed = urlparse(url)
        assert parsed.hostname is not None and parsed.port is not None
        yield parsed.hostname, parsed.port


@pytest.fixture
def spec(secured: tuple[str, int]) -> Iterator[str]:
    host, port = secured
    yield f"redis://:{PASSWORD}@{host}:{port}/3"
    redis.Redis(host=host, port=port, password=PASSWORD).flushall()


def test_a_password_and_a_database_from_the_spec(spec: str, secured: tuple[str, int]) -> None:
    store = get_store(spec)
    key = store.put(np.arange(10))
    assert np.array_equal(store.get(key), np.arange(10))
    server = redis.Redis(host=secured[0], port=secured[1], password=PASSWORD, db=3)
    assert server.dbsize() == 1
    assert redis.Redis(host=secured[0], port=secured[1], password=PASSWORD).dbsize() == 0
    store.evict(key)
    assert_empty_and_close(store)


def test_the_password_shows_nowhere_and_travels_with_no_proxy(spec: str) -> None:
    store = get_store(spec)
    p = proxy(store, np.arange(10), keep_target=False)
    shown = [store.name, repr(store), repr(store.connector), str(store.config())]
    assert all(PASSWORD not in text for text in shown), shown
    assert PASSWORD.encode() not in pickle.dumps(p)
    store.evict(key_of(p))
    assert_empty_and_close(store)


def test_an_acl_user(secured: tuple[str, int]) -> None:
    user, password = ALICE
    store = get_store(f"redis://{user}:{password}@{secured[0]}:{secured[1]}")
    assert isinstance(store.connector, SecureRedisConnector)
    assert store.connector.username == user
    key = store.put(b"x" * 1000)
    assert store.get(key) == b"x" * 1000
    store.evict(key)
    assert_empty_and_close(store)


def test_wrong_credentials_are_our_error_naming_the_store_not_the_password(
    secured: tuple[str, int],
) -> None:
    store = get_store(f"redis://:not-the-password@{secured[0]}:{secured[1]}")
    with pytest.raises(StoreAccessError, match=PASSWORD_ENV) as refused:
        proxy(store, np.ones(10))
    assert "not-the-password" not in str(refused.value)
    assert f"{secured[0]}:{secured[1]}" in str(refused.value)


def _resolve_in_a_process(p: Any, env: dict[str, str]) -> str:
    code = (
        "import pickle, sys\n"
        "p = pickle.loads(sys.stdin.buffer.read())\n"
        "try:\n"
        "    print(int(p.sum()))\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        input=pickle.dumps(p),
        cwd=tempfile.gettempdir(),
        env=env,
        capture_output=True,
        check=True,
    )
    return done.stdout.decode()


def test_another_process_takes_the_password_from_its_environment(spec: str) -> None:
    store = get_store(spec)
    p = proxy(store, np.ones(1000), keep_target=False)
    env = {k: v for k, v in os.environ.items() if k != PASSWORD_ENV}
    assert _resolve_in_a_process(p, {**env, PASSWORD_ENV: PASSWORD}).strip() == "1000"
    refused = _resolve_in_a_process(p, env)
    assert refused.startswith("StoreAccessError") and PASSWORD_ENV in refused
    store.evict(key_of(p))
    assert_empty_and_close(store)


def test_streams_and_records_on_a_secured_server(spec: str) -> None:
    store = get_store(spec)
    consumer = StreamConsumer[Any]("secured", store, timeout=30)
    with StreamProducer[Any]("secured", store) as producer:
        for i in range(3):
            producer.send(np.full(100_000, i))
    assert [int(next(consumer)[0]) for _ in range(3)] == [0, 1, 2]
    assert next(consumer, None) is None
    consumer.close()
    assert count_entries(store) == 0
    assert_empty_and_close(store)


def _double(x: np.ndarray) -> np.ndarray:
    return x * 2


def test_dask_workers_reach_a_secured_store(spec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The plugin sends the spec without its password; workers take it from their environment
    (inherited here, set in a cluster's worker environment elsewhere)."""
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    store = get_store(spec)
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        register(client, threshold="1 MiB", store=spec)
        assert PASSWORD not in str(client.run_on_scheduler(_scheduler_plugin_spec))
        result = client.submit(_double, np.ones(1_000_000)).result()
        assert float(result.sum()) == 2_000_000.0
        del result
    assert_empty_and_close(store)


def _scheduler_plugin_spec(dask_scheduler: Any) -> str:
    return str(dask_scheduler.plugins["proxy-patterns"].store_spec)


# --- TLS: a real TLS endpoint (Python's ssl) in front of the server ---------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, made with openssl."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture(scope="module")
def tls_port(secured: tuple[str, int], certificate: tuple[Path, Path]) -> Iterator[int]:
    """A TLS endpoint on a free port that forwards to the secured server."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    loop = asyncio.new_event_loop()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(*secured)
        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    server = loop.run_until_complete(asyncio.start_server(forward, "127.0.0.1", 0, ssl=context))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield int(server.sockets[0].getsockname()[1])
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def test_tls_with_the_servers_ca(
    tls_port: int, certificate: tuple[Path, Path], secured: tuple[str, int]
) -> None:
    store = get_store(f"rediss://:{PASSWORD}@127.0.0.1:{tls_port}?ca_file={certificate[0]}")
    assert store.connector.tls  # type: ignore[attr-defined]
    key = store.put(np.arange(100_000))
    assert int(store.get(key).sum()) == int(np.arange(100_000).sum())
    store.evict(key)
    assert_empty_and_close(store)


def test_tls_refuses_a_server_it_cannot_verify(tls_port: int) -> None:
    store = get_store(f"rediss://:{PASSWORD}@127.0.0.1:{tls_port}")  # the system's CAs only
    with pytest.raises(StoreUnavailableError, match="certificate verify failed"):
        proxy(store, np.ones(10))
