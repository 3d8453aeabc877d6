"""The proxy every plugin hands to a framework: transparent to user code, opaque to inspection.

A ProxyStore ``Proxy`` resolves on *any* attribute lookup, and frameworks inspect task
arguments: Dask asks for ``__dask_graph__``/``__dask_tokenize__``, and ``isinstance(p,
collections.abc.Iterator)`` is True for every ProxyStore proxy, so ``dask.array`` turns a
proxied chunk into ``list(p)``. :class:`OpaqueProxy` fixes each of these once, for every plugin:

* ``isinstance`` answers from the class cached when the proxy was made, without resolving;
* it is never an ``Iterator`` (it has no ``__next__``), so it is not consumed by mistake;
* framework protocol attributes (``__dask_*__``) are absent rather than resolved;
* it stays an ``OpaqueProxy`` when pickled.

User code that touches the value resolves it as usual.

:class:`TransitProxy` is the proxy a plugin makes for a task argument or result it moves: it
only *travels*. The task, a dependent task and the client get the object itself
(:func:`materialize`, a mapping on shared memory), so C extensions, the buffer protocol and
``type(x) is`` behave as without the plugin; a Python-level proxy cannot export the buffer
protocol before Python 3.12. Proxies a user makes (futures, :func:`proxy`, owned references)
stay lazy where they go, as the user asked.
"""

from __future__ import annotations

import copyreg
import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

from proxystore.proxy import Proxy, get_factory
from proxystore.proxy._property import proxy_property
from proxystore.proxy._utils import ProxyMetaType
from proxystore.store import Store
from proxystore.store.factory import StoreFactory

from proxy_patterns.availability import reaching
from proxy_patterns.containers import is_container, members, with_members
from proxy_patterns.serialize import Frames
from proxy_patterns.store import put

if TYPE_CHECKING:
    from proxy_patterns.policy import ProxyPolicy

T = TypeVar("T")

# Attribute prefixes of framework protocols a proxy never implements.
_FRAMEWORK_PROTOCOLS = ("__dask_",)


def _rebuild(factory: Callable[[], T], default_class: Any, default_hash: Any) -> OpaqueProxy[T]:
    return _with_defaults(OpaqueProxy(factory), default_class, default_hash)


def _rebuild_transit(
    factory: Callable[[], T], default_class: Any, default_hash: Any
) -> TransitProxy[T]:
    return _with_defaults(TransitProxy(factory), default_class, default_hash)


P = TypeVar("P", bound="OpaqueProxy[Any]")


def _with_defaults(p: P, default_class: Any, default_hash: Any) -> P:
    object.__setattr__(p, "__proxy_default_class__", default_class)
    object.__setattr__(p, "__proxy_default_hash__", default_hash)
    return p


def _module_of(p: OpaqueProxy[Any]) -> Any:
    """``p.__module__``, as its target answers it, read from the class cached at creation until
    the proxy is resolved: ``inspect.getmodule``, which frameworks call while pickling, reads
    it, and ProxyStore's answer resolves the proxy (a full read of the object on Redis)."""
    if object.__getattribute__(p, "__proxy_resolved__"):
        return p.__proxy_wrapped__.__module__
    cls = object.__getattribute__(p, "__proxy_default_class__")
    for klass in cls.__mro__:  # where an instance finds it: in a class's __dict__
        if "__module__" in vars(klass):
            return vars(klass)["__module__"]
    raise AttributeError(f"{cls.__name__!r} object has no attribute '__module__'")


def _resolve(factory: Callable[[], T]) -> T:
    """``factory()``, with a store that cannot be reached named in the error, with the key."""
    store = getattr(getattr(factory, "store_config", None), "name", "of this proxy")
    with reaching(store, f"reading key {getattr(factory, 'key', None)}"):
        return factory()


class _OpaqueProxyType(ProxyMetaType):
    """ProxyStore's metaclass copies its own ``__module__`` property into every proxy class;
    this one puts :func:`_module_of` in its place (the class itself reports the module that
    defines it)."""

    def __new__(cls, name: str, bases: tuple[Any, ...], dictionary: dict[Any, Any]) -> Any:
        module = dictionary["__module__"]
        proxy_class = super().__new__(cls, name, bases, dictionary)
        type.__setattr__(proxy_class, "__module__", proxy_property(default=module)(_module_of))
        return proxy_class


