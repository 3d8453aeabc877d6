"""Write-once keys and event-driven waits on them: what proxy futures need from a store.

ProxyStore's ``Store.future()`` polls the store (once a second by default), so a consumer
learns of a value up to a second late. Here a waiter sleeps until the store says the key was
written: on shared memory through ``inotify`` on the segment directory (the kernel wakes it
when the segment is linked into place), on Redis through pub/sub.

A waiter must not wait forever for a producer that died. The process that will set a key
*claims* it; a waiter that finds the claimant gone (its pid and start time no longer match on
shared memory, its lease expired on Redis) for longer than a grace period raises
:class:`ProducerLostError` instead of hanging.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import threading
import time
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from proxystore.store import Store

from proxy_patterns.liveness import process_tag, tag_alive
from proxy_patterns.serialize import Frames
from proxy_patterns.shm import KeyExistsError, SharedMemoryConnector, SharedMemoryKey
from proxy_patterns.store import CLAIM_SUFFIX, redis_client_of

if TYPE_CHECKING:
    import redis

LIVENESS_INTERVAL = 0.5
"""Seconds between checks that a key's claimant is still alive."""
GRACE = 2.0
"""Seconds a claimant may be gone before waiters give up (a framework may retry the task)."""
LEASE = 5.0
"""Seconds a Redis claim lives unless renewed (renewed every third of it)."""


class ProducerLostError(RuntimeError):
    """The process that was to set a future's value died before setting it."""


class Rendezvous(Protocol):
    """Write-once keys a waiter can block on, with claims on who will write them."""

    def new_key(self) -> Any:
        """A fresh key, not yet written."""
        ...

    def set_once(self, key: Any, frames: Frames) -> bool:
        """Write ``key``; False (and nothing written) if it was already written."""
        ...

    def exists(self, key: Any) -> bool:
        """Whether ``key`` has been written."""
        ...

    def wait(self, key: Any, timeout: float | None) -> bool:
        """Block until ``key`` is written (True) or ``timeout`` passes (False)."""
        ...

    def claim(self, key: Any) -> None:
        """Record that this process will write ``key``."""
        ...

    def forget(self, key: Any) -> None:
        """Remove ``key``'s value and claim."""
        ...


def rendezvous_for(store: Store[Any]) -> Rendezvous:
    """The rendezvous of ``store``'s connector (shared memory or Redis)."""
    connector = store.connector
    if isinstance(connector, SharedMemoryConnector) and connector.serves_other_hosts:
        raise TypeError(
            "proxy futures across hosts need a Redis store (store='redis://host:port'): on "
            "the topology store a process of another host would wait for a value it is never "
            "told of"
        )
    if isinstance(connector, SharedMemoryConnector):
        return SharedMemoryRendezvous(connector)
    client = redis_client_of(connector)
    if client is not None:
        return RedisRendezvous(connector, client)
    raise TypeError(
        f"proxy futures need a shared-memory or Redis store, not {type(connector).__name__}"
    )


class _Lost:
    """Tracks how long a claimant has been seen dead, to apply the grace period."""

    def __init__(self) -> None:
        self.since: float | None = None

    def check(self, dead: bool, key: Any) -> None:
        if not dead:
            self.since = None
        elif self.since is None:
            self.since = time.monotonic()
        elif time.monotonic() - self.since > GRACE:
            raise ProducerLostError(
                f"the process that was to set future {key} died before setting it"
            )


def _wait_loop(
    key: Any,
    timeout: float | None,
    exists: Any,
    claimant_dead: Any,
    sleep: Any,
) -> bool:
    deadline = None if timeout is None else time.monotonic() + timeout
    lost = _Lost()
    while not exists():
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return False
        lost.check(claimant_dead(), key)
        sleep(LIVENESS_INTERVAL if remaining is None else min(remaining, LIVENESS_INTERVAL))
    return True


class DirectoryWatcher:
    """One inotify watch per directory (and kind of events) and process; wakes every waiter
    whenever a file is created, linked or renamed into it, and with ``deletes`` also whenever
    one is deleted.

    ``changed`` is notified after each batch of events, and ``generation`` counts batches,
    so a waiter can tell whether anything happened since it last looked. Waiters for a value
    do not watch deletes: a put deletes its temporary file, a wake-up for nothing.
    """

    _IN_CREATE, _IN_MOVED_TO, _IN_DELETE = 0x100, 0x80, 0x200
    _watchers: ClassVar[dict[tuple[str, bool], DirectoryWatcher]] = {}
    _lock = threading.Lock()

    @classmethod
    def of(cls, directory: str, deletes: bool = False) -> DirectoryWatcher:
        with cls._lock:
            if (directory, deletes) not in cls._watchers:
                cls._watchers[(directory, deletes)] = cls(directory, deletes)
            return cls._watchers[(directory, deletes)]

    def __init__(self, directory: str, deletes: bool) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        mask = self._IN_CREATE | self._IN_MOVED_TO | (self._IN_DELETE if deletes else 0)
        if self._fd < 0 or libc.inotify_add_watch(self._fd, directory.encode(), mask) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"cannot watch {directory}: {os.strerror(err)}")
        self.changed = threading.Condition()
        self.generation = 0
        threading.Thread(target=self._run, name=f"watch {directory}", daemon=True).start()

    def _run(self) -> None:
        while True:
            select.select([self._fd], [], [])
            try:
                while os.read(self._fd, 65536):
                    pass
            except BlockingIOError:
                pass
            with self.changed:
                self.generation += 1
                self.changed.notify_all()


