"""Dask integration: large task arguments and results travel as proxies, evicted with the graph.

One call turns it on for an existing client::

    from proxy_patterns.plugins.dask import register
    plugin = register(client, threshold="1 MiB")

Three parts, each on the Dask hook made for its side:

* **client** — Dask has no client plugin type, so two methods of the given client instance are
  wrapped (the only places every graph leaves and every result arrives):
  ``_graph_to_futures`` pickles the graph once, judging each task argument by its serialized
  size on the way (:mod:`proxy_patterns.policy`) and replacing a large one by a proxy, so the
  scheduler never receives the bytes; ``_gather`` materializes proxies in results, so users
  get real objects.
* **workers** — a ``WorkerPlugin`` gives each task its arguments, and the results it depends
  on, as real objects (mapped from the store) when it starts, and replaces a large result in
  ``worker.data`` by a proxy the first time it leaves its worker: dependents elsewhere and
  clients receive the proxy, not the bytes, while tasks on the same worker use the object
  itself, never copied.
* **scheduler** — a ``SchedulerPlugin`` owns every key the plugin created. A key is held by
  the tasks of every graph that carried it (sent as a task annotation) and by every task whose
  result contains it (reported by the worker); when the last holder is forgotten or released,
  the key is evicted. Argument keys are deduplicated by the client by content (an object passed
  to many ``submit`` calls is put once), so the scheduler hands an idle argument key back to
  its client, which evicts it unless a graph being submitted or a future it holds still
  carries it. A graph that carries a :class:`~proxy_patterns.futures.ProxyFuture` (or a proxy
  of one) makes the scheduler a holder of the future's ownership record until its tasks are
  forgotten.

Configuration: ``dask.config`` keys ``proxy-patterns.threshold`` (default ``1 MiB``) and
``proxy-patterns.store`` (a store spec, default ``$PROXY_PATTERNS_STORE`` or ``shm``), also as
``DASK_PROXY_PATTERNS__THRESHOLD`` / ``DASK_PROXY_PATTERNS__STORE``. Clusters started from the
command line load it with ``--preload proxy_patterns.plugins.dask`` (scheduler and workers) and
the ``distributed.client.preload`` config (clients).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import io
import logging
import pickle
import threading
import weakref
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cloudpickle
from proxystore.proxy import Proxy, get_factory

from proxy_patterns.extras import requires_extra

with requires_extra("dask", __name__):
    import dask
    import dask.config
    from dask._expr import Expr
    from dask._task_spec import DataNode, GraphNode, Task, TaskRef
    from dask.base import annotate, normalize_token
    from dask.highlevelgraph import HighLevelGraph, Layer
    from dask.sizeof import sizeof
    from distributed import Client, Future, Scheduler, SchedulerPlugin, Worker, WorkerPlugin
    from distributed.client import _MapExpr
    from distributed.protocol.serialize import Serialized

from proxy_patterns.futures import pickled_futures
from proxy_patterns.ownership import ReferenceInvalidError, RefTable, ref_table_of
from proxy_patterns.plugins._dask_prometheus import expose
from proxy_patterns.policy import AROUND_ARGUMENTS, AROUND_GATHERED, DEFAULT_THRESHOLD, ProxyPolicy
from proxy_patterns.proxy import (
    SCALARS,
    TransitProxy,
    held,
    key_of,
    map_proxies,
    materialize,
    proxy,
    put_large_parts,
    store_keys_in,
)
from proxy_patterns.serialize import Frames, SizeExceeded, dumps
from proxy_patterns.shm import process_tag
from proxy_patterns.store import get_store, spec_owned_by

logger = logging.getLogger(__name__)

PLUGIN_NAME = "proxy-patterns"
ANNOTATION = "proxy_patterns"
RESULTS_TOPIC = "proxy-patterns-results"
EVICTED_TOPIC = "proxy-patterns-evicted"
OWNER_HANDLER = "proxy_patterns_owner"
PROXY_NBYTES = 512
"""What Dask's ``sizeof`` reports for a proxy: its own small size, never its target's."""

dask.config.update_defaults({"proxy-patterns": {"threshold": DEFAULT_THRESHOLD, "store": None}})


def _idle_topic(client_id: str) -> str:
    return f"proxy-patterns-idle-{client_id}"


# Dask's inspection of task data must never resolve a proxy.
@sizeof.register(Proxy)
def _sizeof_proxy(p: Proxy[Any]) -> int:
    return PROXY_NBYTES


@normalize_token.register(Proxy)
def _tokenize_proxy(p: Proxy[Any]) -> tuple[str, Any]:
    factory = get_factory(p)
    return "proxy", getattr(factory, "key", id(factory))


def _pickled_graph(frames: list[Any]) -> Serialized:
    """A graph already pickled by the client hook, as Dask's own pickling would have left it
    (the scheduler unpickles it as usual).

    The pickle stream is copied out of its buffer (it is small: large objects went to the
    store, or as their own frames), because Dask keeps what it sends for a while, and a view
    would keep the whole stream object alive with it.
    """
    stream, *buffers = frames
    writeable = tuple(not memoryview(f).readonly for f in buffers)
    return Serialized({"serializer": "pickle", "writeable": writeable}, [bytes(stream), *buffers])


# The structure of a graph: never judged as task data, only walked by the pickler (a
# container holding them is walked too, so that no graph node is ever hidden in a proxy).
_GRAPH_TYPES: tuple[type, ...] = (GraphNode, TaskRef, Expr, HighLevelGraph, Layer)


class _GraphPickler(cloudpickle.Pickler):
    """Pickles a task graph once, with every large task argument replaced by its proxy.

    Task data sits in a few places of a graph: the arguments of each ``Task``, the value of
    each ``DataNode``, the per-task argument lists of a ``client.map``, and non-builtin objects
    anywhere (expression operands such as a pandas frame). Pickle calls this hook for every
    object except builtins (``bytes``, ``str``, lists, dicts, ...), so arguments are judged here,
    from the task that holds them; whatever else reaches the hook is judged as it comes.
    ``judge`` returns an object, its proxy, or a ``Serialized`` of the frames made to measure it.
    """

    def __init__(self, file: io.BytesIO, judge: Callable[[Any], Any], **kw: Any) -> None:
        super().__init__(file, protocol=5, **kw)
        self.judge = judge

    def reducer_override(self, obj: Any) -> Any:
        cls = type(obj)
        if issubclass(cls, Task):  # and the container tasks, whose args are their items
            args = tuple(map(self.judge, obj.args))
            kwargs = {name: self.judge(value) for name, value in obj.kwargs.items()}
            if _changed(args, obj.args) or _changed(kwargs.values(), obj.kwargs.values()):
                task = copy.copy(obj)
                task.args, task.kwargs = args, kwargs
                return task.__reduce_ex__(5)
        elif cls is DataNode:
            value = self.judge(obj.value)
            if value is not obj.value:
                return DataNode, (obj.key, value)
        elif cls is _MapExpr:
            return self._reduce_map(obj)
        elif not issubclass(cls, _GRAPH_TYPES):
            judged = self.judge(obj)
            if judged is not obj:
                return judged.__reduce_ex__(5)
        return super().reducer_override(obj)

    def _reduce_map(self, expr: Any) -> Any:
        """``client.map``'s expression holds each argument position as a list of per-task
        arguments: each item is one task's argument."""
        reconstruct, (cls, *operands, token, cache) = expr.__reduce__()
        position = {name: i for i, name in enumerate(cls._parameters)}
        iterables = operands[position["iterables"]]
        operands[position["iterables"]] = [list(map(self.judge, it)) for it in iterables]
        kwargs = operands[position["kwargs"]]
        operands[position["kwargs"]] = {name: self.judge(v) for name, v in kwargs.items()}
        return reconstruct, (cls, *operands, token, cache)


