"""Reference records: who holds each owned object, kept with the store so every process counts.

:mod:`proxy_patterns.ownership` gives users owners and borrows; this module keeps, for each
object, the *record* those references are counted in, atomically across processes and threads.
A record is a set of *holders*, named ``kind.tag.token``: the kind (``owner``, ``ref`` or
``mut``), the :func:`~proxy_patterns.liveness.process_tag` of the process holding it, and a
random token. Whoever drops the last live holder evicts the object (and a proxy future's claim
on its key).

Every holder carries a *lease*, the liveness of its process: the process tag itself on shared
memory (:func:`~proxy_patterns.liveness.tag_alive`), an expiring key renewed by a background
thread on Redis (a stream's queued item is held by a lease of the stream instead: see
:mod:`proxy_patterns.brokers`). Holders whose lease ended are dropped whenever the record is
read, so a killed worker never pins an object; an object this process released while others
held it is checked again until it is gone (:func:`watch_until_evicted`), so it goes when those
others die.

A :class:`RefTable` keeps the records of one store: :class:`SharedMemoryRefTable` (a directory
of holder files beside the segment, changed under ``flock``) or :class:`RedisRefTable` (a hash
changed by Lua scripts). Another ProxyStore connector plugs in by implementing the protocol
and returning its table from a ``ref_table()`` method (as a topology store does, see
:mod:`proxy_patterns.topology`).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol

import proxystore.store
from proxystore.store import Store

from proxy_patterns.liveness import process_tag
from proxy_patterns.rendezvous import (
    LEASE,
    RedisRendezvous,
    SharedMemoryRendezvous,
    lease_renewer,
)
from proxy_patterns.shm import (
    REFS_SUFFIX,
    SharedMemoryConnector,
    SharedMemoryKey,
    holder_tag,
    lease_alive,
    remove_stale_segments,
)
from proxy_patterns.store import CLAIM_SUFFIX, LEASE_PREFIX, RECORD_SUFFIX, redis_client_of

if TYPE_CHECKING:
    import redis

Kind = Literal["owner", "ref", "mut"]
"""A holder's kind: the owner, a shared borrow or a mutable (exclusive) borrow."""

WATCH_INTERVAL = 0.5
"""Seconds between checks of objects this process released while others still held them."""


class ReferenceInvalidError(RuntimeError):
    """A reference was used after it was released or moved, or its object was evicted."""


class MutableBorrowError(RuntimeError):
    """A borrow would break the rule: one mutable borrow, or any number of shared ones."""


class RefTable(Protocol):
    """The reference records of one store's objects (atomic across processes)."""

    def create(self, key: Any) -> str:
        """Record a new object owned by this process; return the owner's holder name."""
        ...

    def add(self, key: Any, kind: Kind) -> str:
        """Add a ``ref`` or ``mut`` holder leased by this process; return its name.

        Raises ReferenceInvalidError if the object is gone, MutableBorrowError if the borrow
        conflicts with a live one.
        """
        ...

    def claim(self, key: Any, holder: str) -> str:
        """Take over ``holder`` (moved from another process); return the new holder name.

        Raises ReferenceInvalidError if it was already claimed or its lease expired.
        """
        ...

    def drop(self, key: Any, holder: str) -> bool:
        """Remove ``holder``; evict the object if no live holder is left (then True).

        Raises ReferenceInvalidError if ``holder`` is not in the record.
        """
        ...

    def prune(self, key: Any) -> bool:
        """Drop holders whose lease expired, evicting if none is left; True if the object
        is gone."""
        ...

    def holders(self, key: Any) -> list[str]:
        """Names of the live holders (``kind.tag.token``)."""
        ...

    def create_held(self, key: Any, leases: Sequence[str]) -> list[str]:
        """Record a new object held by one ``ref`` holder per lease in ``leases`` (leases of
        other processes, or of streams, as :meth:`lease` gives them); return the holders, in
        order. What a stream does with an item each consumer group must see."""
        ...

    def lease(self) -> str:
        """This process's lease: what its holders live by, to name in :meth:`create_held`."""
        ...

    def lease_alive(self, lease: str) -> bool:
        """Whether ``lease`` (of a process, or of a stream) is still alive."""
        ...

    def sweep(self) -> int:
        """Evict every object of the store whose holders all died (a process killed while it
        held keys: nobody is left to drop them); return how many were evicted."""
        ...


def _new_holder(kind: str, tag: str) -> str:
    return f"{kind}.{tag}.{secrets.token_hex(8)}"


