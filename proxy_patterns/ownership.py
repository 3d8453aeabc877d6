"""Ownership across processes: owned objects are evicted exactly when nothing can use them.

ProxyStore's ``OwnedProxy``/``borrow``/``mut_borrow`` keep borrow counts as plain integers in
one process: a borrow taken by a worker process does not count, and the object is evicted
when any one process drops its copy. Here every object's *reference record* lives with the
store, so every process counts:

* :func:`owned` puts an object and returns an :class:`OwnedProxy`; :func:`borrow` and
  :func:`mut_borrow` return a :class:`RefProxy` (shared) or a :class:`RefMutProxy`
  (exclusive); :func:`clone` makes an independent owned copy.
* Each reference is one *holder* in the record (``owner``, ``ref`` or ``mut``). A reference is
  released by :func:`release`, or when its proxy is garbage collected; the last release evicts
  the object. Releasing twice is an error, never a negative count.
* Pickling a reference *moves* it: the process that unpickles it becomes its holder, and the
  sender's proxy can no longer be used. Every pickle of it names the same holder, which is
  received once (``borrow()`` or ``clone()`` to send to more than one process). Until it is
  received, a moved reference is held on the sender's lease.
* Every holder carries a *lease*, the liveness of the process that holds it: the pid and
  start time on shared memory, an expiring key renewed by a background thread on Redis.
  Holders whose process died are dropped, so a killed worker never pins an object.
* Using a released, moved or evicted reference raises :class:`ReferenceInvalidError` naming
  the key and what happened to it; it never resolves to other data.

:func:`owned_scope` releases every owned object created inside it on exit unless it was moved
out; :func:`owned_task` does the same for a task function and also releases the references
the task was given, except those it returns.

Records are kept by a :class:`RefTable`, chosen per connector: shared memory (a directory of
holder files beside the segment, changed under ``flock``) and Redis (a hash changed by Lua
scripts). Another ProxyStore connector plugs in by implementing the protocol.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import fcntl
import functools
import os
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Literal, ParamSpec, Protocol, TypeVar

import proxystore.store
from proxystore.store import Store
from proxystore.store.factory import StoreFactory

from proxy_patterns.liveness import process_tag, tag_alive
from proxy_patterns.proxy import OpaqueProxy, key_of, map_proxies, pickle_by_reference, proxy
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
)
from proxy_patterns.store import LEASE_PREFIX, get_store

T = TypeVar("T")
P = ParamSpec("P")
Kind = Literal["owner", "ref", "mut"]

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


def _new_holder(kind: str, tag: str) -> str:
    return f"{kind}.{tag}.{secrets.token_hex(8)}"


def _kind(holder: str) -> str:
    return holder.partition(".")[0]


class SharedMemoryRefTable:
    """Records as directories of empty holder files (``<segment>.refs/<kind>.<tag>.<token>``).

    Every change runs under an exclusive ``flock`` on the directory, so processes and threads
    never lose an update. A holder's lease is its process: a file naming a dead process is
    removed whenever the record is read.
    """

    def __init__(self, connector: SharedMemoryConnector) -> None:
        self.connector = connector

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

    @staticmethod
    def _live(directory: str) -> list[str]:
        live = []
        for holder in os.listdir(directory):
            if tag_alive(holder_tag(holder)):
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
        # Built under a temporary name and renamed into place: a record is never seen empty.
        directory = self._directory(key)
        tmp = f"{directory}-{secrets.token_hex(4)}.tmp"
        os.mkdir(tmp, 0o700)
        holder = _new_holder("owner", process_tag())
        self._touch(tmp, holder)
        os.rename(tmp, directory)
        self.connector.detach(key)  # from now on the record decides when it goes
        return holder

    def add(self, key: SharedMemoryKey, kind: Kind) -> str:
        with self._locked(key) as directory:
            live = self._live(directory)
            if not live:
                raise ReferenceInvalidError(f"object {key.name} has no live reference left")
            _check_borrow(key.name, kind, live)
            holder = _new_holder(kind, process_tag())
            self._touch(directory, holder)
            return holder

    def claim(self, key: SharedMemoryKey, holder: str) -> str:
        new = _new_holder(_kind(holder), process_tag())
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

    def __init__(self, connector: Any) -> None:
        self.connector = connector
        self.client = connector._redis_client
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
        return f"{key.redis_key}:refs", key.redis_key, RedisRendezvous.claim_name(key)

    def create(self, key: Any) -> str:
        holder = _new_holder("owner", self._tag)
        self.client.hset(self._keys(key)[0], holder, self._lease())
        return holder

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
        new = _new_holder(_kind(holder), self._tag)
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


def _check_borrow(name: str, kind: Kind, live: list[str]) -> None:
    kinds = [_kind(h) for h in live]
    if "mut" in kinds and kind in ("ref", "mut"):
        raise MutableBorrowError(f"object {name} is mutably borrowed; release that borrow first")
    if kind == "mut" and "ref" in kinds:
        raise MutableBorrowError(
            f"object {name} has {kinds.count('ref')} shared borrow(s); a mutable borrow needs none"
        )


def _not_claimable(name: str, holder: str) -> ReferenceInvalidError:
    return ReferenceInvalidError(
        f"{_kind(holder)} reference to object {name} cannot be received: it was received "
        "already (a reference moves once; send borrow() or clone() copies to send it more "
        "than once) or the process that sent it died"
    )


def _not_held(name: str, holder: str) -> ReferenceInvalidError:
    return ReferenceInvalidError(
        f"{_kind(holder)} reference to object {name} was released already (or its process's "
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
    with _tables_lock:
        table: RefTable | None = getattr(connector, _TABLE, None)
        if table is None:
            if isinstance(connector, SharedMemoryConnector):
                table = SharedMemoryRefTable(connector)
            elif hasattr(connector, "_redis_client"):
                table = RedisRefTable(connector)
            else:
                raise TypeError(
                    "ownership needs a shared-memory or Redis store, not "
                    f"{type(connector).__name__}"
                )
            setattr(connector, _TABLE, table)
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


class _Reference:
    """This process's hold on one holder of an object's record."""

    __slots__ = ("__weakref__", "holder", "key", "lock", "state", "store_config")

    def __init__(self, key: Any, store_config: Any, holder: str) -> None:
        self.key = key
        self.store_config = store_config
        self.holder = holder
        self.state: Literal["held", "moved", "released"] = "held"
        self.lock = threading.Lock()

    def table(self) -> RefTable:
        # Looked up without registering it: a store closed and unregistered stays so.
        return ref_table_for(proxystore.store.get_or_create_store(self.store_config))

    def check(self) -> None:
        if self.state != "held":
            raise ReferenceInvalidError(
                f"{_kind(self.holder)} reference to object {self.key} was {self.state} in "
                f"process {process_tag()}; it can no longer be used"
            )

    def take(self, state: Literal["moved", "released"]) -> None:
        """Give the holder up (checked): moved to another process, or released.

        Moving again is allowed: serializers may pickle an object more than once (Dask
        retries with cloudpickle), and every pickle names the same holder, received once.
        """
        with self.lock:
            if not (state == "moved" == self.state):
                self.check()
            self.state = state
        _held.discard(self)
        if state == "released":
            table = self.table()
            if not table.drop(self.key, self.holder):
                _watcher.add(table, self.key)

    def release_quietly(self) -> None:
        """Release if still held (garbage collection, exit); never raises."""
        with contextlib.suppress(Exception):
            if self.state == "held":
                self.take("released")


_held: weakref.WeakSet[_Reference] = weakref.WeakSet()


@atexit.register
def _release_all() -> None:
    """A process that exits cleanly gives up its references rather than wait for its lease."""
    for reference in list(_held):
        reference.release_quietly()


def _received(
    factory: StoreFactory[Any, T], holder: str, default_class: Any, default_hash: Any
) -> BaseRefProxy[T]:
    """Unpickle a moved reference: this process takes over its holder."""
    new = ref_table_of(factory.store_config).claim(factory.key, holder)
    cls = _PROXY_CLASSES[_kind(holder)]
    p: BaseRefProxy[T] = cls._make(factory, new, default_class, default_hash)
    return p


class BaseRefProxy(OpaqueProxy[T]):
    """A proxy that is one holder of its object's record (see the module docstring)."""

    __slots__ = ("__proxy_reference__",)

    @classmethod
    def _make(
        cls, factory: StoreFactory[Any, T], holder: str, default_class: Any, default_hash: Any
    ) -> Any:
        p = cls(factory)
        object.__setattr__(p, "__proxy_default_class__", default_class)
        object.__setattr__(p, "__proxy_default_hash__", default_hash)
        reference = _Reference(factory.key, factory.store_config, holder)
        object.__setattr__(p, "__proxy_reference__", reference)
        _held.add(reference)
        return p

    def _wrapped_if_usable(self) -> T:
        object.__getattribute__(self, "__proxy_reference__").check()
        return OpaqueProxy.__proxy_wrapped__.fget(self)  # type: ignore[attr-defined, no-any-return]

    # OpaqueProxy's property, with a getter that refuses a released or moved reference.
    __proxy_wrapped__ = OpaqueProxy.__proxy_wrapped__.getter(_wrapped_if_usable)  # type: ignore[attr-defined]

    def __reduce__(self) -> Any:
        reference: _Reference = object.__getattribute__(self, "__proxy_reference__")
        reference.take("moved")
        return _received, (
            object.__getattribute__(self, "__proxy_factory__"),
            reference.holder,
            object.__getattribute__(self, "__proxy_default_class__"),
            object.__getattribute__(self, "__proxy_default_hash__"),
        )

    def __reduce_ex__(self, protocol: Any) -> Any:
        return self.__reduce__()

    def __copy__(self) -> Any:
        raise TypeError("a reference proxy cannot be copied: use borrow() or clone()")

    def __deepcopy__(self, memo: Any) -> Any:
        raise TypeError("a reference proxy cannot be copied: use borrow() or clone()")

    def __dask_tokenize__(self) -> tuple[str, str]:
        # Dask tokenizes task arguments by pickling them otherwise, which would move this one.
        return "proxy-patterns-reference", object.__getattribute__(
            self, "__proxy_reference__"
        ).holder

    def __del__(self) -> None:
        with contextlib.suppress(AttributeError):  # never fully built
            object.__getattribute__(self, "__proxy_reference__").release_quietly()


