"""The store proxies live in, chosen by one spec string; shared memory on this node by default.

A *store spec* names a ProxyStore connector and where it keeps its bytes:

=====================  ========================================================
``shm``                :class:`~proxy_patterns.shm.SharedMemoryConnector` in this user's
                       ``0700`` directory of ``/dev/shm`` (``shm.DEFAULT_DIRECTORY``)
``shm:///some/tmpfs``  the same on another tmpfs directory (``?owner=PID-START``: whose
                       segments they are, see :func:`spec_owned_by`; ``?spare_bytes=1GiB``:
                       how much of evicted segments to keep for reuse, 0 for none)
``file:///some/dir``   ProxyStore ``FileConnector`` (never deletes the directory on close)
``redis://host:port``  ProxyStore ``RedisConnector`` (multi-node)
``topology``           :class:`~proxy_patterns.topology.TopologyConnector`: shared memory
                       within each host, objects pulled peer to peer, once per host, across
                       hosts (multi-node, no server; ``topology:///tmpfs/dir``,
                       ``?address=`` this host's address for other hosts)
=====================  ========================================================

The default spec comes from the ``PROXY_PATTERNS_STORE`` environment variable, else ``shm``.
Every spec maps to one registered ProxyStore ``Store`` per process, whose config travels with
each proxy: a worker that receives a proxy of a store it has never seen re-creates it.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable
from urllib.parse import parse_qs, urlparse

import proxystore.store
from proxystore.connectors.protocols import Connector
from proxystore.store import Store

from proxy_patterns.allocation import allocate, unpublished_allocation
from proxy_patterns.availability import reaching
from proxy_patterns.extras import requires_extra
from proxy_patterns.serialize import Frames, deserialize, dumps, serialize
from proxy_patterns.shm import (
    DEFAULT_DIRECTORY,
    SEGMENT_PREFIX,
    SharedMemoryConnector,
    is_segment,
)
from proxy_patterns.sizes import parse_bytes

if TYPE_CHECKING:
    import numpy as np
    import redis

STORE_ENV = "PROXY_PATTERNS_STORE"
DEFAULT_SPEC = "shm"
TOPOLOGY_SPEC = "topology"
"""The store of a cluster whose processes run on several hosts (see
:mod:`proxy_patterns.topology`)."""

# What proxy-patterns keeps in Redis beside an object's own key (``<key>``):
LEASE_PREFIX = "proxy-patterns:lease:"
"""Process leases (see :mod:`proxy_patterns.records`): they say which processes are alive and
expire with them; neither entries nor objects."""
RECORD_SUFFIX = ":refs"
"""``<key>:refs``, an object's reference record (see :mod:`proxy_patterns.records`)."""
CLAIM_SUFFIX = ":claim"
"""``<key>:claim``, the claim on a proxy future's key (see :mod:`proxy_patterns.rendezvous`)."""


@runtime_checkable
class FramesConnector(Protocol):
    """A connector that can write an object's frames without joining them first."""

    def put_frames(self, frames: Frames) -> Any:
        """Store the frames as one payload and return its key."""
        ...


def default_spec() -> str:
    """The spec used when none is given: ``$PROXY_PATTERNS_STORE`` or ``shm``."""
    return os.environ.get(STORE_ENV) or DEFAULT_SPEC


