"""Large values to and from Redis with one copy each way, on redis-py's pooled connections.

redis-py returns a 100 MB ``GET`` as ``bytes`` built through its parser's buffers (the
pure-Python parser copies the value about three times, hiredis twice), and the store then
copies the read-only ``bytes`` once more to give writable arrays: ≈300 ms here, where the
kernel's copy over loopback takes ≈30 ms. Sending, redis-py (with hiredis installed) packs
the value into one command buffer, and a proxy-patterns payload had been joined from its
frames before that.

So the bulk value of a reply is read straight from the connection's socket into a writable
buffer allocated once at its final size, and a value is sent as the frames it is made of,
never joined. Everything else (connecting, credentials, TLS, the database, retries, the
pool) stays redis-py's: a connection is taken from the client's pool and handed back in sync,
every reply read to its end, or disconnected.
"""

from __future__ import annotations

import mmap
import socket
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import redis
from redis.connection import Connection

T = TypeVar("T")
Chunk = bytes | bytearray | memoryview

_CRLF = b"\r\n"
_READ_SIZE = 1 << 16
_POPULATE_FROM = 1 << 20
"""Values from this size get a buffer whose pages the kernel maps in one go (``MAP_POPULATE``,
Linux): faulting 100 MB in page by page costs about twice as much as the copy itself."""


def command(*args: bytes, value: Sequence[Chunk] = (), after: Sequence[bytes] = ()) -> list[Chunk]:
    """A RESP command ``args + [value] + after`` as the pieces to send, ``value`` (if any)
    as the chunks it is made of, uncopied."""
    count = len(args) + len(after) + (1 if value else 0)
    head = [b"*%d\r\n" % count, *(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)]
    if not value:
        return [b"".join(head)]
    nbytes = sum(memoryview(chunk).nbytes for chunk in value)
    head.append(b"$%d\r\n" % nbytes)
    tail = [_CRLF, *(b"$%d\r\n%s\r\n" % (len(a), a) for a in after)]
    return [b"".join(head), *value, b"".join(tail)]


def value_buffer(nbytes: int) -> bytearray | mmap.mmap:
    """A writable buffer of ``nbytes``, its pages mapped in at once when it is large."""
    populate = getattr(mmap, "MAP_POPULATE", 0)
    if nbytes < _POPULATE_FROM or not populate:
        return bytearray(nbytes)
    return mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate)


class BulkReader:
    """Reads RESP2 replies from a socket, bulk strings straight into buffers of their size
    (the connection's client must speak RESP2: ``protocol=2``)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pending = bytearray()
        """Bytes received and not yet consumed (the start of the next reply)."""

    def _receive(self, into: memoryview) -> int:
        received = self.sock.recv_into(into)
        if received == 0:
            raise redis.ConnectionError("the Redis server closed the connection mid-reply")
        return received

    def _line(self) -> bytes:
        while (end := self.pending.find(_CRLF)) < 0:
            chunk = bytearray(_READ_SIZE)
            self.pending += memoryview(chunk)[: self._receive(memoryview(chunk))]
        line = bytes(self.pending[:end])
        del self.pending[: end + 2]
        return line

    def _fill(self, view: memoryview) -> None:
        """Fill ``view`` with the next bytes of the stream."""
        taken = min(len(self.pending), view.nbytes)
        view[:taken] = self.pending[:taken]
        del self.pending[:taken]
        while taken < view.nbytes:
            taken += self._receive(view[taken:])

    def bulk(self) -> memoryview | None:
        """The next reply, a bulk string, as a writable view; None for a nil reply."""
        line = self._line()
        if line[:1] == b"-":
            raise redis.ResponseError(line[1:].decode(errors="replace"))
        if line[:1] != b"$":
            raise redis.InvalidResponse(f"expected a bulk string from Redis, got {line[:60]!r}")
        nbytes = int(line[1:])
        if nbytes < 0:
            return None
        buffer = memoryview(value_buffer(nbytes))
        self._fill(buffer)
        end = bytearray(2)
        self._fill(memoryview(end))
        if end != _CRLF:
            raise redis.InvalidResponse("a bulk string from Redis did not end with CRLF")
        return buffer


def get_connection(client: redis.Redis) -> Connection:
    """A connection from ``client``'s pool (redis-py < 5.3 names the command it is for)."""
    pool = client.connection_pool
    try:
        return pool.get_connection()
    except TypeError:
        return pool.get_connection("GET")


def on_connection(client: redis.Redis, transfer: Callable[[Connection], T]) -> T:
    """``transfer(connection)`` on a pooled connection, with the client's retries.

    Any failure disconnects the connection, so none goes back to the pool with a reply
    half read.
    """
    connection = get_connection(client)

    def attempt() -> T:
        try:
            return transfer(connection)
        except OSError as error:
            connection.disconnect()
            raise redis.ConnectionError(f"Redis transfer failed: {error}") from error
        except BaseException:
            connection.disconnect()
            raise

    def failed(_error: Exception, *_: Any) -> None:
        connection.disconnect()

    try:
        return connection.retry.call_with_retry(attempt, failed)
    finally:
        client.connection_pool.release(connection)


def send(client: redis.Redis, pieces: list[Chunk]) -> Any:
    """Send one command made of ``pieces`` and return its parsed reply."""

    def transfer(connection: Connection) -> Any:
        connection.send_packed_command(pieces)
        return connection.read_response()

    return on_connection(client, transfer)


def get_values(client: redis.Redis, keys: Sequence[bytes]) -> list[memoryview | None]:
    """``GET`` of each key, pipelined, each value read into its own writable buffer."""

    def transfer(connection: Connection) -> list[memoryview | None]:
        connection.send_packed_command([b"".join(command(b"GET", key)[0] for key in keys)])
        sock = getattr(connection, "_sock", None)  # redis-py's socket, once connected
        if not isinstance(sock, socket.socket):  # a redis-py that keeps it elsewhere
            return [_writable(connection.read_response()) for _ in keys]
        reader = BulkReader(sock)
        values = [reader.bulk() for _ in keys]
        if reader.pending:
            raise redis.InvalidResponse("Redis sent more than the replies asked for")
        return values

    return on_connection(client, transfer)


def _writable(value: bytes | None) -> memoryview | None:
    return None if value is None else memoryview(bytearray(value))