class OwnedProxy(BaseRefProxy[T]):
    """The owner of an object: the object lives at least as long as it is held."""

    __slots__ = ()


class RefProxy(BaseRefProxy[T]):
    """A shared borrow: the object lives at least as long as it is held."""

    __slots__ = ()


class RefMutProxy(BaseRefProxy[T]):
    """An exclusive borrow: no other borrow exists while it is held."""

    __slots__ = ()


pickle_by_reference(__name__, BaseRefProxy, OwnedProxy, RefProxy, RefMutProxy)

# By holder kind.
_PROXY_CLASSES: dict[str, type[BaseRefProxy[Any]]] = {
    "owner": OwnedProxy,
    "ref": RefProxy,
    "mut": RefMutProxy,
}


def _reference(p: BaseRefProxy[Any]) -> _Reference:
    if not issubclass(type(p), BaseRefProxy) or type(p) is BaseRefProxy:
        raise TypeError(f"expected an OwnedProxy, RefProxy or RefMutProxy, got {type(p).__name__}")
    reference: _Reference = object.__getattribute__(p, "__proxy_reference__")
    return reference


def _defaults(p: OpaqueProxy[Any]) -> tuple[Any, Any]:
    return (
        object.__getattribute__(p, "__proxy_default_class__"),
        object.__getattribute__(p, "__proxy_default_hash__"),
    )


