"""A broker in the shared-memory store's directory: one node, no server.

A topic is a directory beside the segments (``proxy-patterns-stream-<id>.topic``, 0700 as the
store). Each message is a small file; every step is one atomic rename, so processes need no
server to agree on who got what::

    mode                         {"mode": ..., "producers": N}
    producers/<producer>         its lease; renamed to closed/<producer> by close(), or to
                                 lost/<producer> by a consumer that found it dead
    groups/<group>/lease         the lease that keeps the group's items alive
    groups/<group>/consumers/<c> a consumer's lease
    groups/<group>/q/<message>   queued; ``~end`` once the stream ended
    groups/<group>/pending/<c>~<message>   taken by consumer <c>, not yet acked

A message is named ``<ns>-<producer>-<seq>.<nbytes>``: names sort in sending order, and the
unconsumed bytes are counted from names alone. Consumers wait for messages with ``inotify``.
Joining, leaving and ending take an exclusive ``flock`` on the topic; publishing a shared one,
so a group never goes away between being chosen for a message and getting it.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import secrets
import select
import shutil
from collections.abc import Callable, Iterator
from typing import Any

from proxy_patterns.brokers import (
    WORK_GROUP,
    Discard,
    Membership,
    Mode,
    check_mode,
    producer_lost,
    stream_ended,
)
from proxy_patterns.records import RefTable
from proxy_patterns.shm import (
    SEGMENT_PREFIX,
    STREAM_LEASE_PREFIX,
    TOPIC_SUFFIX,
    SharedMemoryConnector,
)

END = "~end"
"""The file in a group's queue that says the stream ended (sorts after every message)."""


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def _write(path: str, data: str | bytes, tmp: str | None = None) -> None:
    """Write ``path`` whole: as ``tmp`` (default: beside it), then renamed into place."""
    tmp = tmp or f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.rename(tmp, path)


def _listdir(path: str) -> list[str]:
    try:
        return [name for name in os.listdir(path) if not name.endswith(".tmp")]
    except FileNotFoundError:
        return []


def _nbytes(message: str) -> int:
    return int(message.rpartition(".")[2])


class _Inotify:
    """Wakes a consumer when a message is renamed into its group's queue."""

    _IN_MOVED_TO, _IN_CREATE = 0x80, 0x100

    def __init__(self, directory: str) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if (
            self._fd < 0
            or libc.inotify_add_watch(
                self._fd, directory.encode(), self._IN_MOVED_TO | self._IN_CREATE
            )
            < 0
        ):
            err = ctypes.get_errno()
            raise OSError(err, f"cannot watch {directory}: {os.strerror(err)}")

    def wait(self, timeout: float) -> None:
        if select.select([self._fd], [], [], timeout)[0]:
            with contextlib.suppress(BlockingIOError):
                while os.read(self._fd, 65536):
                    pass

    def close(self) -> None:
        os.close(self._fd)


