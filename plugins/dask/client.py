"""The client side of the Dask plugin: graphs leave with large arguments as proxies, results
arrive as real objects.

Dask has no client plugin type, so two methods of the given client instance are wrapped (the
only places every graph leaves and every result arrives): ``_graph_to_futures`` pickles the
graph once, judging each task argument by its serialized size on the way
(:mod:`proxy_patterns.policy`) and replacing a large one by a proxy, so the scheduler never
receives the bytes; ``_gather`` materializes proxies in results, so users get real objects.

Arguments are put once per content (:mod:`proxy_patterns.arguments`). For each graph, the
client takes a holder of every key the graph carries (arguments, and proxy futures) and sends
the holders with the graph; the scheduler takes them over when the graph arrives. So a key
cannot be evicted while a graph that uses it is on its way, whatever the scheduler does
meanwhile with earlier graphs.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import pickle
from collections.abc import Callable
from typing import Any

import cloudpickle
from dask._expr import Expr
from dask._task_spec import DataNode, GraphNode, Task, TaskRef
from dask.base import annotate
from dask.highlevelgraph import HighLevelGraph, Layer
from distributed import Client, Future, Scheduler
from distributed.client import _MapExpr
from distributed.protocol.serialize import Serialized
from proxystore.proxy import Proxy

from proxy_patterns.arguments import ArgumentProxies
from proxy_patterns.availability import StoreUnavailableError
from proxy_patterns.futures import pickled_futures
from proxy_patterns.plugins.dask.protocol import ANNOTATION, PLUGIN_NAME, Hold
from proxy_patterns.policy import AROUND_ARGUMENTS, AROUND_GATHERED, ProxyPolicy
from proxy_patterns.proxy import held, key_of, map_proxies, materialize
from proxy_patterns.records import ReferenceInvalidError, ref_table_of
from proxy_patterns.serialize import Frames, SizeExceeded, dumps
from proxy_patterns.store import get_store


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


class DaskProxyPlugin:
    """The client side of the plugin; returned by :func:`~proxy_patterns.plugins.dask.register`.

    Holds the client's argument proxies (one per distinct content) and the two wrapped client
    methods.
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
        self.arguments = ArgumentProxies(self.store)
        self._graph_to_futures = client._graph_to_futures
        self._gather = client._gather

    # --- installed on the client -------------------------------------------------------
    def install(self) -> None:
        """Wrap the client's graph submission and gathering."""
        self.client._graph_to_futures = self._submit_graph  # type: ignore[method-assign]
        self.client._gather = self._gather_resolved  # type: ignore[method-assign]

    def uninstall(self) -> None:
        """Restore the client's own methods; keys in use stay held by the scheduler."""
        self.client._graph_to_futures = self._graph_to_futures  # type: ignore[method-assign]
        self.client._gather = self._gather  # type: ignore[method-assign]

    def _submit_graph(self, expr: Any, keys: Any, *args: Any, **kwargs: Any) -> Any:
        with pickled_futures() as futures:
            frames = self._pickle_small_graph(expr)
            holds: list[Hold] = []
            if frames is None:  # larger than the threshold: judge what it holds
                frames, holds = self._pickle_graph(expr)
        holds += _hold_futures(futures)  # the client may drop its futures at once
        if not holds:
            return self._graph_to_futures(_pickled_graph(frames), keys, *args, **kwargs)
        try:
            with annotate(**{ANNOTATION: pickle.dumps([tuple(h) for h in holds])}):
                return self._graph_to_futures(_pickled_graph(frames), keys, *args, **kwargs)
        except BaseException:
            _drop(holds)  # those the scheduler took over already are not ours to drop
            raise

    def _pickle_small_graph(self, expr: Any) -> list[Any] | None:
        """``expr`` pickled, if that takes no more than the threshold: then nothing in it can
        be larger, and it is sent as it is. None (after about threshold bytes of work) if not."""
        try:
            return dumps(expr, limit=int(self.policy.threshold)).frames
        except SizeExceeded:
            return None
        except Exception as e:
            raise TypeError(f"could not serialize the task graph: {e}") from e

    def _pickle_graph(self, expr: Any) -> tuple[list[Any], list[Hold]]:
        """Pickle ``expr`` once, its large arguments proxied; (frames, holds of their keys)."""
        holds: dict[Any, Hold] = {}
        store_config = self.store.config()

        def make_proxy(obj: Any, frames: Frames) -> Proxy[Any]:
            p, holder = self.arguments.hold(obj, frames)
            key = key_of(p)
            if key in holds:  # equal contents twice in one graph: one hold is enough
                self.arguments.table.drop(key, holder)
            else:
                holds[key] = Hold(key, store_config, holder, frames.nbytes)
            return p

        buffers: list[Any] = []
        stream = io.BytesIO()
        judge = self.policy.judge(make_proxy, keep_frames=True)
        try:
            _GraphPickler(
                stream, judge, buffer_callback=lambda b: buffers.append(memoryview(b))
            ).dump(expr)
        except StoreUnavailableError:
            _drop(list(holds.values()))
            raise
        except Exception as e:
            _drop(list(holds.values()))
            raise TypeError(f"could not serialize the task graph: {e}") from e
        return [stream.getbuffer(), *buffers], list(holds.values())

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


def _hold_futures(futures: dict[Any, Any]) -> list[Hold]:
    """A holder of each proxy future's key a graph carries, for the scheduler to take over.

    A future released already is left out: its value can never be set.
    """
    holds = []
    for key, store_config in futures.items():
        with contextlib.suppress(ReferenceInvalidError):
            holds.append(Hold(key, store_config, ref_table_of(store_config).add(key, "ref"), None))
    return holds


def _drop(holds: list[Hold]) -> None:
    """Release the holders of a graph that was not sent (or not all of it)."""
    for hold in holds:
        with contextlib.suppress(ReferenceInvalidError):  # taken over by the scheduler
            ref_table_of(hold.store_config).drop(hold.key, hold.holder)


def _scheduler_stats(dask_scheduler: Scheduler) -> dict[str, int]:
    stats: dict[str, int] = dask_scheduler.plugins[PLUGIN_NAME].stats()  # type: ignore[attr-defined]
    return stats