class OwnedScope:
    """Owned objects created in an :func:`owned_scope`; released when it exits."""

    def __init__(self) -> None:
        self._owned: list[OwnedProxy[Any]] = []
        self._kept: set[int] = set()

    def add(self, p: OwnedProxy[Any]) -> None:
        self._owned.append(p)

    def keep(self, p: BaseRefProxy[Any]) -> None:
        """Do not release ``p`` on exit (it leaves the scope some other way)."""
        self._kept.add(id(p))

    def release_all(self) -> None:
        """Release every object created in the scope that is still held here, not kept."""
        owned, self._owned = self._owned, []
        for p in owned:
            if id(p) not in self._kept:
                _reference(p).release_quietly()


_scope: contextvars.ContextVar[OwnedScope | None] = contextvars.ContextVar(
    "proxy_patterns_owned_scope", default=None
)


@contextlib.contextmanager
def owned_scope() -> Iterator[OwnedScope]:
    """Release on exit every object :func:`owned` creates inside, unless it was moved out
    (pickled, e.g. returned from a task to another process) or :meth:`OwnedScope.keep` kept."""
    scope = OwnedScope()
    token = _scope.set(scope)
    try:
        yield scope
    finally:
        _scope.reset(token)
        scope.release_all()


def owned(obj: T, store: Store[Any] | None = None) -> OwnedProxy[T]:
    """Put ``obj`` in ``store`` (default: :func:`~proxy_patterns.store.get_store`) and return
    the owner of it: the object is evicted once the owner and every borrow are released."""
    store = store or get_store()
    table = ref_table_for(store)
    plain = proxy(store, obj, keep_target=False)
    try:
        holder = table.create(key_of(plain))
    except BaseException:
        store.evict(key_of(plain))
        raise
    factory = object.__getattribute__(plain, "__proxy_factory__")
    p: OwnedProxy[T] = OwnedProxy._make(factory, holder, *_defaults(plain))
    scope = _scope.get()
    if scope is not None:
        scope.add(p)
    return p


