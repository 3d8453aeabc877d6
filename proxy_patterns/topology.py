"""Topology-aware stores: shared memory within a host, and each object's bytes pulled at most
once per host, peer to peer, across hosts.

The store spec ``topology`` (``topology:///tmpfs/dir?address=10.0.0.5``) is the shared-memory
store of :mod:`proxy_patterns.shm` with keys that also say where their object is: the
:func:`~proxy_patterns.hosts.host_identity` of the host that put it and the endpoint of a
peer server there (:mod:`proxy_patterns.peers`), run by the process that put it.

* On the object's own host a read maps the segment, as on a one-host store.
* On another host the first reader pulls the bytes from that peer server into a *replica*: a
  segment of the same name in its own host's shared memory, which every later reader on that
  host maps. One fetch per host at a time (a host-wide lock), so an object crosses each host
  boundary once, however many tasks there read it.
* A replica is held, in its host's reference records, by the process that fetched it; that
  process checks every :data:`~proxy_patterns.records.WATCH_INTERVAL` whether the object
  still exists on its host and drops the replica once it does not, or when it exits (a killed
  one's replicas are swept as any dead process's segments are). The object itself goes by
  its own record, on its own host, where processes of other hosts hold it under peer leases
  (:mod:`proxy_patterns.peer_records`).

No server runs on the data path: bytes go from the host that has them to the host that reads
them. The advertised address is ``address`` in the spec, else ``$PROXY_PATTERNS_PEER_ADDRESS``,
else the address of this host's outgoing interface: set the variable on each host whose
other hosts reach it on another interface (a fast cluster network, for example).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from proxy_patterns.hosts import StoreUnreachableError, host_identity
from proxy_patterns.peer_records import (
    PEER_ADDRESS_ENV,
    TopologyRefTable,
    answer_renew,
    answer_table,
    ask,
    ask_many,
)
from proxy_patterns.peers import PeerServer
from proxy_patterns.records import WATCH_INTERVAL, ReferenceInvalidError, SharedMemoryRefTable
from proxy_patterns.shm import DEFAULT_DIRECTORY, SharedMemoryConnector, SharedMemoryKey

FETCH_CHUNK = 8 * 2**20
"""Bytes of an object asked for at a time when it is pulled from another host."""
FETCH_WINDOW = 4
"""Chunks asked for ahead of the one being written: the transfer of the next overlaps it."""
_FETCH_LOCK = "proxy-patterns.fetching"
"""A store directory's lock file, held while a replica is fetched (no key: never counted)."""


def default_address() -> str:
    """``$PROXY_PATTERNS_PEER_ADDRESS``, else the address of the interface this host reaches
    other networks by (as ``distributed.utils.get_ip`` finds it), else ``127.0.0.1``."""
    return os.environ.get(PEER_ADDRESS_ENV) or _outgoing_interface()


@functools.cache
def _outgoing_interface() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("8.8.8.8", 80))  # UDP: chooses a route, sends nothing
            return str(probe.getsockname()[0])
        except OSError:
            return "127.0.0.1"