class SharedMemoryRendezvous:
    """Rendezvous on the shared-memory connector: inotify waits, pid-checked claims."""

    def __init__(self, connector: SharedMemoryConnector) -> None:
        self.connector = connector

    def _claim_path(self, key: SharedMemoryKey) -> str:
        return self.connector.path(key) + ".claim"

    def new_key(self) -> SharedMemoryKey:
        return self.connector.new_key()

    def set_once(self, key: SharedMemoryKey, frames: Frames) -> bool:
        try:
            self.connector.set_frames(key, frames)
        except KeyExistsError:
            return False
        return True

    def exists(self, key: SharedMemoryKey) -> bool:
        return self.connector.exists(key)

    def claim(self, key: SharedMemoryKey) -> None:
        path = self._claim_path(key)
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # ours alone, as segments
        with os.fdopen(fd, "w") as f:
            f.write(process_tag())
        os.replace(tmp, path)

    def _claimant_dead(self, key: SharedMemoryKey) -> bool:
        try:
            with open(self._claim_path(key)) as f:
                claimant = f.read()
        except FileNotFoundError:
            return False  # unclaimed: whoever holds the future may still set it
        return not tag_alive(claimant)

    def wait(self, key: SharedMemoryKey, timeout: float | None) -> bool:
        watcher = DirectoryWatcher.of(self.connector.directory)
        with watcher.changed:  # held between the existence check and the wait: no lost wake-up
            return _wait_loop(
                key,
                timeout,
                lambda: self.exists(key),
                lambda: self._claimant_dead(key),
                lambda seconds: watcher.changed.wait(seconds),
            )

    def forget(self, key: SharedMemoryKey) -> None:
        self.connector.evict(key)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._claim_path(key))


class _LeaseRenewer:
    """Renews this process's Redis claims until they are released or the process dies.

    One thread per client (per server): a server that stops answering holds its thread for
    seconds per call (redis-py retries), and must not delay the renewal of leases on other
    servers, which would then expire under the objects they keep.
    """

    def __init__(self) -> None:
        self._claims: dict[int, dict[str, Any]] = {}  # id(client) -> name -> client
        self._lock = threading.Lock()

    def add(self, client: Any, name: str) -> None:
        with self._lock:
            claims = self._claims.get(id(client))
            if claims is None:  # no thread renews this client's claims: start one
                claims = self._claims[id(client)] = {}
                threading.Thread(
                    target=self._run, args=(client,), name="leases", daemon=True
                ).start()
            claims[name] = client

    def discard(self, client: Any, name: str) -> None:
        with self._lock:
            self._claims.get(id(client), {}).pop(name, None)

    # Renew only a claim that is still ours: another process may have claimed the key since.
    _RENEW = (
        "if redis.call('get', KEYS[1]) == ARGV[1] then "
        "return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"
    )

    def _run(self, client: Any) -> None:
        while True:
            time.sleep(LEASE / 3)
            with self._lock:
                names = list(self._claims[id(client)])
                if not names:  # nothing left to renew: the next add starts a new thread
                    del self._claims[id(client)]
                    return
            for name in names:
                try:
                    renewed = client.eval(self._RENEW, 1, name, process_tag(), int(LEASE * 1000))
                except Exception:  # e.g. a connection closed under us: try again next round
                    continue  # (this thread must not die: the client's leases need it)
                if not renewed:
                    self.discard(client, name)


lease_renewer = _LeaseRenewer()


class RedisRendezvous:
    """Rendezvous on ProxyStore's Redis connector: pub/sub waits, leased claims."""

    def __init__(self, connector: Any, client: redis.Redis) -> None:
        self.connector = connector
        self.client = client

    @staticmethod
    def _channel(key: Any) -> str:
        return f"proxy-patterns:set:{key.redis_key}"

    @staticmethod
    def claim_name(key: Any) -> str:
        """The Redis key of ``key``'s claim."""
        return f"{key.redis_key}{CLAIM_SUFFIX}"

    def new_key(self) -> Any:
        return self.connector.new_key()

    def set_once(self, key: Any, frames: Frames) -> bool:
        set_frames = getattr(self.connector, "set_frames", None)  # ours: frames not joined
        if set_frames is not None:
            if not set_frames(key, frames, only_new=True):
                return False
        elif not self.client.set(key.redis_key, bytes(frames.join()), nx=True):
            return False
        lease_renewer.discard(self.client, self.claim_name(key))
        self.client.delete(self.claim_name(key))
        self.client.publish(self._channel(key), b"set")
        return True

    def exists(self, key: Any) -> bool:
        return bool(self.client.exists(key.redis_key))

    def claim(self, key: Any) -> None:
        name = self.claim_name(key)
        self.client.set(name, process_tag(), px=int(LEASE * 1000))
        lease_renewer.add(self.client, name)

    def wait(self, key: Any, timeout: float | None) -> bool:
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(self._channel(key))
        try:  # subscribed before the existence check: a set in between is not missed
            return _wait_loop(
                key,
                timeout,
                lambda: self.exists(key),
                lambda: not self.client.exists(self.claim_name(key)),
                lambda seconds: pubsub.get_message(timeout=seconds),
            )
        finally:
            pubsub.close()

    def forget(self, key: Any) -> None:
        lease_renewer.discard(self.client, self.claim_name(key))
        self.client.delete(key.redis_key, self.claim_name(key))