def _borrow(p: BaseRefProxy[T], cls: type[BaseRefProxy[T]], kind: Kind) -> Any:
    reference = _reference(p)
    reference.check()
    factory = object.__getattribute__(p, "__proxy_factory__")
    holder = reference.table().add(reference.key, kind)
    return cls._make(factory, holder, *_defaults(p))


def borrow(p: BaseRefProxy[T]) -> RefProxy[T]:
    """A shared borrow of ``p``'s object (``p`` is an owner or a borrow).

    Raises MutableBorrowError while the object is mutably borrowed.
    """
    return _borrow(p, RefProxy, "ref")  # type: ignore[no-any-return]


def mut_borrow(p: BaseRefProxy[T]) -> RefMutProxy[T]:
    """An exclusive borrow of ``p``'s object; raises MutableBorrowError while it is borrowed."""
    return _borrow(p, RefMutProxy, "mut")  # type: ignore[no-any-return]


def clone(p: BaseRefProxy[T]) -> OwnedProxy[T]:
    """An independent owned copy of ``p``'s object (a new key, in the same store)."""
    reference = _reference(p)
    reference.check()
    store = proxystore.store.get_or_create_store(reference.store_config, register=True)
    data = store.connector.get(reference.key)
    if data is None:
        raise ReferenceInvalidError(f"object {reference.key} has been evicted")
    key = store.connector.put(data)
    holder = ref_table_for(store).create(key)
    factory: StoreFactory[Any, T] = StoreFactory(key, store_config=store.config())
    return OwnedProxy._make(factory, holder, *_defaults(p))  # type: ignore[no-any-return]


def release(p: BaseRefProxy[Any]) -> None:
    """Give up ``p`` now; the last reference released evicts the object.

    Raises ReferenceInvalidError if ``p`` was released or moved already.
    """
    _reference(p).take("released")


def holders(p: BaseRefProxy[Any]) -> list[str]:
    """Kinds of the live references to ``p``'s object, in every process (sorted)."""
    reference = _reference(p)
    return sorted(_kind(h) for h in reference.table().holders(reference.key))


def _references_in(obj: Any) -> list[BaseRefProxy[Any]]:
    found: list[BaseRefProxy[Any]] = []

    def collect(p: Any) -> Any:
        if issubclass(type(p), BaseRefProxy):  # not isinstance: it would resolve other proxies
            found.append(p)
        return p

    map_proxies(obj, collect, depth=3)
    return found


def owned_task(fn: Callable[P, T]) -> Callable[P, T]:
    """Make a task function release what it was given and what it made, except its result.

    References among the arguments (and in their lists, tuples and dicts) are held for the
    call and released when it returns (an argument passed by value is moved into the task;
    pass ``borrow(p)`` to keep ``p``). Objects :func:`owned` during the call are released on
    return. References in the result are neither: they travel to the caller.
    """

    @functools.wraps(fn)
    def task(*args: P.args, **kwargs: P.kwargs) -> T:
        given = _references_in(list(args) + list(kwargs.values()))
        with owned_scope() as scope:
            result = fn(*args, **kwargs)
            returned = _references_in(result)
            for p in returned:
                scope.keep(p)
        returned_ids = {id(p) for p in returned}
        for p in given:
            if id(p) not in returned_ids:
                _reference(p).release_quietly()
        return result

    return task
