"""Dask integration: large task arguments and results travel as proxies, evicted with the graph.

One call turns it on for an existing client::

    from proxy_patterns.plugins.dask import register
    plugin = register(client, threshold="1 MiB")

Three parts, each on the Dask hook made for its side:

* **client** — Dask has no client plugin type, so two methods of the given client instance are
  wrapped (the only places every graph leaves and every result arrives):
  ``_graph_to_futures`` serializes the graph once, and if it is larger than the threshold,
  again with every large object replaced by a proxy (so the scheduler never receives the
  bytes); ``_gather`` resolves proxies in results, so users get real objects.
* **workers** — a ``WorkerPlugin`` replaces each large result in ``worker.data`` by a proxy
  right after the task finishes: dependents elsewhere receive the proxy, not the bytes.
* **scheduler** — a ``SchedulerPlugin`` owns every key the plugin created. An argument key
  belongs to the tasks of the graph that carried it (sent as a task annotation), a result key
  to its task; when Dask forgets those tasks the key is evicted. Argument keys are deduplicated
  by the client (an object passed to many ``submit`` calls is put once), so the client, not the
  scheduler, evicts them: the scheduler reports a key idle together with the number of graphs
  it has seen carrying it, and the client evicts only if it has sent no newer graph with it.

Configuration: ``dask.config`` keys ``proxy-patterns.threshold`` (default ``1 MiB``) and
``proxy-patterns.store`` (a store spec, default ``$PROXY_PATTERNS_STORE`` or ``shm``), also as
``DASK_PROXY_PATTERNS__THRESHOLD`` / ``DASK_PROXY_PATTERNS__STORE``. Clusters started from the
command line load it with ``--preload proxy_patterns.plugins.dask`` (scheduler and workers) and
the ``distributed.client.preload`` config (clients).
"""

from __future__ import annotations

import io
import pickle
import threading
import weakref
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cloudpickle
import dask
import dask.config
from dask._expr import Expr
from dask._task_spec import GraphNode
from dask.base import annotate, normalize_token
from dask.highlevelgraph import HighLevelGraph, Layer
from dask.sizeof import sizeof
from distributed import Client, Scheduler, SchedulerPlugin, Worker, WorkerPlugin
from distributed.protocol import pickle as dask_pickle
from distributed.protocol.serialize import dask_deserialize, dask_serialize
from proxystore.proxy import Proxy, extract, get_factory

from proxy_patterns.policy import ProxyPolicy
from proxy_patterns.proxy import is_proxy, key_of, proxy
from proxy_patterns.store import get_store

PLUGIN_NAME = "proxy-patterns"
ANNOTATION = "proxy_patterns"
RESULTS_TOPIC = "proxy-patterns-results"
EVICTED_TOPIC = "proxy-patterns-evicted"
PROXY_NBYTES = 512
"""What Dask's ``sizeof`` reports for a proxy: its own small size, never its target's."""

dask.config.update_defaults({"proxy-patterns": {"threshold": "1 MiB", "store": None}})


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


class _SerializedGraph:
    """A graph already serialized by the client hook; deserializes to the graph itself."""

    def __init__(self, frames: list[Any]) -> None:
        self.frames = frames


@dask_serialize.register(_SerializedGraph)
def _serialize_graph(graph: _SerializedGraph) -> tuple[dict[str, Any], list[Any]]:
    return {}, graph.frames


@dask_deserialize.register(_SerializedGraph)
def _deserialize_graph(header: dict[str, Any], frames: list[Any]) -> Any:
    return dask_pickle.loads(frames[0], buffers=frames[1:])


# Never judged as a whole: pickle walks into them and judges what they hold, so a dict of arrays
# becomes a dict of proxies and the graph's own structure is never hidden in a proxy.
_WALKED_TYPES: tuple[type, ...] = (
    list,
    tuple,
    dict,
    set,
    frozenset,
    GraphNode,
    Expr,
    HighLevelGraph,
    Layer,
)


