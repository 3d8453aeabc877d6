"""What the client, scheduler and worker sides of the Dask plugin say to each other.

* A graph that carries store keys is sent with the task annotation :data:`ANNOTATION`: a
  pickled list of :class:`Hold`, one per key, each a holder in the key's reference record
  (:mod:`proxy_patterns.ownership`) that the client took for that graph and the scheduler
  takes over (claims) when the graph arrives.
* A worker that put a task's result in the store, or whose task returned proxies it was given,
  tells the scheduler with a :data:`RESULTS_TOPIC` event (:class:`ResultKeys`). It records
  each key it put with a holder leased by itself, which the scheduler takes over: a worker
  killed before its event arrives takes the key with it (at the next sweep).
* Workers ask the scheduler's process tag with the :data:`OWNER_HANDLER` handler: results are
  put in shared-memory segments named for the scheduler, which outlives workers.
"""

from __future__ import annotations

from typing import Any, NamedTuple

PLUGIN_NAME = "proxy-patterns"
ANNOTATION = "proxy_patterns"
RESULTS_TOPIC = "proxy-patterns-results"
OWNER_HANDLER = "proxy_patterns_owner"


class Hold(NamedTuple):
    """One key a graph carries: the holder the client took for it, and the bytes it counts
    (None for a proxy future's key, which the graph only waits for)."""

    key: Any
    store_config: Any
    holder: str
    nbytes: int | None


class ResultKeys(NamedTuple):
    """Store keys in a task's result: ``created`` (key, bytes, the worker's holder, which the
    scheduler claims) by the worker's put, ``held`` every key the result refers to (those
    created, and proxies the task passed on)."""

    task: Any
    created: list[tuple[Any, int, str]]
    held: list[Any]
