"""Task functions and test objects for the tests that run Dask clusters.

They live in an importable module (not in the test module) so that worker and scheduler
processes unpickle them by reference, whichever way the cluster was started.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
from distributed.protocol.serialize import dask_deserialize, dask_serialize

from proxy_patterns.ownership import owned, owned_task

MiB = 2**20


def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    message: str | Callable[[], str] = "",
    interval: float = 0.02,
) -> Any:
    """Poll ``predicate`` until it returns something truthy; raise after ``timeout`` seconds.

    ``message`` (or what it returns, evaluated only on timeout) says what was awaited.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            text = message() if callable(message) else message
            raise TimeoutError(f"not true after {timeout} s: {text or predicate}")
        time.sleep(interval)


def poll_for(predicate: Callable[[], Any], timeout: float) -> bool:
    """Like :func:`wait_until`, but a timeout is an answer (False), not an error."""
    try:
        wait_until(predicate, timeout)
    except TimeoutError:
        return False
    return True


class Signal:
    """A one-shot signal from a test to tasks in any local process: a file that exists once set.

    A task that must still be running when the test does something waits for it, rather than
    for a duration that a slow machine may outlast.
    """

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, f"signal-{uuid.uuid4().hex}")

    def set(self) -> None:
        with open(self.path, "a"):
            pass

    def wait(self, timeout: float = 60.0) -> None:
        wait_until(lambda: os.path.exists(self.path), timeout, message=f"signal {self.path}")


class PickledWhen:
    """A task result whose pickling announces itself (``started``) and then waits for ``go``:
    a put of it into the store lasts as long as the test wants."""

    def __init__(self, nbytes: int, started: Signal, go: Signal) -> None:
        self.payload = bytes(nbytes)
        self.started = started
        self.go = go

    def __reduce__(self) -> tuple[Any, ...]:
        self.started.set()
        self.go.wait()
        return bytes, (self.payload,)


def pickled_when(nbytes: int, started: Signal, go: Signal) -> PickledWhen:
    return PickledWhen(nbytes, started, go)