class _ProxyingPickler(cloudpickle.Pickler):
    """Pickles a graph with every large object in it replaced by a proxy."""

    def __init__(
        self, file: io.BytesIO, policy: ProxyPolicy, make_proxy: Callable[[Any], Any], **kw: Any
    ) -> None:
        super().__init__(file, protocol=5, **kw)
        self.policy = policy
        self.make_proxy = make_proxy

    def reducer_override(self, obj: Any) -> Any:
        if (
            not isinstance(obj, type)
            and not issubclass(type(obj), _WALKED_TYPES)
            and self.policy.should_proxy(obj)
        ):
            return self.make_proxy(obj).__reduce__()
        return super().reducer_override(obj)


@dataclass
class _Argument:
    """A proxied argument the client may reuse: its proxy and how many graphs carried it."""

    proxy: Proxy[Any]
    nbytes: int
    sent: int = 0
    object_ids: set[int] = field(default_factory=set)


class DaskProxyPlugin:
    """The client side of the plugin; returned by :func:`register`.

    Holds the client's argument proxies (one per distinct large object still in use) and the
    two wrapped client methods.
    """

    def __init__(self, client: Client, policy: ProxyPolicy, store_spec: str | None) -> None:
        self.client = client
        self.policy = policy
        self.store_spec = store_spec
        self.store = get_store(store_spec)
        self._lock = threading.Lock()
        self._by_id: dict[int, Any] = {}
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
        buffers: list[Any] = []
        try:
            stream = dask_pickle.dumps(
                expr, buffer_callback=lambda b: buffers.append(memoryview(b))
            )
        except Exception as e:
            raise TypeError(f"could not serialize the task graph: {e}") from e
        nbytes = len(stream) + sum(memoryview(b).nbytes for b in buffers)
        if nbytes <= int(self.policy.threshold):
            return self._graph_to_futures(
                _SerializedGraph([stream, *buffers]), keys, *args, **kwargs
            )
        del stream, buffers
        frames, carried = self._proxy_graph(expr)
        annotation = pickle.dumps(carried)
        with annotate(**{ANNOTATION: annotation}):
            return self._graph_to_futures(_SerializedGraph(frames), keys, *args, **kwargs)

    def _proxy_graph(self, expr: Any) -> tuple[list[Any], list[tuple[Any, int, int]]]:
        """Pickle ``expr`` with its large objects proxied; (frames, [(key, nbytes, sent)])."""
        carried: dict[Any, _Argument] = {}
        created: list[Any] = []

        def make_proxy(obj: Any) -> Proxy[Any]:
            with self._lock:
                key = self._by_id.get(id(obj))
                if key is None or key not in self._arguments:
                    p = proxy(self.store, obj, keep_target=False)
                    key = key_of(p)
                    created.append(key)
                    self._arguments[key] = _Argument(p, self.policy.size_of(obj))
                    self._remember(obj, key)
                carried[key] = self._arguments[key]
                return self._arguments[key].proxy

        buffers: list[Any] = []
        stream = io.BytesIO()
        try:
            _ProxyingPickler(
                stream,
                self.policy,
                make_proxy,
                buffer_callback=lambda b: buffers.append(memoryview(b)),
            ).dump(expr)
        except Exception as e:
            with self._lock:
                for key in created:
                    self._forget(key)
                    self.store.evict(key)
            raise TypeError(f"could not serialize the task graph: {e}") from e
        with self._lock:
            for argument in carried.values():
                argument.sent += 1
            annotation = [(k, a.nbytes, a.sent) for k, a in carried.items()]
        return [stream.getbuffer(), *buffers], annotation

    def _remember(self, obj: Any, key: Any) -> None:
        """Map ``obj`` to ``key`` while ``obj`` lives (ids are reused after it dies)."""
        try:
            weakref.finalize(obj, self._drop_id, id(obj), key)
        except TypeError:
            return  # not weak-referenceable: deduplicated within one graph only
        self._by_id[id(obj)] = key
        self._arguments[key].object_ids.add(id(obj))

    def _drop_id(self, object_id: int, key: Any) -> None:
        with self._lock:
            if self._by_id.get(object_id) == key:
                del self._by_id[object_id]

    def _forget(self, key: Any) -> None:
        argument = self._arguments.pop(key, None)
        for object_id in argument.object_ids if argument else ():
            if self._by_id.get(object_id) == key:
                del self._by_id[object_id]

    async def _on_idle(self, event: tuple[float, dict[str, Any]]) -> None:
        """The scheduler saw no task left using an argument key: evict it unless reused.

        Runs in the client's event loop, so it uses the client's asynchronous API.
        """
        key, seen = pickle.loads(event[1]["data"])
        with self._lock:
            argument = self._arguments.get(key)
            if argument is None or argument.sent != seen:
                return  # already evicted, or a newer graph carries it
            self._forget(key)
        self.store.evict(key)
        scheduler = self.client.scheduler
        if scheduler is not None:  # None once the client has closed
            await scheduler.log_event(topic=EVICTED_TOPIC, msg={"data": pickle.dumps(key)})

    async def _gather_resolved(self, futures: Any, *args: Any, **kwargs: Any) -> Any:
        result = await self._gather(futures, *args, **kwargs)
        return _resolve_proxies(result, depth=self.policy.max_depth + 2)

    # --- user-facing -------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        """Counters kept by the scheduler: bytes proxied, keys/bytes live, keys evicted."""
        return dict(self.client.run_on_scheduler(_scheduler_stats))


