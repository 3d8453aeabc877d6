"""Tests for proxy_patterns.policy: which objects become proxies, without any store.

The size that decides is the serialized size, whatever the type; containers are judged whole
unless they hold something that must stay visible (a proxy, a future, an excluded type).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import pickle
import re
import sys
import threading
import types
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pytest
from proxystore.proxy import Proxy
from task_objects import Plain, Record

from proxy_patterns.policy import SERIALIZED_MIN_BYTES, ProxyPolicy, known_nbytes
from proxy_patterns.serialize import Frames, Serialized, deserialize

MiB = 2**20


class Marker:
    """Stands in for a proxy: records what make_proxy was given."""

    def __init__(self, obj: Any, frames: Frames) -> None:
        self.obj = obj
        self.frames = frames


class Recorder:
    """A make_proxy that wraps objects in Marker and records the calls."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    def __call__(self, obj: Any, frames: Frames) -> Marker:
        self.calls.append(obj)
        return Marker(obj, frames)


def proxied(policy: ProxyPolicy, obj: Any) -> bool:
    """Whether ``policy`` replaces ``obj``, taken alone, by a proxy."""
    return isinstance(policy.apply(obj, Recorder()), Marker)


def big(n: int = 2 * MiB) -> np.ndarray:
    return np.zeros(n, dtype=np.uint8)


def counting_proxy(target: Any = None) -> tuple[Proxy[Any], list[int]]:
    """A real proxystore proxy whose factory records each resolution."""
    calls: list[int] = []

    def factory() -> Any:
        calls.append(1)
        return big() if target is None else target

    return Proxy(factory), calls


def raising_proxy() -> Proxy[Any]:
    def factory() -> Any:
        raise AssertionError("proxy was resolved")

    return Proxy(factory)


class CountsPickling:
    """Counts how often it is serialized (its ``__reduce__`` calls)."""

    reductions = 0

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce__(self) -> Any:
        CountsPickling.reductions += 1
        return CountsPickling, (self.data,)


class Point(NamedTuple):
    x: Any
    y: Any


class Pair(tuple):  # type: ignore[type-arg]
    pass


class Tagged(dict):  # type: ignore[type-arg]
    pass


class NeedsName(dict):  # type: ignore[type-arg]
    def __init__(self, name: str, data: dict[Any, Any]) -> None:
        super().__init__(data)
        self.name = name


# --- threshold and construction ------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1 MiB", MiB), ("1MB", 10**6), (1024, 1024), ("1024", 1024), ("0", 0), (0, 0)],
)
def test_threshold_parsing(value: int | str, expected: int) -> None:
    assert ProxyPolicy(threshold=value).threshold == expected


def test_default_threshold_is_one_mib_and_policies_compare_normalized() -> None:
    assert ProxyPolicy().threshold == MiB
    assert ProxyPolicy("1 MiB") == ProxyPolicy(MiB)
    assert hash(ProxyPolicy("1 MiB")) == hash(ProxyPolicy(MiB))


@pytest.mark.parametrize("value", ["abc", "1 XB", "--1", "1e400", "", "  "])
def test_unparsable_threshold_raises_naming_the_string(value: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(value))):
        ProxyPolicy(threshold=value)


@pytest.mark.parametrize("value", [-1, "-1 MiB"])
def test_negative_threshold_raises_naming_the_value(value: int | str) -> None:
    with pytest.raises(ValueError, match=str(value)):
        ProxyPolicy(threshold=value)


def test_negative_max_depth_raises() -> None:
    with pytest.raises(ValueError, match="-1"):
        ProxyPolicy(max_depth=-1)


def test_policy_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        ProxyPolicy().threshold = 5  # type: ignore[misc]


# --- the serialized size decides ----------------------------------------------------------


def _object_frame(n: int) -> pd.DataFrame:
    return pd.DataFrame({"a": np.arange(n), "s": pd.Series(["text"] * n, dtype=object)})


