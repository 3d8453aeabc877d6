"""OpaqueProxy: transparent to user code, never resolved by framework inspection."""

from __future__ import annotations

import collections.abc
import gc
import inspect
import pickle
import subprocess
import sys
import weakref
from typing import Any

import numpy as np
import pytest
import task_objects
from proxystore.store import Store

from dask_helpers import CountingFactory
from proxy_patterns.proxy import OpaqueProxy, TransitProxy, is_proxy, key_of, materialize, proxy


def _unresolved(value: Any) -> tuple[OpaqueProxy[Any], CountingFactory]:
    factory = CountingFactory(value)
    p: OpaqueProxy[Any] = OpaqueProxy(factory, cache_defaults=True, target=value)
    del p.__proxy_wrapped__
    return p, factory


def test_inspection_does_not_resolve() -> None:
    p, factory = _unresolved(np.arange(10))
    assert isinstance(p, np.ndarray)
    assert not isinstance(p, collections.abc.Iterator)
    assert isinstance(p, collections.abc.Iterable)
    assert not hasattr(p, "__dask_graph__") and not hasattr(p, "__dask_tokenize__")
    assert is_proxy(p) and not is_proxy(np.arange(3))
    assert factory.calls == 0
    assert p.sum() == 45 and list(p)[:2] == [0, 1]  # user code resolves it
    assert factory.calls == 1


def test_pickling_keeps_the_type_and_the_cached_class(shm_store: Store[Any]) -> None:
    p = proxy(shm_store, np.arange(1000))
    copy = pickle.loads(pickle.dumps(p))
    assert type(copy) is OpaqueProxy
    assert not copy.__proxy_resolved__ and isinstance(copy, np.ndarray)
    assert not copy.__proxy_resolved__
    assert copy[999] == 999
    shm_store.evict(key_of(p))


def test_without_target_the_object_is_not_held(shm_store: Store[Any]) -> None:
    p = proxy(shm_store, np.ones(100), keep_target=False)
    assert not p.__proxy_resolved__ and isinstance(p, np.ndarray)
    assert float(p.sum()) == 100.0
    shm_store.evict(key_of(p))


def test_a_transit_proxy_pickles_as_itself_without_resolving() -> None:
    factory = CountingFactory(np.arange(10))
    p: TransitProxy[Any] = TransitProxy(factory, cache_defaults=True, target=factory.value)
    del p.__proxy_wrapped__
    copy = pickle.loads(pickle.dumps(p))
    assert type(copy) is TransitProxy and isinstance(copy, np.ndarray)
    assert factory.calls == 0


def test_materialize_resolves_transit_proxies_only(shm_store: Store[Any]) -> None:
    moved = proxy(shm_store, np.arange(5.0), keep_target=False, cls=TransitProxy)
    users = proxy(shm_store, np.arange(3.0), keep_target=False)
    whole = proxy(shm_store, [moved, 1], keep_target=False, cls=TransitProxy)
    out = materialize({"a": moved, "b": (users, whole)}, depth=3)
    assert type(out["a"]) is np.ndarray and out["a"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert out["b"][0] is users and not users.__proxy_resolved__  # the user's: left lazy
    assert type(out["b"][1]) is list and type(out["b"][1][0]) is np.ndarray  # nested, too
    assert not moved.__proxy_resolved__  # the proxy itself does not pin the object
    for p in (moved, users, whole):
        shm_store.evict(key_of(p))


def test_a_proxy_of_an_unhashable_object_pins_no_frames(shm_store: Store[Any]) -> None:
    """``hash(p)`` re-raises the target's TypeError, kept in the proxy: neither its traceback
    nor the exception being handled when it was raised may keep the caller's frames alive."""

    class Sentinel:
        pass

    sentinel = Sentinel()
    alive = weakref.ref(sentinel)

    def make(local: Sentinel) -> OpaqueProxy[Any]:
        try:
            raise KeyError("being handled")
        except KeyError:
            return proxy(shm_store, np.zeros(3))  # an ndarray: its hash error is kept

    p = make(sentinel)
    del sentinel
    gc.collect()
    assert alive() is None
    with pytest.raises(TypeError, match="unhashable"):
        hash(p)
    shm_store.evict(key_of(p))


def test_proxy_classes_pickle_beside_modules_with_a_module_getattr() -> None:
    """Proxy classes are pickled by reference to the module that defines them, found without
    asking every module in ``sys.modules`` (a module-level ``__getattr__`` may raise)."""
    code = (
        "import pickle, sys, types\n"
        "hostile = types.ModuleType('hostile')\n"
        "def refuse(name):\n"
        "    raise RuntimeError(f'asked for {name}')\n"
        "hostile.__getattr__ = refuse\n"
        "sys.modules['hostile'] = hostile\n"
        "from proxy_patterns.ownership import OwnedProxy\n"
        "from proxy_patterns.proxy import OpaqueProxy, TransitProxy\n"
        "for cls in (OpaqueProxy, TransitProxy, OwnedProxy):\n"
        "    assert pickle.loads(pickle.dumps(cls)) is cls\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_proxy_adds_no_names_that_hide_its_targets(shm_store: Store[Any]) -> None:
    class Target:
        _state = "the target's"

    for cls in (OpaqueProxy, TransitProxy):
        p = proxy(shm_store, Target(), cls=cls)
        assert p._state == "the target's"
        shm_store.evict(key_of(p))


def test_the_policy_and_materialize_walk_the_same_containers(shm_store: Store[Any]) -> None:
    """A future in a set pins the set, so the policy proxies its large members one by one;
    materialize must find those proxies where the policy put them."""
    from concurrent.futures import Future

    from proxy_patterns.policy import ProxyPolicy
    from proxy_patterns.proxy import put_large_parts

    future: Future[None] = Future()
    large = b"x" * 4096
    value = (frozenset({large, future}), 1)
    proxied, created = put_large_parts(ProxyPolicy(1024), shm_store, value)
    assert len(created) == 1
    inner = next(m for m in proxied[0] if m is not future)
    assert type(inner) is TransitProxy
    materialized = materialize(proxied, depth=3)
    assert type(next(m for m in materialized[0] if m is not future)) is bytes  # not a proxy
    assert materialized == value
    shm_store.evict(created[0][0])


@pytest.mark.parametrize("value", [np.arange(3), task_objects.make("dataclass", 1), 5])
def test_the_module_of_a_proxy_is_answered_without_resolving(value: Any) -> None:
    """Frameworks call ``inspect.getmodule`` on what they pickle (Dask, on a result it sends):
    it must give the target's answer without reading the target from the store."""
    p, factory = _unresolved(value)
    assert inspect.getmodule(p) is inspect.getmodule(value)
    assert hasattr(p, "__module__") == hasattr(value, "__module__")
    assert factory.calls == 0
    assert str(p) == str(value)  # resolves it: from now on the target answers
    assert inspect.getmodule(p) is inspect.getmodule(value) and factory.calls == 1