def _resolve_proxies(obj: Any, depth: int) -> Any:
    """``obj`` with every proxy in it (and in its containers, to ``depth``) resolved."""
    if is_proxy(obj):
        return extract(obj)
    if depth <= 0 or type(obj) not in (list, tuple, dict):
        return obj
    if type(obj) is dict:
        return {k: _resolve_proxies(v, depth - 1) for k, v in obj.items()}
    return type(obj)(_resolve_proxies(v, depth - 1) for v in obj)


def _scheduler_stats(dask_scheduler: Scheduler) -> dict[str, int]:
    plugin = dask_scheduler.plugins[PLUGIN_NAME]
    assert isinstance(plugin, ProxySchedulerPlugin)
    return plugin.stats()


class ProxyWorkerPlugin(WorkerPlugin):
    """Replaces large task results in ``worker.data`` by proxies, and tells the scheduler."""

    name = PLUGIN_NAME
    idempotent = True

    def __init__(self, policy: ProxyPolicy, store_spec: str | None) -> None:
        self.policy = policy
        self.store_spec = store_spec

    def setup(self, worker: Worker) -> None:
        self.worker = worker
        self.store = get_store(self.store_spec)

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        if finish != "memory" or start in ("flight", "resumed") or key not in self.worker.data:
            return  # only results computed here (data fetched from peers is already small)
        value = self.worker.data[key]
        created: list[tuple[Any, int]] = []

        def make_proxy(obj: Any) -> Proxy[Any]:
            p = proxy(self.store, obj, keep_target=False)
            created.append((key_of(p), self.policy.size_of(obj)))
            return p

        proxied = self.policy.apply(value, make_proxy)
        if proxied is not value:
            self.worker.data[key] = proxied
            self.worker.log_event(RESULTS_TOPIC, {"data": pickle.dumps((key, created))})


