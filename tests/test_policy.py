"""Tests for proxy_patterns.policy: which objects become proxies, without any store."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pytest
from proxystore.proxy import Proxy

from proxy_patterns.policy import ProxyPolicy

MiB = 2**20


class Marker:
    """Stands in for a proxy: records what make_proxy was given."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj


class Recorder:
    """A make_proxy that wraps objects in Marker and counts the calls."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    def __call__(self, obj: Any) -> Marker:
        self.calls.append(obj)
        return Marker(obj)


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


# --- size_of -------------------------------------------------------------------------------


def test_size_of_estimates_without_serializing() -> None:
    class Unpicklable:
        def __init__(self) -> None:
            self.data = big()

        def __reduce__(self) -> Any:
            raise AssertionError("serialized")

    assert ProxyPolicy().size_of(big()) >= 2 * MiB
    assert ProxyPolicy().size_of(Unpicklable()) > 0
    assert ProxyPolicy().size_of(b"x" * MiB) >= MiB


# --- should_proxy --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "obj",
    [
        big(),
        b"x" * (2 * MiB),
        "x" * (2 * MiB),
        pd.DataFrame({"a": np.zeros(MiB // 2)}),
        [big()],
        {"a": big()},
    ],
    ids=["ndarray", "bytes", "str", "DataFrame", "list", "dict"],
)
def test_large_objects_are_proxied(obj: Any) -> None:
    assert ProxyPolicy().should_proxy(obj)


@pytest.mark.parametrize(
    "obj", [np.zeros(10), b"abc", "abc", pd.DataFrame({"a": [1]}), [1, 2], {"a": 1}]
)
def test_small_objects_are_not_proxied(obj: Any) -> None:
    assert not ProxyPolicy().should_proxy(obj)


def test_threshold_is_strictly_greater() -> None:
    obj = b"x" * 1000
    size = ProxyPolicy().size_of(obj)
    assert not ProxyPolicy(threshold=size).should_proxy(obj)
    assert ProxyPolicy(threshold=size - 1).should_proxy(obj)


def test_threshold_zero_proxies_everything_non_trivial() -> None:
    policy = ProxyPolicy(threshold=0)
    assert policy.should_proxy(b"x")
    assert not policy.should_proxy(b"")  # sizeof(bytes) is len(): nothing to move
    assert policy.should_proxy("x")
    assert policy.should_proxy(np.zeros(1))


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
        Marker(None).__init__,
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
    policy = ProxyPolicy(threshold=0)
    assert not policy.should_proxy(obj)
    assert policy.apply(obj, Recorder()) is obj


def test_include_limits_proxying_to_given_types() -> None:
    policy = ProxyPolicy(include=(np.ndarray,))
    assert policy.should_proxy(big())
    assert not policy.should_proxy(b"x" * (2 * MiB))
    assert not policy.should_proxy(pd.DataFrame({"a": np.zeros(MiB)}))


def test_exclude_prevents_proxying() -> None:
    policy = ProxyPolicy(exclude=(np.ndarray,))
    assert not policy.should_proxy(big())
    assert policy.should_proxy(b"x" * (2 * MiB))


def test_exclude_wins_over_include() -> None:
    assert not ProxyPolicy(include=(np.ndarray,), exclude=(np.ndarray,)).should_proxy(big())

    class MyBytes(bytes):
        pass

    policy = ProxyPolicy(include=(bytes,), exclude=(MyBytes,))
    assert policy.should_proxy(b"x" * (2 * MiB))
    assert not policy.should_proxy(MyBytes(b"x" * (2 * MiB)))


# --- futures -------------------------------------------------------------------------------


class AppFutureLike(concurrent.futures.Future):  # type: ignore[type-arg]
    """Parsl's AppFuture and Globus Compute's ComputeFuture subclass concurrent Future."""


def test_concurrent_futures_are_never_proxied() -> None:
    policy = ProxyPolicy(threshold=0)
    for fut in (concurrent.futures.Future(), AppFutureLike()):
        assert not policy.should_proxy(fut)
        assert policy.apply(fut, Recorder()) is fut


def test_asyncio_futures_are_never_proxied() -> None:
    loop = asyncio.new_event_loop()
    try:
        fut = loop.create_future()
        assert not ProxyPolicy(threshold=0).should_proxy(fut)
    finally:
        loop.close()


def test_distributed_futures_are_never_proxied() -> None:
    distributed = pytest.importorskip("distributed")

    class ClientlessFuture(distributed.Future):  # type: ignore[misc,name-defined]
        def __del__(self) -> None:  # the real one releases its key on a client
            pass

    fut = ClientlessFuture.__new__(ClientlessFuture)
    policy = ProxyPolicy(threshold=0)
    assert not policy.should_proxy(fut)
    items = [fut, 1]
    assert policy.apply(items, Recorder()) is items


def test_distributed_future_found_through_sys_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeFuture:
        pass

    policy = ProxyPolicy(threshold=0)
    monkeypatch.delitem(sys.modules, "distributed", raising=False)
    assert policy.should_proxy(FakeFuture())  # without distributed imported: an ordinary object

    fake = types.ModuleType("distributed")
    fake.Future = FakeFuture  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "distributed", fake)
    assert not policy.should_proxy(FakeFuture())

    monkeypatch.setitem(sys.modules, "distributed", types.ModuleType("distributed"))
    assert policy.should_proxy(FakeFuture())  # half-imported distributed has no Future yet


def test_container_of_futures_is_not_proxied_whole() -> None:
    futs = [concurrent.futures.Future() for _ in range(3)]
    policy = ProxyPolicy(threshold=0)
    assert policy.apply(futs, Recorder()) is futs
    mixed = [futs[0], b"data"]
    out = policy.apply(mixed, Recorder())
    assert out[0] is futs[0] and isinstance(out[1], Marker)


# --- proxies are never resolved ------------------------------------------------------------


def test_should_proxy_does_not_resolve_proxies() -> None:
    p, calls = counting_proxy()
    for policy in (ProxyPolicy(), ProxyPolicy(threshold=0), ProxyPolicy(include=(np.ndarray,))):
        assert not policy.should_proxy(p)
        assert not policy.should_proxy(raising_proxy())
    assert calls == []


def test_apply_returns_proxies_untouched() -> None:
    p, calls = counting_proxy()
    make = Recorder()
    policy = ProxyPolicy(threshold=0, exclude=(bytes,))
    rp = raising_proxy()
    assert policy.apply(p, make) is p
    assert policy.apply(rp, make) is rp
    assert make.calls == [] and calls == []


def test_apply_keeps_proxies_in_containers_untouched() -> None:
    p, calls = counting_proxy()
    make = Recorder()
    arr = big()
    out = ProxyPolicy().apply([p, arr, {"k": p, "r": raising_proxy()}], make)
    assert out[0] is p and out[2]["k"] is p
    assert isinstance(out[1], Marker)
    assert make.calls == [arr]
    assert calls == []


def test_container_holding_a_proxy_is_not_proxied_whole() -> None:
    p, calls = counting_proxy()
    items = [p, 1, "small", raising_proxy()]
    assert ProxyPolicy(threshold=0, exclude=(str,)).apply(items, Recorder()) is items
    assert calls == []


# --- apply: single objects -----------------------------------------------------------------


def test_apply_proxies_large_object() -> None:
    arr = big()
    out = ProxyPolicy().apply(arr, Recorder())
    assert isinstance(out, Marker) and out.obj is arr


def test_apply_returns_small_object_itself() -> None:
    arr = np.zeros(10)
    assert ProxyPolicy().apply(arr, Recorder()) is arr


def test_apply_proxies_large_dataframe_and_str() -> None:
    df = pd.DataFrame({"a": np.zeros(MiB // 2)})
    text = "x" * (2 * MiB)
    make = Recorder()
    out = ProxyPolicy().apply({"df": df, "text": text, "n": 3}, make)
    assert out["df"].obj is df and out["text"].obj is text and out["n"] == 3


# --- apply: containers ---------------------------------------------------------------------


def test_list_of_large_items_becomes_list_of_proxies() -> None:
    items = [big() for _ in range(20)]
    make = Recorder()
    out = ProxyPolicy(threshold="1 MiB").apply(items, make)
    assert type(out) is list and len(out) == 20
    assert all(isinstance(o, Marker) and o.obj is i for o, i in zip(out, items, strict=True))
    assert len(make.calls) == 20
    assert all(type(i) is np.ndarray for i in items)  # the input is not modified


def test_mixed_list_keeps_small_items() -> None:
    small = np.zeros(3)
    items = [small, big(), "s", None]
    out = ProxyPolicy().apply(items, Recorder())
    assert out[0] is small and isinstance(out[1], Marker) and out[2:] == ["s", None]


@pytest.mark.parametrize(
    "container", [[1, b"ab"], (1, b"ab"), {"a": b"ab"}, Point(1, 2), [], (), {}]
)
def test_small_container_is_returned_itself(container: Any) -> None:
    make = Recorder()
    assert ProxyPolicy().apply(container, make) is container
    assert make.calls == []


def test_container_large_only_as_a_whole_is_proxied_whole() -> None:
    items = [bytes([i % 256]) * 1024 for i in range(200)]
    make = Recorder()
    out = ProxyPolicy(threshold="100 KiB").apply(items, make)
    assert isinstance(out, Marker) and out.obj is items
    assert make.calls == [items]


def test_tuple_is_rebuilt_as_tuple() -> None:
    arr = big()
    out = ProxyPolicy().apply((1, arr), Recorder())
    assert type(out) is tuple and out[0] == 1 and out[1].obj is arr


def test_namedtuple_is_rebuilt_with_its_type() -> None:
    arr = big()
    out = ProxyPolicy().apply(Point(x=arr, y=2), Recorder())
    assert type(out) is Point and out.x.obj is arr and out.y == 2


def test_tuple_subclass_is_rebuilt_with_its_type() -> None:
    arr = big()
    out = ProxyPolicy().apply(Pair((arr, 2)), Recorder())
    assert type(out) is Pair and out[0].obj is arr and out[1] == 2


def test_dict_values_are_proxied_and_keys_kept() -> None:
    key = b"k" * (2 * MiB)
    arr = big()
    out = ProxyPolicy().apply({key: arr, "small": 1}, Recorder())
    assert type(out) is dict and list(out) == [key, "small"]
    assert next(iter(out)) is key
    assert out[key].obj is arr and out["small"] == 1


def test_dict_subclasses_keep_their_type() -> None:
    arr = big()
    for cls in (Tagged, collections.OrderedDict):
        out = ProxyPolicy().apply(cls(a=arr, b=1), Recorder())
        assert type(out) is cls and out["a"].obj is arr and out["b"] == 1


def test_dict_subclass_that_cannot_take_a_dict_falls_back_to_dict() -> None:
    arr = big()
    out = ProxyPolicy().apply(NeedsName("n", {"a": arr}), Recorder())
    assert type(out) is dict and out["a"].obj is arr


def test_nested_containers_are_walked() -> None:
    a, b, c = big(), big(), big()
    obj = {"xs": [a, 1], "t": (2, {"deep": b}), "c": c}
    out = ProxyPolicy(max_depth=3).apply(obj, Recorder())
    assert out["xs"][0].obj is a and out["xs"][1] == 1
    assert type(out["t"]) is tuple and out["t"][1]["deep"].obj is b
    assert out["c"].obj is c


def test_containers_beyond_max_depth_are_treated_whole() -> None:
    inner = [big()]
    make = Recorder()
    out = ProxyPolicy(max_depth=2).apply([[inner]], make)
    assert type(out[0]) is list and isinstance(out[0][0], Marker)
    assert out[0][0].obj is inner and make.calls == [inner]


def test_max_depth_one_and_zero() -> None:
    inner = [big()]
    out = ProxyPolicy(max_depth=1).apply([inner, 1], Recorder())
    assert out[0].obj is inner and out[1] == 1

    outer = [big(), big()]
    out0 = ProxyPolicy(max_depth=0).apply(outer, Recorder())
    assert isinstance(out0, Marker) and out0.obj is outer


def test_include_still_walks_containers() -> None:
    arr = big()
    blob = b"x" * (2 * MiB)
    policy = ProxyPolicy(include=(np.ndarray,))
    out = policy.apply([arr, blob], Recorder())
    assert out[0].obj is arr and out[1] is blob
    blobs = [blob, b"y" * (2 * MiB)]
    assert policy.apply(blobs, Recorder()) is blobs  # a list is not an ndarray


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
    out = ProxyPolicy().apply({"x": arr, "ys": [arr, arr], "t": (arr,)}, make)
    assert make.calls == [arr]
    assert out["x"] is out["ys"][0] is out["ys"][1] is out["t"][0]


def test_equal_but_distinct_objects_are_proxied_separately() -> None:
    make = Recorder()
    out = ProxyPolicy().apply([big(), big()], make)
    assert len(make.calls) == 2 and out[0] is not out[1]


# --- import hygiene ------------------------------------------------------------------------


def test_module_imports_no_framework() -> None:
    path = Path(__file__).resolve().parents[1] / "proxy_patterns" / "policy.py"
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('policy', {str(path)!r})\n"
        "mod = importlib.util.module_from_spec(spec)\n"
        "sys.modules['policy'] = mod\n"
        "spec.loader.exec_module(mod)\n"
        "bad = [m for m in ('dask', 'distributed', 'parsl', 'globus_compute_sdk')"
        " if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
