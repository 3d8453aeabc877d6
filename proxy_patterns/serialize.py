"""Pickle protocol 5 with out-of-band buffers, laid out so a reader can map instead of copy.

ProxyStore's default serializer pickles in band: a 100 MB array is copied into the pickle
stream on put and copied out again on resolve. Here the pickle stream only describes the
object; the large buffers (numpy arrays, pandas blocks, big ``bytes``) travel as separate
frames, 64-byte aligned in one payload::

    b"PPF1" | n: u32 | n x length: u64 | padding | frame 0 (pickle) | padding | frame 1 | ...

A writer can hand the frames to the kernel one by one (``os.pwritev``), never joining them;
a reader given a memoryview of the payload gets back objects that are views on it.
"""

from __future__ import annotations

import io
import pickle
import struct
from collections.abc import Iterator
from typing import Any

from proxystore.serialize import BytesLike

MAGIC = b"PPF1"
ALIGNMENT = 64
# `bytes` cannot be pickled out of band on its own; above this size it is sent as a buffer.
_BYTES_OUT_OF_BAND = 64 * 1024
_COUNT = struct.Struct("<4sI")
_LENGTH = struct.Struct("<Q")


def _padding(offset: int) -> int:
    return -offset % ALIGNMENT


class _Pickler(pickle.Pickler):
    """Pickler that also sends large ``bytes`` out of band (numpy does this itself)."""

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is bytes and len(obj) > _BYTES_OUT_OF_BAND:
            return bytes, (pickle.PickleBuffer(obj),)
        return NotImplemented


class Frames:
    """A serialized object as a header plus frames, not yet joined into one buffer."""

    def __init__(self, frames: list[memoryview]) -> None:
        self.frames = frames
        header = _COUNT.pack(MAGIC, len(frames)) + b"".join(_LENGTH.pack(f.nbytes) for f in frames)
        self.header = header + bytes(_padding(len(header)))
        self.nbytes = len(self.header) + sum(f.nbytes + _padding(f.nbytes) for f in frames)

    def chunks(self) -> Iterator[memoryview | bytes]:
        """The payload in order, padding included: what a scatter-gather write takes."""
        yield self.header
        for frame in self.frames:
            yield frame
            pad = _padding(frame.nbytes)
            if pad:
                yield bytes(pad)

    def digest(self) -> str:
        """Hash of the payload (xxh3-128): equal for objects that serialize to equal bytes.

        A content token for deduplication that costs a third of ``dask.base.tokenize`` on
        large arrays (which hashes with xxh64), and covers every picklable object.
        """
        import xxhash

        h = xxhash.xxh3_128()
        for chunk in self.chunks():
            h.update(chunk)
        return h.hexdigest()

    def join(self) -> bytearray:
        """The payload as one buffer, for connectors that need contiguous bytes."""
        out = bytearray(self.nbytes)
        offset = 0
        for chunk in self.chunks():
            n = len(chunk) if isinstance(chunk, bytes) else chunk.nbytes
            out[offset : offset + n] = chunk
            offset += n
        return out


def dumps(obj: Any) -> Frames:
    """Serialize ``obj`` into frames without copying its large buffers."""
    buffers: list[pickle.PickleBuffer] = []
    stream = io.BytesIO()
    _Pickler(stream, protocol=5, buffer_callback=buffers.append).dump(obj)
    frames = [stream.getbuffer()]
    frames.extend(b.raw() for b in buffers)
    return Frames(frames)


def serialize(obj: Any) -> BytesLike:
    """ProxyStore-compatible serializer: the frame layout as one contiguous buffer (one copy)."""
    return memoryview(dumps(obj).join())


def deserialize(data: BytesLike) -> Any:
    """Rebuild an object from a payload; its buffers are views on ``data`` when it is writable.

    A writable payload (a copy-on-write mapping of a shared-memory segment) is used in place,
    so arrays come back zero-copy and writable without touching the store's bytes. A read-only
    payload (``bytes`` from Redis or a file) has its buffers copied once, so resolved objects
    are writable whatever the connector.
    """
    view = memoryview(data).cast("B")
    magic, count = _COUNT.unpack_from(view, 0)
    if magic != MAGIC:
        raise ValueError(
            f"not a proxy-patterns payload (starts with {bytes(view[:4])!r}, expected {MAGIC!r})"
        )
    lengths = [_LENGTH.unpack_from(view, _COUNT.size + i * _LENGTH.size)[0] for i in range(count)]
    offset = _COUNT.size + count * _LENGTH.size
    offset += _padding(offset)
    frames: list[memoryview] = []
    for length in lengths:
        frames.append(view[offset : offset + length])
        offset += length + _padding(length)
    buffers = [memoryview(bytearray(f)) for f in frames[1:]] if view.readonly else frames[1:]
    return pickle.loads(frames[0], buffers=buffers)