def _changed(new: Any, old: Any) -> bool:
    return any(a is not b for a, b in zip(new, old, strict=True))


@dataclass
class _Argument:
    """A proxied argument the client may reuse for another graph carrying the same content."""

    proxy: Proxy[Any]
    nbytes: int
    token: str
    pending: int = 0  # graphs carrying it that are being submitted right now
    outputs: set[Any] = field(default_factory=set)  # keys of the futures of those graphs


class DaskProxyPlugin:
    """The client side of the plugin; returned by :func:`register`.

    Holds the client's argument proxies, one per distinct content (an object passed to many
    tasks, or equal objects, are put once), and the two wrapped client methods.
    """

    def __init__(
        self,
        client: Client,
        policy: ProxyPolicy,
        store_spec: str | None,
        resolve_results: bool = True,
    ) -> None:
        self.client = client
        self.policy = dataclasses.replace(policy, exclude=(*policy.exclude, *_GRAPH_TYPES))
        self.store_spec = store_spec
        self.resolve_results = resolve_results
        self.store = get_store(store_spec)
        self._lock = threading.Lock()
        self._by_token: dict[str, Any] = {}
        self._arguments: dict[Any, _Argument] = {}
        self._graph_to_futures = client._graph_to_futures
        self._gather = client._gather

    # --- installed on the client -------------------------------------------------------
    def install(self) -> None:
        """Wrap the client's graph submission and gathering; subscribe to idle keys."""
        self.client._graph_to_futures = self._submit_graph  # type: ignore[method-assign]
        self.client._gather = self._gather_resolved  # type: ignore[method-assign]
        self.client.subscribe_topic(_idle_topic(self.client.id), self._on_idle)

    def uninstall(self) -> None:
        """Restore the client's own methods; keys already in use stay owned by the scheduler."""
        self.client._graph_to_futures = self._graph_to_futures  # type: ignore[method-assign]
        self.client._gather = self._gather  # type: ignore[method-assign]
        self.client.unsubscribe_topic(_idle_topic(self.client.id))

    def _submit_graph(self, expr: Any, keys: Any, *args: Any, **kwargs: Any) -> Any:
        with pickled_futures() as futures:
            frames = self._pickle_small_graph(expr)
            carried: dict[Any, _Argument] = {}
            if frames is None:  # larger than the threshold: judge what it holds
                frames, carried = self._pickle_graph(expr)
        if not carried and not futures:
            return self._graph_to_futures(_pickled_graph(frames), keys, *args, **kwargs)
        held_futures = _hold_futures(futures)  # for the scheduler, which takes them over
        try:
            arguments = [(key, a.nbytes) for key, a in carried.items()]
            with annotate(**{ANNOTATION: pickle.dumps((arguments, held_futures))}):
                return self._graph_to_futures(_pickled_graph(frames), keys, *args, **kwargs)
        except BaseException:
            _release_futures(held_futures)
            raise
        finally:  # the futures exist now (or the submission failed): the graph is not pending
            with self._lock:
                for argument in carried.values():
                    argument.pending -= 1
                    argument.outputs.update(keys)

    def _pickle_small_graph(self, expr: Any) -> list[Any] | None:
        """``expr`` pickled, if that takes no more than the threshold: then nothing in it can
        be larger, and it is sent as it is. None (after about threshold bytes of work) if not."""
        try:
            return dumps(expr, limit=int(self.policy.threshold)).frames
        except SizeExceeded:
            return None
        except Exception as e:
            raise TypeError(f"could not serialize the task graph: {e}") from e

    def _pickle_graph(self, expr: Any) -> tuple[list[Any], dict[Any, _Argument]]:
        """Pickle ``expr`` once, its large arguments proxied; (frames, arguments it carries)."""
        carried: dict[Any, _Argument] = {}
        created: list[Any] = []

        def make_proxy(obj: Any, frames: Frames) -> Proxy[Any]:
            token = frames.digest()  # content, so that an object changed in place is put anew
            with self._lock:
                argument = self._carry(self._by_token.get(token), carried)
            if argument is not None:
                return argument.proxy
            # Put outside the lock: the event loop's idle handler must not wait for a copy.
            p = proxy(self.store, obj, keep_target=False, frames=frames, cls=TransitProxy)
            new = _Argument(p, frames.nbytes, token)
            with self._lock:
                existing = self._by_token.get(token)  # another thread may have put it too
                if existing is None:
                    self._by_token[token] = key_of(p)
                    self._arguments[key_of(p)] = new
                    created.append(key_of(p))
                argument = self._carry(self._by_token[token], carried)
            if existing is not None:
                self.store.evict(key_of(p))
            assert argument is not None
            return argument.proxy

        buffers: list[Any] = []
        stream = io.BytesIO()
        judge = self.policy.judge(make_proxy, keep_frames=True)
        try:
            _GraphPickler(
                stream, judge, buffer_callback=lambda b: buffers.append(memoryview(b))
            ).dump(expr)
        except Exception as e:
            with self._lock:
                for argument in carried.values():
                    argument.pending -= 1
                for key in created:
                    self._forget(key)
            for key in created:
                self.store.evict(key)
            raise TypeError(f"could not serialize the task graph: {e}") from e
        return [stream.getbuffer(), *buffers], carried

    def _carry(self, key: Any, carried: dict[Any, _Argument]) -> _Argument | None:
        """Mark argument ``key`` (if any) as carried by the graph being pickled (under lock)."""
        if key is None:
            return None
        argument = self._arguments[key]
        if key not in carried:
            argument.pending += 1  # from now on an idle report cannot evict it
            carried[key] = argument
        return argument

    def _forget(self, key: Any) -> None:
        argument = self._arguments.pop(key)
        del self._by_token[argument.token]

    async def _on_idle(self, event: tuple[float, dict[str, Any]]) -> None:
        """The scheduler saw no task left using an argument key: evict it unless still used.

        Still used means carried by a graph being submitted, or by a graph whose futures the
        client holds. Runs in the client's event loop, so it uses the asynchronous API.
        """
        key = pickle.loads(event[1]["data"])
        with self._lock:
            argument = self._arguments.get(key)
            if argument is None or argument.pending:
                return
            argument.outputs = {k for k in argument.outputs if self.client.refcount.get(k)}
            if argument.outputs:
                return
            self._forget(key)
        self.store.evict(key)
        scheduler = self.client.scheduler
        if scheduler is not None:  # None once the client has closed
            await scheduler.log_event(topic=EVICTED_TOPIC, msg={"data": pickle.dumps(key)})

    async def _gather_resolved(self, futures: Any, *args: Any, **kwargs: Any) -> Any:
        result = await self._gather(futures, *args, **kwargs)
        if not self.resolve_results:
            return self._held_results(futures, result)
        return materialize(result, depth=self.policy.max_depth + AROUND_GATHERED)

    def _held_results(self, futures: Any, result: Any) -> Any:
        """Lazy results: each proxy holds a future on the key of the task that made it.

        ``compute()`` releases its futures explicitly right after gathering, so each proxy
        holds a future of its own (a new reference the client counts). ``futures`` is walked
        alongside ``result`` through lists, tuples and dicts, as ``gather`` packs them; the
        results of anything else are resolved, as by default.
        """
        if isinstance(futures, Future):
            own: Future[Any] = Future(futures.key, self.client)
            return map_proxies(
                result, lambda p: held(p, own), self.policy.max_depth + AROUND_ARGUMENTS
            )
        if type(futures) in (list, tuple):
            return type(futures)(
                self._held_results(f, r) for f, r in zip(futures, result, strict=True)
            )
        if type(futures) is dict:
            return {k: self._held_results(f, result[k]) for k, f in futures.items()}
        return materialize(result, depth=self.policy.max_depth + AROUND_GATHERED)

    # --- user-facing -------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        """Counters kept by the scheduler: bytes proxied, keys/bytes live, keys evicted."""
        return dict(self.client.run_on_scheduler(_scheduler_stats))


