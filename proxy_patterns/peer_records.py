"""Reference records of a topology store: each kept on its object's own host.

A topology store (:mod:`proxy_patterns.topology`) keeps an object's record beside its segment,
on the host that put it. A process of another host (the Dask scheduler holding a result that a
worker of another host put, say) changes that record through the peer server there, for
holders leased by its *peer lease*: a file on that host
(:func:`~proxy_patterns.shm.peer_lease_path`) that this process touches every third of
:data:`~proxy_patterns.shm.PEER_LEASE_SECONDS` through the same server. Another host's
processes are not in that host's process table, so their liveness is that renewal: a process
that dies stops renewing, and its holds end.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from proxy_patterns.hosts import StoreUnreachableError, host_identity
from proxy_patterns.peers import PeerError, RemoteError, request, requests
from proxy_patterns.records import (
    Kind,
    MutableBorrowError,
    ReferenceInvalidError,
    SharedMemoryRefTable,
)
from proxy_patterns.shm import (
    PEER_LEASE_PREFIX,
    PEER_LEASE_SECONDS,
    SharedMemoryConnector,
    SharedMemoryKey,
    peer_lease_path,
)

if TYPE_CHECKING:
    from proxy_patterns.topology import TopologyConnector

PEER_ADDRESS_ENV = "PROXY_PATTERNS_PEER_ADDRESS"
"""The address other hosts reach this host's peer servers at (see
:func:`~proxy_patterns.topology.default_address`)."""
_REMOTE_ERRORS: dict[str, type[Exception]] = {
    "ReferenceInvalidError": ReferenceInvalidError,
    "MutableBorrowError": MutableBorrowError,
}
_TABLE_METHODS = frozenset({"add", "claim", "drop", "prune", "holders"})
"""What a peer server does to a record for another host: nothing that creates one."""


def ask(key: SharedMemoryKey, *frames: bytes) -> list[Any]:
    """Send a request about ``key`` to the peer server that serves it, on its host.

    Raises :class:`~proxy_patterns.hosts.StoreUnreachableError` if that server cannot be
    reached or goes away mid-request; an error the request raised there is raised here as its
    own type when it is a records error.
    """
    with _translated(key):
        return request(key.address, *frames)


def ask_many(
    key: SharedMemoryKey, messages: Iterable[Sequence[bytes]], window: int
) -> Iterator[list[Any]]:
    """:func:`ask` for several requests about ``key``, ``window`` of them in flight at a
    time (see :func:`~proxy_patterns.peers.requests`); yields each reply in order."""
    with _translated(key):
        yield from requests(key.address, messages, window)


@contextlib.contextmanager
def _translated(key: SharedMemoryKey) -> Iterator[None]:
    try:
        yield
    except PeerError as e:
        raise StoreUnreachableError(
            f"object {key.name} is on host {key.host!r}, served at {key.address}, and this "
            f"process on {host_identity()!r} cannot get it: {e}. If that host's address is "
            f"wrong, set ${PEER_ADDRESS_ENV} there (or ?address= in the store spec); if the "
            "process that put the object has exited, its objects went with it"
        ) from e
    except RemoteError as e:
        raise _REMOTE_ERRORS.get(e.kind, RemoteError)(str(e)) from e


class TopologyRefTable:
    """Reference records of a topology store: each on its object's host.

    A record of this host's object is changed here (:class:`SharedMemoryRefTable`); a record
    of another host's object by that host's peer server, for holders leased by this process's
    peer lease there.
    """

    def __init__(self, connector: TopologyConnector) -> None:
        self.connector = connector
        self.local = SharedMemoryRefTable(connector)

    def _remote(self, key: SharedMemoryKey, method: str, *args: Any) -> Any:
        lease = _leases.lease_at(key)
        arguments = json.dumps([key.name, key.nbytes, *args]).encode()
        (result,) = ask(key, b"table", method.encode(), lease.encode(), arguments)
        return json.loads(result.bytes)

    def create(self, key: SharedMemoryKey) -> str:
        return self.local.create(key)  # only this host's objects are created here

    def create_held(self, key: SharedMemoryKey, leases: Sequence[str]) -> list[str]:
        return self.local.create_held(key, leases)

    def lease(self) -> str:
        return self.local.lease()

    def lease_alive(self, lease: str) -> bool:
        return self.local.lease_alive(lease)

    def add(self, key: SharedMemoryKey, kind: Kind) -> str:
        if self.connector.is_local(key):
            return self.local.add(key, kind)
        return str(self._remote(key, "add", kind))

    def claim(self, key: SharedMemoryKey, holder: str) -> str:
        if self.connector.is_local(key):
            return self.local.claim(key, holder)
        return str(self._remote(key, "claim", holder))

    def drop(self, key: SharedMemoryKey, holder: str) -> bool:
        if self.connector.is_local(key):
            return self.local.drop(key, holder)
        return bool(self._remote(key, "drop", holder))

    def prune(self, key: SharedMemoryKey) -> bool:
        if self.connector.is_local(key):
            return self.local.prune(key)
        return bool(self._remote(key, "prune"))

    def holders(self, key: SharedMemoryKey) -> list[str]:
        if self.connector.is_local(key):
            return self.local.holders(key)
        return list(self._remote(key, "holders"))

    def sweep(self) -> int:
        return self.local.sweep()


def answer_table(connector: SharedMemoryConnector, args: list[bytes]) -> list[Any]:
    """A peer server's answer to ``table METHOD LEASE [name, nbytes, *args]``: the method of
    this host's record of ``name``, for a holder of the peer lease ``LEASE``."""
    method, lease, arguments = (a.decode() for a in args)
    if method not in _TABLE_METHODS or not lease.startswith(PEER_LEASE_PREFIX):
        raise ValueError(f"no such request: {method} for {lease}")
    name, nbytes, *rest = json.loads(arguments)
    table = SharedMemoryRefTable(connector, lease=lease)
    key = SharedMemoryKey(name, nbytes, host_identity())
    return [json.dumps(getattr(table, method)(key, *rest)).encode()]


