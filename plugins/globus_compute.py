"""Globus Compute integration: data over 10 MB through the store, futures as arguments.

::

    from globus_compute_sdk import Executor
    from proxy_patterns.plugins.globus_compute import proxied

    with proxied(Executor(endpoint_id=...), store="redis://host:6379") as executor:
        a = executor.submit(simulate, big_input)       # 100 MB: no HTTP 413
        b = executor.submit(analyse, a)                # a's future as an argument: starts now
        print(b.result())                              # the object itself

Globus Compute sends every argument and result through its cloud service, refuses a
submission over 10 MB (HTTP 413 ``TASK_PAYLOAD_TOO_LARGE``) and a result over 10 MiB
(``MaxResultSizeExceeded``), and its futures cannot be arguments of other functions.
:func:`proxied` wraps an SDK ``Executor`` (the shape of ProxyStore's ``StoreExecutor``,
``concurrent.futures.Executor``'s interface):

* arguments whose serialized size is above the threshold, of any type, are put in the store
  (once per distinct content while functions use them) and sent as proxies; the function gets
  the objects themselves;
* each function's result is set into a :class:`~proxy_patterns.futures.ProxyFuture` by the
  endpoint: a large one reaches the client through the store, never through the service;
* a future this executor returned, passed to ``submit``, is sent as that proxy future's proxy:
  the second function starts at once and waits only where it reads the value.

Lifetimes follow the same records as the other plugins: an argument is held by each function
that received it until it is done; a result by its future (the value lives while the client
keeps the future, to pass it on) and by each function it was passed to until that one is done.

The store must be reachable from both sides: Redis or any spec both reach. The embedded
shared-memory store works only for an endpoint on the client's host; a function that reaches
another host fails at once with :class:`~proxy_patterns.hosts.StoreUnreachableError`.

Inside functions submitted through a plain ``Executor``, :func:`proxy_io` does the function's
part alone; :class:`~proxy_patterns.futures.ProxyFuture`, :mod:`~proxy_patterns.streams` and
:mod:`~proxy_patterns.ownership` work inside any function as they do anywhere.
"""

from __future__ import annotations

import copy
import functools
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar, cast

from proxy_patterns.extras import requires_extra

with requires_extra("globus", __name__):
    import globus_compute_sdk

from proxy_patterns.arguments import ArgumentProxies
from proxy_patterns.futures import ProxyFuture
from proxy_patterns.hosts import check_reachable, host_identity
from proxy_patterns.ownership import owned
from proxy_patterns.policy import AROUND_ARGUMENTS, DEFAULT_THRESHOLD, ProxyPolicy, known_nbytes
from proxy_patterns.proxy import key_of, materialize
from proxy_patterns.records import ReferenceInvalidError
from proxy_patterns.serialize import SizeExceeded, dumps
from proxy_patterns.store import default_spec, get_store

P = ParamSpec("P")
R = TypeVar("R")

SUBMISSION_LIMIT = 10_000_000
"""Bytes of one submission the Globus Compute service accepts (it answers HTTP 413 above)."""
_BASE64 = 4 / 3
"""The SDK sends serialized arguments base64-encoded."""


class SubmissionTooLargeError(ValueError):
    """A submission would exceed the service's limit even with large arguments proxied."""


@dataclass(frozen=True)
class _InStore:
    """What a function returns when its result went to the store only (too large to send)."""


class _EndpointFunction:
    """The user's function as the endpoint runs it: arguments as objects, result into the
    store (its future), only small results through the service.

    One per user function, registered with the service once; per-task data (the future) is an
    argument.
    """

    def __init__(self, fn: Callable[..., Any], policy: ProxyPolicy, origin: str) -> None:
        self.fn = fn
        self.policy = policy
        self.origin = origin
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)
        self.__doc__ = getattr(fn, "__doc__", None)

    def __call__(self, future: ProxyFuture[Any], *args: Any, **kwargs: Any) -> Any:
        check_reachable(future.store, self.origin)
        depth = self.policy.max_depth + AROUND_ARGUMENTS
        try:
            result = self.fn(*materialize(args, depth), **materialize(kwargs, depth))
        except BaseException as e:
            future.set_exception(e)
            raise
        future.set_result(result)
        large = _larger_than(result, cast(int, self.policy.threshold))
        return _InStore() if large else result