def holder_kind(holder: str) -> str:
    """The kind of a holder (``owner``, ``ref`` or ``mut``), from its name."""
    return holder.partition(".")[0]


class SharedMemoryRefTable:
    """Records as directories of empty holder files (``<segment>.refs/<kind>.<tag>.<token>``).

    Every change runs under an exclusive ``flock`` on the directory, so processes and threads
    never lose an update. A holder's lease is its process: a file naming a dead process is
    removed whenever the record is read.
    """

    def __init__(self, connector: SharedMemoryConnector, lease: str | None = None) -> None:
        self.connector = connector
        self._lease = lease
        """The lease of the holders this table adds: this process's tag unless given (a peer
        server adds holders for processes on other hosts, see :mod:`~proxy_patterns.topology`)."""

    def _directory(self, key: SharedMemoryKey) -> str:
        return self.connector.path(key) + REFS_SUFFIX

    @contextlib.contextmanager
    def _locked(self, key: SharedMemoryKey) -> Iterator[str]:
        directory = self._directory(key)
        try:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            raise ReferenceInvalidError(f"object {key.name} has been evicted") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_nlink == 0:  # removed while this process waited for the lock
                raise ReferenceInvalidError(f"object {key.name} has been evicted")
            yield directory
        finally:
            os.close(fd)

    def _live(self, directory: str) -> list[str]:
        live = []
        for holder in os.listdir(directory):
            if self.lease_alive(holder_tag(holder)):
                live.append(holder)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(directory, holder))
        return live

    @staticmethod
    def _touch(directory: str, holder: str) -> None:
        os.close(os.open(os.path.join(directory, holder), os.O_CREAT | os.O_EXCL, 0o600))

    def _evict_if_unheld(self, key: SharedMemoryKey, directory: str) -> bool:
        if self._live(directory):
            return False
        SharedMemoryRendezvous(self.connector).forget(key)  # the object, and a future's claim
        os.rmdir(directory)
        return True

    def create(self, key: SharedMemoryKey) -> str:
        return self._create(key, [_new_holder("owner", self.lease())])[0]

    def create_held(self, key: SharedMemoryKey, leases: Sequence[str]) -> list[str]:
        return self._create(key, [_new_holder("ref", lease) for lease in leases])

    def _create(self, key: SharedMemoryKey, holders: list[str]) -> list[str]:
        # Built under a temporary name and renamed into place: a record is never seen empty.
        directory = self._directory(key)
        tmp = f"{directory}-{secrets.token_hex(4)}.tmp"
        os.mkdir(tmp, 0o700)
        for holder in holders:
            self._touch(tmp, holder)
        os.rename(tmp, directory)
        self.connector.detach(key)  # from now on the record decides when it goes
        return holders

    def lease(self) -> str:
        return self._lease or process_tag()

    def lease_alive(self, lease: str) -> bool:
        return lease_alive(self.connector.directory, lease)

    def add(self, key: SharedMemoryKey, kind: Kind) -> str:
        with self._locked(key) as directory:
            live = self._live(directory)
            if not live:
                raise ReferenceInvalidError(f"object {key.name} has no live reference left")
            _check_borrow(key.name, kind, live)
            holder = _new_holder(kind, self.lease())
            self._touch(directory, holder)
            return holder

    def claim(self, key: SharedMemoryKey, holder: str) -> str:
        new = _new_holder(holder_kind(holder), self.lease())
        with self._locked(key) as directory:
            try:
                os.rename(os.path.join(directory, holder), os.path.join(directory, new))
            except FileNotFoundError:
                raise _not_claimable(key.name, holder) from None
            return new

    def drop(self, key: SharedMemoryKey, holder: str) -> bool:
        with self._locked(key) as directory:
            try:
                os.unlink(os.path.join(directory, holder))
            except FileNotFoundError:
                raise _not_held(key.name, holder) from None
            return self._evict_if_unheld(key, directory)

    def prune(self, key: SharedMemoryKey) -> bool:
        try:
            with self._locked(key) as directory:
                return self._evict_if_unheld(key, directory)
        except ReferenceInvalidError:
            return True

    def sweep(self) -> int:
        return len(remove_stale_segments(self.connector.directory))

    def holders(self, key: SharedMemoryKey) -> list[str]:
        try:
            with self._locked(key) as directory:
                return self._live(directory)
        except ReferenceInvalidError:
            return []


