"""The objects real task code passes, and tasks that report what they received.

Shared by the Dask and Parsl tests, in an importable module so that worker processes unpickle
the classes and functions by reference. Each case is about 2 MiB serialized, above the tests'
1 MiB threshold; most are objects ``dask.sizeof`` cannot size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from proxy_patterns.proxy import is_proxy

NBYTES = 2 * 2**20


@dataclasses.dataclass
class Record:
    """A dataclass holding raw bytes."""

    raw: bytes


class Plain:
    """A plain object with its data in ``__dict__``."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def __eq__(self, other: object) -> bool:
        return type(other) is Plain and other.raw == self.raw


def _raw(seed: int) -> bytes:
    return random.Random(seed).randbytes(NBYTES)


def _frame_with_object_column(seed: int) -> pd.DataFrame:
    n = NBYTES // 16
    names = pd.Series([f"name-{seed}-{i}" for i in range(n)], dtype=object)
    return pd.DataFrame({"i": np.arange(n) + seed, "name": names})


CASES: dict[str, Callable[[int], Any]] = {
    "dataclass": lambda seed: Record(_raw(seed)),
    "plain-object": lambda seed: Plain(_raw(seed)),
    "bytes": _raw,
    "str": lambda seed: _raw(seed).hex()[:NBYTES],
    "bytearray": lambda seed: bytearray(_raw(seed)),
    "dict-of-bytes": lambda seed: {"a": _raw(seed), "b": _raw(seed + 1)[:1000]},
    "records": lambda seed: [{"i": i + seed, "name": "abc"} for i in range(100_000)],
    "dataframe-object-column": _frame_with_object_column,
    "object-array": lambda seed: np.array([f"{seed}-{i}" for i in range(200_000)], dtype=object),
    "ndarray": lambda seed: np.random.default_rng(seed).random(NBYTES // 8),
}
"""Name -> a function of a seed making the object (on a client or on a worker)."""


def make(case: str, seed: int) -> Any:
    """Task: build a case's object where the task runs (a large result)."""
    return CASES[case](seed)


def fingerprint(x: Any) -> tuple[str, Any]:
    """Task: the type of ``x`` and a digest of its content, computed the way C code reads it.

    Buffer-protocol consumers (``zlib.crc32``, ``hashlib``, ``memoryview``) get the object
    itself: they fail on a Python-level proxy (TypeError: a bytes-like object is required).
    """
    name = type(x).__name__
    if isinstance(x, (Record, Plain)):
        return name, (zlib.crc32(x.raw), hashlib.sha256(memoryview(x.raw)).hexdigest())
    if isinstance(x, (bytes, bytearray)):
        return name, (zlib.crc32(x), hashlib.sha256(x).hexdigest(), memoryview(x).nbytes)
    if isinstance(x, str):
        return name, zlib.crc32(x.encode())
    if isinstance(x, dict):
        return name, tuple((k, zlib.crc32(v)) for k, v in x.items())
    if isinstance(x, list):
        return name, (len(x), sum(r["i"] for r in x), type(x[0]).__name__)
    if isinstance(x, pd.DataFrame):
        return name, (int(pd.util.hash_pandas_object(x).sum()), str(x["name"].dtype))
    if isinstance(x, np.ndarray) and x.dtype.hasobject:
        return name, (x.dtype.str, zlib.crc32(",".join(x.tolist()).encode()))
    if isinstance(x, np.ndarray):
        digest = hashlib.sha256(x).hexdigest()
        return name, (x.dtype.str, zlib.crc32(x), digest, memoryview(x).nbytes)
    raise TypeError(f"no fingerprint for a {name}")


def echo(x: Any) -> Any:
    """Task: return the argument (a large result of the argument's type)."""
    return x


def stream_item(x: Any, gate: Any) -> tuple[bool, int, float]:
    """Task: how it received a stream's item ``x`` (a float array): whether as a proxy, its
    length and first value; once ``gate`` (a proxy of a future) is set, so that the test sees
    the item held while the task runs."""
    assert gate
    return is_proxy(x), len(x), float(x[0])
