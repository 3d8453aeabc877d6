"""Which host a store can be reached from: shared memory only from the host that made it.

A proxy carries its store's configuration, not the store: a process on another host that
receives a proxy of a shared-memory store re-creates a store of its *own* ``/dev/shm``, where
the key is not (or, worse, where another object has that name). Code that sends proxies to
processes it did not start (a Globus Compute endpoint, a worker on another node) records the
host it ran on, and the receiving side checks it with :func:`check_reachable` before any read,
failing at once with :class:`StoreUnreachableError`, which says what to configure.
"""

from __future__ import annotations

import functools
import socket
from typing import Any

from proxystore.store import Store

_BOOT_ID = "/proc/sys/kernel/random/boot_id"


class StoreUnreachableError(RuntimeError):
    """A process received proxies of a store it cannot reach (another host's shared memory)."""


@functools.cache
def host_identity() -> str:
    """This host, as ``<hostname>/<boot id>``: two hosts, or one host before and after a
    reboot (when its shared memory was emptied), never share it."""
    try:
        with open(_BOOT_ID) as f:
            boot = f.read().strip()
    except OSError:
        boot = "unknown-boot"
    return f"{socket.gethostname()}/{boot}"


def check_reachable(store: Store[Any], origin: str) -> None:
    """Raise :class:`StoreUnreachableError` if ``store`` is one host's shared memory and this
    process does not run on ``origin`` (a :func:`host_identity`), the host whose memory it is.
    A topology store (:mod:`proxy_patterns.topology`) is reachable from every host."""
    from proxy_patterns.shm import SharedMemoryConnector  # (which raises this module's error)

    connector = store.connector
    if isinstance(connector, SharedMemoryConnector) and not connector.serves_other_hosts:
        here = host_identity()
        if origin != here:
            raise StoreUnreachableError(unreachable_message(f"store {store.name!r}", origin))


def unreachable_message(what: str, origin: str) -> str:
    """Why ``what``, in the shared memory of host ``origin``, cannot be read here, and what
    to configure instead."""
    return (
        f"{what} is in the shared memory of host {origin!r}, and this process runs on "
        f"{host_identity()!r} (<hostname>/<boot id>): another host's shared memory cannot be "
        "read. Use the store 'topology' (objects move between hosts peer to peer) or one "
        "every host reaches, such as 'redis://host:port': dask config proxy-patterns.store, "
        "the Parsl option store=..., or $PROXY_PATTERNS_STORE"
    )
