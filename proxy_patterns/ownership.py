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
* Every holder carries a *lease*, the liveness of the process that holds it, so a killed
  worker never pins an object.
* Using a released, moved or evicted reference raises :class:`ReferenceInvalidError` naming
  the key and what happened to it; it never resolves to other data.

:func:`owned_scope` releases every owned object created inside it on exit unless it was moved
out; :func:`owned_task` does the same for a task function and also releases the references
the task was given, except those it returns.

This module is the user's side: the proxies and what is done with them. The records, their
leases and how each store keeps them are in :mod:`proxy_patterns.records`.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import functools
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Literal, ParamSpec, TypeVar

import proxystore.store
from proxystore.store import Store
from proxystore.store.factory import StoreFactory

from proxy_patterns.liveness import process_tag
from proxy_patterns.proxy import OpaqueProxy, key_of, map_proxies, pickle_by_reference, proxy
from proxy_patterns.records import (
    Kind,
    MutableBorrowError,
    ReferenceInvalidError,
    RefTable,
    holder_kind,
    ref_table_for,
    ref_table_of,
    watch_until_evicted,
)
from proxy_patterns.store import get_store

__all__ = [
    "BaseRefProxy",
    "MutableBorrowError",
    "OwnedProxy",
    "OwnedScope",
    "RefMutProxy",
    "RefProxy",
    "ReferenceInvalidError",
    "borrow",
    "clone",
    "holders",
    "mut_borrow",
    "owned",
    "owned_scope",
    "owned_task",
    "release",
]

T = TypeVar("T")
P = ParamSpec("P")


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
                f"{holder_kind(self.holder)} reference to object {self.key} was {self.state} in "
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
                watch_until_evicted(table, self.key)

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
    cls = _PROXY_CLASSES[holder_kind(holder)]
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
    return sorted(holder_kind(h) for h in reference.table().holders(reference.key))


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
