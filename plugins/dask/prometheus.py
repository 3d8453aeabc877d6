"""The Dask plugin's counters as Prometheus metrics, served at the scheduler's ``/metrics``.

Distributed serves ``prometheus_client``'s default registry at ``/metrics`` whenever
``prometheus_client`` is installed. A collector registered in that registry, in the
scheduler's process, is scraped together with Dask's own metrics and named like them:
``<namespace>_scheduler_proxy_patterns_...``, the namespace being
``distributed.dashboard.prometheus.namespace`` (``dask`` by default).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from typing import Any, Protocol

import dask.config


class Counted(Protocol):
    """What reports counters: the scheduler plugin."""

    def stats(self) -> dict[str, int]: ...


_sources: weakref.WeakSet[Counted] = weakref.WeakSet()
_lock = threading.Lock()
_registered = False


class _Collector:
    """Sums the counters of every scheduler plugin alive in this process (normally one)."""

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        totals = {"bytes_proxied": 0, "keys_evicted": 0, "keys_live": 0, "bytes_live": 0}
        for source in list(_sources):
            for name, value in source.stats().items():
                totals[name] += value
        namespace = dask.config.get("distributed.dashboard.prometheus.namespace")
        prefix = "_".join(filter(None, [namespace, "scheduler_proxy_patterns"]))
        yield CounterMetricFamily(
            f"{prefix}_proxied_bytes",
            "Bytes of task arguments and results put in the store instead of sent through Dask",
            value=totals["bytes_proxied"],
        )
        yield CounterMetricFamily(
            f"{prefix}_evicted_keys",
            "Store keys evicted because Dask no longer holds their tasks",
            value=totals["keys_evicted"],
        )
        yield GaugeMetricFamily(
            f"{prefix}_live_keys", "Store keys held by tasks", value=totals["keys_live"]
        )
        yield GaugeMetricFamily(
            f"{prefix}_live_bytes",
            "Bytes in the store held by tasks (not counted in Dask's managed memory)",
            value=totals["bytes_live"],
        )


def expose(source: Counted) -> None:
    """Report ``source.stats()`` at ``/metrics`` while ``source`` lives; a no-op without
    ``prometheus_client`` (Dask then serves no metrics either)."""
    global _registered
    try:
        from prometheus_client import REGISTRY
    except ImportError:
        return
    with _lock:
        _sources.add(source)
        if not _registered:
            REGISTRY.register(_Collector())
            _registered = True