LARGE = {
    "ndarray": lambda: big(),
    "bytes": lambda: b"x" * (2 * MiB),
    "bytearray": lambda: bytearray(2 * MiB),
    "memoryview": lambda: memoryview(bytearray(2 * MiB)),
    "str": lambda: "x" * (2 * MiB),
    "str-unicode": lambda: "é" * MiB,
    "dataclass-of-bytes": lambda: Record(b"x" * (2 * MiB)),
    "plain-object": lambda: Plain(b"x" * (2 * MiB)),
    "dict-of-bytes": lambda: {"a": b"x" * (2 * MiB)},
    "records": lambda: [{"i": i, "name": "abc"} for i in range(100_000)],
    "DataFrame-numeric": lambda: pd.DataFrame({"a": np.zeros(MiB // 2)}),
    "DataFrame-object-column": lambda: _object_frame(200_000),
    "object-array": lambda: np.array([str(i) for i in range(200_000)], dtype=object),
}


@pytest.mark.parametrize("make", LARGE.values(), ids=LARGE.keys())
def test_large_objects_of_any_type_are_proxied(make: Any) -> None:
    obj = make()
    out = ProxyPolicy().apply(obj, Recorder())
    assert isinstance(out, Marker) and out.obj is obj
    assert out.frames.nbytes > MiB
    restored = deserialize(out.frames.join())  # the frames given are the object's own
    assert type(restored) is type(obj)


def test_size_is_not_dask_sizeof() -> None:
    """dask.sizeof calls a dataclass holding 2 MiB of bytes 56 bytes: not a size to go by."""
    from dask.sizeof import sizeof

    record = Record(b"x" * (2 * MiB))
    assert sizeof(record) < 1000
    assert proxied(ProxyPolicy(), record)


@pytest.mark.parametrize(
    "obj",
    [np.zeros(10), b"abc", "abc", pd.DataFrame({"a": [1]}), [1, 2], {"a": 1}, Record(b"ab")],
)
def test_small_objects_are_not_proxied(obj: Any) -> None:
    make = Recorder()
    assert ProxyPolicy().apply(obj, make) is obj
    assert make.calls == []


def test_known_sizes_are_exact_without_serializing() -> None:
    assert known_nbytes(b"x" * 10) == 10
    assert known_nbytes(bytearray(7)) == 7
    assert known_nbytes(memoryview(np.zeros(4))) == 32
    assert known_nbytes("abc") == 3
    assert known_nbytes("é") is None  # UTF-8 size unknown without encoding
    assert known_nbytes(np.zeros(3)) == 24
    assert known_nbytes(np.array([1], dtype=object)) is None
    assert known_nbytes(Record(b"x")) is None


def test_threshold_is_strictly_greater() -> None:
    obj = b"x" * 1000
    assert not proxied(ProxyPolicy(threshold=1000), obj)
    assert proxied(ProxyPolicy(threshold=999), obj)
    record = Record(b"x" * 1000)
    size = ProxyPolicy(threshold=0).apply(record, Recorder()).frames.nbytes
    assert not proxied(ProxyPolicy(threshold=size), record)
    assert proxied(ProxyPolicy(threshold=size - 1), record)


def test_threshold_zero_proxies_everything_non_trivial() -> None:
    policy = ProxyPolicy(threshold=0)
    assert proxied(policy, b"x")
    assert not proxied(policy, b"")  # nothing to move
    assert proxied(policy, "x")
    assert proxied(policy, np.zeros(1))
    assert proxied(policy, Record(b""))


# --- one serialization per object ------------------------------------------------------------


def test_a_proxied_object_is_serialized_once() -> None:
    CountsPickling.reductions = 0
    obj = CountsPickling(b"x" * (2 * MiB))
    out = ProxyPolicy().apply(obj, Recorder())
    assert isinstance(out, Marker) and CountsPickling.reductions == 1
    assert deserialize(out.frames.join()).data == obj.data


def test_a_small_object_measured_is_sent_as_its_frames() -> None:
    CountsPickling.reductions = 0
    obj = CountsPickling(b"x" * SERIALIZED_MIN_BYTES)
    out = ProxyPolicy().apply(obj, Recorder(), keep_frames=True)
    assert isinstance(out, Serialized) and CountsPickling.reductions == 1
    again = pickle.loads(pickle.dumps(out))  # what a framework does with it
    assert type(again) is CountsPickling and again.data == obj.data
    assert CountsPickling.reductions == 1


def test_tiny_objects_are_not_wrapped_in_frames() -> None:
    obj = Record(b"ab")
    assert ProxyPolicy().apply(obj, Recorder(), keep_frames=True) is obj


def test_an_object_used_twice_is_one_replacement() -> None:
    obj = Record(b"x" * SERIALIZED_MIN_BYTES)
    judge = ProxyPolicy().judge(Recorder(), keep_frames=True)
    first, second = judge(obj), judge(obj)
    assert first is second  # pickled once: the receiver gets one object, as without frames
    loaded = pickle.loads(pickle.dumps([first, second]))
    assert loaded[0] is loaded[1]


def test_scalars_and_small_containers_of_them_are_not_serialized(monkeypatch: Any) -> None:
    import proxy_patterns.policy as policy_module

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("serialized")

    monkeypatch.setattr(policy_module, "dumps", refuse)
    policy = ProxyPolicy(threshold=MiB)
    for obj in [(1, 2.0, "key", None), slice(0, 10), range(5), {"a": (1, 2)}, [b"ab"] * 10]:
        assert policy.apply(obj, Recorder()) is obj


# --- what is never proxied -------------------------------------------------------------------


@pytest.mark.parametrize(
    "obj",
    [
        None,
        True,
        10**100_000,
        1.5,
        1j,
        int,
        np.ndarray,
        len,
        lambda: None,
        Record(b"").__eq__,
        [].append,
        np,
    ],
    ids=[
        "None",
        "bool",
        "int",
        "float",
        "complex",
        "class",
        "extension-class",
        "builtin",
        "function",
        "method",
        "builtin-method",
        "module",
    ],
)
def test_trivial_objects_are_never_proxied(obj: Any) -> None:
    assert ProxyPolicy(threshold=0).apply(obj, Recorder()) is obj


def test_include_limits_proxying_to_given_types() -> None:
    policy = ProxyPolicy(include=(np.ndarray,))
    assert proxied(policy, big())
    assert not proxied(policy, b"x" * (2 * MiB))
    assert not proxied(policy, pd.DataFrame({"a": np.zeros(MiB)}))


def test_exclude_prevents_proxying() -> None:
    policy = ProxyPolicy(exclude=(np.ndarray,))
    assert not proxied(policy, big())
    assert proxied(policy, b"x" * (2 * MiB))


def test_exclude_wins_over_include() -> None:
    assert not proxied(ProxyPolicy(include=(np.ndarray,), exclude=(np.ndarray,)), big())

    class MyBytes(bytes):
        pass

    policy = ProxyPolicy(include=(bytes,), exclude=(MyBytes,))
    assert proxied(policy, b"x" * (2 * MiB))
    assert not proxied(policy, MyBytes(b"x" * (2 * MiB)))


def test_unpicklable_objects_are_left_and_reported() -> None:
    lock = Plain(b"x" * (2 * MiB))
    lock.lock = threading.Lock()  # type: ignore[attr-defined]
    unpicklable: list[tuple[Any, Exception]] = []
    assert ProxyPolicy().apply(lock, Recorder(), unpicklable=unpicklable) is lock
    [(obj, error)] = unpicklable
    assert obj is lock and "lock" in str(error)


# --- futures -------------------------------------------------------------------------------


class AppFutureLike(concurrent.futures.Future):  # type: ignore[type-arg]
    """Parsl's AppFuture and Globus Compute's ComputeFuture subclass concurrent Future."""


def test_concurrent_futures_are_never_proxied() -> None:
    policy = ProxyPolicy(threshold=0)
    for fut in (concurrent.futures.Future(), AppFutureLike()):
        assert policy.apply(fut, Recorder()) is fut


def test_asyncio_futures_are_never_proxied() -> None:
    loop = asyncio.new_event_loop()
    try:
        fut = loop.create_future()
        assert ProxyPolicy(threshold=0).apply(fut, Recorder()) is fut
    finally:
        loop.close()


def test_distributed_futures_are_never_proxied() -> None:
    distributed = pytest.importorskip("distributed")

    class ClientlessFuture(distributed.Future):  # type: ignore[misc,name-defined]
        def __del__(self) -> None:  # the real one releases its key on a client
            pass

    fut = ClientlessFuture.__new__(ClientlessFuture)
    policy = ProxyPolicy(threshold=0)
    assert policy.pinned(ClientlessFuture)
    items = [fut, 1]
    assert policy.apply(items, Recorder()) is items


def test_distributed_future_found_through_sys_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeFuture:
        pass

    policy = ProxyPolicy(threshold=0)
    monkeypatch.delitem(sys.modules, "distributed", raising=False)
    assert not policy.pinned(FakeFuture)  # without distributed imported: an ordinary object

    fake = types.ModuleType("distributed")
    fake.Future = FakeFuture  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "distributed", fake)
    assert policy.pinned(FakeFuture)

    monkeypatch.setitem(sys.modules, "distributed", types.ModuleType("distributed"))
    assert not policy.pinned(FakeFuture)  # half-imported distributed has no Future yet


def test_container_of_futures_is_walked_not_proxied_whole() -> None:
    futs = [concurrent.futures.Future() for _ in range(3)]
    policy = ProxyPolicy(threshold=0)
    assert policy.apply(futs, Recorder()) is futs
    mixed = [futs[0], b"data"]
    out = policy.apply(mixed, Recorder())
    assert out[0] is futs[0] and isinstance(out[1], Marker)


def test_object_holding_a_future_is_not_proxied() -> None:
    holder = Plain(b"x" * (2 * MiB))
    holder.future = concurrent.futures.Future()  # type: ignore[attr-defined]
    assert ProxyPolicy().apply(holder, Recorder()) is holder


# --- proxies are never resolved ------------------------------------------------------------


def test_apply_returns_proxies_untouched() -> None:
    p, calls = counting_proxy()
    make = Recorder()
    policy = ProxyPolicy(threshold=0, exclude=(bytes,))
    rp = raising_proxy()
    assert policy.apply(p, make) is p
    assert policy.apply(rp, make) is rp
    assert make.calls == [] and calls == []


def test_container_holding_a_proxy_is_walked_and_its_large_members_proxied() -> None:
    p, calls = counting_proxy()
    make = Recorder()
    arr = big()
    out = ProxyPolicy().apply([p, arr, {"k": p, "r": raising_proxy()}], make)
    assert out[0] is p and out[2]["k"] is p
    assert isinstance(out[1], Marker) and make.calls == [arr]
    assert calls == []


def test_container_holding_only_small_things_and_a_proxy_is_returned_itself() -> None:
    p, calls = counting_proxy()
    items = [p, 1, "small", raising_proxy()]
    assert ProxyPolicy(threshold=0, exclude=(str,)).apply(items, Recorder()) is items
    assert calls == []


# --- containers ------------------------------------------------------------------------------


def test_container_is_proxied_whole() -> None:
    items = [big(), big(), "s", None]
    make = Recorder()
    out = ProxyPolicy().apply(items, make)
    assert isinstance(out, Marker) and out.obj is items and make.calls == [items]
    restored = deserialize(out.frames.join())
    assert [type(i) for i in restored] == [np.ndarray, np.ndarray, str, type(None)]


def test_container_large_only_as_a_whole_is_proxied_whole() -> None:
    items = [bytes([i % 256]) * 1024 for i in range(200)]
    make = Recorder()
    out = ProxyPolicy(threshold="100 KiB").apply(items, make)
    assert isinstance(out, Marker) and out.obj is items
    assert make.calls == [items]


@pytest.mark.parametrize(
    "container", [[1, b"ab"], (1, b"ab"), {"a": b"ab"}, Point(1, 2), [], (), {}]
)
def test_small_container_is_returned_itself(container: Any) -> None:
    make = Recorder()
    assert ProxyPolicy().apply(container, make) is container
    assert make.calls == []


def _walked(container: Any) -> Any:
    """``container`` judged when it also holds a future (so it is walked, not proxied)."""
    return ProxyPolicy().apply(container, Recorder())


FUTURE = concurrent.futures.Future()  # type: ignore[var-annotated]


def test_walked_tuple_is_rebuilt_as_tuple() -> None:
    arr = big()
    out = _walked((FUTURE, arr))
    assert type(out) is tuple and out[0] is FUTURE and out[1].obj is arr


def test_walked_namedtuple_is_rebuilt_with_its_type() -> None:
    arr = big()
    out = _walked(Point(x=arr, y=FUTURE))
    assert type(out) is Point and out.x.obj is arr and out.y is FUTURE


def test_walked_tuple_subclass_is_rebuilt_with_its_type() -> None:
    arr = big()
    out = _walked(Pair((arr, FUTURE)))
    assert type(out) is Pair and out[0].obj is arr and out[1] is FUTURE


def test_walked_dict_keeps_its_keys() -> None:
    key = b"k" * (2 * MiB)
    arr = big()
    out = _walked({key: arr, "f": FUTURE})
    assert type(out) is dict and list(out) == [key, "f"]
    assert next(iter(out)) is key
    assert out[key].obj is arr and out["f"] is FUTURE


def test_walked_dict_subclasses_keep_their_type() -> None:
    arr = big()
    for cls in (Tagged, collections.OrderedDict):
        out = _walked(cls(a=arr, f=FUTURE))
        assert type(out) is cls and out["a"].obj is arr and out["f"] is FUTURE


def test_walked_dict_subclass_that_cannot_take_a_dict_falls_back_to_dict() -> None:
    arr = big()
    out = _walked(NeedsName("n", {"a": arr, "f": FUTURE}))
    assert type(out) is dict and out["a"].obj is arr


def test_walked_containers_judge_nested_ones_whole() -> None:
    a, b = big(), big()
    obj = {"xs": [a, FUTURE], "t": (2, {"deep": b}), "n": 1}
    out = ProxyPolicy(max_depth=3).apply(obj, Recorder())
    assert out["xs"][0].obj is a and out["xs"][1] is FUTURE
    assert isinstance(out["t"], Marker) and out["t"].obj is obj["t"]  # no future inside
    assert out["n"] == 1


def test_containers_beyond_max_depth_are_left_as_they_are() -> None:
    arr = big()
    deep = [[[arr, FUTURE]]]
    out = ProxyPolicy(max_depth=2).apply(deep, Recorder())
    assert out is deep  # the future is three levels down: nothing around it is hidden


def test_include_still_walks_containers() -> None:
    arr = big()
    blob = b"x" * (2 * MiB)
    policy = ProxyPolicy(include=(np.ndarray,))
    out = policy.apply([arr, blob], Recorder())
    assert out[0].obj is arr and out[1] is blob


def test_container_of_excluded_items_is_not_proxied_whole() -> None:
    arrays = [big(), big()]
    make = Recorder()
    assert ProxyPolicy(exclude=(np.ndarray,)).apply(arrays, make) is arrays
    assert make.calls == []


def test_excluded_container_is_not_walked() -> None:
    items = [big()]
    assert ProxyPolicy(exclude=(list,)).apply(items, Recorder()) is items


def test_same_object_is_proxied_once() -> None:
    arr = big()
    make = Recorder()
    out = ProxyPolicy().apply({"x": arr, "ys": [arr, arr, FUTURE], "t": (arr, FUTURE)}, make)
    assert make.calls == [arr]
    assert out["x"] is out["ys"][0] is out["ys"][1] is out["t"][0]


def test_equal_but_distinct_objects_are_proxied_separately() -> None:
    make = Recorder()
    out = ProxyPolicy().apply([big(), big(), FUTURE], make)
    assert len(make.calls) == 2 and out[0] is not out[1]
