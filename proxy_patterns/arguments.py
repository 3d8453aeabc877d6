"""Task arguments put once per distinct content; every use of one holds its key.

Users pass one large object to many tasks (a loop of ``submit(f, x)``, ``map`` with a large
constant), or equal objects. A plugin puts each distinct content once and hands every task the
same proxy. The key must live while any task given it may still run, and no longer, so every
use takes its own *holder* in the key's reference record (:mod:`proxy_patterns.ownership`),
which whoever ends that use releases: the Dask scheduler when the tasks are forgotten, the
Parsl plugin when the app is done. The record evicts the key when its last holder goes, and
the next use of the same content puts it again. No plugin evicts an argument itself, so a use
that starts while the previous one ends can never lose its key.
"""

from __future__ import annotations

import threading
from typing import Any

from proxystore.proxy import Proxy
from proxystore.store import Store

from proxy_patterns.availability import reaching
from proxy_patterns.proxy import TransitProxy, key_of, proxy
from proxy_patterns.records import ReferenceInvalidError, RefTable, ref_table_for
from proxy_patterns.serialize import Frames

_SWEEP_AFTER = 64
"""Remembered contents beyond twice the number found live at the last sweep (plus this many)
trigger a sweep that forgets the evicted ones: memory stays bounded in long sessions."""


class ArgumentProxies:
    """The argument proxies of one client (or executor) in ``store``, one per content."""

    def __init__(self, store: Store[Any]) -> None:
        self.store = store
        self.table: RefTable = ref_table_for(store)
        self._lock = threading.Lock()
        self._by_digest: dict[str, Proxy[Any]] = {}
        self._live_at_sweep = 0
        self.bytes_put = 0

    def hold(self, obj: Any, frames: Frames) -> tuple[Proxy[Any], str]:
        """A proxy of ``obj`` (``frames`` is ``dumps(obj)``) and a new holder of its key.

        The key of an earlier use of the same content is reused while it is held; otherwise
        ``obj`` is put now. The caller releases the holder (``self.table.drop``) when the use
        ends, or passes it to the process that will.
        """
        digest = frames.digest()  # content: an object changed in place is put anew
        with self._lock:
            known = self._by_digest.get(digest)
        if known is not None:
            try:
                with reaching(self.store.name, f"holding key {key_of(known)}"):
                    return known, self.table.add(key_of(known), "ref")
            except ReferenceInvalidError:  # its last use ended: it was evicted
                pass
        p = proxy(self.store, obj, keep_target=False, frames=frames, cls=TransitProxy)
        try:
            with reaching(self.store.name, f"holding key {key_of(p)}"):
                holder = self.table.create(key_of(p))
        except BaseException:
            self.store.evict(key_of(p))
            raise
        with self._lock:
            self._by_digest[digest] = p  # two threads putting one content: the last one wins
            self.bytes_put += frames.nbytes
            sweep = len(self._by_digest) > 2 * self._live_at_sweep + _SWEEP_AFTER
        if sweep:
            self._sweep()
        return p, holder

    def _sweep(self) -> None:
        """Forget contents whose keys were evicted."""
        with self._lock:
            known = list(self._by_digest.items())
        gone = [(digest, p) for digest, p in known if not self.table.holders(key_of(p))]
        with self._lock:
            for digest, p in gone:
                if self._by_digest.get(digest) is p:  # not put again meanwhile
                    del self._by_digest[digest]
            self._live_at_sweep = len(self._by_digest)