def connector_from_spec(spec: str) -> Connector[Any]:
    """Build the connector a store spec names (see the module docstring)."""
    url = urlparse(spec)
    if url.scheme == "" and url.path == "shm":
        return SharedMemoryConnector(DEFAULT_DIRECTORY)
    if url.scheme == "shm":
        query = parse_qs(url.query)
        owner = query.get("owner", [None])[0]
        spare = query.get("spare_bytes", [None])[0]
        spare_bytes = None if spare is None else parse_bytes(spare)
        return SharedMemoryConnector(
            url.path or DEFAULT_DIRECTORY, owner=owner, spare_bytes=spare_bytes
        )
    if url.scheme == TOPOLOGY_SPEC or (url.scheme == "" and url.path == TOPOLOGY_SPEC):
        from proxy_patterns.topology import TopologyConnector

        address = parse_qs(url.query).get("address", [None])[0]
        directory = url.path if url.scheme else DEFAULT_DIRECTORY
        return TopologyConnector(directory or DEFAULT_DIRECTORY, address=address)
    if url.scheme == "file" and url.path:
        from proxystore.connectors.file import FileConnector

        return FileConnector(url.path, clear=False)
    if url.scheme in ("redis", "rediss") and url.hostname:
        with requires_extra("redis", f"the store {public_spec(spec)!r}"):
            from proxy_patterns.redis_connector import connector_from_url

        return connector_from_url(spec)
    raise ValueError(
        f"unknown store spec {public_spec(spec)!r}: expected 'shm', 'shm:///tmpfs/dir', "
        "'topology', 'topology:///tmpfs/dir[?address=...]', 'file:///dir' or "
        "'redis[s]://[user[:password]@]host:port[/db][?ca_file=...]'"
    )


def public_spec(spec: str) -> str:
    """``spec`` without the password it may hold: what names the store, travels to other
    processes (which take the password from their environment, see
    :mod:`proxy_patterns.redis_connector`) and shows in messages."""
    url = urlparse(spec)
    if url.password is None:
        return spec
    user = f"{url.username}@" if url.username else ""
    port = f":{url.port}" if url.port else ""
    return url._replace(netloc=f"{user}{url.hostname}{port}").geturl()


def spec_owned_by(spec: str | None, owner: str) -> str:
    """``spec``, with shared-memory segments it creates owned by process ``owner``.

    For a worker that puts results on behalf of a longer-lived process (a scheduler): the
    segments then outlive the worker. Other stores have no per-process cleanup to move; their
    spec is returned without a password, as it is sent to the worker.
    """
    spec = spec or default_spec()
    connector = connector_from_spec(spec)
    if not isinstance(connector, SharedMemoryConnector) or connector.serves_other_hosts:
        # (a process of one host is nobody's owner on another: records decide there)
        return public_spec(spec)
    return f"shm://{connector.directory}?owner={owner}&spare_bytes={connector.spare_bytes}"


def get_store(spec: str | None = None) -> Store[Any]:
    """The process's store for ``spec``, created and registered on first use.

    Resolved objects are not cached by the store (``cache_size=0``): on shared memory a second
    resolve is another cheap mapping, and a cache would pin memory that eviction should free.
    """
    spec = spec or default_spec()
    name = f"proxy-patterns:{public_spec(spec)}"
    store = proxystore.store.get_store(name)
    if store is None:
        store = Store(
            name,
            connector_from_spec(spec),
            serializer=serialize,
            deserializer=deserialize,
            cache_size=0,
            populate_target=True,
            register=True,
        )
    return store


def put(store: Store[Any], obj: Any, frames: Frames | None = None) -> Any:
    """Put ``obj`` in ``store`` and return its key, writing its buffers without joining them
    when the connector can (one copy from the object into the store).

    ``frames``, if given, is ``dumps(obj)`` already made (for example to hash it). An array
    from :func:`empty` is published as it is, without a copy (see
    :mod:`proxy_patterns.allocation`).
    """
    connector = store.connector
    if isinstance(connector, SharedMemoryConnector):
        allocation = unpublished_allocation(obj, connector)
        if allocation is not None:
            return allocation.publish(connector, connector.new_key())
    frames = dumps(obj) if frames is None else frames
    with reaching(store.name, f"putting {frames.nbytes} bytes"):
        if isinstance(connector, FramesConnector):
            return connector.put_frames(frames)
        return store.put(frames, serializer=Frames.join)


def empty(shape: Any, dtype: Any = float, store: Store[Any] | None = None) -> np.ndarray:
    """A writable array of ``shape`` and ``dtype`` allocated in ``store`` (default:
    :func:`get_store`), to be filled in place and published without a copy.

    On a shared-memory store its memory is a segment that is no key yet, and ``proxy(store,
    array)``, ``put`` or a future's ``set_result(array)`` publishes it as it is; an allocation
    never published is removed. See :mod:`proxy_patterns.allocation` for the rules. Other
    stores (Redis, files) cannot be written in place: there it is an ordinary
    :func:`numpy.empty` array, copied when published, so the same code runs on every store.
    Its contents are arbitrary, as :func:`numpy.empty`'s.
    """
    connector = (store or get_store()).connector
    if isinstance(connector, SharedMemoryConnector):
        return allocate(connector, shape, dtype)
    import numpy

    return numpy.empty(shape, dtype)