def answer_renew(connector: SharedMemoryConnector, args: list[bytes]) -> list[Any]:
    """A peer server's answer to ``renew LEASE``: the lease lives on from now."""
    lease = args[0].decode()
    if not lease.startswith(PEER_LEASE_PREFIX) or "/" in lease:
        raise ValueError(f"not a peer lease: {lease!r}")
    path = peer_lease_path(connector.directory, lease)
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    os.utime(path)
    return []


class _PeerLeases:
    """This process's peer lease at each host it holds objects of, renewed in a thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = -1
        self._tag = ""
        self._endpoints: set[str] = set()

    def lease_at(self, key: SharedMemoryKey) -> str:
        """The lease, valid at ``key``'s host from now on (created there on first use)."""
        with self._lock:
            if self._pid != os.getpid():  # a forked child is another holder
                self._pid, self._endpoints = os.getpid(), set()
                self._tag = f"{PEER_LEASE_PREFIX}{os.urandom(8).hex()}"
                renewer = threading.Thread(target=self._renew_forever, name="peer-leases")
                renewer.daemon = True
                renewer.start()
            known = key.address in self._endpoints
            tag = self._tag
        if not known:
            ask(key, b"renew", tag.encode())
            with self._lock:
                self._endpoints.add(key.address)
        return tag

    def _renew_forever(self) -> None:
        pid = os.getpid()
        while self._pid == pid:
            time.sleep(PEER_LEASE_SECONDS / 3)
            with self._lock:
                endpoints, tag = list(self._endpoints), self._tag
            for endpoint in endpoints:
                with contextlib.suppress(PeerError):  # a host gone: its holders went with it
                    request(endpoint, b"renew", tag.encode())


_leases = _PeerLeases()