class TopologyConnector(SharedMemoryConnector):
    """A :class:`~proxy_patterns.shm.SharedMemoryConnector` whose objects every host can read.

    Args:
        directory: This host's tmpfs directory (each host has its own, of the same name).
        address: The address other hosts reach this host at (see the module docstring).
        owner: As for :class:`~proxy_patterns.shm.SharedMemoryConnector`.
        spare_bytes: As for :class:`~proxy_patterns.shm.SharedMemoryConnector`.
    """

    serves_other_hosts = True

    def __init__(
        self,
        directory: str = DEFAULT_DIRECTORY,
        address: str | None = None,
        owner: str | None = None,
        spare_bytes: int | None = None,
    ) -> None:
        super().__init__(directory, owner, spare_bytes)
        self.address = address
        """The address given in the spec, which every host then uses; else each host's own
        :func:`default_address` (not sent with the store's config to other hosts)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(directory={self.directory!r}, address={self.address!r})"

    @property
    def advertised_address(self) -> str:
        """The address this host's peer servers listen on and other hosts reach them at."""
        return self.address or default_address()

    def make_key(self, name: str, nbytes: int) -> SharedMemoryKey:
        """The key of this host's segment ``name``, with the endpoint that serves it."""
        return SharedMemoryKey(name, nbytes, host_identity(), _server_of(self).endpoint)

    def is_local(self, key: SharedMemoryKey) -> bool:
        """Whether ``key``'s object is in this host's shared memory (not a replica of it)."""
        return not key.address or key.host == host_identity()

    def get(self, key: SharedMemoryKey) -> memoryview | None:
        """Map the object: the segment on its own host, else this host's replica of it,
        fetched first if there is none. None if the object was evicted."""
        if self.is_local(key):
            return super().get(key)
        view = self._map(key)
        if view is not None:
            return view
        with self._fetch_lock():
            return self._map(key) or self._fetch(key)

    @contextlib.contextmanager
    def _fetch_lock(self) -> Iterator[None]:
        fd = os.open(os.path.join(self.directory, _FETCH_LOCK), os.O_RDONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _fetch(self, key: SharedMemoryKey) -> memoryview | None:
        """Pull the object into a replica on this host, in chunks of :data:`FETCH_CHUNK`
        bytes, each written into place as it comes: no buffer of the object's size is made
        (a fresh one costs a page fault per 4 KiB, as much as the transfer itself)."""
        first = _ask_chunk(key, 0)
        if first is None:
            return None
        nbytes, data = first
        tmp, fd = self.create_unpublished(nbytes)
        try:
            _write_at(fd, data, 0)
            rest = (
                _chunk_request(key, offset) for offset in range(len(data), nbytes, FETCH_CHUNK)
            )
            offset = len(data)
            for found, _, chunk in ask_many(key, rest, FETCH_WINDOW):
                if found.bytes != b"1":
                    return None  # evicted on its host meanwhile
                offset = _write_at(fd, chunk.buffer, offset)
            replica = _replica_key(key)
            table = SharedMemoryRefTable(self)
            # The record first: a segment found without one is taken for a stale one.
            (holder,) = table.create_held(replica, [table.lease()])
            try:
                self.publish(tmp, key.name)
            except BaseException:
                table.drop(replica, holder)
                raise
        finally:
            os.close(fd)
            os.unlink(tmp)
        _replicas.add(self, key, holder)
        return self._map(key)

    def exists(self, key: SharedMemoryKey) -> bool:
        """Whether the object is still in the store of its host."""
        if self.is_local(key):
            return super().exists(key)
        found: bytes = ask(key, b"exists", key.name.encode())[0].bytes
        return found == b"1"

    def evict(self, key: SharedMemoryKey) -> None:
        """Evict the object on its host (and so, soon after, every replica of it)."""
        if self.is_local(key):
            super().evict(key)
        else:
            ask(key, b"evict", key.name.encode(), str(key.nbytes).encode())

    def ref_table(self) -> TopologyRefTable:
        """The reference records of this store's objects (see :class:`TopologyRefTable`)."""
        return TopologyRefTable(self)

    def config(self) -> dict[str, Any]:
        """Configuration that re-creates the connector in another process, on any host."""
        return {**super().config(), "address": self.address}


def _write_at(fd: int, data: memoryview, offset: int) -> int:
    """Write all of ``data`` at ``offset`` of ``fd``; return the offset after it."""
    while data.nbytes:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written
    return offset


def _chunk_request(key: SharedMemoryKey, offset: int) -> tuple[bytes, ...]:
    return (b"get", key.name.encode(), b"%d" % offset, b"%d" % FETCH_CHUNK)


def _ask_chunk(key: SharedMemoryKey, offset: int) -> tuple[int, memoryview] | None:
    """The object's size and its bytes from ``offset`` (at most :data:`FETCH_CHUNK`), from
    its host; None if it is not there (evicted)."""
    found, *data = ask(key, *_chunk_request(key, offset))
    if found.bytes != b"1":
        return None
    nbytes, chunk = data
    return int(nbytes.bytes), chunk.buffer


def _replica_key(key: SharedMemoryKey) -> SharedMemoryKey:
    """The key of this host's replica of another host's object: a local segment."""
    return key._replace(host=host_identity(), address="")


class _Handlers:
    """What a process's peer server answers, about the segments of its host's ``directory``."""

    def __init__(self, connector: TopologyConnector) -> None:
        self.connector = connector
        self.sent_bytes = 0

    def _key(self, name: bytes, nbytes: bytes = b"0") -> SharedMemoryKey:
        return SharedMemoryKey(name.decode(), int(nbytes), host_identity())

    def get(self, args: list[bytes]) -> list[Any]:
        name, offset, length = args[0], int(args[1]), int(args[2])
        view = self.connector._map(self._key(name))
        if view is None:
            return [b"0"]
        chunk = view[offset : offset + length]
        self.sent_bytes += chunk.nbytes
        return [b"1", b"%d" % view.nbytes, chunk]

    def exists(self, args: list[bytes]) -> list[Any]:
        return [b"1" if self.connector.exists(self._key(args[0])) else b"0"]

    def evict(self, args: list[bytes]) -> list[Any]:
        self.connector.evict(self._key(*args))
        return []


_servers: dict[tuple[int, str, str], tuple[PeerServer, _Handlers]] = {}
_servers_lock = threading.Lock()


def _server_of(connector: TopologyConnector) -> PeerServer:
    """This process's peer server for ``connector``'s directory, started on first use."""
    address = connector.advertised_address
    index = (os.getpid(), connector.directory, address)
    with _servers_lock:
        if index not in _servers:
            handlers = _Handlers(connector)
            server = PeerServer(
                address,
                {
                    b"get": handlers.get,
                    b"exists": handlers.exists,
                    b"evict": handlers.evict,
                    b"table": functools.partial(answer_table, connector),
                    b"renew": functools.partial(answer_renew, connector),
                },
            )
            _servers[index] = (server, handlers)
        return _servers[index][0]


def bytes_served() -> int:
    """Bytes of objects this process's peer servers sent to other hosts: what crossed host
    boundaries from here (benchmarks and tests count them)."""
    pid = os.getpid()
    with _servers_lock:
        return sum(h.sent_bytes for (p, _, _), (_, h) in _servers.items() if p == pid)


class _Replicas:
    """The replicas this process fetched, dropped once their object is gone from its host."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[tuple[str, str], tuple[TopologyConnector, SharedMemoryKey, str]] = {}
        self._pid = -1

    def add(self, connector: TopologyConnector, key: SharedMemoryKey, holder: str) -> None:
        with self._lock:
            if self._pid != os.getpid():
                self._pid, self._held = os.getpid(), {}
                threading.Thread(target=self._watch, name="replicas", daemon=True).start()
                atexit.register(self._drop_all)
            self._held[(connector.directory, key.name)] = (connector, key, holder)

    def _drop(self, connector: TopologyConnector, key: SharedMemoryKey, holder: str) -> None:
        with contextlib.suppress(ReferenceInvalidError):
            SharedMemoryRefTable(connector).drop(_replica_key(key), holder)

    def _drop_all(self) -> None:
        """At exit: this process's replicas go now rather than at the host's next sweep."""
        with self._lock:
            held, self._held = list(self._held.values()), {}
        for replica in held:
            self._drop(*replica)

    def _watch(self) -> None:
        pid = os.getpid()
        while self._pid == pid:
            time.sleep(WATCH_INTERVAL)
            with self._lock:
                held = list(self._held.items())
            for index, (connector, key, holder) in held:
                try:
                    gone = not connector.exists(key)
                except StoreUnreachableError:
                    gone = True  # its host's server is gone, and with it the object
                if gone:
                    with self._lock:
                        if self._held.pop(index, None) is None:
                            continue  # dropped meanwhile
                    self._drop(connector, key, holder)


_replicas = _Replicas()