def _hold_futures(futures: dict[Any, Any]) -> list[tuple[Any, Any, str]]:
    """Hold the keys of the proxy futures a graph carries until the scheduler takes the holds
    over (the client may drop its futures at once); (key, store config, holder) each.

    A future released already is left out: its value can never be set.
    """
    held_futures = []
    for key, store_config in futures.items():
        table = ref_table_of(store_config)
        with contextlib.suppress(ReferenceInvalidError):
            held_futures.append((key, store_config, table.add(key, "ref")))
    return held_futures


def _release_futures(held_futures: list[tuple[Any, Any, str]]) -> None:
    for key, store_config, holder in held_futures:
        table = ref_table_of(store_config)
        with contextlib.suppress(ReferenceInvalidError):
            table.drop(key, holder)


def _scheduler_stats(dask_scheduler: Scheduler) -> dict[str, int]:
    plugin = dask_scheduler.plugins[PLUGIN_NAME]
    assert isinstance(plugin, ProxySchedulerPlugin)
    return plugin.stats()


class ProxyWorkerPlugin(WorkerPlugin):
    """Gives tasks real objects, and replaces large task results in ``worker.data`` by proxies
    when they leave the worker, telling the scheduler.

    A task starting here gets its arguments and the results it depends on materialized
    (mapped from shared memory): its function runs exactly as on plain Dask. A result stays
    a real object while only tasks on its own worker use it (a persisted collection costs
    nothing), and is put in the store the first time another worker or a client asks for it:
    from then on ``worker.data`` holds the proxy, which is what travels. Results are put in
    segments owned by the scheduler's process, not the worker's: a worker that is retired or
    restarted does not take results that Dask copied elsewhere with it.
    """

    name = PLUGIN_NAME
    idempotent = True

    def __init__(self, policy: ProxyPolicy, store_spec: str | None) -> None:
        self.policy = policy
        self.store_spec = store_spec

    async def setup(self, worker: Worker) -> None:
        self.worker = worker
        owner = await getattr(worker.scheduler, OWNER_HANDLER)()
        self.store = get_store(spec_owned_by(self.store_spec, owner))
        self._unproxied: set[Any] = set()  # results computed here, not yet looked at
        self._passed_on: dict[Any, list[Any]] = {}  # store keys in results, from the tasks
        # Wrapped, because no plugin hook runs when data leaves a worker: ``get_data`` is the
        # one handler that serves results to other workers, clients and the scheduler.
        self._serve_data = worker.handlers["get_data"]
        worker.handlers["get_data"] = self._get_data

    async def teardown(self, worker: Worker) -> None:
        worker.handlers["get_data"] = self._serve_data

    async def _get_data(self, comm: Any, keys: Any, **kwargs: Any) -> Any:
        for key in keys:
            if key in self._unproxied and key in self.worker.data:
                self._unproxied.discard(key)
                self._proxy_result(key)
        return await self._serve_data(comm, keys=keys, **kwargs)

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        if finish == "executing":  # before the Execute instruction reads the run_spec
            ts = self.worker.state.tasks[key]
            if _takes_only_scalars(ts.run_spec):  # nothing to materialize, nor to pass on
                self._passed_on[key] = []
                return
            report = functools.partial(self._passed_on.__setitem__, key)
            spec = _materializing(ts.run_spec, self.policy.max_depth + AROUND_ARGUMENTS, report)
            if spec is not None:
                ts.run_spec = spec
        elif finish == "memory" and start in ("executing", "long-running"):
            # Only results computed here: not data fetched from peers or scattered.
            self._unproxied.add(key)
            held = self._passed_on.pop(key, None)
            if held is None:  # not a task function (an alias, say): look at the result
                held = store_keys_in(
                    self.worker.data[key], self.policy.max_depth + AROUND_ARGUMENTS
                )
            if held:  # proxies the task passed through (e.g. dask.array aliases)
                self.worker.log_event(RESULTS_TOPIC, {"data": pickle.dumps((key, [], held))})
        elif start == "memory":
            self._unproxied.discard(key)
        if finish in ("released", "error", "forgotten"):
            self._passed_on.pop(key, None)

    def _proxy_result(self, key: Any) -> None:
        """Put ``key``'s large parts in the store; if that fails, it leaves by value, as in
        plain Dask (a store that is full must not fail the transfer)."""
        value = self.worker.data[key]
        try:
            proxied, created = put_large_parts(self.policy, self.store, value)
        except Exception:
            logger.warning(
                "result %r is sent by value: it could not be put in the store", key, exc_info=True
            )
            return
        if proxied is not value:
            self.worker.data[key] = proxied
        held = store_keys_in(proxied, self.policy.max_depth + AROUND_ARGUMENTS)
        if created:
            data = pickle.dumps((key, created, held))
            self.worker.log_event(RESULTS_TOPIC, {"data": data})