def array(nbytes: int, seed: int = 0) -> np.ndarray:
    """A float64 array of ``nbytes`` bytes with distinct values."""
    return np.random.default_rng(seed).random(nbytes // 8)


# --- task functions -----------------------------------------------------------------------
def total(x: Any, *rest: Any) -> float:
    """Sum of the first argument (the others are only carried along)."""
    return float(np.sum(x))


def total2(x: Any, y: Any) -> float:
    return float(np.sum(x) + np.sum(y))


def double(x: Any) -> Any:
    return x * 2.0


def scaled_head(x: Any, i: int, n: int) -> np.ndarray:
    """The first ``n`` values of ``x`` times ``i``: a new (large) result from a large argument."""
    return np.asarray(x[:n]) * i


def inc(i: int) -> int:
    return i + 1


def identity(x: Any) -> Any:
    return x


def in_list(x: Any) -> list[Any]:
    return [x]


def frame(n: int, start: int) -> Any:
    """A DataFrame of ``n`` rows (two float columns) made on the worker."""
    import pandas as pd

    a = np.arange(start, start + n, dtype=float)
    return pd.DataFrame({"a": a, "b": a * 0.5}, index=np.arange(start, start + n))


def dd_concat(parts: list[Any]) -> Any:
    """What dask.dataframe runs to combine partitions (dispatches on the first one's type)."""
    from dask.dataframe.dispatch import concat

    return concat(parts)


class DaskOnly:
    """Large data that only Dask's own serialization can send (pickle refuses it)."""

    def __init__(self, data: np.ndarray) -> None:
        self.data = data

    def __reduce__(self) -> Any:
        raise TypeError("DaskOnly is sent by Dask's serializer only")


@dask_serialize.register(DaskOnly)
def _serialize_dask_only(obj: DaskOnly) -> tuple[dict[str, Any], list[Any]]:
    return {}, [obj.data.data]


@dask_deserialize.register(DaskOnly)
def _deserialize_dask_only(header: dict[str, Any], frames: list[Any]) -> DaskOnly:
    return DaskOnly(np.frombuffer(frames[0], dtype=float).copy())


def dask_only(n: int) -> DaskOnly:
    """A large result the store cannot take (it cannot be pickled), but Dask can send."""
    return DaskOnly(np.ones(n))


def fingerprint_first(x: Any, *rest: Any) -> Any:
    """The fingerprint of the first argument (the others are waited for)."""
    from task_objects import fingerprint

    return fingerprint(x)


def raises(x: Any, message: str) -> None:
    """A task that fails after receiving its (large) argument."""
    raise ValueError(message)


def filled(n: int, value: float) -> np.ndarray:
    """A large result made on the worker: ``n`` float64 values all equal to ``value``."""
    return np.full(n, value)


def filled_when(go: Signal, n: int, value: float) -> np.ndarray:
    """A large result, computed once the test sets ``go`` (until then the task is running)."""
    go.wait()
    return np.full(n, value)


class Pair(NamedTuple):
    first: Any
    second: Any


def result_shaped(shape: str, n: int) -> Any:
    """Two large arrays (values 1 and 2) in the container ``shape`` names."""
    a, b = np.full(n, 1.0), np.full(n, 2.0)
    return {
        "array": a,
        "list": [a, b],
        "tuple": (a, b),
        "dict": {"first": a, "second": b},
        "namedtuple": Pair(a, b),
    }[shape]


# --- proxies whose resolution is observable -----------------------------------------------
class CountingFactory:
    """A proxy factory that counts how often it is asked for its value."""

    def __init__(self, value: Any) -> None:
        self.value, self.calls = value, 0

    def __call__(self) -> Any:
        self.calls += 1
        return self.value


class SlowFactory:
    """A picklable proxy factory that takes ``seconds`` to produce its value.

    It is slow only in the process that created it (the test process, which also runs the
    scheduler of a ``LocalCluster``): a resolve there shows as a delay, while workers resolve it
    at once, so a test never leaves a worker thread blocked.
    """

    def __init__(self, value: Any, seconds: float) -> None:
        self.value, self.seconds, self.calls = value, seconds, 0
        self.creator = os.getpid()

    def __call__(self) -> Any:
        self.calls += 1
        if os.getpid() == self.creator:
            time.sleep(self.seconds)
        return self.value


class Unpicklable:
    """Cannot be pickled at all: placed after a large argument, it fails a submission after
    that argument was put in the store."""

    def __reduce__(self) -> Any:
        raise TypeError("Unpicklable cannot be pickled")


class PausesPickling:
    """Runs ``pause()`` the first time it is pickled; pickles as ``0``.

    Placed after a large argument, it holds the submission at the point where that
    argument's proxy has been chosen but the graph is not yet sent, as a slow put of a
    further argument would.
    """

    def __init__(self, pause: Callable[[], None]) -> None:
        self.pause: Callable[[], None] | None = pause

    def __reduce__(self) -> Any:
        pause, self.pause = self.pause, None
        if pause is not None:
            pause()
        return int, (0,)


# --- ownership (test_ownership.py) ----------------------------------------------------------
@owned_task
def held_sum(x: Any, go: Signal) -> float:
    """Sum of ``x`` once the test sets ``go``; the task holds its (borrowed) argument meanwhile."""
    go.wait()
    return float(np.sum(x))


@owned_task
def owned_ones(n: int) -> Any:
    """An owned array made on the worker: it moves to whoever receives the result."""
    return owned(np.ones(n))


@owned_task
def owned_head(*parts: Any) -> Any:
    """Reduce owned arguments (released when the task returns) to a new owned array."""
    return owned(np.concatenate(parts)[:10])


def total_when(x: Any, started: Signal, go: Signal) -> float:
    """The sum of ``x``, once the test says ``go`` (having said it ``started``): a task the
    test can kill its worker under."""
    started.set()
    go.wait()
    return float(np.asarray(x).sum())
