"""The scheduler side of the Dask plugin: store keys are held exactly as long as Dask holds
the tasks that use them.

The scheduler is one holder in the reference record (:mod:`proxy_patterns.ownership`) of every
key a task graph carries or a task result contains, leased by its process: if the scheduler
dies, its holds die with it, and the keys are freed like those of any dead process. Which
tasks use a key is Dask's business, kept here: the tasks of every graph that carried it (until
they are forgotten) and the tasks whose result refers to it (until that result is released).
When the last of them goes, the scheduler drops its holder, and the record evicts the key
unless another holder remains (a graph still on its way from a client). Eviction itself is the
record's: nothing here evicts a key.
"""

from __future__ import annotations

import asyncio
import contextlib
import pickle
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from distributed import Scheduler, SchedulerPlugin

from proxy_patterns.liveness import process_tag
from proxy_patterns.plugins.dask.prometheus import expose
from proxy_patterns.plugins.dask.protocol import (
    ANNOTATION,
    OWNER_HANDLER,
    PLUGIN_NAME,
    RESULTS_TOPIC,
    Hold,
    ResultKeys,
)
from proxy_patterns.records import ReferenceInvalidError, RefTable, ref_table_for, ref_table_of
from proxy_patterns.rendezvous import LEASE
from proxy_patterns.store import get_store, public_spec

# Who uses a key: a task, as the carrier of the graph that sent the key ("graph") or as the
# producer of a result that refers to it ("result").
_User = tuple[Any, str]


@dataclass
class _Held:
    """The scheduler's hold on one key, and the tasks that use it."""

    table: RefTable
    holder: str
    nbytes: int | None  # None: a proxy future's key (counted by its owner, not here)
    users: set[_User] = field(default_factory=set)