class _Materialized:
    """A task function that receives its arguments materialized (see :func:`materialize`).

    Task arguments are the proxies the client put in the graph and the results the task
    depends on, which reach a worker as proxies when they were computed elsewhere. With
    ``report``, the store keys of proxies in the result (proxies the task passed on) are
    given to it, found in the task's thread rather than by reading ``worker.data`` again.
    """

    def __init__(
        self,
        func: Callable[..., Any],
        depth: int,
        report: Callable[[list[Any]], None] | None = None,
    ) -> None:
        self.func = func
        self.depth = depth
        self.report = report

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        result = self.func(*materialize(args, self.depth), **materialize(kwargs, self.depth))
        if self.report is not None:
            self.report(store_keys_in(result, self.depth))
        return result


def _takes_only_scalars(spec: Any) -> bool:
    """Whether ``spec`` is a task of scalar arguments and no dependencies (tiny tasks: most of
    a graph of many), which can neither receive a proxy nor pass one on."""
    return (
        type(spec) is Task
        and not spec.dependencies
        and all(type(a) in SCALARS for a in spec.args)
        and all(type(v) in SCALARS for v in spec.kwargs.values())
    )


def _materializing(
    spec: Any, depth: int, report: Callable[[list[Any]], None] | None = None
) -> Any:
    """``spec`` (a task's run_spec) with its function, and those of the tasks fused into it,
    given their arguments materialized; other graph nodes (aliases, data, containers of
    results) pass their values on as they are, and are left as they are (None returned)."""
    if type(spec) is not Task or type(spec.func) is _Materialized or spec.is_coro:
        return None
    args = spec.args
    if spec.has_subgraph():  # _execute_subgraph(inner_dsk, outkey, inkeys, *dependencies)
        inner = {key: _materializing(task, depth) or task for key, task in args[0].items()}
        args = (inner, *args[1:])
    return Task(
        spec.key,
        _Materialized(spec.func, depth, report),
        *args,
        _data_producer=spec.data_producer,
        **spec.kwargs,
    )


