"""Pickle protocol 5 with out-of-band buffers, laid out so a reader can map instead of copy.

ProxyStore's default serializer pickles in band: a 100 MB array is copied into the pickle
stream on put and copied out again on resolve. Here the pickle stream only describes the
object; the large buffers (numpy arrays, pandas and Arrow buffers, ``memoryview``s, and a
``bytes`` object serialized on its own) travel as separate frames, 64-byte aligned in one
payload::

    b"PPF1" | n: u32 | n x length: u64 | padding | frame 0 (pickle) | padding | frame 1 | ...

A writer can hand the frames to the kernel one by one (``os.pwritev``), never joining them;
a reader given a memoryview of the payload gets back objects that are views on it.

Unpickling runs code: whoever can write a store can run code in every process that reads it.
With a key in ``$PROXY_PATTERNS_HMAC_KEY`` payloads are *signed*: the header is ``b"PPS1"``
and carries an HMAC-SHA256 of the lengths and frames, and a reader with the key refuses any
payload whose HMAC does not match, or that is not signed, before unpickling it
(:class:`PayloadSignatureError`). Signing reads every byte once more on write and on read.
"""

from __future__ import annotations

import copyreg
import functools
import hashlib
import hmac
import io
import os
import pickle
import struct
import types
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from proxystore.serialize import BytesLike

MAGIC = b"PPF1"
SIGNED_MAGIC = b"PPS1"
"""A signed payload: its HMAC follows the frame lengths in the header."""
HMAC_KEY_ENV = "PROXY_PATTERNS_HMAC_KEY"
"""The environment variable that holds the signing key (every process that shares a store
must have the same one)."""
_MAC_BYTES = 32
ALIGNMENT = 64
_COUNT = struct.Struct("<4sI")
_LENGTH = struct.Struct("<Q")


def _padding(offset: int) -> int:
    return -offset % ALIGNMENT


class PayloadSignatureError(ValueError):
    """A payload failed its HMAC check, or its signing does not match this process's key;
    refused before anything in it was unpickled."""


def signing_key() -> bytes | None:
    """This process's signing key, ``$PROXY_PATTERNS_HMAC_KEY``; None when unset."""
    key = os.environ.get(HMAC_KEY_ENV)
    return key.encode() if key else None


def _mac(key: bytes, counts: bytes, frames: Iterator[memoryview]) -> bytes:
    """HMAC-SHA256 of the header's counts and lengths and the frames (padding excluded)."""
    mac = hmac.new(key, counts, hashlib.sha256)
    for frame in frames:
        mac.update(frame)
    return mac.digest()


def _memoryview_of(buffer: Any, format: Any, shape: tuple[int, ...]) -> memoryview:
    return memoryview(buffer).cast("B").cast(format, shape)


def _reduce_memoryview(view: memoryview) -> Any:
    """A ``memoryview`` (which pickle refuses) as an out-of-band buffer; it comes back as a
    view of the same format and shape, on the store's bytes."""
    contiguous = view if view.c_contiguous else memoryview(view.tobytes())
    return _memoryview_of, (pickle.PickleBuffer(contiguous), view.format, view.shape)


