"""Seeing from outside that a process waits on a store key, and making its waits event-only.

A test that checks a waiter is woken by a set must set only once the waiter waits. The store
shows it, as :mod:`proxy_patterns.rendezvous` waits: on Redis a waiter is subscribed to a
channel named after the key, on shared memory its process watches the store's directory with
inotify. And a waiter woken by its periodic liveness check would hide a lost wake-up: the test
spaces those checks an hour apart.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from proxystore.store import Store

from proxy_patterns import rendezvous
from proxy_patterns.shm import SharedMemoryConnector

EVENTS_ONLY = 3600.0
"""Seconds between a patient waiter's liveness checks: longer than any test waits for it."""


def wake_only_on_events() -> None:
    """Space this process's liveness checks (which also look at the key) an hour apart, so
    that only the store's event for a set wakes its waiters. For a process the test started;
    the test's own process patches it for one test (``monkeypatch``) instead."""
    assert hasattr(rendezvous, "LIVENESS_INTERVAL"), "the rendezvous has no liveness interval"
    rendezvous.LIVENESS_INTERVAL = EVENTS_ONLY


def waiting_on(store: Store[Any], key: Any, pids: Iterable[int]) -> int:
    """How many waiters wait on ``key``: on Redis, subscribers to a channel named after it;
    on shared memory, processes among ``pids`` that watch the store's directory."""
    connector = store.connector
    if isinstance(connector, SharedMemoryConnector):
        inode = os.stat(connector.directory).st_ino
        return sum(_watches(pid, inode) for pid in pids)
    import redis

    with redis.Redis(host=connector.hostname, port=connector.port) as client:
        channels = [c for c in client.pubsub_channels() if key.redis_key.encode() in c]
        return sum(n for _, n in client.pubsub_numsub(*channels)) if channels else 0


def _watches(pid: int, inode: int) -> bool:
    """Whether process ``pid`` has an inotify watch on the directory of inode ``inode``."""
    fdinfo = f"/proc/{pid}/fdinfo"
    try:
        descriptors = os.listdir(fdinfo)
    except FileNotFoundError:  # the process is gone
        return False
    for fd in descriptors:
        try:
            with open(os.path.join(fdinfo, fd)) as f:
                lines = f.read().splitlines()
        except OSError:  # closed meanwhile
            continue
        if any(line.startswith("inotify wd:") and f" ino:{inode:x} " in line for line in lines):
            return True
    return False