class ProxySchedulerPlugin(SchedulerPlugin):
    """Owns every key the plugin created and evicts it when nothing in Dask holds it.

    A store key is held by the tasks whose graph carried it (until they are forgotten) and by
    the tasks whose result contains it (until that result is released). Argument keys of a
    connected client are handed back to it when idle; the others are evicted here.
    """

    name = PLUGIN_NAME
    # A second client registering must not replace the plugin and wipe its key ownership.
    idempotent = True

    def __init__(self, store_spec: str | None) -> None:
        self.store_spec = store_spec
        self._holders: dict[Any, set[tuple[Any, str]]] = defaultdict(set)
        self._held: dict[tuple[Any, str], set[Any]] = defaultdict(set)
        self._client_of: dict[Any, str] = {}
        self._nbytes: dict[Any, int] = {}
        self._futures: dict[Any, tuple[RefTable, str]] = {}  # future key -> the hold on it here
        self.bytes_proxied = 0
        self.keys_evicted = 0

    async def start(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.store = get_store(self.store_spec)
        # Workers ask whose segments their results are (see ProxyWorkerPlugin).
        scheduler.handlers[OWNER_HANDLER] = lambda comm=None: process_tag()
        expose(self)

    def _track(self, key: Any, nbytes: int) -> None:
        if key not in self._nbytes:
            self._nbytes[key] = nbytes
            self.bytes_proxied += nbytes

    def _hold(self, holder: tuple[Any, str], key: Any) -> None:
        self._holders[key].add(holder)
        self._held[holder].add(key)

    def _release(self, holder: tuple[Any, str]) -> None:
        for key in self._held.pop(holder, ()):
            holders = self._holders[key]
            holders.discard(holder)
            if not holders:
                self._idle(key)

    def update_graph(
        self,
        scheduler: Scheduler,
        *,
        client: str,
        tasks: list[Any],
        annotations: dict[str, dict[Any, Any]],
        **kwargs: Any,
    ) -> None:
        for task, annotation in annotations.get(ANNOTATION, {}).items():
            arguments, futures = pickle.loads(annotation)
            for key, nbytes in arguments:
                self._track(key, nbytes)
                self._client_of[key] = client
                self._hold((task, "graph"), key)
            for key, store_config, holder in futures:
                self._take_future(key, store_config, holder)
                self._hold((task, "graph"), key)

    def _take_future(self, key: Any, store_config: Any, holder: str) -> None:
        """Take over the client's hold on a future's key (one per key: others are dropped)."""
        table = ref_table_of(store_config)
        with contextlib.suppress(ReferenceInvalidError):  # the same hold, seen for another task
            if key in self._futures:
                table.drop(key, holder)
            else:
                self._futures[key] = (table, table.claim(key, holder))

    def log_event(self, topic: str, msg: Any) -> None:
        if topic == RESULTS_TOPIC:
            task, created, held = pickle.loads(msg["data"])
            for key, nbytes in created:
                self._track(key, nbytes)
            ts = self.scheduler.tasks.get(task)
            alive = ts is not None and ts.state in ("processing", "memory")
            for key in held:
                if key in self._nbytes and alive:  # never adopt keys the plugin did not make
                    self._hold((task, "result"), key)
                elif key in self._nbytes and not self._holders.get(key):
                    self._idle(key)  # the task was forgotten while it ran
        elif topic == EVICTED_TOPIC:
            key = pickle.loads(msg["data"])
            if not self._holders.get(key):
                self._drop(key)

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if not self._held:  # nothing held: the common case, decided at once
            return
        if finish in ("released", "forgotten", "erred"):
            self._release((key, "result"))
        if finish == "forgotten":
            self._release((key, "graph"))

    def _idle(self, key: Any) -> None:
        if key in self._futures:  # no task holds the future's key: give up the scheduler's hold
            table, holder = self._futures.pop(key)
            self._holders.pop(key, None)
            with contextlib.suppress(ReferenceInvalidError):
                table.drop(key, holder)
            return
        client = self._client_of.get(key)
        if client in self.scheduler.clients:
            self.scheduler.log_event(_idle_topic(client), {"data": pickle.dumps(key)})
        else:
            self.store.evict(key)
            self._drop(key)

    def _drop(self, key: Any) -> None:
        self._holders.pop(key, None)
        self._client_of.pop(key, None)
        if self._nbytes.pop(key, None) is not None:
            self.keys_evicted += 1

    def remove_client(self, scheduler: Scheduler, client: str) -> None:
        for key, owner in list(self._client_of.items()):
            if owner == client:
                del self._client_of[key]  # the scheduler decides for it from now on
                if not self._holders.get(key):
                    self._idle(key)

    async def close(self) -> None:
        for key in list(self._nbytes):
            self.store.evict(key)
            self._drop(key)
        for key in list(self._futures):
            self._idle(key)

    def stats(self) -> dict[str, int]:
        """Bytes proxied so far, keys and bytes live in the store, keys evicted."""
        return {
            "bytes_proxied": self.bytes_proxied,
            "keys_live": len(self._nbytes),
            "bytes_live": sum(self._nbytes.values()),
            "keys_evicted": self.keys_evicted,
        }


def _configured_policy(threshold: int | str | None) -> ProxyPolicy:
    return ProxyPolicy(
        dask.config.get("proxy-patterns.threshold") if threshold is None else threshold
    )


def _configured_store(store: str | None) -> str | None:
    return store if store is not None else dask.config.get("proxy-patterns.store")


_registered: weakref.WeakKeyDictionary[Client, DaskProxyPlugin] = weakref.WeakKeyDictionary()


def _prepare(
    client: Client, threshold: int | str | None, store: str | None, resolve_results: bool = True
) -> tuple[DaskProxyPlugin, ProxySchedulerPlugin, ProxyWorkerPlugin]:
    if client in _registered:
        raise ValueError(f"proxy-patterns is already registered on {client}")
    policy = _configured_policy(threshold)
    spec = _configured_store(store)
    plugin = DaskProxyPlugin(client, policy, spec, resolve_results)
    return plugin, ProxySchedulerPlugin(spec), ProxyWorkerPlugin(policy, spec)


def _install(client: Client, plugin: DaskProxyPlugin) -> DaskProxyPlugin:
    plugin.install()
    _registered[client] = plugin
    return plugin


def register(
    client: Client,
    threshold: int | str | None = None,
    store: str | None = None,
    *,
    resolve_results: bool = True,
) -> DaskProxyPlugin:
    """Proxy every task argument and result above ``threshold`` for ``client``'s graphs.

    Args:
        client: A connected ``distributed.Client``.
        threshold: Objects larger than this travel by proxy (``"1 MiB"``-style strings work);
            default ``proxy-patterns.threshold``.
        store: Store spec (``shm``, ``redis://host:port``, ...); default
            ``proxy-patterns.store``, else ``$PROXY_PATTERNS_STORE``, else ``shm``.
        resolve_results: ``result()``, ``gather`` and ``compute`` return real objects (default);
            with False, large results come back as proxies, resolved on first use, that keep
            their task's key alive while they live.

    Returns:
        The client side of the plugin (see :meth:`DaskProxyPlugin.stats`).
    """
    plugin, on_scheduler, on_workers = _prepare(client, threshold, store, resolve_results)
    client.register_plugin(on_scheduler, name=PLUGIN_NAME)
    client.register_plugin(on_workers, name=PLUGIN_NAME)
    return _install(client, plugin)


def unregister(client: Client) -> None:
    """Restore plain behaviour: ``client``'s later graphs, and later task results on the
    cluster's workers, are not proxied.

    Keys already created stay owned by the scheduler and are evicted with their tasks.
    """
    plugin = _registered.pop(client, None)
    if plugin is None:
        raise ValueError(f"proxy-patterns is not registered on {client}")
    plugin.uninstall()
    client.unregister_worker_plugin(PLUGIN_NAME)


async def dask_setup(target: Scheduler | Worker | Client) -> None:
    """Preload hook (``--preload proxy_patterns.plugins.dask``, ``distributed.client.preload``)."""
    spec = _configured_store(None)
    if isinstance(target, Scheduler):
        target.add_plugin(ProxySchedulerPlugin(spec), name=PLUGIN_NAME, idempotent=True)
    elif isinstance(target, Worker):
        await target.plugin_add(ProxyWorkerPlugin(_configured_policy(None), spec), PLUGIN_NAME)
    elif isinstance(target, Client):
        # A client preload runs inside the client's event loop, where its blocking API would
        # deadlock: use the coroutines that Client.register_plugin itself wraps.
        plugin, on_scheduler, on_workers = _prepare(target, None, spec)
        await target._register_scheduler_plugin(on_scheduler, PLUGIN_NAME, idempotent=True)
        await target._register_worker_plugin(on_workers, PLUGIN_NAME, idempotent=True)
        _install(target, plugin)