class OpaqueProxy(Proxy[T], metaclass=_OpaqueProxyType):
    """A ProxyStore proxy that framework inspection cannot resolve (see the module docstring)."""

    __slots__ = ()

    def __init__(
        self, factory: Callable[[], T], *, cache_defaults: bool = False, target: T | None = None
    ) -> None:
        super().__init__(factory, cache_defaults=cache_defaults, target=target)
        if object.__getattribute__(self, "__proxy_default_class__") is None:
            # Class unknown until resolved: claim to be a plain object, so that isinstance
            # checks answer False instead of resolving (or blocking on a future).
            object.__setattr__(self, "__proxy_default_class__", object)

    # Blocks collections.abc.Iterator's structural check; iteration (__iter__) still works.
    __next__ = None  # type: ignore[assignment]

    def __getattr__(self, name: str) -> Any:
        # Reached after a property raised AttributeError too: _module_of's answer is final.
        if name.startswith(_FRAMEWORK_PROTOCOLS) or name == "__module__":
            raise AttributeError(name)
        return super().__getattr__(name)

    @property
    def __proxy_wrapped__(self) -> T:
        # Unlike ProxyStore's Proxy, let the factory's exception through as it is (not as a
        # ProxyResolveError, which does not unpickle cleanly): a task that reads a failed
        # future raises the producer's own exception, and a missing key says which key.
        try:
            return cast(T, object.__getattribute__(self, "__proxy_target__"))
        except AttributeError:
            pass
        target = _resolve(object.__getattribute__(self, "__proxy_factory__"))
        object.__setattr__(self, "__proxy_target__", target)
        return cast(T, target)

    @__proxy_wrapped__.setter
    def __proxy_wrapped__(self, target: T) -> None:
        object.__setattr__(self, "__proxy_target__", target)

    @__proxy_wrapped__.deleter
    def __proxy_wrapped__(self) -> None:
        object.__delattr__(self, "__proxy_target__")

    def __reduce__(self) -> Any:
        return _rebuild, _state(self)

    def __reduce_ex__(self, protocol: Any) -> Any:
        return self.__reduce__()


def _state(p: OpaqueProxy[Any]) -> tuple[Any, Any, Any]:
    """What rebuilds a proxy: its factory and cached class and hash (a function, not a method:
    any name on a proxy class hides the target's attribute of that name from user code)."""
    return (
        object.__getattribute__(p, "__proxy_factory__"),
        object.__getattribute__(p, "__proxy_default_class__"),
        object.__getattribute__(p, "__proxy_default_hash__"),
    )


class TransitProxy(OpaqueProxy[T]):
    """The proxy of an object a plugin moves for a task: resolved where the task starts, by
    :func:`materialize`, so user code never sees it (see the module docstring)."""

    __slots__ = ()

    def __reduce__(self) -> Any:
        return _rebuild_transit, _state(self)


class HeldProxy(OpaqueProxy[T]):
    """An :class:`OpaqueProxy` that keeps an object alive for as long as it lives.

    A plugin returns one to a user who asked for lazy results: it holds the framework future
    whose task owns the key, so the key cannot be evicted while the proxy can still be used.
    Pickled, it is a plain OpaqueProxy (the hold stays in this process).
    """

    __slots__ = ("__proxy_holds__",)


def held(p: Proxy[T], holds: object) -> HeldProxy[T]:
    """A :class:`HeldProxy` resolving like ``p``, holding ``holds``."""
    copy: HeldProxy[T] = HeldProxy(get_factory(p))
    for name in ("__proxy_default_class__", "__proxy_default_hash__"):
        object.__setattr__(copy, name, object.__getattribute__(p, name))
    object.__setattr__(copy, "__proxy_holds__", holds)
    return copy


def _import_class(module: str, qualname: str) -> type:
    return cast(type, getattr(importlib.import_module(module), qualname))


_defined_in: dict[type, str] = {}


def pickle_by_reference(module: str, *classes: type) -> None:
    """Let proxy ``classes``, defined in ``module``, be pickled by reference to it.

    Every ProxyStore proxy class reports ``__module__`` as ``proxystore.proxy`` (a property
    that, on instances, forwards to the target), so pickle would look for them there and fail.
    Frameworks pickle result types (Dask reports each result's type to its scheduler), so they
    must pickle: each module registers its proxy classes with their real module.
    """
    for cls in classes:
        _defined_in[cls] = module


def _reduce_proxy_class(cls: type) -> Any:
    """Pickle a proxy *class*: by reference to its registered module, else as pickle would
    (ProxyStore's own classes, which live in the module they report)."""
    module = _defined_in.get(cls)
    if module is None:
        return cls.__qualname__
    return _import_class, (module, cls.__qualname__)


