"""Parsl integration: one option on an executor; large app arguments and results go by proxy.

::

    from parsl import Config, HighThroughputExecutor
    from proxy_patterns.plugins.parsl import proxied

    config = Config(executors=[proxied(HighThroughputExecutor(label="htex"), threshold="1 MiB")])

:func:`proxied` returns the executor itself: its class must stay what it is, because the
DataFlowKernel scales, configures and monitors executors by class. Two methods of that one
instance are replaced (other executors of the Config are untouched):

* ``submit`` puts each argument above the threshold in the store (once per distinct content
  while apps use it) and sends a proxy instead; the app function is wrapped so that the
  worker puts a large result in the store and sends back a proxy. The bytes never pass
  through the HTEX interchange. ``AppFuture.result()`` is that proxy: it behaves as the
  object (its class is known, it resolves on first use, zero-copy on shared memory), and
  passed to another app it stays a small proxy that the dependent worker reads from the store.
* ``shutdown`` (called by ``DataFlowKernel.cleanup()``) evicts what is left.

Lifetimes rest on :mod:`proxy_patterns.ownership`'s reference records: an argument is held by
every app that received it until the app is done; a result is held by its proxy in this
process (the AppFuture's result and every copy the user keeps) and by every dependent app
until it is done.

In-process executors (``ThreadPoolExecutor``) serialize nothing, so proxying could only add
cost: :func:`proxied` leaves them as they are unless ``in_process=True``.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from dask.base import tokenize
from parsl.dataflow.memoization import id_for_memo
from parsl.executors import ThreadPoolExecutor
from parsl.executors.base import ParslExecutor
from parsl.serialize.errors import SerializationError
from proxystore.proxy import Proxy, get_factory
from proxystore.store.factory import StoreFactory

from proxy_patterns.ownership import ReferenceInvalidError, ref_table_for
from proxy_patterns.policy import ProxyPolicy
from proxy_patterns.proxy import held, is_proxy, key_of, map_proxies, proxy, store_keys_in
from proxy_patterns.serialize import dumps
from proxy_patterns.shm import process_tag
from proxy_patterns.store import default_spec, get_store, spec_owned_by

DEFAULT_THRESHOLD = "1 MiB"
E = TypeVar("E", bound=ParslExecutor)


@dataclass(frozen=True)
class _ProxiedResult:
    """What the worker returns for a result that holds new proxies: the result and their keys.

    Not callable, unlike a proxy (HTEX serializes callable results as code).
    """

    value: Any
    created: tuple[Any, ...]


class _ProxyingApp:
    """The app function as the worker runs it: large results are put in the store.

    Segments are named for the submitting process (``owner``): a worker that exits does not
    take results with it, and the submitting process's records decide when they go.
    """

    def __init__(self, func: Callable[..., Any], policy: ProxyPolicy, store_spec: str) -> None:
        self.func = func
        self.policy = policy
        self.store_spec = store_spec
        self.__name__ = getattr(func, "__name__", type(func).__name__)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        result = self.func(*args, **kwargs)
        store = get_store(self.store_spec)
        created: list[Any] = []

        def make_proxy(obj: Any) -> Proxy[Any]:
            p = proxy(store, obj, keep_target=False)
            created.append(key_of(p))
            return p

        proxied = self.policy.apply(result, make_proxy)
        return _ProxiedResult(proxied, tuple(created)) if created else result


class _ResultHold:
    """The hold of a result's proxies in this process; released when they are all gone."""

    def __init__(self, release: Callable[[], None]) -> None:
        self._release: Callable[[], None] | None = release
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            release, self._release = self._release, None
        if release is not None:
            release()

    def __del__(self) -> None:
        self.release()


