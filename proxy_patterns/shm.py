"""A ProxyStore connector that keeps objects in shared memory and resolves them without copying.

ProxyStore has no shared-memory connector; ``FileConnector`` on ``/dev/shm`` comes closest but
reads every object back with a copy. Here each object is one file in a tmpfs directory (a
*segment*). Readers map it copy-on-write (``MAP_PRIVATE``), so a resolved array is a view on
the very pages the writer filled, writable in the reader without touching the store's bytes.

Lifetimes follow from the kernel rather than from bookkeeping:

* evicting unlinks the file (or renames it to a spare, below); a mapping made before stays
  valid until the last view on it is garbage collected (the ``mmap`` object is kept alive by
  the memoryviews that export it);
* a process removes the segments it created on ``close()`` and at interpreter exit;
* segment names carry the creator's process tag (pid and start time, see
  :mod:`proxy_patterns.liveness`), so the segments of a killed process are recognised as
  stale and removed by :func:`remove_stale_segments` (run by ``proxy-patterns clean`` and
  whenever a connector starts).

Writes go to a temporary name and are linked into place, so a segment is never seen half
written and a failed put (for example ``/dev/shm`` full) leaves nothing behind. A producer may
also fill such a temporary segment itself, through a mapping, before it is linked
(:meth:`SharedMemoryConnector.create_unpublished`, :mod:`proxy_patterns.allocation`).

Filling fresh tmpfs pages costs far more than copying into pages that exist (on ``/dev/shm``,
with 4 KiB pages, about 0.5 ms per MB against 0.2 ms), so evicting a large segment renames
it to a *spare*, whose pages a later put of about its size rewrites once no process maps
them any more (:class:`_Spares`). Whether anyone maps a segment is known from the kernel,
not bookkeeping: every mapping holds a shared ``flock`` on its segment, through the file
descriptor the ``mmap`` object keeps (a forked child inherits it), and a put reuses a spare
only after winning an exclusive lock on it.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import functools
import mmap
import os
import secrets
import shutil
import stat
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

from proxystore.serialize import BytesLike

from proxy_patterns.hosts import StoreUnreachableError, host_identity, unreachable_message
from proxy_patterns.liveness import process_tag, tag_alive
from proxy_patterns.serialize import Frames

DEFAULT_DIRECTORY = f"/dev/shm/proxy-patterns.user-{os.geteuid()}"
"""This user's own directory in ``/dev/shm`` (``0700``, see :func:`private_directory`): other
local users can neither list the names of our segments nor plant entries among them. (Its name
is no segment's nor spare's, so a sweep of ``/dev/shm`` itself never takes it for one.)"""
SEGMENT_PREFIX = "proxy-patterns-"
_TMP_SUFFIX = ".tmp"
SPARE_PREFIX = "proxy-patterns.spare-"
"""Spare segments (``proxy-patterns.spare-<pid>-<start>-<nbytes>-<token>``) are no keys."""
SPARE_MIN_BYTES = 2**20
"""Smaller segments are not kept as spares: their pages cost little to allocate."""
SPARE_IDLE_SECONDS = 10.0
"""A spare not reused within this time is removed."""


class StoreCapacityError(MemoryError):
    """The shared-memory directory has no room for an object."""


class UntrustedSegmentError(PermissionError):
    """A segment is not this user's own, or others may write it: reading it would unpickle
    bytes someone else may have planted, which is running their code."""


class UntrustedDirectoryError(PermissionError):
    """The default store directory exists but is not this user's alone."""


class KeyExistsError(KeyError):
    """A write-once key was written twice."""


class UnpublishedSegment(NamedTuple):
    """A segment that is no key yet (see :meth:`SharedMemoryConnector.create_unpublished`)."""

    path: str
    fd: int
    """Open for reading and writing; the caller closes it."""