# Redis: a hash ``<key>:refs`` maps each holder to the lease key of its process. Every script
# first drops the holders whose lease key expired.
_PRUNE = """
local live = {}
local flat = redis.call('hgetall', KEYS[1])
for i = 1, #flat, 2 do
  if redis.call('exists', flat[i + 1]) == 1 then
    table.insert(live, flat[i])
  else
    redis.call('hdel', KEYS[1], flat[i])
  end
end
"""
_EVICT_IF_UNHELD = """
if #live == 0 then
  redis.call('del', KEYS[1], KEYS[2], KEYS[3])
  return 1
end
return 0
"""
_ADD = (
    "if redis.call('exists', KEYS[1]) == 0 then return {'gone'} end"
    + _PRUNE
    + """
if #live == 0 then return {'gone'} end
local refs, muts = 0, 0
for _, holder in ipairs(live) do
  local kind = string.match(holder, '^[^.]+')
  if kind == 'ref' then refs = refs + 1 elseif kind == 'mut' then muts = muts + 1 end
end
if muts > 0 or (ARGV[3] == 'mut' and refs > 0) then
  table.insert(live, 1, 'conflict')
  return live
end
redis.call('hset', KEYS[1], ARGV[1], ARGV[2])
return {'ok'}
"""
)
_CLAIM = """
if redis.call('hexists', KEYS[1], ARGV[1]) == 0 then return 0 end
local lease = redis.call('hget', KEYS[1], ARGV[1])
if redis.call('exists', lease) == 0 then return 0 end
redis.call('hdel', KEYS[1], ARGV[1])
redis.call('hset', KEYS[1], ARGV[2], ARGV[3])
return 1
"""
_DROP = (
    "if redis.call('hdel', KEYS[1], ARGV[1]) == 0 then return -1 end" + _PRUNE + _EVICT_IF_UNHELD
)
_PRUNE_AND_EVICT = "if redis.call('exists', KEYS[1]) == 0 then return 1 end" + (
    _PRUNE + _EVICT_IF_UNHELD
)
_HOLDERS = _PRUNE + "return live"


class RedisRefTable:
    """Records in Redis hashes, changed atomically by Lua scripts.

    A holder's lease is a key per process (``proxy-patterns:lease:<tag>``) that expires
    :data:`~proxy_patterns.rendezvous.LEASE` seconds after the process stops renewing it.
    """

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._lease_lock = threading.Lock()

    @functools.cached_property
    def _tag(self) -> str:
        # pid-start is unique on one host only; a random part makes it unique across nodes.
        return f"{process_tag()}-{secrets.token_hex(4)}"

    def _lease(self) -> str:
        """This process's lease key, created (and renewed from now on) on first use."""
        name = LEASE_PREFIX + self._tag
        with self._lease_lock:
            if not self.client.exists(name):
                self.client.set(name, process_tag(), px=int(LEASE * 1000))
                lease_renewer.add(self.client, name)
        return name

    @staticmethod
    def _keys(key: Any) -> tuple[str, str, str]:
        """The record, the object, and a future's claim (see :mod:`~proxy_patterns.futures`)."""
        return f"{key.redis_key}{RECORD_SUFFIX}", key.redis_key, RedisRendezvous.claim_name(key)

    def create(self, key: Any) -> str:
        holder = _new_holder("owner", self._tag)
        self.client.hset(self._keys(key)[0], holder, self._lease())
        return holder

    def create_held(self, key: Any, leases: Sequence[str]) -> list[str]:
        holders = [_new_holder("ref", self._tag) for _ in leases]
        self.client.hset(self._keys(key)[0], mapping=dict(zip(holders, leases, strict=True)))
        return holders

    def lease(self) -> str:
        return self._lease()

    def lease_alive(self, lease: str) -> bool:
        return bool(self.client.exists(lease))

    def add(self, key: Any, kind: Kind) -> str:
        holder = _new_holder(kind, self._tag)
        status, *live = (
            answer.decode()
            for answer in self.client.eval(
                _ADD, 1, self._keys(key)[0], holder, self._lease(), kind
            )
        )
        if status == "gone":
            raise ReferenceInvalidError(f"object {key.redis_key} has no live reference left")
        _check_borrow(key.redis_key, kind, live)  # raises: the script found a conflict
        assert status == "ok", live
        return holder

    def claim(self, key: Any, holder: str) -> str:
        new = _new_holder(holder_kind(holder), self._tag)
        if not self.client.eval(_CLAIM, 1, self._keys(key)[0], holder, new, self._lease()):
            raise _not_claimable(key.redis_key, holder)
        return new

    def drop(self, key: Any, holder: str) -> bool:
        freed = self.client.eval(_DROP, 3, *self._keys(key), holder)
        if freed == -1:
            raise _not_held(key.redis_key, holder)
        return bool(freed)

    def prune(self, key: Any) -> bool:
        return bool(self.client.eval(_PRUNE_AND_EVICT, 3, *self._keys(key)))

    def holders(self, key: Any) -> list[str]:
        return [h.decode() for h in self.client.eval(_HOLDERS, 1, self._keys(key)[0])]

    def sweep(self) -> int:
        evicted = 0
        for record in self.client.scan_iter(match=f"*{RECORD_SUFFIX}", count=1000):
            name = record.decode().removesuffix(RECORD_SUFFIX)
            claim = name + CLAIM_SUFFIX
            evicted += bool(self.client.eval(_PRUNE_AND_EVICT, 3, record, name, claim))
        return evicted