class ParslProxyPlugin:
    """The state :func:`proxied` attaches to one executor (``executor.proxy_patterns``)."""

    def __init__(self, executor: ParslExecutor, policy: ProxyPolicy, store_spec: str) -> None:
        self.executor = executor
        self.policy = policy
        self.store_spec = store_spec
        self.store = get_store(store_spec)
        self.table = ref_table_for(self.store)
        self._submit = executor.submit
        self._shutdown = executor.shutdown
        self._lock = threading.Lock()
        self._arguments: dict[str, Any] = {}  # content token -> argument proxy in the store
        self._token_of: dict[Any, str] = {}  # and back, from its key
        self._results: set[Any] = set()  # keys of results whose proxies are alive here
        self._holds: weakref.WeakSet[_ResultHold] = weakref.WeakSet()
        self._apps: dict[int, _ProxyingApp] = {}

    def install(self) -> None:
        self.executor.submit = self.submit  # type: ignore[method-assign]
        self.executor.shutdown = self.shutdown  # type: ignore[method-assign]
        self.executor.proxy_patterns = self  # type: ignore[attr-defined]

    # --- arguments ------------------------------------------------------------------------
    def _hold_argument(self, obj: Any, holders: list[tuple[Any, str]]) -> Proxy[Any]:
        frames = dumps(obj)
        token = frames.digest()
        with self._lock:
            known = self._arguments.get(token)
            if known is not None:
                try:
                    holders.append((key_of(known), self.table.add(key_of(known), "ref")))
                    return known  # type: ignore[no-any-return]
                except ReferenceInvalidError:  # its last app finished meanwhile
                    self._forget_argument(key_of(known))
            p = proxy(self.store, obj, keep_target=False, frames=frames)
            try:
                holders.append((key_of(p), self.table.create(key_of(p))))
            except BaseException:
                self.store.evict(key_of(p))
                raise
            self._arguments[token] = p
            self._token_of[key_of(p)] = token
            return p

    def _forget_argument(self, key: Any) -> None:
        token = self._token_of.pop(key, None)
        if token is not None:
            del self._arguments[token]

    def _hold_passed_results(self, value: Any, holders: list[tuple[Any, str]]) -> None:
        """A result proxy passed on to another app is held until that app is done."""
        for key in store_keys_in(value, self.policy.max_depth + 1):
            if key in self._results:
                holders.append((key, self.table.add(key, "ref")))

    def _proxy_argument(
        self, name: str, value: Any, holders: list[tuple[Any, str]], unstored: list[str]
    ) -> Any:
        """``value`` with its large parts proxied; one that cannot be put in the store is left
        for Parsl to serialize (its serializer may manage), and noted in ``unstored``."""
        self._hold_passed_results(value, holders)
        try:
            return self.policy.apply(value, lambda obj: self._hold_argument(obj, holders))
        except ReferenceInvalidError:
            raise
        except Exception as e:
            unstored.append(f"argument {name} (a {type(value).__name__}): {e}")
            return value

    def _drop(self, holders: list[tuple[Any, str]]) -> None:
        for key, holder in holders:
            if self.table.drop(key, holder):
                with self._lock:
                    self._results.discard(key)
                    self._forget_argument(key)

    # --- the executor's methods -----------------------------------------------------------
    def submit(
        self,
        func: Callable[..., Any],
        resource_specification: dict[str, Any],
        *args: Any,
        **kw: Any,
    ) -> Future[Any]:
        """Submit with large arguments as proxies; the returned future's result is a proxy
        when the app's result was large."""
        holders: list[tuple[Any, str]] = []
        unstored: list[str] = []
        try:
            args = tuple(
                self._proxy_argument(str(i), a, holders, unstored) for i, a in enumerate(args)
            )
            kw = {name: self._proxy_argument(name, v, holders, unstored) for name, v in kw.items()}
            try:
                inner = self._submit(self._app(func), resource_specification, *args, **kw)
            except SerializationError as e:
                if not unstored:
                    raise
                reasons = "; ".join(unstored)
                raise SerializationError(e.fname) from TypeError(
                    f"proxy-patterns could not put {reasons} in store {self.store_spec!r}"
                )
        except BaseException:
            self._drop(holders)  # nothing of a failed submission stays in the store
            raise
        outer: Future[Any] = Future()
        if hasattr(inner, "parsl_executor_task_id"):  # read by the DataFlowKernel's logging
            outer.parsl_executor_task_id = inner.parsl_executor_task_id  # type: ignore[attr-defined]
        # A weak reference: Parsl's result thread keeps the last finished inner future (and
        # so this callback) alive, which must not keep the result's proxies alive.
        outer_ref = weakref.ref(outer)
        inner.add_done_callback(lambda done: self._complete(done, outer_ref(), holders))
        return outer

    def _app(self, func: Callable[..., Any]) -> _ProxyingApp:
        # One wrapper per function: Parsl caches serialized functions by identity.
        with self._lock:
            app = self._apps.get(id(func))
            if app is None or app.func is not func:
                owned_by_us = spec_owned_by(self.store_spec, process_tag())
                app = self._apps[id(func)] = _ProxyingApp(func, self.policy, owned_by_us)
            return app

    def _complete(
        self, done: Future[Any], outer: Future[Any] | None, holders: list[tuple[Any, str]]
    ) -> None:
        self._drop(holders)
        exception = done.exception()
        result = None if exception is not None else done.result()
        if outer is None:  # nobody waits for it any more (the DataFlowKernel was cleaned up)
            if isinstance(result, _ProxiedResult):
                for key in result.created:
                    self.store.evict(key)
            return
        if exception is not None:
            outer.set_exception(exception)
            return
        if isinstance(result, _ProxiedResult):
            result = self._hold_result(result)
        outer.set_result(result)

    def _hold_result(self, result: _ProxiedResult) -> Any:
        """Record the result's keys, held by its proxies in this process until they are gone."""
        owners = [(key, self.table.create(key)) for key in result.created]
        with self._lock:
            self._results.update(result.created)
        hold = _ResultHold(lambda: self._drop(owners))
        self._holds.add(hold)
        created = set(result.created)

        def hold_if_created(p: Proxy[Any]) -> Proxy[Any]:
            if key_of(p) not in created:
                return p
            _memoize_proxies_by_key(object.__getattribute__(p, "__proxy_default_class__"))
            return held(p, hold)

        return map_proxies(result.value, hold_if_created, self.policy.max_depth + 1)

    def shutdown(self, *args: Any, **kwargs: Any) -> Any:
        """Shut the executor down, then evict every result and argument still in the store."""
        try:
            return self._shutdown(*args, **kwargs)
        finally:
            for hold in list(self._holds):
                hold.release()

    def keys_held(self) -> int:
        """Store keys of arguments and results this executor holds now."""
        with self._lock:
            return len(set(self._token_of) | self._results)


