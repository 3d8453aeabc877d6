"""The containers that every walk over task data goes into, and how one is rebuilt.

The policy walks containers to judge their members (:mod:`proxy_patterns.policy`); proxies are
found in them to be materialized, counted or held (:func:`proxy_patterns.proxy.map_proxies`).
Both must agree on what a container is and how one is rebuilt, or a proxy that one walk puts
somewhere is never found by the other (a proxy in a set that is never materialized).
"""

from __future__ import annotations

from typing import Any

CONTAINER_TYPES: tuple[type, ...] = (list, tuple, dict, set, frozenset)
"""Walked into, with their subclasses (namedtuples, ``OrderedDict``, ...)."""


def is_container(cls: type) -> bool:
    """Whether instances of ``cls`` are containers that walks go into."""
    return issubclass(cls, CONTAINER_TYPES)


def members(obj: Any) -> list[Any]:
    """The members of container ``obj`` (a dict's values, in order)."""
    return list(obj.values()) if isinstance(obj, dict) else list(obj)


def with_members(obj: Any, new: list[Any]) -> Any:
    """``obj`` itself if ``new`` (in :func:`members` order) holds the very same objects, else
    a container of ``obj``'s type holding them (a dict keeps its keys)."""
    if all(a is b for a, b in zip(new, members(obj), strict=True)):
        return obj
    items = dict(zip(obj, new, strict=True)) if isinstance(obj, dict) else new
    return _rebuild(type(obj), items)


def _rebuild(cls: type, items: list[Any] | dict[Any, Any]) -> Any:
    """A ``cls`` built from ``items``, or its builtin base if ``cls`` cannot take them."""
    try:
        if issubclass(cls, tuple) and hasattr(cls, "_fields"):  # namedtuple
            return cls(*items)
        return cls(items)
    except TypeError:
        base = next(b for b in CONTAINER_TYPES if issubclass(cls, b))
        return base(items)
