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
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import redis
from proxystore.connectors.redis import RedisConnector

from proxy_patterns.store import public_spec

PASSWORD_ENV = "PROXY_PATTERNS_REDIS_PASSWORD"
"""Where a process that re-creates a Redis store from a proxy finds the password."""


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
        self._redis_client = self.new_client()

    def new_client(self) -> redis.Redis:
        """A client of the same server and database, with the same credentials."""
        return redis.Redis(
            host=self.hostname,
            port=self.port,
            db=self.db,
            username=self.username,
            password=self._password,
            ssl=self.tls,
            ssl_ca_certs=self.ca_file,
        )

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
