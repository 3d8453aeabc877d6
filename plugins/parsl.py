"""Parsl integration: one option on an executor; large app arguments and results go by proxy.

::

    from parsl import Config, HighThroughputExecutor
    from proxy_patterns.plugins.parsl import proxied

    config = Config(executors=[proxied(HighThroughputExecutor(label="htex"), threshold="1 MiB")])

:func:`proxied` returns the executor itself: its class must stay what it is, because the
DataFlowKernel scales, configures and monitors executors by class. Two methods of that one
instance are replaced (other executors of the Config are untouched):

* ``submit`` puts each argument whose serialized size is above the threshold in the store (once
  per distinct content while apps use it) and sends a proxy instead; the app function is
  wrapped so that the worker gives the app its arguments as real objects (mapped from the
  store) and puts a large result in the store, sending back a proxy. The bytes never pass
  through the HTEX interchange. ``AppFuture.result()`` is the real object (mapped on shared
  memory), as without the plugin; passed on to a dependent app, it travels as the proxy it
  came as, not by value.
* ``shutdown`` (called by ``DataFlowKernel.cleanup()``) evicts what is left.

Lifetimes rest on :mod:`proxy_patterns.ownership`'s reference records and never on when Python
frees an object (log handlers that keep records, such as pytest's, keep ``AppFuture`` objects alive
at will): an argument is held by every app that received it until the app is done; a result
is held until it is delivered and the apps already waiting for it have been handed its proxy,
then by each of those apps until it is done. The delivered object itself lives in the
process as long as anything refers to it; on shared memory it is a mapping, valid after its
key is evicted.

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

from proxystore.proxy import Proxy

from proxy_patterns.extras import requires_extra

with requires_extra("parsl", __name__):
    import parsl
    from parsl.errors import NoDataFlowKernelError
    from parsl.executors import ThreadPoolExecutor
    from parsl.executors.base import ParslExecutor
    from parsl.executors.high_throughput.errors import ManagerLost, WorkerLost
    from parsl.serialize.errors import SerializationError

from proxy_patterns.arguments import ArgumentProxies
from proxy_patterns.liveness import process_tag
from proxy_patterns.ownership import ReferenceInvalidError
from proxy_patterns.policy import AROUND_ARGUMENTS, DEFAULT_THRESHOLD, ProxyPolicy
from proxy_patterns.proxy import key_of, materialize, put_large_parts
from proxy_patterns.records import ref_table_for
from proxy_patterns.serialize import Frames
from proxy_patterns.store import default_spec, get_store, spec_owned_by

E = TypeVar("E", bound=ParslExecutor)


@dataclass(frozen=True)
class _ProxiedResult:
    """What the worker returns for a result that holds new proxies: the result, their keys,
    and the worker's holder of each, which the submitting process takes over on delivery.

    Not callable, unlike a proxy (HTEX serializes callable results as code).
    """

    value: Any
    created: tuple[Any, ...]
    holders: tuple[str, ...]
    nbytes: int


class _ProxyingApp:
    """The app function as the worker runs it: real arguments in, large results to the store.

    Each result key is recorded at once with a holder leased by the worker, which the
    submitting process takes over on delivery (a claim). A worker killed between the put and
    the delivery takes its lease with it: the key goes at the next sweep, not when the
    submitting process exits (its segments are named for the submitting process, ``owner``,
    only for the instant before the record exists).
    """

    def __init__(self, func: Callable[..., Any], policy: ProxyPolicy, store_spec: str) -> None:
        self.func = func
        self.policy = policy
        self.store_spec = store_spec
        self.__name__ = getattr(func, "__name__", type(func).__name__)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        depth = self.policy.max_depth + AROUND_ARGUMENTS
        result = self.func(*materialize(args, depth), **materialize(kwargs, depth))
        try:
            proxied, created = put_large_parts(self.policy, get_store(self.store_spec), result)
        except Exception:  # the store cannot take it (full): it goes by value, as in Parsl
            return result
        if not created:
            return result
        keys = tuple(key for key, _ in created)
        table = ref_table_for(get_store(self.store_spec))
        holders = tuple(table.create(key) for key in keys)
        return _ProxiedResult(proxied, keys, holders, sum(nbytes for _, nbytes in created))


@dataclass
class _Holds:
    """The store keys one app (or one delivered result) holds, released once."""

    holders: list[tuple[Any, str]]

    def take(self) -> list[tuple[Any, str]]:
        holders, self.holders = self.holders, []
        return holders


@dataclass
class _Delivered:
    """A result given to the DataFlowKernel: the object, the proxied form it came as, and the
    hold on its keys that lasts until the apps already waiting for it are submitted."""

    value: Any
    proxied: Any
    holds: _Holds


class ParslProxyPlugin:
    """The state :func:`proxied` attaches to one executor (``executor.proxy_patterns``)."""

    def __init__(
        self, executor: ParslExecutor, policy: ProxyPolicy, store_spec: str, in_process: bool
    ) -> None:
        self.executor = executor
        self.policy = policy
        self.store_spec = store_spec
        self.in_process = in_process
        self.store = get_store(store_spec)
        self.arguments = ArgumentProxies(self.store)
        self.table = self.arguments.table
        self._submit = executor.submit
        self._shutdown = executor.shutdown
        self._lock = threading.Lock()
        self._delivered: dict[int, _Delivered] = {}  # by id of the delivered object
        self._holds: dict[int, _Holds] = {}  # of apps not done yet, and of delivered results
        self._apps: dict[int, _ProxyingApp] = {}
        self._result_bytes = 0

    def install(self) -> None:
        self.executor.submit = self.submit  # type: ignore[method-assign]
        self.executor.shutdown = self.shutdown  # type: ignore[method-assign]
        self.executor.proxy_patterns = self  # type: ignore[attr-defined]

    # --- arguments ------------------------------------------------------------------------
    def _hold_argument(self, obj: Any, frames: Frames, holds: _Holds) -> Proxy[Any]:
        p, holder = self.arguments.hold(obj, frames)
        holds.holders.append((key_of(p), holder))
        return p

    def _passed_on(self, value: Any, holds: _Holds) -> Any:
        """The proxied form of a result delivered earlier, held for the app it is passed to,
        or None (the DataFlowKernel hands a dependent app the very object it delivered)."""
        with self._lock:
            delivered = self._delivered.get(id(value))
            if delivered is None or delivered.value is not value:
                return None
            try:
                for key, _ in delivered.holds.holders:
                    holds.holders.append((key, self.table.add(key, "ref")))
            except ReferenceInvalidError:
                return None
            return delivered.proxied

    def _proxy_arguments(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], holds: _Holds
    ) -> tuple[tuple[Any, ...], dict[str, Any], list[str]]:
        """The arguments with their large parts proxied, and the reasons why objects that could
        not be put in the store were left for Parsl to serialize (its serializer may manage)."""
        unpicklable: list[tuple[Any, Exception]] = []
        reasons: list[str] = []
        judge = self.policy.judge(
            lambda obj, frames: self._hold_argument(obj, frames, holds),
            keep_frames=not self.in_process,
            unpicklable=unpicklable,
        )

        def argument(name: str, value: Any) -> Any:
            passed = self._passed_on(value, holds)
            if passed is not None:
                return passed
            value = judge(value)
            reasons.extend(f"argument {name} (a {type(o).__name__}: {e})" for o, e in unpicklable)
            unpicklable.clear()
            return value

        args = tuple(argument(str(i), a) for i, a in enumerate(args))
        kwargs = {name: argument(name, value) for name, value in kwargs.items()}
        return args, kwargs, reasons

    def _drop(self, holds: _Holds) -> None:
        """Release ``holds``; keys left with no holder are evicted by their record."""
        with self._lock:
            self._holds.pop(id(holds), None)
        for key, holder in holds.take():
            self.table.drop(key, holder)

    # --- the executor's methods -----------------------------------------------------------
    def submit(
        self,
        func: Callable[..., Any],
        resource_specification: dict[str, Any],
        *args: Any,
        **kw: Any,
    ) -> Future[Any]:
        """Submit with large arguments as proxies; the returned future's result is the real
        object, its large parts mapped from the store."""
        holds = self._new_holds()
        try:
            args, kw, unstored = self._proxy_arguments(args, kw, holds)
            try:
                inner = self._submit(self._app(func), resource_specification, *args, **kw)
            except SerializationError as e:
                if not unstored:
                    raise
                reasons = "; ".join(unstored)
                raise SerializationError(e.fname) from TypeError(
                    f"proxy-patterns could not put {reasons} in store {self.store.name!r}"
                )
        except BaseException:
            self._drop(holds)  # nothing of a failed submission stays in the store
            raise
        outer: Future[Any] = Future()
        if hasattr(inner, "parsl_executor_task_id"):  # read by the DataFlowKernel's logging
            outer.parsl_executor_task_id = inner.parsl_executor_task_id  # type: ignore[attr-defined]
        # A weak reference: Parsl's result thread keeps the last finished inner future (and
        # so this callback) alive, which must not keep the outer future alive.
        outer_ref = weakref.ref(outer)
        inner.add_done_callback(lambda done: self._complete(done, outer_ref(), holds))
        return outer

    def _new_holds(self) -> _Holds:
        holds = _Holds([])
        with self._lock:
            self._holds[id(holds)] = holds
        return holds

    def _app(self, func: Callable[..., Any]) -> _ProxyingApp:
        # One wrapper per function: Parsl caches serialized functions by identity.
        with self._lock:
            app = self._apps.get(id(func))
            if app is None or app.func is not func:
                owned_by_us = spec_owned_by(self.store_spec, process_tag())
                app = self._apps[id(func)] = _ProxyingApp(func, self.policy, owned_by_us)
            return app

    def _complete(self, done: Future[Any], outer: Future[Any] | None, holds: _Holds) -> None:
        """The app is done: release its arguments, deliver its result (any error, ours too,
        reaches the AppFuture: an app must never hang)."""
        delivered: _Delivered | None = None
        try:
            self._drop(holds)
            result = done.result()
            if isinstance(result, _ProxiedResult):
                delivered = self._deliver(result)
                result = delivered.value
        except BaseException as e:
            if isinstance(e, (WorkerLost, ManagerLost)):
                # The lost process may have put a result it never sent: its lease ended, so
                # the sweep frees it now, rather than when this process exits.
                self.table.sweep()
            if outer is not None:
                outer.set_exception(e)
            if delivered is not None:
                self._release_delivered(delivered)
            return
        if outer is None:  # nobody waits for it any more (the DataFlowKernel was cleaned up)
            if delivered is not None:
                self._release_delivered(delivered)
            return
        outer.set_result(result)  # the DataFlowKernel queues the launch of waiting apps
        if delivered is not None:
            self._after_queued_launches(lambda: self._release_delivered(delivered))

    def _deliver(self, result: _ProxiedResult) -> _Delivered:
        """Record the result's keys, materialize it, and remember it to pass it on by proxy."""
        holds = self._new_holds()
        holds.holders = [
            (key, self.table.claim(key, holder))
            for key, holder in zip(result.created, result.holders, strict=True)
        ]
        with self._lock:
            self._result_bytes += result.nbytes
        try:
            value = materialize(result.value, self.policy.max_depth + AROUND_ARGUMENTS)
        except BaseException:
            self._drop(holds)
            raise
        delivered = _Delivered(value, result.value, holds)
        with self._lock:
            self._delivered[id(value)] = delivered
        return delivered

    def _release_delivered(self, delivered: _Delivered) -> None:
        with self._lock:
            if self._delivered.get(id(delivered.value)) is delivered:
                del self._delivered[id(delivered.value)]
        self._drop(delivered.holds)

    def _after_queued_launches(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` once the DataFlowKernel has launched the apps it queued so far.

        Setting a result makes the DataFlowKernel queue the launch of every app waiting for it
        (on its one launch thread, in order): ``fn`` is queued after them. If the executor's
        DataFlowKernel cannot be found, ``fn`` runs at once and a waiting app gets the result
        put in the store again rather than its proxy: slower, never wrong.
        """
        try:
            dfk = parsl.dfk()
            if dfk.executors.get(self.executor.label) is not self.executor:
                raise NoDataFlowKernelError("not this executor's DataFlowKernel")
            dfk._task_launch_pool.submit(fn)
        except (NoDataFlowKernelError, AttributeError, RuntimeError):  # none, or shut down
            fn()

    def shutdown(self, *args: Any, **kwargs: Any) -> Any:
        """Shut the executor down, then evict every result and argument still in the store."""
        try:
            return self._shutdown(*args, **kwargs)
        finally:
            with self._lock:
                delivered = list(self._delivered.values())
                holds = list(self._holds.values())
            for d in delivered:
                self._release_delivered(d)
            for h in holds:
                self._drop(h)

    def keys_held(self) -> int:
        """Store keys of arguments and results this executor holds now."""
        with self._lock:
            return len({key for h in self._holds.values() for key, _ in h.holders})

    def stats(self) -> dict[str, int]:
        """Bytes proxied so far (arguments put, results delivered), and keys held now."""
        with self._lock:
            bytes_proxied = self.arguments.bytes_put + self._result_bytes
        return {"bytes_proxied": bytes_proxied, "keys_held": self.keys_held()}


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
        threshold: Objects whose serialized size is larger travel by proxy (``"1 MiB"``-style
            strings work).
        store: Store spec (``shm``, ``topology`` when workers run on other hosts than the
            client, ``redis://host:port``, ...); default ``$PROXY_PATTERNS_STORE``, else
            ``shm``.
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
    ParslProxyPlugin(executor, ProxyPolicy(threshold), spec, in_process).install()
    return executor
