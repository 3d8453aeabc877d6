"""Futures as proxies: hand a task a value that does not exist yet (task pipelining).

A :class:`ProxyFuture` names a store key before its value exists. Its :meth:`~ProxyFuture.proxy`
can be passed to any task right away; the task starts and blocks only where it touches the
value. Whoever holds the future (it pickles, so a task can receive it) sets the value once,
with :meth:`~ProxyFuture.set_result`, or an error with :meth:`~ProxyFuture.set_exception`;
consumers then get the value zero-copy, or the original exception. A producer can write the
value in place: :meth:`~ProxyFuture.buffer` is an array in the store that ``set_result``
publishes without a copy (see :mod:`proxy_patterns.allocation`).

The future owns its key (see :mod:`proxy_patterns.ownership`): the value is evicted once the
future and the proxies made from it in this process are gone, unless something else holds
the key; with the Dask plugin, every task graph that carries the future or a proxy of it does.

The API follows :class:`concurrent.futures.Future`. Waiting is event-driven (see
:mod:`proxy_patterns.rendezvous`), and a consumer whose producer died gets
:class:`~proxy_patterns.rendezvous.ProducerLostError` rather than waiting forever.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, InvalidStateError
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import proxystore.store
from proxystore.store import Store
from proxystore.store.config import StoreConfig

from proxy_patterns.allocation import Allocation, unpublished_allocation
from proxy_patterns.proxy import OpaqueProxy, held
from proxy_patterns.records import ReferenceInvalidError, RefTable, ref_table_for
from proxy_patterns.rendezvous import ProducerLostError, Rendezvous, rendezvous_for
from proxy_patterns.serialize import deserialize, dumps
from proxy_patterns.shm import KeyExistsError, SharedMemoryConnector
from proxy_patterns.store import empty, get_store

if TYPE_CHECKING:
    import numpy as np

T = TypeVar("T")


class _Raised:
    """What a future holds when it was given an exception (or cancelled) instead of a value."""

    def __init__(self, exception: BaseException) -> None:
        self.exception = exception


_pickling = threading.local()


@contextlib.contextmanager
def pickled_futures() -> Iterator[dict[Any, StoreConfig]]:
    """Collect the key and store of every future (or future proxy) pickled in this block, by
    this thread: a framework plugin learns which futures a task graph carries."""
    collected: dict[Any, StoreConfig] = {}
    outer = getattr(_pickling, "collected", None)
    _pickling.collected = collected
    try:
        yield collected
    finally:
        _pickling.collected = outer


class FutureFactory(Generic[T]):
    """Resolves a future's proxy: waits for the value, then reads it from the store."""

    def __init__(self, key: Any, store_config: StoreConfig, timeout: float | None) -> None:
        self.key = key
        self.store_config = store_config
        self.timeout = timeout

    def __reduce__(self) -> Any:
        collected = getattr(_pickling, "collected", None)
        if collected is not None:
            collected[self.key] = self.store_config
        return FutureFactory, (self.key, self.store_config, self.timeout)

    def __call__(self) -> T:
        return self.result(self.timeout)

    def store(self) -> Store[Any]:
        """The store, re-created in this process if needed."""
        return proxystore.store.get_or_create_store(self.store_config, register=True)

    def outcome(self, timeout: float | None) -> Any:
        """The value or :class:`_Raised` once set; TimeoutError after ``timeout`` seconds."""
        store = self.store()
        if not rendezvous_for(store).wait(self.key, timeout):
            raise TimeoutError(f"future {self.key} was not set within {timeout} s")
        data = store.connector.get(self.key)
        if data is None:
            raise LookupError(f"future {self.key} was set but has been evicted from the store")
        return deserialize(data)

    def result(self, timeout: float | None) -> T:
        """The value, or raise the exception the future was given."""
        outcome = self.outcome(timeout)
        if isinstance(outcome, _Raised):
            raise outcome.exception
        return outcome  # type: ignore[no-any-return]


