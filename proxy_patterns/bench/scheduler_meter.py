"""Scheduler preload that counts the bytes the scheduler reads from its TCP connections.

Distributed keeps no per-process byte counter, and the kernel's ``rchar`` misses socket reads,
so the benchmark harness wraps the one function through which every TCP message body is read
(``distributed.comm.tcp.read_bytes_rw``). Measurement only: never loaded outside benchmarks.
"""

from __future__ import annotations

from typing import Any

BYTES_READ_ATTRIBUTE = "proxy_patterns_bytes_read"


def dask_setup(scheduler: Any) -> None:
    """Preload hook: start counting on ``scheduler``."""
    from distributed.comm import tcp

    setattr(scheduler, BYTES_READ_ATTRIBUTE, 0)
    read = tcp.read_bytes_rw

    async def counting_read(stream: Any, n: int) -> memoryview:
        setattr(scheduler, BYTES_READ_ATTRIBUTE, getattr(scheduler, BYTES_READ_ATTRIBUTE) + n)
        return await read(stream, n)

    tcp.read_bytes_rw = counting_read


def bytes_read(dask_scheduler: Any) -> int:
    """For ``client.run_on_scheduler``: the bytes counted so far."""
    return int(getattr(dask_scheduler, BYTES_READ_ATTRIBUTE))
