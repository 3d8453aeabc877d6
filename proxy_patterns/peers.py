"""The peer transport of topology stores: how the bytes of one host's objects reach another.

A topology store (:mod:`proxy_patterns.topology`) keeps each object in the shared memory of
the host that put it, and the process that put it answers requests for it from other hosts
on a ZeroMQ socket: ZeroMQ (already a dependency of Parsl and Jupyter) frames the messages,
reconnects, and sends a segment's pages straight from its mapping (``copy=False``), so this
module only names the requests. Why ZeroMQ rather than Dask's worker comms or ProxyStore's
``EndpointConnector``: the same transport serves Dask, Parsl and Globus Compute processes,
and a 100 MB object crosses it in about the time of one copy (see the README's measurements).

A request is a multipart message ``[op, *args]``; a reply is ``[b"ok", *values]`` or
``[b"error", type, message]``. With a key in ``$PROXY_PATTERNS_HMAC_KEY`` (see
:mod:`proxy_patterns.serialize`) every request ends with its HMAC and unsigned requests are
refused, so only processes holding the key can read, hold or evict objects. Replies of
``get`` are the stored payloads themselves, signed by their writer.
"""

from __future__ import annotations

import atexit
import hashlib
import hmac
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import zmq

from proxy_patterns.serialize import signing_key

PEER_TIMEOUT_ENV = "PROXY_PATTERNS_PEER_TIMEOUT"
"""Seconds to wait for a reply from another host (default :data:`DEFAULT_TIMEOUT`)."""
DEFAULT_TIMEOUT = 60.0
CONNECT_TIMEOUT = 5.0
"""Seconds to wait for a connection to another host's peer server before giving up."""

Reply = Sequence[Any]
"""The values of an ``ok`` reply: bytes, or buffers sent without a copy."""
Handler = Callable[[list[bytes]], Reply]
"""Serves one op: its arguments in, the values of the reply out."""


class PeerError(ConnectionError):
    """A peer server could not be reached, went away mid-request, or refused the request."""


