"""Arrays allocated in the store: a producer fills its value in place and publishes it uncopied.

A put copies an object into the store, into pages it has to allocate or reuse, and the
producer had filled pages of its own just before. An allocation skips both the copy and the
producer's own pages: :func:`allocate` maps a new segment of a shared-memory store that is no
key yet, writes into it what a put of an array of that shape and dtype would write before the
array's bytes (the payload header and the pickle stream, see :mod:`proxy_patterns.serialize`),
and returns a numpy array on the bytes that follow. The producer writes its value there.
Publishing links the segment's file under a key, as a put does after its copy: readers map it
exactly like a put's segment, and its bytes are those a put of the filled array writes.

The pages are mapped when the array is allocated: a producer that allocates its output before
computing it writes at memory speed when its value is due, and publishing is a link, so its
consumers wake up about as soon as the value is written. In total, an allocation takes a
spare's pages when one fits (see :mod:`proxy_patterns.shm`), as a repeated workload's puts do,
and then allocating, filling and publishing costs less than building the array and putting it
(10 MB here: 2.0 ms against 2.3 ms). Fresh ``/dev/shm`` pages cost more mapped than written by
a put (7.5 ms against 4.4 ms for 10 MB): the kernel clears each 4 KiB page as it maps it, while
a put's whole-page writes skip that.

What is published, and how (``ProxyFuture.set_result``, :func:`proxy_patterns.proxy.proxy`
and :func:`proxy_patterns.store.put` follow these rules):

* An allocation is published, without a copy, when the array itself is (or a view of it with
  its address, shape and dtype). Anything else is copied into the store as any object is: an
  ordinary array, part of an allocation (a slice, a reshaped or retyped view), a container
  holding one, an allocation of another store, and an allocation already published (it is an
  ordinary array by then: publishing it again puts its current contents under a new key).
* Once published, the producer's array is a private copy-on-write view of the segment, like a
  resolved array: writing to it no longer changes the store.
* An allocation never published is removed when its array and every view of it are garbage
  collected, at interpreter exit, when the future it is a buffer of is evicted, and, if its
  process is killed, with the stale segments of that process
  (:func:`proxy_patterns.shm.remove_stale_segments`).
* Publishing raises :class:`AllocationError`, and publishes nothing, if the allocation was
  removed, or if the bytes before or after the array in the segment were overwritten (a write
  out of the array's bounds, which would corrupt what readers decode).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import mmap
import os
import sys
import threading
import weakref
from typing import TYPE_CHECKING, Any

from proxy_patterns.serialize import ALIGNMENT, dumps
from proxy_patterns.shm import SharedMemoryConnector, SharedMemoryKey

if TYPE_CHECKING:
    import numpy as np

_MAP_FIXED = 0x10
"""Linux's ``MAP_FIXED`` (which the ``mmap`` module does not export): replace the pages at an
address with a new mapping."""
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
)

_PENDING = "pending"
_REMOVED = "removed"


class AllocationError(ValueError):
    """A store allocation cannot be published (see the module docstring)."""


class Allocation(mmap.mmap):
    """The memory of an array from :func:`allocate`: its segment, mapped shared and writable.

    It is the ``base`` of that array (and so of every view of it): it lives as long as they do.
    Like every mapping of a segment it holds a shared ``flock`` on it, through the descriptor
    the ``mmap`` object keeps, so that once published and evicted the segment is not reused
    as a spare while the producer still maps it (see :mod:`proxy_patterns.shm`).
    """

    directory: str
    path: str
    """The segment's file while it is no key."""
    shape: tuple[int, ...]
    dtype: Any
    offset: int
    """Where the array's bytes start in the segment."""
    end: int
    """Where they end (padding follows, to the alignment)."""
    prefix: bytes
    """What precedes them: the payload header, the pickle stream, padding."""
    address: int
    """Where the segment is mapped in this process."""
    state: str
    """``pending``, ``removed``, or the name of the key it was published as."""
    _lock: threading.Lock
    _remove_file: weakref.finalize[Any, Any]

    def _describe(self) -> str:
        """``shape dtype``, how the user knows the allocation in messages."""
        return f"{self.shape} {self.dtype}"

    def publish(self, connector: SharedMemoryConnector, key: SharedMemoryKey) -> SharedMemoryKey:
        """Make the segment the object of ``key`` in ``connector`` (whose directory it is in);
        return the key with its size.

        Raises :class:`~proxy_patterns.shm.KeyExistsError` if ``key`` is set (the allocation
        stays unpublished), :class:`AllocationError` for the reasons the module docstring gives.
        """
        with self._lock:
            if self.state == _REMOVED:
                raise AllocationError(
                    f"the store allocation {self._describe()} was removed before it was "
                    "published (its future was evicted): nothing to publish"
                )
            if self.state != _PENDING:  # another thread published it meanwhile
                raise AllocationError(
                    f"the store allocation {self._describe()} is already published as "
                    f"{self.state!r}"
                )
            if not self._surroundings_intact():
                raise AllocationError(
                    f"the bytes around the array of the store allocation {self._describe()} "
                    "were overwritten (a write out of the array's bounds): not published"
                )
            connector.publish(self.path, key.name)
            self.state = key.name
            self._remove_file.detach()
            try:
                self._map_private()
            finally:
                _unlink(self.path)
        return connector.make_key(key.name, len(self))

    def _surroundings_intact(self) -> bool:
        """Whether the bytes before and after the array are those written when allocating."""
        tail = len(self) - self.end
        return self[: self.offset] == self.prefix and self[self.end :] == bytes(tail)

    def remove(self) -> None:
        """Remove the segment unless it is published (the mapping stays valid)."""
        with self._lock:
            if self.state == _PENDING:
                self._remove_file()
                self.state = _REMOVED

    def _map_private(self) -> None:
        """Replace the shared mapping by a private copy-on-write one of the same file, at the
        same address: the producer's arrays stay valid, and its writes stay its own."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            address = _libc.mmap(
                self.address,
                len(self),
                mmap.PROT_READ | mmap.PROT_WRITE,
                mmap.MAP_PRIVATE | _MAP_FIXED,
                fd,
                0,
            )
        finally:
            os.close(fd)
        if address != self.address:
            err = ctypes.get_errno()
            raise OSError(err, f"cannot map {self.path} privately: {os.strerror(err)}")


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _remove_unpublished(path: str, pid: int) -> None:
    """Remove an allocation's file, unless in a forked child: the file is its parent's."""
    if os.getpid() == pid:
        _unlink(path)


def allocate(connector: SharedMemoryConnector, shape: Any, dtype: Any) -> np.ndarray:
    """A writable array whose memory is an unpublished segment of ``connector``; its contents
    are arbitrary, as :func:`numpy.empty`'s. See the module docstring for what follows.

    Raises TypeError for a dtype numpy pickles in band (objects, datetimes): its array has no
    bytes of its own in a payload to be written in place.
    """
    import numpy as np

    template = np.empty(shape, dtype)  # address space only: no page is touched
    frames = dumps(template)
    if len(frames.frames) != 2 or frames.frames[1].nbytes != template.nbytes:
        raise TypeError(
            f"arrays of dtype {template.dtype} are pickled with their elements in the pickle "
            "stream, not as one buffer: they cannot be allocated in the store (use "
            "numpy.empty; publishing it copies it)"
        )
    stream = frames.frames[0]
    prefix = frames.header + bytes(stream) + bytes(-stream.nbytes % ALIGNMENT)
    segment = connector.create_unpublished(frames.nbytes)
    try:
        fcntl.flock(segment.fd, fcntl.LOCK_SH)
        # Every page is mapped now, when the producer allocates, not as it writes: its writes
        # run at memory speed when its value is due (see the module docstring).
        memory = Allocation(segment.fd, frames.nbytes, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
    except BaseException:
        _unlink(segment.path)
        raise
    finally:
        os.close(segment.fd)
    memory._remove_file = weakref.finalize(memory, _remove_unpublished, segment.path, os.getpid())
    memory.directory = connector.directory
    memory.path = segment.path
    memory.shape = template.shape
    memory.dtype = template.dtype
    memory.offset = len(prefix)
    memory.end = len(prefix) + template.nbytes
    memory.prefix = prefix
    memory.state = _PENDING
    memory._lock = threading.Lock()
    memory[: memory.offset] = prefix
    memory[memory.end :] = bytes(frames.nbytes - memory.end)
    array = np.ndarray(template.shape, template.dtype, buffer=memory, offset=memory.offset)
    memory.address = array.__array_interface__["data"][0] - memory.offset
    return array


def unpublished_allocation(obj: Any, connector: SharedMemoryConnector) -> Allocation | None:
    """The allocation ``obj`` is, if publishing ``obj`` in ``connector`` publishes it without
    a copy; None if ``obj`` is to be copied (see the module docstring)."""
    numpy = sys.modules.get("numpy")
    if numpy is None or type(obj) is not numpy.ndarray:
        return None
    base = obj.base
    while isinstance(base, numpy.ndarray):
        base = base.base
    if (
        not isinstance(base, Allocation)
        or base.directory != connector.directory
        or base.state not in (_PENDING, _REMOVED)
    ):
        return None
    interface = obj.__array_interface__
    exact = (
        interface["data"][0] == base.address + base.offset
        and obj.shape == base.shape
        and obj.dtype == base.dtype
        and obj.flags.c_contiguous
    )
    return base if exact else None
