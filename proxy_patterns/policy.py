"""Decide which task arguments and results travel by reference.

Moving a large object through a scheduler costs a serialization and a copy per hop, while a proxy
costs a few hundred bytes and is resolved only where the object is used. Proxying small objects
buys nothing and adds a store round trip, and proxying the wrong things breaks the frameworks:
a future hidden inside a proxy is no longer seen, so its dependency is never resolved. Every
integration therefore asks this one module, so that Dask, Parsl and Globus Compute make the same
choice for the same object.

The module holds no store: callers pass ``make_proxy``, which stores an object and returns its
proxy. Dask is imported lazily so that importing the policy stays cheap and framework-free.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from proxystore.proxy import Proxy

T = TypeVar("T")

# Never worth a store round trip: scalars are tiny, and the serializer sends classes, functions
# and modules by name (or, for lambdas, as small code objects).
_TRIVIAL_TYPES: tuple[type, ...] = (
    type(None),
    bool,
    int,
    float,
    complex,
    type,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    types.ModuleType,
)


def _is_future(cls: type) -> bool:
    """Whether instances of ``cls`` are futures that their framework must see unwrapped.

    Parsl's ``AppFuture`` and Globus Compute's ``ComputeFuture`` subclass
    ``concurrent.futures.Future``. ``distributed.Future`` is checked only when ``distributed`` is
    already imported: if it is not, no such future can exist yet.
    """
    if issubclass(cls, (concurrent.futures.Future, asyncio.Future)):
        return True
    distributed = sys.modules.get("distributed")
    future = getattr(distributed, "Future", None)  # None while distributed is half-imported
    return isinstance(future, type) and issubclass(cls, future)


@dataclass(frozen=True)
class ProxyPolicy:
    """Which objects to replace by proxies, and how far into containers to look.

    Every check uses ``type(obj)``: ``isinstance`` reads ``__class__``, which resolves a proxy,
    fetching the very object the proxy exists to keep away.

    Containers (``list``, ``tuple``, ``dict`` and their subclasses) are walked rather than
    proxied whole, so a task receiving ``[a, b, c]`` gets three proxies it can resolve one at a
    time instead of one proxy that fetches everything. A container that holds a proxy, a future
    or an excluded object is never proxied whole, since that would hide the item all the same.

    Attributes:
        threshold: Objects whose estimated size is strictly greater are proxied. Accepts
            ``"1 MiB"``-style strings; always an ``int`` after construction.
        include: If non-empty, only instances of these types are proxied.
        exclude: Instances of these types are never proxied nor walked into; takes precedence
            over ``include``.
        max_depth: How many levels of nested containers are walked; deeper containers are
            treated as single objects.
    """

    threshold: int | str = "1 MiB"
    include: tuple[type, ...] = ()
    exclude: tuple[type, ...] = ()
    max_depth: int = 2

    def __post_init__(self) -> None:
        from dask.utils import parse_bytes

        threshold = self.threshold
        if isinstance(threshold, str):
            try:
                if not threshold.strip():  # parse_bytes would read a blank string as 1 byte
                    raise ValueError("blank string")
                threshold = parse_bytes(threshold)
            except (ValueError, OverflowError) as e:
                raise ValueError(f"cannot parse threshold {self.threshold!r} as bytes") from e
        if threshold < 0:
            raise ValueError(f"threshold must not be negative, got {self.threshold!r}")
        if self.max_depth < 0:
            raise ValueError(f"max_depth must not be negative, got {self.max_depth!r}")
        object.__setattr__(self, "threshold", threshold)

    def size_of(self, obj: object) -> int:
        """Estimate the in-memory size of ``obj`` in bytes, without serializing it."""
        from dask.sizeof import sizeof

        return int(sizeof(obj))

    def should_proxy(self, obj: object) -> bool:
        """Whether ``obj`` itself, taken as a whole, should be replaced by a proxy."""
        cls = type(obj)
        if self._pinned(cls) or issubclass(cls, _TRIVIAL_TYPES):
            return False
        if self.include and not issubclass(cls, self.include):
            return False
        return self.size_of(obj) > cast(int, self.threshold)

    def apply(self, obj: T, make_proxy: Callable[[Any], Any]) -> T:
        """Return ``obj``, a proxy of it, or a copy of the container with its large items proxied.

        An object found several times is stored once and its proxy reused. When nothing is
        replaced, ``obj`` itself is returned.
        """
        proxies: dict[int, Any] = {}
        return cast(T, self._apply(obj, make_proxy, self.max_depth, proxies)[0])

    def _pinned(self, cls: type) -> bool:
        """Whether instances of ``cls`` must reach the framework as they are."""
        return issubclass(cls, Proxy) or _is_future(cls) or issubclass(cls, self.exclude)

    def _apply(
        self, obj: Any, make_proxy: Callable[[Any], Any], depth: int, proxies: dict[int, Any]
    ) -> tuple[Any, bool]:
        """Return ``obj`` or its replacement, and whether it holds something pinned."""
        if id(obj) in proxies:
            return proxies[id(obj)], False
        cls = type(obj)
        if self._pinned(cls):
            return obj, True
        if depth > 0 and issubclass(cls, (list, tuple, dict)):
            is_dict = issubclass(cls, dict)
            values = list(obj.values()) if is_dict else list(obj)
            results = [self._apply(v, make_proxy, depth - 1, proxies) for v in values]
            new_values = [new for new, _ in results]
            if any(new is not old for new, old in zip(new_values, values, strict=True)):
                items = dict(zip(obj, new_values, strict=True)) if is_dict else new_values
                return rebuild_container(cls, items), False
            if any(pinned for _, pinned in results):
                return obj, True
        if self.should_proxy(obj):
            proxies[id(obj)] = make_proxy(obj)
            return proxies[id(obj)], False
        return obj, False


def rebuild_container(cls: type, items: list[Any] | dict[Any, Any]) -> Any:
    """Build a ``cls`` from ``items``, or its builtin base if ``cls`` cannot take them."""
    try:
        if issubclass(cls, tuple) and hasattr(cls, "_fields"):  # namedtuple
            return cls(*items)
        return cls(items)
    except TypeError:
        base = next(b for b in (dict, list, tuple) if issubclass(cls, b))
        return base(items)