copyreg.pickle(ProxyMetaType, _reduce_proxy_class)
copyreg.pickle(_OpaqueProxyType, _reduce_proxy_class)
pickle_by_reference(__name__, OpaqueProxy, TransitProxy, HeldProxy)


def is_proxy(obj: object) -> bool:
    """Whether ``obj`` is a proxy, decided from its real type so that it is never resolved."""
    return issubclass(type(obj), Proxy)


def proxy(
    store: Store[Any],
    obj: T,
    *,
    keep_target: bool = True,
    frames: Frames | None = None,
    cls: type[OpaqueProxy[Any]] = OpaqueProxy,
) -> OpaqueProxy[T]:
    """Put ``obj`` in ``store`` and return an :class:`OpaqueProxy` (or ``cls``) of it.

    The proxy knows its target's class either way. With ``keep_target`` it also holds the
    object itself (no resolve needed in this process); without, the object can be freed and
    the proxy resolves from the store like a copy received by another process. ``frames`` is
    ``dumps(obj)``, if the caller made it already.
    """
    key = put(store, obj, frames)
    factory: StoreFactory[Any, T] = StoreFactory(key, store_config=store.config())
    p: OpaqueProxy[T] = cls(factory, cache_defaults=True, target=obj)
    unhashable = object.__getattribute__(p, "__proxy_default_hash__")
    if isinstance(unhashable, BaseException):
        # Cached to be re-raised by hash(p); its traceback, and that of an exception being
        # handled when it was raised (its context), would pin the caller's frames.
        unhashable.__traceback__ = None
        unhashable.__context__ = None
    if not keep_target:
        del p.__proxy_wrapped__
    return p


def put_large_parts(
    policy: ProxyPolicy, store: Store[Any], value: Any
) -> tuple[Any, list[tuple[Any, int]]]:
    """``value`` with its large parts put in ``store`` (judged by ``policy``) and replaced by
    :class:`TransitProxy` objects, and the (key, bytes) of each part put: what a worker does with a
    task's result. If a put fails (a store that is full), what was put is evicted and the
    error raised: the caller sends the value as the framework would.
    """
    created: list[tuple[Any, int]] = []

    def make_proxy(obj: Any, frames: Frames) -> Proxy[Any]:
        p = proxy(store, obj, keep_target=False, frames=frames, cls=TransitProxy)
        created.append((key_of(p), frames.nbytes))
        return p

    try:
        return policy.apply(value, make_proxy), created
    except BaseException:
        for key, _ in created:
            store.evict(key)
        raise


def key_of(p: Proxy[Any]) -> Any:
    """The store key a proxy resolves from, read without resolving the proxy."""
    return cast(StoreFactory[Any, Any], get_factory(p)).key


SCALARS = frozenset({type(None), bool, int, float, complex, str, bytes})
"""Types that never are, nor hold, a proxy."""


def map_proxies(obj: Any, fn: Callable[[Proxy[Any]], Any], depth: int) -> Any:
    """``obj`` with every proxy in it, and in its containers (:mod:`proxy_patterns.containers`)
    to ``depth``, replaced by ``fn(proxy)``.

    Containers are rebuilt with their own type (namedtuples, dict subclasses) when something
    inside was replaced, and returned as they are otherwise.
    """
    cls = type(obj)
    if cls in SCALARS:  # most task arguments: answered before any subclass check
        return obj
    if issubclass(cls, Proxy):
        return fn(obj)
    if depth <= 0 or not is_container(cls):
        return obj
    return with_members(obj, [map_proxies(member, fn, depth - 1) for member in members(obj)])


def store_keys_in(obj: Any, depth: int) -> list[Any]:
    """Store keys of the store proxies in ``obj`` and its containers (to ``depth``), unresolved."""
    keys: list[Any] = []

    def collect(p: Proxy[Any]) -> Proxy[Any]:
        factory = get_factory(p)
        if isinstance(factory, StoreFactory):
            keys.append(factory.key)
        return p

    map_proxies(obj, collect, depth)
    return keys


def materialize(obj: Any, depth: int) -> Any:
    """``obj`` with every :class:`TransitProxy` in it, and in its containers to ``depth``,
    replaced by the object it stands for (what the task, or the client, receives).

    The proxy itself is left unresolved (a proxy kept by a framework must not pin the object
    it stands for); a container that was proxied whole is materialized in turn. Other proxies
    (futures, the user's own) are left as they are.
    """

    def resolve(p: Proxy[Any]) -> Any:
        if type(p) is not TransitProxy:
            return p
        return materialize(_resolve(get_factory(p)), depth)

    return map_proxies(obj, resolve, depth)
