"""The worker side of the Dask plugin: tasks get real objects; results leave as proxies.

A task starting on a worker gets its arguments and the results it depends on materialized
(mapped from shared memory): its function runs exactly as on plain Dask. A result stays a real
object while only tasks on its own worker use it (a persisted collection costs nothing), and is
put in the store the first time another worker or a client asks for it: from then on
``worker.data`` holds the proxy, which is what travels. The put runs in Dask's offload thread,
not on the worker's event loop, which keeps serving other requests meanwhile.

Each key a worker puts is recorded at once with a holder leased by the worker, which the
scheduler takes over when the worker's event arrives: a worker killed in between takes the key
with it (the scheduler sweeps when it loses a worker). Segments are named for the scheduler's
process for the instant before the record exists.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import pickle
from collections.abc import Callable
from typing import Any

from dask._task_spec import Task
from distributed import Worker, WorkerPlugin
from distributed.utils import offload

from proxy_patterns.plugins.dask.protocol import (
    OWNER_HANDLER,
    PLUGIN_NAME,
    RESULTS_TOPIC,
    ResultKeys,
)
from proxy_patterns.policy import AROUND_ARGUMENTS, ProxyPolicy
from proxy_patterns.proxy import SCALARS, materialize, put_large_parts, store_keys_in
from proxy_patterns.records import ref_table_for
from proxy_patterns.store import get_store, public_spec, spec_owned_by

logger = logging.getLogger(__name__)


class ProxyWorkerPlugin(WorkerPlugin):
    """Gives tasks real objects, and replaces large task results in ``worker.data`` by proxies
    when they leave the worker, telling the scheduler which keys each result holds."""

    name = PLUGIN_NAME
    idempotent = True

    def __init__(self, policy: ProxyPolicy, store_spec: str | None) -> None:
        self.policy = policy
        # Sent to the scheduler and workers: without a password, which they take from their
        # environment (see proxy_patterns.redis_connector).
        self.store_spec = None if store_spec is None else public_spec(store_spec)

    async def setup(self, worker: Worker) -> None:
        self.worker = worker
        owner = await getattr(worker.scheduler, OWNER_HANDLER)()
        self.store = get_store(spec_owned_by(self.store_spec, owner))
        self.table = ref_table_for(self.store)
        self._unproxied: set[Any] = set()  # results computed here, not yet looked at
        self._putting: dict[Any, asyncio.Future[None]] = {}  # results being put now
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
                put = asyncio.ensure_future(self._proxy_result(key))
                self._putting[key] = put
                put.add_done_callback(functools.partial(self._put_done, key))
        puts = [self._putting[key] for key in keys if key in self._putting]
        if puts:  # a request that arrives during a put waits for it too
            await asyncio.gather(*puts)
        return await self._serve_data(comm, keys=keys, **kwargs)

    def _put_done(self, key: Any, put: asyncio.Future[None]) -> None:
        self._putting.pop(key, None)

    async def _proxy_result(self, key: Any) -> None:
        """Put ``key``'s large parts in the store; if that fails, it leaves by value, as in
        plain Dask (a store that is full must not fail the transfer)."""
        value = self.worker.data[key]
        try:
            proxied, created = await offload(self._put_and_record, value)
        except Exception:
            logger.warning(
                "result %r is sent by value: it could not be put in the store", key, exc_info=True
            )
            return
        ts = self.worker.state.tasks.get(key)
        if ts is None or ts.state != "memory" or self.worker.data.get(key) is not value:
            # Released (or replaced) during the put: nobody was given these keys.
            for new, _, holder in created:
                self.table.drop(new, holder)
            return
        if proxied is not value:
            self.worker.data[key] = proxied
        if created:
            held = store_keys_in(proxied, self.policy.max_depth + AROUND_ARGUMENTS)
            self._report(ResultKeys(key, created, held))

    def _put_and_record(self, value: Any) -> tuple[Any, list[tuple[Any, int, str]]]:
        """``value`` with its large parts put, and each key put with this worker's holder."""
        proxied, created = put_large_parts(self.policy, self.store, value)
        recorded: list[tuple[Any, int, str]] = []
        try:
            for new, nbytes in created:
                recorded.append((new, nbytes, self.table.create(new)))
        except BaseException:
            for new, _, holder in recorded:
                self.table.drop(new, holder)
            for new, _ in created[len(recorded) :]:
                self.store.evict(new)
            raise
        return proxied, recorded

    def _report(self, keys: ResultKeys) -> None:
        self.worker.log_event(RESULTS_TOPIC, {"data": pickle.dumps(tuple(keys))})

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
                self._report(ResultKeys(key, [], held))
        elif start == "memory":
            self._unproxied.discard(key)
        if finish in ("released", "error", "forgotten"):
            self._passed_on.pop(key, None)


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
