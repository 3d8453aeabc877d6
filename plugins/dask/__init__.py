"""Dask integration: large task arguments and results travel as proxies, evicted with the graph.

One call turns it on for an existing client::

    from proxy_patterns.plugins.dask import register
    plugin = register(client, threshold="1 MiB")

Three parts, each on the Dask hook made for its side, one module each:

* :mod:`~proxy_patterns.plugins.dask.client` — graphs leave with their large arguments as
  proxies (put once per content); gathered results are real objects.
* :mod:`~proxy_patterns.plugins.dask.worker` — tasks get real objects; a large result is put in
  the store the first time it leaves its worker, and travels as a proxy from then on.
* :mod:`~proxy_patterns.plugins.dask.scheduler` — holds every store key as long as Dask holds
  the tasks that use it, as one holder in the key's reference record
  (:mod:`proxy_patterns.ownership`); the record evicts the key when nothing holds it.

Configuration: ``dask.config`` keys ``proxy-patterns.threshold`` (default ``1 MiB``) and
``proxy-patterns.store`` (a store spec, default ``$PROXY_PATTERNS_STORE``, else ``topology``
when :func:`register` finds workers on another host than the client's, else ``shm``), also as
``DASK_PROXY_PATTERNS__THRESHOLD`` / ``DASK_PROXY_PATTERNS__STORE``. Clusters started from the
command line load it with ``--preload proxy_patterns.plugins.dask`` (scheduler and workers) and
the ``distributed.client.preload`` config (clients).
"""

from __future__ import annotations

import os
import weakref
from typing import Any

from proxystore.proxy import Proxy, get_factory

from proxy_patterns.extras import requires_extra
from proxy_patterns.hosts import host_identity

# The package's modules import Dask too: this runs first, so it guards them all.
with requires_extra("dask", __name__):
    import dask
    import dask.config
    from dask.base import normalize_token
    from dask.sizeof import sizeof
    from distributed import Client, Scheduler, Worker

from proxy_patterns.plugins.dask.client import DaskProxyPlugin
from proxy_patterns.plugins.dask.protocol import PLUGIN_NAME
from proxy_patterns.plugins.dask.scheduler import ProxySchedulerPlugin
from proxy_patterns.plugins.dask.worker import ProxyWorkerPlugin
from proxy_patterns.policy import DEFAULT_THRESHOLD, ProxyPolicy
from proxy_patterns.store import STORE_ENV, TOPOLOGY_SPEC

__all__ = [
    "PLUGIN_NAME",
    "DaskProxyPlugin",
    "ProxySchedulerPlugin",
    "ProxyWorkerPlugin",
    "dask_setup",
    "register",
    "unregister",
]

PROXY_NBYTES = 512
"""What Dask's ``sizeof`` reports for a proxy: its own small size, never its target's."""

dask.config.update_defaults({"proxy-patterns": {"threshold": DEFAULT_THRESHOLD, "store": None}})


# Dask's inspection of task data must never resolve a proxy.
@sizeof.register(Proxy)
def _sizeof_proxy(p: Proxy[Any]) -> int:
    return PROXY_NBYTES


@normalize_token.register(Proxy)
def _tokenize_proxy(p: Proxy[Any]) -> tuple[str, Any]:
    factory = get_factory(p)
    return "proxy", getattr(factory, "key", id(factory))


def _configured_policy(threshold: int | str | None) -> ProxyPolicy:
    return ProxyPolicy(
        dask.config.get("proxy-patterns.threshold") if threshold is None else threshold
    )


def _configured_store(store: str | None) -> str | None:
    return store if store is not None else dask.config.get("proxy-patterns.store")


def _store_for_cluster(client: Client, store: str | None) -> str | None:
    """The configured store; if none is, ``topology`` for a cluster whose workers are on
    other hosts than the client (one host's shared memory would not reach them)."""
    spec = _configured_store(store)
    if spec is None and not os.environ.get(STORE_ENV):
        here = host_identity()
        if any(host != here for host in client.run(host_identity).values()):
            return TOPOLOGY_SPEC
    return spec


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
        store: Store spec (``shm``, ``topology``, ``redis://host:port``, ...); default
            ``proxy-patterns.store``, else ``$PROXY_PATTERNS_STORE``, else ``topology`` if
            workers run on another host than the client, else ``shm``.
        resolve_results: ``result()``, ``gather`` and ``compute`` return real objects (default);
            with False, large results come back as proxies, resolved on first use, that keep
            their task's key alive while they live.

    Returns:
        The client side of the plugin (see :meth:`DaskProxyPlugin.stats`).
    """
    spec = _store_for_cluster(client, store)
    plugin, on_scheduler, on_workers = _prepare(client, threshold, spec, resolve_results)
    client.register_plugin(on_scheduler, name=PLUGIN_NAME)
    client.register_plugin(on_workers, name=PLUGIN_NAME)
    return _install(client, plugin)


def unregister(client: Client) -> None:
    """Restore plain behaviour: ``client``'s later graphs, and later task results on the
    cluster's workers, are not proxied.

    Keys already created stay held by the scheduler and are evicted with their tasks.
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