class ProxyFuture(Generic[T]):
    """A value that will be in ``store``; its proxy can be used before it exists.

    Args:
        store: Where the value will live (default: :func:`proxy_patterns.store.get_store`).
            Shared memory and Redis stores are supported.
        timeout: Seconds a consumer resolving the proxy waits before ``TimeoutError``;
            ``None`` waits for ever, like :mod:`concurrent.futures`.
    """

    def __init__(self, store: Store[Any] | None = None, *, timeout: float | None = None) -> None:
        store = store or get_store()
        rendezvous = rendezvous_for(store)
        self._factory: FutureFactory[T] = FutureFactory(
            rendezvous.new_key(), store.config(), timeout
        )
        self._rendezvous: Rendezvous = rendezvous
        self._buffers: weakref.WeakSet[Allocation] = weakref.WeakSet()
        self._rendezvous.claim(self.key)
        # The future owns its key: evicted once it (and every local proxy, which holds it) is
        # gone, unless something else holds the key (a Dask graph, with the plugin).
        self._table = ref_table_for(store)
        owner = self._table.create(self.key)
        self._release: Callable[[], Any] | None = weakref.finalize(
            self, _release_owner, self._table, self.key, owner
        )

    @property
    def key(self) -> Any:
        """The store key the value will have."""
        return self._factory.key

    @property
    def store(self) -> Store[Any]:
        """The store the value will be in (re-created in a process that received the future)."""
        return self._factory.store()

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"<ProxyFuture {self.key} {state}>"

    def __getstate__(self) -> dict[str, Any]:
        return {"factory": self._factory}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Received by another process: that process is now the one expected to set the value.
        # It holds no reference: the key lives while the sender's future or a graph holds it.
        self._factory = state["factory"]
        store = self._factory.store()
        self._rendezvous = rendezvous_for(store)
        self._table = ref_table_for(store)
        self._buffers = weakref.WeakSet()
        self._release = None
        if not self.done():
            self._rendezvous.claim(self.key)

    def unowned(self) -> ProxyFuture[T]:
        """This future as another process receives it: the same value, holding no reference
        to it (and claiming it for this process).

        For a framework that keeps what it is handed (task arguments, kept until it forgets
        them): handed this, it does not keep the value alive; this future, or whatever else
        holds the key, decides when the value goes. Its :meth:`proxy` likewise.
        """
        handle: ProxyFuture[T] = ProxyFuture.__new__(ProxyFuture)
        handle.__setstate__(self.__getstate__())
        return handle

    def proxy(self) -> OpaqueProxy[T]:
        """A proxy of the value: resolving it waits for the value (or raises its exception).

        Until resolved it claims to be a plain ``object``, so that no framework inspection
        (``isinstance`` checks, hashing, tokenizing) waits for the value.
        """
        p: OpaqueProxy[T] = OpaqueProxy(self._factory)
        object.__setattr__(p, "__proxy_default_class__", object)
        object.__setattr__(p, "__proxy_default_hash__", hash(("proxy-future", self.key)))
        return held(p, self)  # in this process it keeps the future, and so its key, alive

    def buffer(self, shape: Any, dtype: Any = float) -> np.ndarray:
        """A writable array in the store, to be filled in place and given to :meth:`set_result`,
        which then publishes it as the value without a copy.

        It is :func:`proxy_patterns.store.empty` on the future's store: on shared memory an
        unpublished segment, removed if never published (at the latest when this future is
        evicted); on Redis an ordinary array, copied by ``set_result`` as any value is. See
        :mod:`proxy_patterns.allocation` for the rules.
        """
        array = empty(shape, dtype, self._factory.store())
        if isinstance(array.base, Allocation):
            self._buffers.add(array.base)
        return array

    def _set(self, outcome: Any) -> None:
        if not self._table.holders(self.key):
            raise InvalidStateError(
                f"future {self.key} was released: neither the future nor anything holding it "
                "is left, so nobody can read a value"
            )
        if not self._set_once(outcome):
            raise InvalidStateError(f"future {self.key} is already set")

    def _set_once(self, outcome: Any) -> bool:
        """Write the value: an allocation of the store is published as it is, anything else
        is serialized into the store. False if the value was set already."""
        connector = self._factory.store().connector
        allocation = (
            unpublished_allocation(outcome, connector)
            if isinstance(connector, SharedMemoryConnector)
            else None
        )
        if allocation is None:
            return self._rendezvous.set_once(self.key, dumps(outcome))
        try:  # the link into place wakes waiters, as any write of the key does
            allocation.publish(connector, self.key)
        except KeyExistsError:
            return False
        return True

    def set_result(self, result: T) -> None:
        """Set the value; a future is set once (InvalidStateError on a second set).

        An array from :meth:`buffer` (or :func:`proxy_patterns.store.empty`) is published as
        it is, without a copy; any other value is copied into the store.
        """
        self._set(result)

    def set_exception(self, exception: BaseException) -> None:
        """Make every consumer raise ``exception`` (its own type and message)."""
        self._set(_Raised(exception))

    def cancel(self) -> bool:
        """Cancel unless already set: consumers then raise CancelledError. True if cancelled."""
        try:
            self._set(_Raised(CancelledError(f"future {self.key} was cancelled")))
        except InvalidStateError:
            return False
        return True

    def done(self) -> bool:
        """Whether a value, an exception or a cancellation has been set."""
        return self._rendezvous.exists(self.key)

    def cancelled(self) -> bool:
        """Whether the future was cancelled."""
        return self.done() and isinstance(self.exception(0), CancelledError)

    def result(self, timeout: float | None = None) -> T:
        """Wait for the value and return it (or raise the exception it was given)."""
        return self._factory.result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Wait, then return the exception the future was given, or None."""
        outcome = self._factory.outcome(timeout)
        return outcome.exception if isinstance(outcome, _Raised) else None

    def add_done_callback(self, fn: Callable[[ProxyFuture[T]], object]) -> None:
        """Call ``fn(self)`` once the future is done, from a background thread."""

        def wait_then_call() -> None:
            with contextlib.suppress(ProducerLostError):  # fn sees the error via result()
                self._rendezvous.wait(self.key, None)
            fn(self)

        threading.Thread(target=wait_then_call, name=f"callback {self.key}", daemon=True).start()

    def evict(self) -> None:
        """Give up this future's hold on its key now, rather than when it is collected.

        The value and the claim are evicted at once unless something else still holds the key
        (a task graph that carries the future, with the Dask plugin), then when that lets go:
        a task that may still read the value never finds it gone. A future received from
        another process holds nothing, so there this does nothing.

        Buffers of this future not published yet are removed at once (their arrays stay
        valid).
        """
        for allocation in list(self._buffers):
            allocation.remove()
        if self._release is not None:
            self._release()


def _release_owner(table: RefTable, key: Any, owner: str) -> None:
    """Drop a future's hold on its key (at garbage collection, :meth:`ProxyFuture.evict` or
    exit); the key is evicted if nothing else holds it."""
    with contextlib.suppress(ReferenceInvalidError):  # evicted and released already
        table.drop(key, owner)