class ProxySchedulerPlugin(SchedulerPlugin):
    """Holds every store key Dask's tasks use, and lets go when Dask lets go of the tasks."""

    name = PLUGIN_NAME
    # A second client registering must not replace the plugin and wipe its holds.
    idempotent = True

    def __init__(self, store_spec: str | None) -> None:
        # Sent to the scheduler and workers: without a password, which they take from their
        # environment (see proxy_patterns.redis_connector).
        self.store_spec = None if store_spec is None else public_spec(store_spec)
        self._keys: dict[Any, _Held] = {}
        self._used: dict[_User, set[Any]] = defaultdict(set)
        self.bytes_proxied = 0
        self.keys_evicted = 0
        self._sweeps: set[asyncio.Task[None]] = set()

    async def start(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.table = ref_table_for(get_store(self.store_spec))
        scheduler.handlers[OWNER_HANDLER] = lambda comm=None: process_tag()
        # Wrapped, because no plugin hook sees every graph (see _update_graph).
        self._dask_update_graph = scheduler.stream_handlers["update-graph"]
        scheduler.stream_handlers["update-graph"] = self._update_graph
        expose(self)

    # --- taking holds ---------------------------------------------------------------------
    async def _update_graph(
        self, *, keys: set[Any], annotations: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """Dask's ``update-graph`` handler, then the holds the graph was sent with taken over
        for its output tasks.

        Holds travel as a graph-wide annotation, which Dask would copy to each *new* task
        only (a graph whose tasks all exist already, such as a collection computed twice,
        would lose them): they are taken out here and given to the graph's outputs instead.
        Every task of the graph is a dependency of an output, and can run again only while
        an output is wanted, so a key is held exactly while the tasks that may read it can run.
        """
        holds: list[Hold] = []
        if annotations and ANNOTATION in annotations:
            annotations = dict(annotations)
            holds = [Hold(*hold) for hold in pickle.loads(annotations.pop(ANNOTATION))]
        try:
            await self._dask_update_graph(keys=keys, annotations=annotations, **kwargs)
        finally:  # the graph's tasks exist now, unless the update failed or was cancelled
            outputs = [key for key in keys if key in self.scheduler.tasks]
            for hold in holds:
                if self._take(hold):
                    for output in outputs:
                        self._use((output, "graph"), hold.key)
                    if not self._keys[hold.key].users:
                        self._let_go(hold.key)

    def _take(self, hold: Hold) -> bool:
        """Take over the client's holder of ``hold.key`` (only one per key is kept: others are
        dropped). False if the key is gone (its client died before the graph arrived)."""
        held = self._keys.get(hold.key)
        table = held.table if held is not None else ref_table_of(hold.store_config)
        try:
            if held is not None:
                table.drop(hold.key, hold.holder)  # cannot evict: the scheduler holds it
            else:
                holder = table.claim(hold.key, hold.holder)
                self._keys[hold.key] = _Held(table, holder, hold.nbytes)
                self.bytes_proxied += hold.nbytes or 0
        except ReferenceInvalidError:
            return held is not None
        return True

    def log_event(self, topic: str, msg: Any) -> None:
        if topic != RESULTS_TOPIC:
            return
        result = ResultKeys(*pickle.loads(msg["data"]))
        created = []
        for key, nbytes, holder in result.created:  # the worker's put: take over its holder
            try:
                self._keys[key] = _Held(self.table, self.table.claim(key, holder), nbytes)
            except ReferenceInvalidError:  # the worker died meanwhile: the key went with it
                continue
            created.append(key)
            self.bytes_proxied += nbytes
        ts = self.scheduler.tasks.get(result.task)
        alive = ts is not None and ts.state in ("processing", "memory")
        for key in result.held:
            if key in self._keys and alive:  # never adopt keys the plugin did not make
                self._use((result.task, "result"), key)
        for key in created:
            if not self._keys[key].users:  # the task was released while its result was put
                self._let_go(key)

    def _use(self, user: _User, key: Any) -> None:
        self._keys[key].users.add(user)
        self._used[user].add(key)

    # --- letting go -----------------------------------------------------------------------
    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if not self._used:  # nothing held: the common case, decided at once
            return
        if finish in ("released", "forgotten", "erred"):
            self._stop_using((key, "result"))
        if finish == "forgotten":
            self._stop_using((key, "graph"))

    def _stop_using(self, user: _User) -> None:
        for key in self._used.pop(user, ()):
            users = self._keys[key].users
            users.discard(user)
            if not users:
                self._let_go(key)

    def _let_go(self, key: Any) -> None:
        """Drop the scheduler's holder of ``key``: the record evicts it unless held elsewhere."""
        held = self._keys.pop(key)
        for user in held.users:
            self._used[user].discard(key)
        with contextlib.suppress(ReferenceInvalidError):  # its record is gone already
            if held.table.drop(key, held.holder) and held.nbytes is not None:
                self.keys_evicted += 1

    def remove_worker(
        self, scheduler: Scheduler, worker: str, *, stimulus_id: str, **kwargs: Any
    ) -> None:
        """A worker left (or died): keys it put whose event never arrived are held by its
        lease alone. Sweep once that lease has surely ended (a Redis lease outlives its
        process by up to :data:`~proxy_patterns.rendezvous.LEASE` seconds)."""
        sweep = asyncio.get_running_loop().create_task(self._sweep_after(LEASE + 1))
        self._sweeps.add(sweep)
        sweep.add_done_callback(self._sweeps.discard)

    async def _sweep_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        await asyncio.get_running_loop().run_in_executor(None, self.table.sweep)

    async def close(self) -> None:
        for sweep in self._sweeps:
            sweep.cancel()
        self.scheduler.stream_handlers["update-graph"] = self._dask_update_graph
        for key in list(self._keys):
            self._let_go(key)
        self._used.clear()

    def stats(self) -> dict[str, int]:
        """Bytes proxied so far, keys and bytes held now, keys evicted (proxy futures' keys,
        which belong to their futures, are not counted)."""
        counted = [h.nbytes for h in self._keys.values() if h.nbytes is not None]
        return {
            "bytes_proxied": self.bytes_proxied,
            "keys_live": len(counted),
            "bytes_live": sum(counted),
            "keys_evicted": self.keys_evicted,
        }