class ProxySchedulerPlugin(SchedulerPlugin):
    """Owns every key the plugin created and evicts it when Dask forgets its tasks."""

    name = PLUGIN_NAME
    # A second client registering must not replace the plugin and wipe its key ownership.
    idempotent = True

    def __init__(self, store_spec: str | None) -> None:
        self.store_spec = store_spec
        self._holders: dict[Any, set[Any]] = defaultdict(set)  # argument key -> tasks
        self._argument_of: dict[Any, set[Any]] = defaultdict(set)  # task -> argument keys
        self._argument_client: dict[Any, str] = {}
        self._argument_seen: dict[Any, int] = {}
        self._results: dict[Any, list[Any]] = defaultdict(list)  # task -> result keys
        self._nbytes: dict[Any, int] = {}
        self.bytes_proxied = 0
        self.keys_evicted = 0

    async def start(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.store = get_store(self.store_spec)

    def update_graph(
        self,
        scheduler: Scheduler,
        *,
        client: str,
        tasks: list[Any],
        annotations: dict[str, dict[Any, Any]],
        **kwargs: Any,
    ) -> None:
        carried_by_task = annotations.get(ANNOTATION, {})
        for task, annotation in carried_by_task.items():
            for key, nbytes, sent in pickle.loads(annotation):
                if key not in self._nbytes:
                    self._nbytes[key] = nbytes
                    self.bytes_proxied += nbytes
                self._holders[key].add(task)
                self._argument_of[task].add(key)
                self._argument_client[key] = client
                self._argument_seen[key] = max(sent, self._argument_seen.get(key, 0))

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if finish in ("released", "forgotten", "erred") and key in self._results:
            for result_key in self._results.pop(key):
                self._evict(result_key)
        if finish == "forgotten":
            for argument in self._argument_of.pop(key, ()):
                holders = self._holders[argument]
                holders.discard(key)
                if not holders:
                    self._idle(argument)

    def _idle(self, key: Any) -> None:
        client = self._argument_client[key]
        if client in self.scheduler.clients:
            data = pickle.dumps((key, self._argument_seen[key]))
            self.scheduler.log_event(_idle_topic(client), {"data": data})
        else:
            self._drop_argument(key)
            self._evict(key)

    def _drop_argument(self, key: Any) -> None:
        self._holders.pop(key, None)
        self._argument_client.pop(key, None)
        self._argument_seen.pop(key, None)

    def _evict(self, key: Any) -> None:
        self.store.evict(key)
        self.keys_evicted += 1
        self._nbytes.pop(key, None)

    def log_event(self, topic: str, msg: Any) -> None:
        if topic == RESULTS_TOPIC:
            task, created = pickle.loads(msg["data"])
            ts = self.scheduler.tasks.get(task)
            for key, nbytes in created:
                self._nbytes[key] = nbytes
                self.bytes_proxied += nbytes
                if ts is None or ts.state not in ("processing", "memory"):
                    self._evict(key)  # the task was forgotten while it ran
                else:
                    self._results[task].append(key)
        elif topic == EVICTED_TOPIC:
            key = pickle.loads(msg["data"])
            if not self._holders.get(key):
                self._drop_argument(key)
                self.keys_evicted += 1
                self._nbytes.pop(key, None)

    def remove_client(self, scheduler: Scheduler, client: str) -> None:
        for key, owner in list(self._argument_client.items()):
            if owner == client and not self._holders.get(key):
                self._drop_argument(key)
                self._evict(key)

    async def close(self) -> None:
        for keys in self._results.values():
            for key in keys:
                self._evict(key)
        for key in list(self._argument_client):
            self._drop_argument(key)
            self._evict(key)
        self._results.clear()

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
    client: Client, threshold: int | str | None, store: str | None
) -> tuple[DaskProxyPlugin, ProxySchedulerPlugin, ProxyWorkerPlugin]:
    if client in _registered:
        raise ValueError(f"proxy-patterns is already registered on {client}")
    policy = _configured_policy(threshold)
    spec = _configured_store(store)
    plugin = DaskProxyPlugin(client, policy, spec)
    return plugin, ProxySchedulerPlugin(spec), ProxyWorkerPlugin(policy, spec)


def _install(client: Client, plugin: DaskProxyPlugin) -> DaskProxyPlugin:
    plugin.install()
    _registered[client] = plugin
    return plugin


def register(
    client: Client, threshold: int | str | None = None, store: str | None = None
) -> DaskProxyPlugin:
    """Proxy every task argument and result above ``threshold`` for ``client``'s graphs.

    Args:
        client: A connected ``distributed.Client``.
        threshold: Objects larger than this travel by proxy (``"1 MiB"``-style strings work);
            default ``proxy-patterns.threshold``.
        store: Store spec (``shm``, ``redis://host:port``, ...); default
            ``proxy-patterns.store``, else ``$PROXY_PATTERNS_STORE``, else ``shm``.

    Returns:
        The client side of the plugin (see :meth:`DaskProxyPlugin.stats`).
    """
    plugin, on_scheduler, on_workers = _prepare(client, threshold, store)
    client.register_plugin(on_scheduler, name=PLUGIN_NAME)
    client.register_plugin(on_workers, name=PLUGIN_NAME)
    return _install(client, plugin)


def unregister(client: Client) -> None:
    """Restore plain behaviour for ``client``: later graphs and results are not proxied.

    Keys already created stay owned by the scheduler and are evicted with their tasks.
    """
    plugin = _registered.pop(client, None)
    if plugin is None:
        raise ValueError(f"proxy-patterns is not registered on {client}")
    plugin.uninstall()


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
