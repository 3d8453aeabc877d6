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

from proxy_patterns.shm import SharedMemoryConnector

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
    """Raise :class:`StoreUnreachableError` if ``store`` is shared memory and this process
    does not run on ``origin`` (a :func:`host_identity`), the host whose memory it is."""
    here = host_identity()
    if isinstance(store.connector, SharedMemoryConnector) and origin != here:
        raise StoreUnreachableError(
            f"store {store.name!r} is shared memory of host {origin!r}, and this process runs "
            f"on {here!r} (<hostname>/<boot id>): configure a store both reach, such as Redis "
            "(store='redis://host:port')"
        )