class SharedMemoryKey(NamedTuple):
    """Key of one segment: its file name inside the connector's directory and its size, and
    where it is."""

    name: str
    nbytes: int
    host: str = ""
    """The :func:`~proxy_patterns.hosts.host_identity` of the host whose shared memory holds
    the segment: a read on another host fails at once instead of finding nothing (or another
    object of that name). Empty: not checked."""
    address: str = ""
    """A peer server on that host that sends the segment to other hosts (topology stores,
    :mod:`proxy_patterns.topology`); empty for a store of one host."""


class _CreatedSegments:
    """Paths of the segments this process created, removed at interpreter exit."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._paths: set[str] = set()
        atexit.register(self.remove_all)
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        """A forked child created none of these segments, and its copy of the lock may have
        been taken by a thread of the parent, which the child does not have: its first put
        would wait for ever (a process pool's worker forked while a watcher thread evicted)."""
        self._lock = threading.Lock()
        self._paths = set()
        for connector in list(_connectors):
            connector._after_fork()

    def add(self, path: str) -> None:
        with self._lock:
            self._paths.add(path)

    def discard(self, path: str) -> None:
        with self._lock:
            self._paths.discard(path)

    def remove(self, paths: Iterable[str]) -> None:
        for path in paths:
            _unlink(path)
            self.discard(path)

    def remove_all(self) -> None:
        with self._lock:
            paths, self._paths = self._paths, set()
        for path in paths:
            _unlink(path)


_created = _CreatedSegments()
_connectors: weakref.WeakSet[SharedMemoryConnector] = weakref.WeakSet()
"""Every connector of this process, whose locks a forked child renews."""
_swept_directories: set[str] = set()


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


REFS_SUFFIX = ".refs"
"""A segment's reference record is the directory ``<segment>.refs`` beside it."""


def holder_tag(holder: str) -> str:
    """The :func:`process_tag` in a reference holder's name (``kind.tag.token``)."""
    return holder.split(".")[1] if holder.count(".") == 2 else ""


TOPIC_SUFFIX = ".topic"
"""A stream's topic is the directory ``proxy-patterns-<lease>.topic``: see
:mod:`proxy_patterns.brokers`."""
STREAM_LEASE_PREFIX = "stream-"
"""A holder leased by a stream (``stream-<id>``) lives as long as the stream's topic does."""


PEER_LEASE_PREFIX = "peer-"
"""A holder leased by a process on another host (``peer-<id>``) lives while that process
renews the lease's file (``proxy-patterns.lease-peer-<id>``) through this host's peer server
(see :mod:`proxy_patterns.topology`): another host's processes are not in this one's table."""
PEER_LEASE_SECONDS = 15.0
"""A peer lease not renewed for this long has ended (its process renews it every third)."""
_LEASE_FILE_PREFIX = "proxy-patterns.lease-"


def peer_lease_path(directory: str, tag: str) -> str:
    """The file whose modification time says when the peer lease ``tag`` was last renewed."""
    return os.path.join(directory, _LEASE_FILE_PREFIX + tag)


def _peer_lease_alive(path: str) -> bool:
    try:
        return time.time() - os.stat(path).st_mtime < PEER_LEASE_SECONDS
    except FileNotFoundError:
        return False


def lease_alive(directory: str, tag: str) -> bool:
    """Whether the lease ``tag`` of a holder of an object in the store ``directory`` is alive.

    A process tag is alive while its process runs (:func:`tag_alive`); a stream's lease while
    the stream's topic exists: an item waiting in a queue is held by the queue, not by the
    process that sent it; a peer lease while its process on another host renews it.
    """
    if tag.startswith(STREAM_LEASE_PREFIX):
        return os.path.isdir(os.path.join(directory, f"{SEGMENT_PREFIX}{tag}{TOPIC_SUFFIX}"))
    if tag.startswith(PEER_LEASE_PREFIX):
        return _peer_lease_alive(peer_lease_path(directory, tag))
    return tag_alive(tag)


def is_segment(name: str) -> bool:
    """Whether the entry ``name`` of a store directory is a segment, that is an object.

    Every other entry has a ``.`` in its name, which segment names never hold (process tags
    hold none): temporary files (``.tmp``), reference records (``.refs``), proxy futures'
    claims (``.claim``, :mod:`proxy_patterns.rendezvous`), streams' topics (``.topic``) and spares
    (``proxy-patterns.``).
    """
    return name.startswith(SEGMENT_PREFIX) and "." not in name


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def remove_stale_segments(directory: str = DEFAULT_DIRECTORY) -> list[str]:
    """Remove segments whose creating process no longer exists; return their names.

    A segment with a reference record (a ``.refs`` directory, see
    :mod:`proxy_patterns.ownership`) lives as long as a process named in its record does,
    whoever created it; it is removed with its record once none does. Spare segments (see
    :class:`_Spares`) of processes that no longer exist are removed too; they are no keys and
    are not reported. Other users' entries are left alone.
    """
    alive = functools.cache(functools.partial(lease_alive, directory))  # many share a maker
    removed = []
    names = set(os.listdir(directory))
    for name in names:
        if not _ours(os.path.join(directory, name)):
            continue
        if name.startswith(SPARE_PREFIX):
            if not alive(_spare_maker_and_size(name)[0]):
                _unlink(os.path.join(directory, name))
            continue
        if name.startswith(_LEASE_FILE_PREFIX):
            if not _peer_lease_alive(os.path.join(directory, name)):
                _unlink(os.path.join(directory, name))
            continue
        if not name.startswith(SEGMENT_PREFIX) or name.endswith(TOPIC_SUFFIX):
            continue  # (a stream's topic lives until it is drained, whoever is gone)
        if name.endswith(REFS_SUFFIX):  # a record whose segment is gone (or not yet written)
            if name.removesuffix(REFS_SUFFIX) not in names and not any(
                alive(holder_tag(h)) for h in _listdir(os.path.join(directory, name))
            ):
                shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
            continue
        refs = os.path.join(directory, name + REFS_SUFFIX)
        if name + REFS_SUFFIX in names:
            live = any(alive(holder_tag(h)) for h in _listdir(refs))
        else:
            pid, _, rest = name[len(SEGMENT_PREFIX) :].partition("-")
            live = alive(f"{pid}-{rest.partition('-')[0]}")
        if live:
            continue
        path = os.path.join(directory, name)
        if os.path.isdir(path):  # a record being built when its process died
            shutil.rmtree(path, ignore_errors=True)
        else:
            _unlink(path)
        shutil.rmtree(refs, ignore_errors=True)
        removed.append(name)
    return removed


def private_directory(path: str) -> str:
    """``path``, a directory that only this user may enter: created ``0700`` if missing, and
    refused if it exists as anything else (another user's, or a link, or open to others), since
    whoever can write there can plant what this user will unpickle."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise UntrustedDirectoryError(
            f"refusing to keep objects in {path}: it should be a directory of uid "
            f"{os.geteuid()} with mode 700, and is owned by uid {st.st_uid} with mode "
            f"{stat.filemode(st.st_mode)}; remove it, or name another directory (shm:///path)"
        )
    return path


@contextlib.contextmanager
def _locked_directory(directory: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``directory`` (against other processes and threads)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _ours(path: str) -> bool:
    """Whether this user owns the entry at ``path``: in a directory shared with other users
    (the sticky ``/dev/shm``), their files are neither removed nor reused, whatever they are
    named."""
    try:
        return os.lstat(path).st_uid == os.geteuid()
    except FileNotFoundError:
        return False


def _check_trusted(path: str, st: os.stat_result) -> None:
    """Refuse a segment that another user owns, or that group or others may write: segment
    names are listed in the world-readable ``/dev/shm``, so another local user could create one
    first (a proxy future's, before its value is set) with a crafted pickle."""
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise UntrustedSegmentError(
            f"refusing to read {path}: it belongs to uid {st.st_uid} with mode "
            f"{st.st_mode & 0o777:o}, not to this user (uid {os.geteuid()}) alone; another "
            "user may have planted it"
        )


def huge_page_directories() -> list[str]:
    """Mounted tmpfs directories that back files with huge pages (``huge=always``/``within_size``).

    Filling a new segment costs one page allocation per page; with 2 MiB pages instead of
    4 KiB ones a put runs at memcpy speed. ``/dev/shm`` rarely has them (the kernel's
    ``shmem_enabled`` default is ``never``), but a tmpfs mounted with ``-o huge=always`` does.
    """
    found = []
    with open("/proc/mounts") as mounts:
        for line in mounts:
            _, directory, fstype, options, *_ = line.split()
            huge = {"huge=always", "huge=within_size"} & set(options.split(","))
            if fstype == "tmpfs" and huge and os.access(directory, os.W_OK):
                found.append(directory)
    return found


def _free_bytes(directory: str) -> int:
    stat = os.statvfs(directory)
    return stat.f_bavail * stat.f_frsize


def _total_bytes(directory: str) -> int:
    stat = os.statvfs(directory)
    return stat.f_blocks * stat.f_frsize


class _Spare(NamedTuple):
    path: str
    nbytes: int


def _spare_maker_and_size(name: str) -> tuple[str, int]:
    """The :func:`process_tag` of the process that made a spare, and its size, from its name."""
    pid, start, nbytes, _ = name[len(SPARE_PREFIX) :].split("-")
    return f"{pid}-{start}", int(nbytes)


class _Spares:
    """Evicted segments of one directory kept for reuse, shared by every process using it.

    Any process may claim a spare that nobody maps any more (see the module docstring) by
    renaming it. This process removes the spares it made once they have been idle for
    :data:`SPARE_IDLE_SECONDS`, and all of them when it exits; the spares of a process that
    exited without doing so (killed, or a forked child leaving by ``os._exit``) are removed by
    whichever process lists the spares next.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._lock = threading.Condition()
        self._made: deque[tuple[float, str]] = deque()  # (deadline, path), oldest first
        self._reaper: threading.Thread | None = None
        atexit.register(self.remove_made)
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        """A forked child owns none of its parent's spares, and has no reaper thread."""
        self._lock = threading.Condition()
        self._made = deque()
        self._reaper = None

    def _list(self) -> list[_Spare]:
        """The spares in the directory, once those of processes that are gone are removed."""
        spares = []
        alive: dict[str, bool] = {process_tag(): True}
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if not entry.name.startswith(SPARE_PREFIX) or not _ours(entry.path):
                    continue  # another user's spare: theirs to reuse, and their file
                tag, nbytes = _spare_maker_and_size(entry.name)
                if tag not in alive:
                    alive[tag] = tag_alive(tag)
                if alive[tag]:
                    spares.append(_Spare(entry.path, nbytes))
                else:
                    _unlink(entry.path)
        return spares

    def offer(self, path: str, limit: int) -> None:
        """Take the segment at ``path`` out of the store, keeping it as a spare if there is room.

        A spare may still be mapped by readers of the object it held; :meth:`take` skips it
        until they are done.
        """
        try:
            nbytes = os.stat(path).st_size
        except FileNotFoundError:
            return
        if nbytes < SPARE_MIN_BYTES or sum(s.nbytes for s in self._list()) + nbytes > limit:
            _unlink(path)
            return
        spare = f"{SPARE_PREFIX}{process_tag()}-{nbytes}-{secrets.token_hex(8)}"
        try:
            os.rename(path, os.path.join(self.directory, spare))  # no new reader can map it
        except FileNotFoundError:
            return  # evicted by another process meanwhile
        self._keep(os.path.join(self.directory, spare))

    def take(self, nbytes: int, tmp: str) -> bool:
        """Move a spare of ``nbytes`` to ``2 * nbytes`` bytes that nobody maps to ``tmp``,
        truncated to ``nbytes``; False if there is none."""
        if nbytes < SPARE_MIN_BYTES:
            return False
        fitting = [s for s in self._list() if nbytes <= s.nbytes <= 2 * nbytes]
        for spare in sorted(fitting, key=lambda s: s.nbytes):
            try:
                fd = os.open(spare.path, os.O_RDONLY)
            except FileNotFoundError:
                continue  # claimed by another process
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while anyone maps it
                os.rename(spare.path, tmp)
            except (BlockingIOError, FileNotFoundError):
                continue
            finally:
                os.close(fd)
            if spare.nbytes != nbytes:
                os.truncate(tmp, nbytes)
            return True
        return False

    def remove_all(self) -> None:
        """Remove every process's spares (to make room for a put)."""
        for spare in self._list():
            _unlink(spare.path)

    def remove_made(self) -> None:
        """Remove the spares this process made that nobody has claimed."""
        with self._lock:
            made, self._made = self._made, deque()
        for _, path in made:
            _unlink(path)

    def _keep(self, path: str) -> None:
        with self._lock:
            self._made.append((time.monotonic() + SPARE_IDLE_SECONDS, path))
            if self._reaper is None:
                self._reaper = threading.Thread(
                    target=self._reap, name="proxy-patterns-spares", daemon=True
                )
                self._reaper.start()
            self._lock.notify()

    def _reap(self) -> None:
        while True:
            with self._lock:
                while not self._made:
                    self._lock.wait()
                deadline, path = self._made[0]
                if time.monotonic() < deadline:
                    self._lock.wait(deadline - time.monotonic())
                    continue
                self._made.popleft()
            _unlink(path)  # gone already if another put claimed it


_spares: dict[str, _Spares] = {}
_spares_lock = threading.Lock()


def _spares_of(directory: str) -> _Spares:
    with _spares_lock:
        if directory not in _spares:
            _spares[directory] = _Spares(directory)
        return _spares[directory]


class SharedMemoryConnector:
    """Connector storing each object in its own segment under ``directory`` (tmpfs).

    Works across the processes of one node with no server. Implements ProxyStore's
    ``Connector`` and ``DeferrableConnector`` protocols (keys are write-once), plus
    :meth:`put_frames` and :meth:`set_frames` for serializers that keep buffers apart.

    Args:
        directory: A tmpfs directory shared by every process that resolves the proxies.
        owner: :func:`process_tag` of the process that owns the segments this connector
            creates (default: this process). Segments of another owner are not removed when
            this process exits, only when they are evicted or when the owner is gone.
        spare_bytes: At most this many bytes of evicted segments are kept in ``directory``
            for reuse by later puts (default: an eighth of the file system; 0 keeps none).
            Spares are never counted as keys and never cause a :class:`StoreCapacityError`.
    """

    serves_other_hosts = False
    """Whether processes on other hosts can read its objects (a topology store's can)."""

    def __init__(
        self,
        directory: str = DEFAULT_DIRECTORY,
        owner: str | None = None,
        spare_bytes: int | None = None,
    ) -> None:
        if directory == DEFAULT_DIRECTORY:
            private_directory(directory)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"shared-memory directory {directory!r} does not exist")
        self.directory = directory
        self.owner = owner
        self.spare_bytes = _total_bytes(directory) // 8 if spare_bytes is None else spare_bytes
        self._spares = _spares_of(directory)
        self._lock = threading.Lock()
        self._created: set[str] = set()
        _connectors.add(self)
        if directory not in _swept_directories:
            _swept_directories.add(directory)
            remove_stale_segments(directory)

    def _after_fork(self) -> None:
        """In a forked child (see :meth:`_CreatedSegments._after_fork`)."""
        self._lock = threading.Lock()
        self._created = set()

    def __repr__(self) -> str:
        owner = f", owner={self.owner!r}" if self.owner else ""
        return f"{type(self).__name__}(directory={self.directory!r}{owner})"

    def _write(self, name: str, nbytes: int, chunks: Iterable[BytesLike]) -> SharedMemoryKey:
        """Write a segment under a temporary name, then publish it as ``name`` atomically."""
        tmp = f"{os.path.join(self.directory, name)}-{secrets.token_hex(4)}{_TMP_SUFFIX}"
        fd = self._create(tmp, nbytes, os.O_WRONLY)
        try:
            offset = 0
            for chunk in chunks:
                view = memoryview(chunk).cast("B")
                while view.nbytes:
                    written = os.pwrite(fd, view, offset)
                    view, offset = view[written:], offset + written
            self.publish(tmp, name)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise self._capacity_error(nbytes) from e
            raise
        finally:
            os.close(fd)
            _unlink(tmp)
        return self.make_key(name, nbytes)

    def _create(self, tmp: str, nbytes: int, mode: int) -> int:
        """Open a new file of ``nbytes`` at ``tmp`` (``mode``: ``os.O_WRONLY`` or ``os.O_RDWR``).

        Its pages are a spare's when one fits, else freshly allocated; StoreCapacityError if
        the directory has no room for them, and then nothing is left behind.
        """
        if self._spares.take(nbytes, tmp):
            return os.open(tmp, mode)
        try:
            return self._allocate(tmp, nbytes, mode)
        except StoreCapacityError:
            # Puts racing for the last free pages can each get part of them and all fail: one
            # at a time, the first gets the room, and the others learn how much is left.
            with _locked_directory(self.directory):
                return self._allocate(tmp, nbytes, mode)

    def _allocate(self, tmp: str, nbytes: int, mode: int) -> int:
        """Open a new file of ``nbytes`` fresh pages at ``tmp``, once there is room for them."""
        if nbytes > _free_bytes(self.directory):
            self._spares.remove_all()
            if nbytes > _free_bytes(self.directory):
                raise self._capacity_error(nbytes)
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | mode, 0o600)
        try:
            if nbytes:
                os.posix_fallocate(fd, 0, nbytes)
        except BaseException as e:
            os.close(fd)
            _unlink(tmp)
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                raise self._capacity_error(nbytes) from e
            raise
        return fd

    def create_unpublished(self, nbytes: int) -> UnpublishedSegment:
        """A new segment of ``nbytes`` that is no key yet, opened for reading and writing.

        For a writer that fills a segment in place (:mod:`proxy_patterns.allocation`) and then
        publishes it with :meth:`publish`, or unlinks the file. Its contents are arbitrary (the
        pages may be a spare's). Its name says it is this process's, so it is removed as stale
        if this process is killed; removing it otherwise is the caller's job.
        """
        path = os.path.join(
            self.directory,
            f"{SEGMENT_PREFIX}{process_tag()}-{secrets.token_hex(16)}{_TMP_SUFFIX}",
        )
        return UnpublishedSegment(path, self._create(path, nbytes, os.O_RDWR))

    def publish(self, tmp: str, name: str) -> None:
        """Make the file ``tmp`` the segment ``name``, in one step: readers never see it half
        written.

        Publishing links rather than renames, so it fails with KeyExistsError if ``name``
        exists: every key is written at most once, even by racing processes. The caller
        unlinks ``tmp``.
        """
        try:
            os.link(tmp, os.path.join(self.directory, name))
        except FileExistsError:
            raise KeyExistsError(f"key {name!r} is already set in {self.directory}") from None

    def _capacity_error(self, nbytes: int) -> StoreCapacityError:
        free = _free_bytes(self.directory)
        return StoreCapacityError(
            f"cannot put {nbytes} bytes in {self.directory}: only {free} bytes are free"
        )

    def new_key(self, obj: BytesLike | None = None) -> SharedMemoryKey:
        """A fresh key whose object is written later by :meth:`set` (in any process).

        The segment belongs to this process, whoever writes it: it is removed when this
        connector closes or this process exits, not when the writer does.
        """
        owner = self.owner or process_tag()
        name = f"{SEGMENT_PREFIX}{owner}-{secrets.token_hex(16)}"
        if owner == process_tag():
            path = os.path.join(self.directory, name)
            with self._lock:
                self._created.add(path)
            _created.add(path)
        return self.make_key(name, 0)

    def make_key(self, name: str, nbytes: int) -> SharedMemoryKey:
        """The key of this host's segment ``name`` of ``nbytes``."""
        return SharedMemoryKey(name, nbytes, host_identity())

    def set(self, key: SharedMemoryKey, obj: BytesLike) -> None:
        """Write the object of a key from :meth:`new_key`; raises KeyExistsError if set."""
        view = memoryview(obj)
        self._write(key.name, view.nbytes, [view])

    def set_frames(self, key: SharedMemoryKey, frames: Frames) -> None:
        """:meth:`set` for frames from :func:`proxy_patterns.serialize.dumps`."""
        self._write(key.name, frames.nbytes, frames.chunks())

    def path(self, key: SharedMemoryKey) -> str:
        """The segment's file."""
        return os.path.join(self.directory, key.name)

    def put(self, obj: BytesLike) -> SharedMemoryKey:
        """Store a serialized object in a new segment."""
        view = memoryview(obj)
        return self._write(self.new_key().name, view.nbytes, [view])

    def put_frames(self, frames: Frames) -> SharedMemoryKey:
        """Store frames from :func:`proxy_patterns.serialize.dumps` without joining them."""
        return self._write(self.new_key().name, frames.nbytes, frames.chunks())

    def put_batch(self, objs: Sequence[BytesLike]) -> list[SharedMemoryKey]:
        """Store several serialized objects."""
        return [self.put(obj) for obj in objs]

    def get(self, key: SharedMemoryKey) -> memoryview | None:
        """Map the segment copy-on-write; None if it was evicted or never existed.

        The mapping holds a shared lock on the segment for as long as it lives (the ``mmap``
        object keeps a duplicate of the descriptor), so the segment is not reused meanwhile.
        Raises :class:`~proxy_patterns.hosts.StoreUnreachableError` if the segment is another
        host's.
        """
        if key.host and key.host != host_identity():
            raise StoreUnreachableError(
                unreachable_message(f"object {key.name} of store shm://{self.directory}", key.host)
            )
        return self._map(key)

    def _map(self, key: SharedMemoryKey) -> memoryview | None:
        path = self.path(key)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            st = os.fstat(fd)
            if os.stat(path).st_ino != st.st_ino:
                return None
            _check_trusted(path, st)
            if st.st_size == 0:
                return memoryview(bytearray())
            return memoryview(mmap.mmap(fd, st.st_size, access=mmap.ACCESS_COPY))
        except (BlockingIOError, FileNotFoundError):
            return None  # being evicted: an evictor holds the lock, or the name is gone
        finally:
            os.close(fd)

    def get_batch(self, keys: Sequence[SharedMemoryKey]) -> list[BytesLike | None]:
        """Map several segments."""
        return [self.get(key) for key in keys]

    def exists(self, key: SharedMemoryKey) -> bool:
        """Whether the segment is still in the store."""
        return os.path.exists(self.path(key))

    def evict(self, key: SharedMemoryKey) -> None:
        """Remove the segment; existing views on it stay valid until they are dropped.

        A large segment is kept as a spare: a later put rewrites its pages once nobody maps it.
        """
        path = self.path(key)
        self._spares.offer(path, self.spare_bytes)
        with self._lock:
            self._created.discard(path)
        _created.discard(path)

    def detach(self, key: SharedMemoryKey) -> None:
        """Stop removing ``key``'s segment at close and exit: its lifetime is decided elsewhere
        (by its reference record, :mod:`proxy_patterns.ownership`)."""
        path = self.path(key)
        with self._lock:
            self._created.discard(path)
        _created.discard(path)

    def close(self) -> None:
        """Remove every segment this connector created and that is still in the store."""
        with self._lock:
            paths, self._created = self._created, set()
        _created.remove(paths)

    def config(self) -> dict[str, Any]:
        """Configuration that re-creates the connector in another process."""
        return {"directory": self.directory, "owner": self.owner, "spare_bytes": self.spare_bytes}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SharedMemoryConnector:
        """Re-create a connector from :meth:`config`."""
        return cls(**config)