class SharedMemoryBroker:
    """A topic's queues as a directory of the shared-memory store (see the module docstring)."""

    def __init__(
        self, connector: SharedMemoryConnector, table: RefTable, topic: str, discard: Discard
    ) -> None:
        self.table = table
        self.topic = topic
        self._discard = discard
        digest = hashlib.sha256(topic.encode()).hexdigest()[:32]
        self.lease = f"{STREAM_LEASE_PREFIX}{digest}"
        """What the work group's items live by: the topic directory existing."""
        self.directory = connector.directory
        self.path = os.path.join(self.directory, f"{SEGMENT_PREFIX}{self.lease}{TOPIC_SUFFIX}")
        self._watches: dict[Membership, _Inotify] = {}

    # -- the topic and its lock ----------------------------------------------------------

    def _create(self, mode: Mode, producers: int | None) -> None:
        """Make the topic directory whole under another name, and rename it into place."""
        check_mode(self.topic, mode, mode)  # an unknown mode: refused before it makes a topic
        tmp = os.path.join(self.directory, f".building-{secrets.token_hex(8)}")
        os.mkdir(tmp, 0o700)
        try:
            _write(os.path.join(tmp, "mode"), json.dumps({"mode": mode, "producers": producers}))
            for sub in ("producers", "closed", "lost", "groups"):
                os.mkdir(os.path.join(tmp, sub), 0o700)
            if mode == WORK_GROUP:
                self._make_group(os.path.join(tmp, "groups", WORK_GROUP), self.lease)
            os.rename(tmp, self.path)
        except OSError:  # another process created it first
            shutil.rmtree(tmp, ignore_errors=True)
            if not os.path.isdir(self.path):
                raise

    @staticmethod
    def _make_group(path: str, lease: str) -> None:
        os.mkdir(path, 0o700)
        for sub in ("q", "pending", "consumers"):
            os.mkdir(os.path.join(path, sub), 0o700)
        _write(os.path.join(path, "lease"), lease)

    @contextlib.contextmanager
    def _locked(
        self, mode: Mode | None = None, producers: int | None = None, shared: bool = False
    ) -> Iterator[dict[str, Any]]:
        """The topic, locked; created first if ``mode`` is given. Yields its settings."""
        while True:
            if mode is not None and not os.path.isdir(self.path):
                self._create(mode, producers)
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
            except FileNotFoundError:
                if mode is None:
                    raise
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
                if os.fstat(fd).st_nlink == 0:  # removed while this process waited
                    if mode is None:
                        raise FileNotFoundError(self.path)
                    continue
                settings = json.loads(_read(os.path.join(self.path, "mode")) or "{}")
                if mode is not None:
                    check_mode(self.topic, mode, settings["mode"])
                yield settings
                return
            finally:
                os.close(fd)

    def _group(self, group: str, *parts: str) -> str:
        return os.path.join(self.path, "groups", group, *parts)

    def _ended(self, settings: dict[str, Any]) -> bool:
        """Whether every producer closed (or died), and as many as the first one expected."""
        done = len(_listdir(os.path.join(self.path, "closed")))
        done += len(_listdir(os.path.join(self.path, "lost")))
        expected = settings.get("producers") or 1
        return not _listdir(os.path.join(self.path, "producers")) and done >= expected

    def _end_if_ended(self, settings: dict[str, Any]) -> None:
        """Once the stream ended, say so in every group's queue (and remove it if finished)."""
        if self._ended(settings):
            for group in _listdir(os.path.join(self.path, "groups")):
                _write(self._group(group, "q", END), b"")
            self._remove_if_finished(settings)

    def _remove_if_finished(self, settings: dict[str, Any]) -> None:
        """Remove the topic once it ended (or nobody ever produced to it), its queues are
        drained and nobody consumes; a broadcast group whose consumer died goes first."""
        never_produced = not any(
            _listdir(os.path.join(self.path, sub)) for sub in ("producers", "closed", "lost")
        )
        if not (never_produced or self._ended(settings)):
            return
        for group in _listdir(os.path.join(self.path, "groups")):
            if group != WORK_GROUP:
                if self._group_alive(group):
                    return  # a broadcast consumer is still subscribed
                self._remove_group(group)
                continue
            queued = [m for m in _listdir(self._group(group, "q")) if m != END]
            if queued or _listdir(self._group(group, "consumers")):
                return
        shutil.rmtree(self.path, ignore_errors=True)

    # -- producers -----------------------------------------------------------------------

    def add_producer(self, mode: Mode, producers: int | None) -> str:
        with self._locked(mode, producers) as settings:
            if self._ended(settings):
                raise stream_ended(self.topic)
            if producers is not None and producers > (settings.get("producers") or 0):
                settings["producers"] = producers  # the topic was made by a consumer
                _write(os.path.join(self.path, "mode"), json.dumps(settings))
            name = secrets.token_hex(6)
            _write(os.path.join(self.path, "producers", name), self.table.lease())
            return name

    def remove_producer(self, producer: str) -> None:
        with self._locked() as settings:
            os.rename(
                os.path.join(self.path, "producers", producer),
                os.path.join(self.path, "closed", producer),
            )
            self._end_if_ended(settings)

    def publish(
        self, name: str, nbytes: int, payloads_for: Callable[[dict[str, str]], dict[str, bytes]]
    ) -> None:
        self._remove_dead_groups()
        message = f"{name}.{nbytes}"
        with self._locked(shared=True):
            leases = {
                group: lease
                for group in _listdir(os.path.join(self.path, "groups"))
                if (lease := _read(self._group(group, "lease"))) is not None
            }
            for group, payload in payloads_for(leases).items():
                # Written beside the queue and renamed in: a consumer never sees half of it.
                _write(self._group(group, "q", message), payload, self._group(group, message))

    def _remove_dead_groups(self) -> None:
        """Remove broadcast groups whose consumer died, discarding what they held."""
        groups = _listdir(os.path.join(self.path, "groups"))
        dead = [group for group in groups if group != WORK_GROUP and not self._group_alive(group)]
        if dead:
            with self._locked():
                for group in dead:
                    self._remove_group(group)

    def _group_alive(self, group: str) -> bool:
        """Whether the lease the group's items live by is alive (for broadcast: its consumer)."""
        lease = _read(self._group(group, "lease"))
        return lease is None or self.table.lease_alive(lease)  # None: removed meanwhile

    def _remove_group(self, group: str) -> None:
        for sub in ("q", "pending"):
            for message in _listdir(self._group(group, sub)):
                if message != END and (payload := _read_bytes(self._group(group, sub, message))):
                    self._discard(payload)
        shutil.rmtree(self._group(group), ignore_errors=True)

    def unconsumed(self) -> tuple[int, int]:
        count, nbytes = 0, 0
        for group in _listdir(os.path.join(self.path, "groups")):
            messages = [m for m in _listdir(self._group(group, "q")) if m != END]
            messages += _listdir(self._group(group, "pending"))
            count = max(count, len(messages))
            nbytes = max(nbytes, sum(_nbytes(m) for m in messages))
        return count, nbytes

    # -- consumers -----------------------------------------------------------------------

    def join(self, mode: Mode) -> Membership:
        consumer = secrets.token_hex(6)
        with self._locked(mode) as settings:
            group = WORK_GROUP if mode == WORK_GROUP else consumer
            if group != WORK_GROUP:
                self._make_group(self._group(group), self.table.lease())
                if self._ended(settings):
                    _write(self._group(group, "q", END), b"")
            _write(self._group(group, "consumers", consumer), self.table.lease())
        member = Membership(group, consumer)
        self._watches[member] = _Inotify(self._group(group, "q"))
        return member

    def take(self, member: Membership, timeout: float) -> tuple[str, bytes] | None:
        queue, pending = self._group(member.group, "q"), self._group(member.group, "pending")
        for attempt in range(2):
            names = sorted(_listdir(queue))
            for name in names:
                if name == END:
                    continue
                taken = os.path.join(pending, f"{member.consumer}~{name}")
                try:
                    os.rename(os.path.join(queue, name), taken)
                except FileNotFoundError:
                    continue  # another consumer of the group took it
                payload = _read_bytes(taken)
                assert payload is not None
                return taken, payload
            if END in names and any(
                not taken.startswith(f"{member.consumer}~") for taken in _listdir(pending)
            ):
                # Another consumer's items may yet come back (if it died, see recover):
                # the group's stream ends once all of them are acked.
                self._watches[member].wait(timeout)
                return None
            if END in names:
                lost = _listdir(os.path.join(self.path, "lost"))
                if lost:
                    raise producer_lost(self.topic, lost[0])
                raise StopIteration
            if attempt == 0:
                self._watches[member].wait(timeout)
        return None

    def ack(self, member: Membership, handle: str) -> bool:
        try:
            os.unlink(handle)
        except FileNotFoundError:
            return False
        return True

    def recover(self, member: Membership) -> None:
        consumers = self._group(member.group, "consumers")
        for consumer in _listdir(consumers):
            lease = _read(os.path.join(consumers, consumer))
            if lease is not None and not self.table.lease_alive(lease):
                self._requeue(member.group, consumer)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(consumers, consumer))
        producers = os.path.join(self.path, "producers")
        dead = [
            producer
            for producer in _listdir(producers)
            if (lease := _read(os.path.join(producers, producer))) is not None
            and not self.table.lease_alive(lease)
        ]
        if dead:  # counted as closed, so the stream ends, with an error, once they all are
            with self._locked() as settings:
                for producer in dead:
                    with contextlib.suppress(FileNotFoundError):
                        os.rename(
                            os.path.join(producers, producer),
                            os.path.join(self.path, "lost", producer),
                        )
                self._end_if_ended(settings)

    def _requeue(self, group: str, consumer: str) -> None:
        pending = self._group(group, "pending")
        for taken in _listdir(pending):
            owner, _, name = taken.partition("~")
            if owner == consumer:
                with contextlib.suppress(FileNotFoundError):
                    os.rename(os.path.join(pending, taken), self._group(group, "q", name))

    def leave(self, member: Membership) -> None:
        self._watches.pop(member).close()
        try:
            with self._locked() as settings:
                if member.group == WORK_GROUP:
                    self._requeue(member.group, member.consumer)
                    os.unlink(self._group(member.group, "consumers", member.consumer))
                else:
                    self._remove_group(member.group)
                self._remove_if_finished(settings)
        except FileNotFoundError:
            pass  # the topic is gone already

    def delete(self) -> None:
        try:
            with self._locked():
                for group in _listdir(os.path.join(self.path, "groups")):
                    self._remove_group(group)
                shutil.rmtree(self.path, ignore_errors=True)
        except FileNotFoundError:
            pass  # no such topic


def _read_bytes(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