def _check_borrow(name: str, kind: Kind, live: list[str]) -> None:
    kinds = [holder_kind(h) for h in live]
    if "mut" in kinds and kind in ("ref", "mut"):
        raise MutableBorrowError(f"object {name} is mutably borrowed; release that borrow first")
    if kind == "mut" and "ref" in kinds:
        raise MutableBorrowError(
            f"object {name} has {kinds.count('ref')} shared borrow(s); a mutable borrow needs none"
        )


def _not_claimable(name: str, holder: str) -> ReferenceInvalidError:
    return ReferenceInvalidError(
        f"{holder_kind(holder)} reference to object {name} cannot be received: it was received "
        "already (a reference moves once; send borrow() or clone() copies to send it more "
        "than once) or the process that sent it died"
    )


def _not_held(name: str, holder: str) -> ReferenceInvalidError:
    return ReferenceInvalidError(
        f"{holder_kind(holder)} reference to object {name} was released already (or its process's "
        "lease expired)"
    )


_TABLE = "_proxy_patterns_ref_table"
_tables_lock = threading.Lock()


def ref_table_for(store: Store[Any]) -> RefTable:
    """The reference records of ``store``'s objects (shared memory or Redis).

    The table is kept on the connector itself: it lives as long as its connector, which it
    refers to (a table kept elsewhere, by ``id(connector)``, kept every connector alive for
    ever, and would have answered for another connector reusing a freed one's ``id``).
    """
    connector = store.connector
    new_redis_table: RedisRefTable | None = None
    with _tables_lock:
        table: RefTable | None = getattr(connector, _TABLE, None)
        if table is None:
            if (own_table := getattr(connector, "ref_table", None)) is not None:
                table = own_table()  # a connector that keeps its records its own way
            elif isinstance(connector, SharedMemoryConnector):
                table = SharedMemoryRefTable(connector)
            elif (client := redis_client_of(connector)) is not None:
                table = new_redis_table = RedisRefTable(client)
            else:
                raise TypeError(
                    "ownership needs a shared-memory or Redis store, not "
                    f"{type(connector).__name__}"
                )
            setattr(connector, _TABLE, table)
    if new_redis_table is not None:
        # As shared memory does whenever a connector starts; a scan of the whole database,
        # so outside the lock that every lookup of every table takes.
        new_redis_table.sweep()
    return table


def ref_table_of(store_config: Any) -> RefTable:
    """:func:`ref_table_for` the store a proxy's config names (re-created here if needed)."""
    return ref_table_for(proxystore.store.get_or_create_store(store_config, register=True))


class _Watcher:
    """Keeps checking objects this process released while other processes held them, so
    that one whose last holder dies without releasing it is evicted (lease expiry)."""

    def __init__(self) -> None:
        self._keys: dict[Any, RefTable] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, table: RefTable, key: Any) -> None:
        with self._lock:
            self._keys[key] = table
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ownership", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(WATCH_INTERVAL)
            with self._lock:
                watched = list(self._keys.items())
            for key, table in watched:
                with contextlib.suppress(Exception):  # a store gone away: try again later
                    if table.prune(key):
                        with self._lock:
                            self._keys.pop(key, None)


_watcher = _Watcher()


def watch_until_evicted(table: RefTable, key: Any) -> None:
    """Check ``key``'s record every :data:`WATCH_INTERVAL` seconds until its object is gone:
    for an object this process released while others held it, which must go when they die."""
    _watcher.add(table, key)
