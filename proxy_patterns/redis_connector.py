"""ProxyStore's Redis connector, for servers that ask for credentials, a database, or TLS.

ProxyStore 1.1's ``RedisConnector`` takes a host and a port only. :class:`SecureRedisConnector`
is that connector (a subclass: everything that recognises a Redis store still does) with an
ACL user and password, a database number and TLS, from specs such as
``redis://alice@host:6379/2`` or ``rediss://:password@host:6380?ca_file=/etc/ca.pem``.

A store's configuration travels inside every proxy (to re-create the store where the proxy is
resolved), so it holds **no password**: the connector takes it from the spec in the process
that gives it, and from ``$PROXY_PATTERNS_REDIS_PASSWORD`` in every process that re-creates
the store from a proxy (set it in the workers' environment). Neither ``repr``, the store's
name, its config, nor any error shows it.

Values go to and from the server through :mod:`proxy_patterns.redis_wire`: read straight into
a writable buffer (so resolved arrays are views on it, not another copy), sent as the frames
they are made of. They are the plain strings ``RedisConnector`` keeps under the object's key,
so eviction, the reference records and entry counts see the same keys.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import redis
from proxystore.connectors.redis import RedisConnector, RedisKey
from proxystore.serialize import BytesLike

from proxy_patterns import redis_wire
from proxy_patterns.serialize import Frames
from proxy_patterns.store import public_spec

PASSWORD_ENV = "PROXY_PATTERNS_REDIS_PASSWORD"
"""Where a process that re-creates a Redis store from a proxy finds the password."""

DEFAULT_MAX_VALUE = 512 << 20
"""The largest value a Redis server takes unless configured otherwise (``proto-max-bulk-len``)."""


class SecureRedisConnector(RedisConnector):
    """A ``RedisConnector`` with a user, a password, a database number and TLS.

    Args:
        hostname: The server's host.
        port: The server's port.
        clear: Remove every key of the database at :meth:`close` (ProxyStore's option).
        db: The database number.
        username: The ACL user (Redis 6); None for the default user.
        password: The password; None takes ``$PROXY_PATTERNS_REDIS_PASSWORD`` (if set).
        tls: Connect with TLS (``rediss://``).
        ca_file: The certificates to verify the server with (default: the system's).
    """

    def __init__(
        self,
        hostname: str,
        port: int,
        clear: bool = False,
        *,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        tls: bool = False,
        ca_file: str | None = None,
    ) -> None:
        self.hostname = hostname
        self.port = port
        self.clear = clear
        self.db = db
        self.username = username
        self.tls = tls
        self.ca_file = ca_file
        self._password = password if password is not None else os.environ.get(PASSWORD_ENV)
        # RESP2: redis_wire reads this client's replies itself, and on RESP2 a connection
        # receives nothing it did not ask for (RESP3 may push notifications at any time).
        self._redis_client = self.new_client(protocol=2)

    def new_client(self, **options: Any) -> redis.Redis:
        """A client of the same server and database, with the same credentials (and
        ``options``, more of ``redis.Redis``'s)."""
        return redis.Redis(
            host=self.hostname,
            port=self.port,
            db=self.db,
            username=self.username,
            password=self._password,
            ssl=self.tls,
            ssl_ca_certs=self.ca_file,
            **options,
        )

    def get(self, key: RedisKey) -> memoryview | None:
        """The value of ``key`` in a writable buffer of its own (None if there is none)."""
        return redis_wire.get_values(self._redis_client, [key.redis_key.encode()])[0]

    def get_batch(self, keys: Sequence[RedisKey]) -> list[BytesLike | None]:
        """The values of ``keys`` (None for those there are none of), in one round trip."""
        if not keys:
            return []
        names = [key.redis_key.encode() for key in keys]
        return list(redis_wire.get_values(self._redis_client, names))

    def put(self, obj: BytesLike) -> RedisKey:
        """Store ``obj`` under a new key, sent from its own memory."""
        key = self.new_key()
        self.set(key, obj)
        return key

    def put_batch(self, objs: Sequence[BytesLike]) -> list[RedisKey]:
        """Store each object under a new key."""
        return [self.put(obj) for obj in objs]

    def put_frames(self, frames: Frames) -> RedisKey:
        """Store a payload under a new key, sent frame by frame (never joined)."""
        key = self.new_key()
        self.set_frames(key, frames)
        return key

    def set(self, key: RedisKey, obj: BytesLike) -> None:
        """Store ``obj`` under ``key``, sent from its own memory."""
        self._set(key, [memoryview(obj).cast("B")], only_new=False)

    def set_frames(self, key: RedisKey, frames: Frames, *, only_new: bool = False) -> bool:
        """Store a payload under ``key``, sent frame by frame; with ``only_new``, only if
        ``key`` has no value yet (``SET NX``). True if it was stored."""
        return self._set(key, list(frames.chunks()), only_new=only_new)

    def _set(self, key: RedisKey, chunks: list[redis_wire.Chunk], *, only_new: bool) -> bool:
        nbytes = sum(memoryview(chunk).nbytes for chunk in chunks)
        if nbytes > self._max_value:
            raise ValueError(
                f"cannot store {nbytes} bytes in Redis at {self.hostname}:{self.port}: the "
                f"server takes values of at most {self._max_value} bytes (its "
                "proto-max-bulk-len setting); raise that setting, or keep objects this large "
                "in a shared-memory store"
            )
        pieces = redis_wire.command(
            b"SET", key.redis_key.encode(), value=chunks, after=[b"NX"] if only_new else []
        )
        return redis_wire.send(self._redis_client, pieces) is not None

    @functools.cached_property
    def _max_value(self) -> int:
        """The largest value the server takes. A larger one is refused before it is sent:
        the server would drop the connection part-way, and redis-py send it again and again
        (then report a broken pipe)."""
        try:
            setting = self._redis_client.config_get("proto-max-bulk-len").get("proto-max-bulk-len")
        except redis.ResponseError:  # CONFIG is not allowed to this user
            setting = None
        return DEFAULT_MAX_VALUE if setting is None else int(setting)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(hostname={self.hostname}, port={self.port}, db={self.db}, "
            f"username={self.username}, tls={self.tls})"
        )

    def config(self) -> dict[str, Any]:
        """What re-creates the connector elsewhere: everything but the password."""
        return {
            "hostname": self.hostname,
            "port": self.port,
            "clear": self.clear,
            "db": self.db,
            "username": self.username,
            "tls": self.tls,
            "ca_file": self.ca_file,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SecureRedisConnector:
        """The connector a :meth:`config` describes, its password from the environment."""
        return cls(**config)


def connector_from_url(spec: str) -> SecureRedisConnector:
    """The connector of a ``redis://`` or ``rediss://`` spec (see the module docstring)."""
    url = urlparse(spec)
    query = parse_qs(url.query)
    path = url.path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"the database of store spec {public_spec(spec)!r} must be a number")
    return SecureRedisConnector(
        url.hostname or "localhost",
        url.port or 6379,
        db=int(path or 0),
        username=unquote(url.username) if url.username else None,
        password=unquote(url.password) if url.password else None,
        tls=url.scheme == "rediss",
        ca_file=query.get("ca_file", [None])[0],
    )