class _BytesBuffer:
    """A ``bytes`` object serialized on its own: pickle copies ``bytes`` into its stream (no
    hook reaches them), so a top-level one is sent as an out-of-band buffer instead."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce__(self) -> Any:
        return bytes, (pickle.PickleBuffer(self.data),)


class PickleRefused(Exception):
    """A serialization met an object its caller asked to be told about (see :func:`dumps`)."""

    def __init__(self, obj: object) -> None:
        super().__init__(f"met a {type(obj).__name__}")
        self.obj = obj


class _ByValue(Exception):
    """The object refers to ``__main__``, which other processes cannot import."""


_Reducer = Callable[[Any], "str | tuple[Any, ...]"]
_DISPATCH_TABLE: Mapping[type, _Reducer] = {
    **copyreg.dispatch_table,
    memoryview: _reduce_memoryview,
}
_FUNCTION_TYPES = (types.FunctionType, types.BuiltinFunctionType)


class _Options:
    """What both picklers add: protocol 5 with out-of-band buffers, ``memoryview``s out of
    band, and a stop at objects of the types ``refuse`` names (see :func:`dumps`)."""

    dispatch_table: Mapping[type, _Reducer]

    def __init__(
        self,
        file: io.BytesIO,
        buffer_callback: Callable[[pickle.PickleBuffer], None],
        refuse: Callable[[type], bool] | None,
    ) -> None:
        super().__init__(file, protocol=5, buffer_callback=buffer_callback)  # type: ignore[call-arg]
        self.dispatch_table = _DISPATCH_TABLE
        self.refuse = refuse

    def _check(self, cls: type, obj: Any) -> None:
        if self.refuse is not None and self.refuse(cls):
            raise PickleRefused(obj)


class _Pickler(_Options, pickle.Pickler):
    """The C pickler, also stopping at references to ``__main__`` (see :func:`dumps`).

    ``reducer_override`` runs for every object except the builtins pickle handles itself
    (``None``, ``bool``, ``int``, ``float``, ``bytes``, ``str``, ``list``, ``tuple``,
    ``dict``, ``set``, ``frozenset``): a list of plain records costs no Python call.
    """

    def reducer_override(self, obj: Any) -> Any:
        cls = type(obj)
        self._check(cls, obj)
        if (issubclass(cls, type) or cls in _FUNCTION_TYPES) and obj.__module__ == "__main__":
            raise _ByValue
        return NotImplemented


@functools.cache
def _cloud_pickler() -> Callable[..., pickle.Pickler]:
    """cloudpickle's pickler with :class:`_Options` (imported on first use: most objects
    never need it)."""
    import cloudpickle

    class CloudPickler(_Options, cloudpickle.Pickler):  # type: ignore[misc]
        def reducer_override(self, obj: Any) -> Any:
            self._check(type(obj), obj)
            return super().reducer_override(obj)

    return CloudPickler


class Frames:
    """A serialized object as a header plus frames, not yet joined into one buffer."""

    def __init__(self, frames: list[memoryview]) -> None:
        self.frames = frames

    @functools.cached_property
    def header(self) -> bytes:
        """The frame count and lengths (and, with a signing key, the HMAC), padded to the
        alignment."""
        frames = self.frames
        lengths = b"".join(_LENGTH.pack(f.nbytes) for f in frames)
        key = signing_key()
        if key is None:
            header = _COUNT.pack(MAGIC, len(frames)) + lengths
        else:
            counts = _COUNT.pack(SIGNED_MAGIC, len(frames)) + lengths
            header = counts + _mac(key, counts, iter(frames))
        return header + bytes(_padding(len(header)))

    @functools.cached_property
    def nbytes(self) -> int:
        """The size of the payload: the serialized size of the object."""
        return len(self.header) + sum(f.nbytes + _padding(f.nbytes) for f in self.frames)

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


class SizeExceeded(Exception):
    """A serialization was stopped: the object is larger than the limit it was given."""


class _LimitedStream(io.BytesIO):
    """A pickle stream that stops the pickler once it and the out-of-band buffers pass a size.

    Pickle hands a large ``bytes`` or ``str`` to ``write`` as it is, and large buffers to the
    buffer callback, so an oversized object is stopped before it is copied.
    """

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.left = limit

    def spend(self, nbytes: int) -> None:
        self.left -= nbytes
        if self.left < 0:
            raise SizeExceeded

    def write(self, data: Any) -> int:
        self.spend(memoryview(data).nbytes)
        return super().write(data)


def dumps(
    obj: Any, refuse: Callable[[type], bool] | None = None, limit: int | None = None
) -> Frames:
    """Serialize ``obj`` into frames without copying its large buffers.

    Like Dask's own pickling: the C pickler first, and cloudpickle where that fails or where
    the object refers to ``__main__`` (classes and functions of a script or notebook, which
    other processes cannot import), so that whatever Dask or Parsl could send, the store can
    take. With ``refuse``, raise :class:`PickleRefused` on meeting an object whose type it
    accepts (only types pickle hands to hooks can be refused: see :class:`_Pickler`). With
    ``limit``, raise :class:`SizeExceeded` as soon as the serialized size passes it, having
    done about ``limit`` bytes of work.
    """
    if type(obj) is bytes:
        obj = _BytesBuffer(obj)
    try:
        stream, buffers = _pickled(_Pickler, obj, refuse, limit)
    except (PickleRefused, SizeExceeded):
        raise
    except Exception:
        stream, buffers = _pickled(_cloud_pickler(), obj, refuse, limit)
    return Frames([stream.getbuffer(), *(b.raw() for b in buffers)])


def _pickled(
    pickler: Callable[..., pickle.Pickler],
    obj: Any,
    refuse: Callable[[type], bool] | None,
    limit: int | None,
) -> tuple[io.BytesIO, list[pickle.PickleBuffer]]:
    buffers: list[pickle.PickleBuffer] = []
    if limit is None:
        stream = io.BytesIO()
        pickler(stream, buffers.append, refuse).dump(obj)
        return stream, buffers
    limited = _LimitedStream(limit)

    def keep(buffer: pickle.PickleBuffer) -> None:
        limited.spend(buffer.raw().nbytes)
        buffers.append(buffer)

    pickler(limited, keep, refuse).dump(obj)
    return limited, buffers


def serialize(obj: Any) -> BytesLike:
    """ProxyStore-compatible serializer: the frame layout as one contiguous buffer (one copy)."""
    return memoryview(dumps(obj).join())


class Serialized:
    """An object already serialized (to measure it), travelling as its frames.

    Pickled, it is its payload; unpickled, it is the object again. A framework that must
    pickle a task anyway is handed this instead of the object, so the object is serialized
    once, not once to be measured and again to be sent.
    """

    __slots__ = ("frames",)

    def __init__(self, frames: Frames) -> None:
        self.frames = frames

    def __reduce__(self) -> Any:
        return _loads_payload, (b"".join(self.frames.chunks()),)


def _loads_payload(payload: bytes) -> Any:
    return deserialize(bytearray(payload))


def deserialize(data: BytesLike) -> Any:
    """Rebuild an object from a payload; its buffers are views on ``data`` when it is writable.

    A writable payload (a copy-on-write mapping of a shared-memory segment) is used in place,
    so arrays come back zero-copy and writable without touching the store's bytes. A read-only
    payload (``bytes`` from Redis or a file) has its buffers copied once, so resolved objects
    are writable whatever the connector.
    """
    view = memoryview(data).cast("B")
    magic, count = _COUNT.unpack_from(view, 0)
    if magic not in (MAGIC, SIGNED_MAGIC):
        raise ValueError(
            f"not a proxy-patterns payload (starts with {bytes(view[:4])!r}, expected {MAGIC!r})"
        )
    if _COUNT.size + count * _LENGTH.size > view.nbytes:
        raise ValueError(f"corrupted payload: {count} frames cannot fit in {view.nbytes} bytes")
    lengths = [_LENGTH.unpack_from(view, _COUNT.size + i * _LENGTH.size)[0] for i in range(count)]
    offset = _COUNT.size + count * _LENGTH.size
    counts = view[:offset]
    if magic == SIGNED_MAGIC:
        mac = bytes(view[offset : offset + _MAC_BYTES])
        offset += _MAC_BYTES
    offset += _padding(offset)
    frames: list[memoryview] = []
    for length in lengths:
        frames.append(view[offset : offset + length])
        offset += length + _padding(length)
    if offset - _padding(lengths[-1] if lengths else 0) > view.nbytes:
        raise ValueError(f"truncated payload: {view.nbytes} bytes of {offset} expected")
    key = signing_key()
    if key is not None and magic != SIGNED_MAGIC:
        raise PayloadSignatureError(
            f"payload is not signed, and ${HMAC_KEY_ENV} is set: refused (it was written by a "
            "process without the key, or by someone else)"
        )
    if magic == SIGNED_MAGIC:
        if key is None:
            raise PayloadSignatureError(
                f"payload is signed, and this process has no key: set ${HMAC_KEY_ENV} as the "
                "processes that write the store do"
            )
        if not hmac.compare_digest(mac, _mac(key, bytes(counts), iter(frames))):
            raise PayloadSignatureError(
                "payload failed its HMAC check (altered, or signed with another key): refused "
                "before unpickling"
            )
    buffers = [memoryview(bytearray(f)) for f in frames[1:]] if view.readonly else frames[1:]
    return pickle.loads(frames[0], buffers=buffers)