class RemoteError(RuntimeError):
    """The peer server ran the request and it raised: ``kind`` names the exception there."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _mac(key: bytes, frames: Sequence[bytes]) -> bytes:
    digest = hmac.new(key, digestmod=hashlib.sha256)
    for frame in frames:
        digest.update(len(frame).to_bytes(8, "little"))
        digest.update(frame)
    return digest.digest()


class PeerServer:
    """Answers requests on ``tcp://<address>:<port>`` (a free port) in a daemon thread.

    Requests are served one at a time, in the order they arrive; a reply's buffers are sent
    without a copy while the next request is served.
    """

    def __init__(self, address: str, handlers: dict[bytes, Handler]) -> None:
        self._handlers = handlers
        self._socket: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        port: int = self._socket.bind_to_random_port(f"tcp://{address}")
        self.endpoint = f"tcp://{address}:{port}"
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="peer-server", daemon=True)
        self._thread.start()
        atexit.register(self.stop)

    def __repr__(self) -> str:
        return f"PeerServer({self.endpoint!r})"

    def _serve(self) -> None:
        while not self._stopped.is_set():
            if not self._socket.poll(200):
                continue
            # A REQ socket's envelope: its identity, then an empty delimiter.
            identity, *envelope = self._socket.recv_multipart()
            if envelope and envelope[0] == b"":  # (other messages are not requests)
                reply = [identity, b"", *self._answer(envelope[1:])]
                self._socket.send_multipart(reply, copy=False)
        self._socket.close()

    def _answer(self, request: list[bytes]) -> Reply:
        key = signing_key()
        if key is not None:
            if len(request) < 2 or not hmac.compare_digest(request[-1], _mac(key, request[:-1])):
                return [b"error", b"PeerError", b"request not signed with this store's key"]
            request = request[:-1]
        if not request or request[0] not in self._handlers:
            return [b"error", b"PeerError", b"unknown request"]
        try:
            return [b"ok", *self._handlers[request[0]](request[1:])]
        except Exception as e:
            return [b"error", type(e).__name__.encode(), str(e).encode()]

    def stop(self) -> None:
        """Stop serving (at exit, or when a test is done with the server)."""
        self._stopped.set()
        if self._thread is not threading.current_thread():
            self._thread.join()


class _Connection:
    """A connected DEALER socket (a REQ socket's envelope, several requests in flight), and
    the monitor socket that tells when its connection drops."""

    def __init__(self, endpoint: str) -> None:
        self.socket: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.IMMEDIATE, 1)  # POLLOUT only once connected: see request()
        self.monitor: zmq.Socket[bytes] = self.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.socket.connect(endpoint)

    def close(self) -> None:
        self.socket.disable_monitor()
        self.monitor.close()
        self.socket.close()


class _Connections(threading.local):
    """Each thread's connections, by endpoint: a ZeroMQ socket is not thread-safe."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.by_endpoint: dict[str, _Connection] = {}


_connections = _Connections()


def _connection_to(endpoint: str) -> _Connection:
    if _connections.pid != os.getpid():  # a forked child must not use its parent's sockets
        _connections.pid, _connections.by_endpoint = os.getpid(), {}
    connection = _connections.by_endpoint.get(endpoint)
    if connection is None:
        connection = _connections.by_endpoint[endpoint] = _Connection(endpoint)
    return connection


def _discard(endpoint: str) -> None:
    connection = _connections.by_endpoint.pop(endpoint, None)
    if connection is not None:
        connection.close()


def timeout() -> float:
    """Seconds to wait for a reply: ``$PROXY_PATTERNS_PEER_TIMEOUT``, else 60."""
    return float(os.environ.get(PEER_TIMEOUT_ENV) or DEFAULT_TIMEOUT)


def request(endpoint: str, *frames: bytes) -> list[zmq.Frame]:
    """Send ``frames`` to the peer server at ``endpoint`` and return its reply's values.

    Raises :class:`PeerError` if no connection is made within :data:`CONNECT_TIMEOUT`, if
    the connection drops before the reply (the serving process died), or if no reply comes
    within :func:`timeout`; :class:`RemoteError` if the request raised there.
    """
    (values,) = requests(endpoint, [frames])
    return values


def requests(
    endpoint: str, messages: Iterable[Sequence[bytes]], window: int = 1
) -> Iterator[list[zmq.Frame]]:
    """Send each of ``messages`` to the peer server at ``endpoint``, with at most ``window``
    of them unanswered at a time, and yield each reply's values in order: the transfer of
    one reply overlaps the handling of the one before. Errors as for :func:`request`."""
    key = signing_key()
    connection = _connection_to(endpoint)
    socket, monitor = connection.socket, connection.monitor
    unsent = iter(messages)
    in_flight = 0
    try:
        if not socket.poll(int(CONNECT_TIMEOUT * 1000), zmq.POLLOUT):
            raise PeerError(f"no connection to {endpoint} within {CONNECT_TIMEOUT:g} s")
        while monitor.poll(0):  # drops of earlier connections, since reconnected
            monitor.recv_multipart()
        while True:
            while in_flight < window and (frames := next(unsent, None)) is not None:
                signed = [*frames, _mac(key, frames)] if key is not None else list(frames)
                socket.send_multipart([b"", *signed])
                in_flight += 1
            if not in_flight:
                return
            reply = _receive(endpoint, socket, monitor)
            in_flight -= 1
            yield _values(endpoint, reply)
    except BaseException:
        _discard(endpoint)  # replies still on their way must not reach the next request
        raise


def _receive(endpoint: str, socket: zmq.Socket[bytes], monitor: zmq.Socket[bytes]) -> list[Any]:
    poller = zmq.Poller()
    poller.register(socket, zmq.POLLIN)
    poller.register(monitor, zmq.POLLIN)
    events = dict(poller.poll(int(timeout() * 1000)))
    if socket not in events:
        lost = "the connection dropped" if monitor in events else "no reply came"
        raise PeerError(f"{lost} while waiting for {endpoint}")
    _, *reply = socket.recv_multipart(copy=False)  # (after the envelope's empty frame)
    return reply


def _values(endpoint: str, reply: list[Any]) -> list[zmq.Frame]:
    status, *values = reply
    if status.bytes == b"error":
        kind, message = (v.bytes.decode(errors="replace") for v in values)
        if kind == "PeerError":
            raise PeerError(f"{endpoint} refused the request: {message}")
        raise RemoteError(kind, message)
    return values