def redis_client_of(connector: Connector[Any]) -> redis.Redis | None:
    """A client of the Redis server ``connector`` keeps its objects in, if it is ProxyStore's
    ``RedisConnector``; None for any other connector.

    The one way to recognise a Redis-backed store: proxy-patterns keeps its records, claims
    and leases beside the objects, in the same Redis. The client is built from the connector's
    public config (ProxyStore's own client is private) once per connector, and kept for as long
    as the connector lives: by the connector object, not its ``id``, which another connector
    may reuse once this one is freed.
    """
    # Looked up, not imported: without the module (and `redis`, an optional extra) loaded,
    # no RedisConnector exists in this process.
    module = sys.modules.get("proxystore.connectors.redis")
    if module is None or not isinstance(connector, module.RedisConnector):
        return None
    with _redis_clients_lock:
        client = _redis_clients.get(connector)
        if client is None:
            new_client = getattr(connector, "new_client", None)  # ours: credentials, TLS
            if new_client is not None:
                client = new_client()
            else:
                import redis

                config = connector.config()
                client = redis.Redis(host=config["hostname"], port=config["port"])
            _redis_clients[connector] = client
        return client


_redis_clients: weakref.WeakKeyDictionary[Any, redis.Redis] = weakref.WeakKeyDictionary()
_redis_clients_lock = threading.Lock()


def count_entries(store: Store[Any]) -> int:
    """Number of entries ``store``'s backend holds, of every process: objects, and also
    reference records, proxy futures' claims, the temporary files of puts in progress and
    arrays from :func:`empty` not yet published.

    What "nothing leaked" checks: 0 once every proxy, owned object and future is released.
    Redis process leases are not counted (they expire with their process); on Redis every
    other key of the database is, proxy-patterns' or not.
    """
    connector = store.connector
    if isinstance(connector, SharedMemoryConnector):
        return sum(name.startswith(SEGMENT_PREFIX) for name in os.listdir(connector.directory))
    redis_client = redis_client_of(connector)
    if redis_client is not None:
        return sum(1 for _ in _redis_keys(redis_client))
    return len(_file_entries(connector))


def count_objects(store: Store[Any]) -> int:
    """Number of objects (values that were put) in ``store``'s backend, of every process:
    the entries :func:`count_entries` counts less reference records, claims, temporary files
    (and a ``FileConnector``'s markers of complete files)."""
    connector = store.connector
    if isinstance(connector, SharedMemoryConnector):
        return sum(is_segment(name) for name in os.listdir(connector.directory))
    redis_client = redis_client_of(connector)
    if redis_client is not None:
        ends = (RECORD_SUFFIX.encode(), CLAIM_SUFFIX.encode())
        return sum(not key.endswith(ends) for key in _redis_keys(redis_client))
    # A FileConnector's object is a file and a marker saying it is complete: count markers.
    return sum(name.endswith(".ready") for name in _file_entries(connector))


def _redis_keys(client: redis.Redis) -> Iterator[bytes]:
    """The keys of the database but process leases."""
    lease = LEASE_PREFIX.encode()
    return (key for key in client.scan_iter(count=1000) if not key.startswith(lease))


def _file_entries(connector: Connector[Any]) -> list[str]:
    """The files of a ProxyStore ``FileConnector``'s directory."""
    from proxystore.connectors.file import FileConnector

    if not isinstance(connector, FileConnector):
        raise TypeError(f"cannot count the entries of a {type(connector).__name__}")
    directory = connector.store_dir
    return os.listdir(directory) if os.path.isdir(directory) else []


def entries_left_after_eviction(store: Store[Any], timeout: float = 30) -> int:
    """:func:`count_entries` once pending evictions are done (they follow the framework
    asynchronously), or after ``timeout`` seconds if some never are."""
    deadline = time.monotonic() + timeout
    while (left := count_entries(store)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left