class GlobusFuture(Future[R]):
    """A future of :class:`ProxiedExecutor`: ``concurrent.futures.Future``, whose value is also
    in the store, so it can be an argument of later submissions."""

    def __init__(self, value: ProxyFuture[R]) -> None:
        super().__init__()
        self.proxy_future = value
        """The proxy future the endpoint sets: passed on, its proxy travels instead."""
        self.inner: Future[Any] | None = None

    def cancel(self) -> bool:
        """Cancel the task too, if the executor still can."""
        if self.inner is not None and not self.inner.cancel():
            return False
        return super().cancel()


class ProxiedExecutor(Executor):
    """A Globus Compute ``Executor`` whose large arguments and results go through ``store``.

    Args:
        executor: The SDK ``Executor`` (or any ``concurrent.futures.Executor`` whose tasks run
            elsewhere); shut down with this one.
        threshold: Objects whose serialized size is larger travel by proxy.
        store: Store spec both sides reach (default ``$PROXY_PATTERNS_STORE``, else ``shm``).
    """

    def __init__(
        self,
        executor: Executor,
        *,
        threshold: int | str = DEFAULT_THRESHOLD,
        store: str | None = None,
    ) -> None:
        self.executor = executor
        self.policy = ProxyPolicy(threshold)
        self.store_spec = store if store is not None else default_spec()
        self.store = get_store(self.store_spec)
        self.arguments = ArgumentProxies(self.store)
        self.table = self.arguments.table
        self._functions: dict[int, _EndpointFunction] = {}
        self._holds: dict[int, list[tuple[Any, str]]] = {}  # of tasks not done yet
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ProxiedExecutor({self.executor!r}, store={self.store.name!r})"

    def _function(self, fn: Callable[..., Any]) -> _EndpointFunction:
        # One wrapper per function: the SDK registers functions with the service by identity.
        with self._lock:
            wrapper = self._functions.get(id(fn))
            if wrapper is None or wrapper.fn is not fn:
                wrapper = self._functions[id(fn)] = _EndpointFunction(
                    fn, self.policy, host_identity()
                )
            return wrapper

    def _argument(self, value: Any, holds: list[tuple[Any, str]]) -> Any:
        """``value`` as it travels: a future of ours as its proxy future's proxy, a large
        object as a proxy; each held for the task."""
        if isinstance(value, GlobusFuture):
            key = value.proxy_future.key
            try:
                holds.append((key, self.table.add(key, "ref")))
            except ReferenceInvalidError as e:
                raise ValueError(
                    f"{value!r} was released: its value can no longer be passed on"
                ) from e
            return value.proxy_future.unowned().proxy()

        def hold(obj: Any, frames: Any) -> Any:
            p, holder = self.arguments.hold(obj, frames)
            holds.append((key_of(p), holder))
            return p

        return self.policy.apply(value, hold)

    def submit(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> GlobusFuture[R]:
        """Run ``fn(*args, **kwargs)`` on the endpoint; arguments may be large and may be
        futures of this executor. The future's result is the object itself."""
        holds: list[tuple[Any, str]] = []
        value: ProxyFuture[R] = ProxyFuture(self.store)
        try:
            sent_args = tuple(self._argument(a, holds) for a in args)
            sent_kwargs = {name: self._argument(v, holds) for name, v in kwargs.items()}
            _check_size(fn, sent_args, sent_kwargs)
            function = self._function(fn)
            inner = self.executor.submit(function, value.unowned(), *sent_args, **sent_kwargs)
        except BaseException:
            self._drop(holds)
            value.evict()
            raise
        outer = GlobusFuture(value)
        outer.inner = inner
        with self._lock:
            self._holds[id(holds)] = holds
        # A weak reference: the SDK keeps its futures (and so this callback), which must not
        # keep ours, and with it the value in the store, alive.
        outer_ref = weakref.ref(outer)
        inner.add_done_callback(lambda done: self._complete(done, outer_ref(), holds))
        return outer

    def _drop(self, holds: list[tuple[Any, str]]) -> None:
        with self._lock:
            self._holds.pop(id(holds), None)
            taken, holds[:] = list(holds), []
        for key, holder in taken:
            self.table.drop(key, holder)

    def _complete(
        self, done: Future[Any], outer: GlobusFuture[Any] | None, holds: list[Any]
    ) -> None:
        """The task is done: release its arguments and deliver its result (any error, ours
        too, reaches the future: a caller must never hang)."""
        self._drop(holds)
        if outer is None:  # nobody can read the result any more
            return
        if done.cancelled():
            outer.proxy_future.cancel()
            outer.cancel()
            return
        if not outer.set_running_or_notify_cancel():
            return
        # The task's error is read, not raised here: raised, it would keep this frame (and
        # ``outer``) in the traceback of an exception the SDK keeps.
        error = done.exception()
        if error is not None:
            if not outer.proxy_future.done():  # died before setting it: readers must not wait
                outer.proxy_future.set_exception(error)
            outer.set_exception(_own_copy(error))
            return
        try:
            result = done.result()
            if isinstance(result, _InStore):
                result = outer.proxy_future.result()
        except BaseException as e:  # our part failed (the store): the caller must know
            outer.set_exception(e)
            return
        outer.set_result(result)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Shut the wrapped executor down, then release every argument still held."""
        try:
            self.executor.shutdown(wait=wait, cancel_futures=cancel_futures)
        finally:
            with self._lock:
                pending = list(self._holds.values())
            for holds in pending:
                self._drop(holds)

    def keys_held(self) -> int:
        """Store keys of arguments this executor holds for tasks not done yet."""
        with self._lock:
            return len({key for holds in self._holds.values() for key, _ in holds})


def _own_copy(error: BaseException) -> BaseException:
    """``error`` as a new object, for our future alone.

    The SDK keeps its last futures (its submitting thread's locals): had ours the same
    exception object, each ``result()`` that raised it would add the caller's frame to its
    traceback, and the SDK would keep those frames, their locals (our futures) and so their
    values in the store alive.
    """
    try:
        return copy.copy(error)
    except Exception:  # an exception that cannot be rebuilt from its arguments
        return error


def _larger_than(obj: Any, threshold: int) -> bool:
    """Whether ``obj``'s serialized size is over ``threshold``: read from arrays and bytes,
    else serialized only until it passes the threshold (the result was serialized whole once
    already, into its future)."""
    known = known_nbytes(obj)
    if known is not None:
        return known > threshold
    try:
        dumps(obj, limit=threshold)
    except SizeExceeded:
        return True
    return False


def _check_size(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Refuse, before the service does (the SDK's executor stops for good on an HTTP 413), a
    submission whose arguments are still over the limit once proxied."""
    try:
        nbytes = int(dumps((args, kwargs)).nbytes * _BASE64)
    except Exception:  # not ours to send: the SDK's serializer may manage, or say why not
        return
    if nbytes > SUBMISSION_LIMIT:
        raise SubmissionTooLargeError(
            f"submitting {getattr(fn, '__name__', fn)!r} would send about {nbytes} bytes, over "
            f"Globus Compute's {SUBMISSION_LIMIT}-byte limit, although arguments over the "
            "threshold travel by proxy: lower the threshold (many arguments just below it add up)"
        )


def proxied(
    executor: globus_compute_sdk.Executor | Executor,
    *,
    threshold: int | str = DEFAULT_THRESHOLD,
    store: str | None = None,
) -> ProxiedExecutor:
    """Wrap a Globus Compute ``Executor`` so large arguments and results go through ``store``
    and its futures can be arguments (see the module docstring)."""
    return ProxiedExecutor(executor, threshold=threshold, store=store)


def proxy_io(
    fn: Callable[P, R] | None = None,
    *,
    threshold: int | str = DEFAULT_THRESHOLD,
    store: str | None = None,
) -> Any:
    """Decorate a function submitted through a plain ``Executor``: it takes proxies among its
    arguments (resolved where it touches them) and returns a large result as an owned proxy
    (:func:`~proxy_patterns.ownership.owned`), which moves to the client and is evicted once
    the client drops it, instead of failing with ``MaxResultSizeExceeded``.

    Usable as ``@proxy_io`` or ``@proxy_io(threshold="1 MiB", store="redis://...")``.
    """
    policy = ProxyPolicy(threshold)

    def decorate(function: Callable[P, R]) -> Callable[P, Any]:
        @functools.wraps(function)
        def run(*args: P.args, **kwargs: P.kwargs) -> Any:
            result = function(*args, **kwargs)
            if not _larger_than(result, cast(int, policy.threshold)):
                return result
            return owned(result, get_store(store))

        return run

    return decorate if fn is None else decorate(fn)