_memo_classes: set[type] = set()
_memo_lock = threading.Lock()


def _memoize_proxies_by_key(cls: type) -> None:
    """Make Parsl's app caching hash our proxies claiming to be ``cls`` by key, unresolved.

    ``id_for_memo`` dispatches on ``obj.__class__``, which a proxy answers with its target's
    class; so the handler of that class is wrapped, and passes every other object on.
    """
    with _memo_lock:
        if cls in _memo_classes:
            return
        _memo_classes.add(cls)
        original = id_for_memo.dispatch(cls)

        def id_for_memo_by_key(obj: Any, output_ref: bool = False) -> bytes:
            if is_proxy(obj) and isinstance(get_factory(obj), StoreFactory):
                return tokenize("proxy-patterns", key_of(obj)).encode()
            return original(obj, output_ref=output_ref)

        id_for_memo.register(cls, id_for_memo_by_key)


def proxied(
    executor: E,
    threshold: int | str = DEFAULT_THRESHOLD,
    store: str | None = None,
    *,
    in_process: bool = False,
) -> E:
    """Make ``executor`` send app arguments and results above ``threshold`` by proxy.

    Args:
        executor: A Parsl executor, not started yet (put it in the ``Config``).
        threshold: Objects larger than this travel by proxy (``"1 MiB"``-style strings work).
        store: Store spec (``shm``, ``redis://host:port``, ...); default
            ``$PROXY_PATTERNS_STORE``, else ``shm``.
        in_process: Also proxy for executors that run apps in this process
            (``ThreadPoolExecutor``), where nothing is serialized anyway.

    Returns:
        The same executor object.
    """
    if hasattr(executor, "proxy_patterns"):
        raise ValueError(f"executor {executor.label!r} is already proxied")
    if isinstance(executor, ThreadPoolExecutor) and not in_process:
        return executor
    spec = store if store is not None else default_spec()
    ParslProxyPlugin(executor, ProxyPolicy(threshold), spec).install()
    return executor
