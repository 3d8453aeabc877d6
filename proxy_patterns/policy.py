"""Decide which task arguments and results travel by reference: by their serialized size.

Moving a large object through a scheduler costs a serialization and a copy per hop, while a proxy
costs a few hundred bytes. What a framework sends is the *serialized* object, so that is the
size that decides, whatever the type: a dataclass holding 50 MB of ``bytes`` is 50 MB, though
``sys.getsizeof`` (and so ``dask.sizeof``, which falls back to it) calls it 56 bytes. Objects
whose serialized size is known without serializing them (``bytes``, ``bytearray``, ``memoryview``,
ASCII ``str``, numpy arrays of numbers) are measured directly; any other object is serialized to
be measured, and those frames are the ones that are stored, or that travel in its place when
it stays below the threshold (:class:`~proxy_patterns.serialize.Serialized`, for objects large
enough that a second serialization would cost more than carrying the frames).

Proxying the wrong things breaks the frameworks: a future hidden inside a proxy is no longer
seen, so its dependency is never resolved. Every integration therefore asks this one module, so
that Dask, Parsl and Globus Compute make the same choice for the same object. The module holds
no store: callers pass ``make_proxy``, which stores the frames of an object and returns a proxy.
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

from proxy_patterns.containers import is_container, members, with_members
from proxy_patterns.serialize import Frames, PickleRefused, Serialized, dumps
from proxy_patterns.sizes import as_bytes

T = TypeVar("T")

DEFAULT_THRESHOLD = "1 MiB"
"""Objects whose serialized size is larger travel by proxy, unless configured otherwise."""

AROUND_ARGUMENTS = 1
"""Container levels around judged values in a task's arguments (the argument tuple or the
keyword dict): ``max_depth + AROUND_ARGUMENTS`` reaches every proxy made for them."""
AROUND_GATHERED = 2
"""Container levels around judged results as a client gathers them (``gather`` packs results
in lists, tuples and dicts, one level inside another at most)."""

MakeProxy = Callable[[Any, Frames], Any]
"""Stores an object, given its frames (``serialize.dumps(obj)``), and returns its proxy."""

# Never worth a store round trip: scalars are tiny, and pickle sends classes, functions and
# modules by name (or, for lambdas, as small code objects).
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
_BOUNDED_DEPTH = 2
_BOUNDED_ITEMS = 64
_UNBOUNDED = sys.maxsize

SERIALIZED_MIN_BYTES = 64 * 1024
"""Smaller objects are serialized again rather than carried as
:class:`~proxy_patterns.serialize.Serialized` frames, which cost more to build and unpack."""


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


def known_nbytes(obj: Any) -> int | None:
    """The size of ``obj``'s serialized data if it is known without serializing it, else None.

    Exact for ``bytes``, ``bytearray``, ``memoryview``, ASCII ``str`` (one byte per character
    in UTF-8) and numpy arrays of non-object dtypes, up to the few bytes of pickle's framing.
    """
    cls = type(obj)
    if cls is bytes or cls is bytearray:
        return len(obj)
    if cls is memoryview:
        return int(obj.nbytes)
    if cls is str:
        return len(obj) if obj.isascii() else None
    numpy = sys.modules.get("numpy")
    if numpy is not None and cls is numpy.ndarray and not obj.dtype.hasobject:
        return int(obj.nbytes)
    return None


def _bounded_nbytes(obj: Any, depth: int) -> int:
    """An upper bound of ``obj``'s serialized size found without serializing it, for the
    scalars, short strings and small containers of them that fill task graphs (``sys.maxsize``
    if there is none): these are never worth serializing just to learn that they are small."""
    cls = type(obj)
    if cls in (type(None), bool, float, complex, range):
        return 64
    if cls is slice:
        parts = (obj.start, obj.stop, obj.step)
        return 16 + sum(_bounded_nbytes(part, depth) for part in parts)
    if cls is int:
        return 16 + int(obj.bit_length()) // 8
    if cls is str or cls is bytes:
        return 16 + 4 * len(obj)
    if depth > 0 and cls in (tuple, list, set, frozenset, dict) and len(obj) <= _BOUNDED_ITEMS:
        items = [*obj, *obj.values()] if cls is dict else obj
        return 16 + sum(_bounded_nbytes(item, depth - 1) for item in items)
    return _UNBOUNDED


@dataclass(frozen=True)
class ProxyPolicy:
    """Which objects to replace by proxies, judged by their serialized size.

    Every check uses ``type(obj)``: ``isinstance`` reads ``__class__``, which resolves a proxy,
    fetching the very object the proxy exists to keep away.

    Containers (``list``, ``tuple``, ``dict``, ``set``, ``frozenset`` and their subclasses) are
    judged **as a whole**: a list of 100 000 small records, or a dict of many 100 kB arrays, is
    one proxy when its serialized size is above the threshold, and so is a list holding one
    large array. One serialization measures the whole container, where judging each member
    would cost one serialization and one store key per member, and the task that receives the
    container resolves it whole anyway. A container that holds something that must stay visible
    to the framework (a proxy, a future, an object of an excluded type) is never hidden inside
    a proxy: it is walked instead, to ``max_depth`` levels, and each of its members is judged
    on its own.

    Attributes:
        threshold: Objects whose serialized size is strictly greater are proxied. Accepts
            ``"1 MiB"``-style strings; always an ``int`` after construction.
        include: If non-empty, only instances of these types are proxied (containers of other
            types are walked, to find them).
        exclude: Instances of these types are never proxied nor walked into; takes precedence
            over ``include``. Containers holding one are walked, never proxied whole.
        max_depth: How many levels of containers holding such objects are walked; deeper ones
            are left as they are.
    """

    threshold: int | str = DEFAULT_THRESHOLD
    include: tuple[type, ...] = ()
    exclude: tuple[type, ...] = ()
    max_depth: int = 2

    def __post_init__(self) -> None:
        threshold = as_bytes(self.threshold, "threshold")
        if self.max_depth < 0:
            raise ValueError(f"max_depth must not be negative, got {self.max_depth!r}")
        object.__setattr__(self, "threshold", threshold)

    def pinned(self, cls: type) -> bool:
        """Whether instances of ``cls`` must reach the framework as they are (proxies,
        futures, excluded types), and so must never be hidden inside a proxy."""
        return issubclass(cls, Proxy) or _is_future(cls) or issubclass(cls, self.exclude)

    def judge(
        self,
        make_proxy: MakeProxy,
        *,
        keep_frames: bool = False,
        unpicklable: list[tuple[Any, Exception]] | None = None,
    ) -> Callable[[Any], Any]:
        """A function that returns each object it is given, a proxy of it, or a copy of the
        container with members proxied; each distinct object is judged once.

        Args:
            make_proxy: Called with an object above the threshold and its frames.
            keep_frames: Return an object that had to be serialized to be measured, and stays,
                as a :class:`~proxy_patterns.serialize.Serialized` of those frames when they
                are large enough for a second serialization to cost more than carrying them
                (for a caller that pickles what it is given).
            unpicklable: Objects that could not be serialized are left as they are (the
                framework may have a way to send them) and, with their error, added here.
        """
        judgement = _Judgement(self, make_proxy, keep_frames, unpicklable)
        return lambda obj: judgement.value(obj, self.max_depth)[0]

    def apply(
        self,
        obj: T,
        make_proxy: MakeProxy,
        *,
        keep_frames: bool = False,
        unpicklable: list[tuple[Any, Exception]] | None = None,
    ) -> T:
        """``obj`` judged alone (see :meth:`judge`); ``obj`` itself if nothing is replaced."""
        judge = self.judge(make_proxy, keep_frames=keep_frames, unpicklable=unpicklable)
        return cast(T, judge(obj))


class _Judgement:
    """One :meth:`ProxyPolicy.apply`: the replacement of each object met, by ``id``."""

    def __init__(
        self,
        policy: ProxyPolicy,
        make_proxy: MakeProxy,
        keep_frames: bool,
        unpicklable: list[tuple[Any, Exception]] | None,
    ) -> None:
        self.policy = policy
        self.threshold = cast(int, policy.threshold)
        self.make_proxy = make_proxy
        self.keep_frames = keep_frames
        self.unpicklable = unpicklable
        self.done: dict[int, tuple[Any, bool]] = {}

    def value(self, obj: Any, depth: int) -> tuple[Any, bool]:
        """``obj`` or its replacement, and whether it holds something pinned."""
        if id(obj) not in self.done:
            self.done[id(obj)] = self._judge(obj, depth)
        return self.done[id(obj)]

    def _judge(self, obj: Any, depth: int) -> tuple[Any, bool]:
        cls = type(obj)
        policy = self.policy
        if issubclass(cls, _TRIVIAL_TYPES):  # first: the cheapest check, and the commonest
            return obj, False
        if policy.pinned(cls):
            return obj, True
        excluded = policy.include and not issubclass(cls, policy.include)
        container = is_container(cls)
        if excluded and not container:
            return obj, False
        nbytes = known_nbytes(obj)
        if nbytes is not None:
            return (self.make_proxy(obj, dumps(obj)) if nbytes > self.threshold else obj), False
        if _bounded_nbytes(obj, _BOUNDED_DEPTH) <= self.threshold:
            return obj, False
        if excluded:
            return self._walk(obj, depth, pinned=False)
        try:
            frames = dumps(obj, refuse=policy.pinned)
        except PickleRefused:  # it holds something pinned: never hidden in a proxy
            return self._walk(obj, depth, pinned=True) if container else (obj, True)
        except Exception as e:
            if self.unpicklable is not None:
                self.unpicklable.append((obj, e))
            return obj, False
        if frames.nbytes > self.threshold:
            return self.make_proxy(obj, frames), False
        keep = self.keep_frames and frames.nbytes >= SERIALIZED_MIN_BYTES
        return (Serialized(frames) if keep else obj), False

    def _walk(self, obj: Any, depth: int, pinned: bool) -> tuple[Any, bool]:
        """Judge each member of a container; the container itself is kept (rebuilt if a
        member was replaced). Beyond ``max_depth`` it is left as it is, ``pinned`` or not."""
        if depth <= 0:
            return obj, pinned
        judged = [self.value(member, depth - 1) for member in members(obj)]
        return with_members(obj, [new for new, _ in judged]), any(p for _, p in judged)
