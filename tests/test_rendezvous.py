"""Rendezvous: write-once keys, event-driven waits and claims, on shared memory and Redis.

Through the public API only (``rendezvous_for`` and the ``Rendezvous`` methods): how a backend
watches keys or checks a claimant's liveness is its own business.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from typing import Any

import pytest
from proxystore.store import Store

from proxy_patterns import rendezvous
from proxy_patterns.rendezvous import GRACE, ProducerLostError, rendezvous_for
from proxy_patterns.serialize import deserialize, dumps
from proxy_patterns.store import count_entries, get_store
from waiters import EVENTS_ONLY

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.parametrize("store_spec", ["shm", "redis"], indirect=True),
]


def test_a_key_is_written_once(store: Store[Any]) -> None:
    rv = rendezvous_for(store)
    key = rv.new_key()
    assert not rv.exists(key)
    assert rv.set_once(key, dumps("first"))
    assert rv.exists(key)
    assert not rv.set_once(key, dumps("second"))
    assert deserialize(store.connector.get(key)) == "first"
    rv.forget(key)


def test_of_concurrent_writers_exactly_one_wins(store: Store[Any]) -> None:
    rv = rendezvous_for(store)
    key = rv.new_key()
    start = threading.Barrier(8)
    won: list[int] = []

    def write(i: int) -> None:
        start.wait()
        if rv.set_once(key, dumps(i)):
            won.append(i)

    writers = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in writers:
        t.start()
    for t in writers:
        t.join(30)
    assert len(won) == 1
    assert deserialize(store.connector.get(key)) == won[0]
    rv.forget(key)


def test_a_wait_is_woken_by_the_set(store: Store[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The key is set once the waiter has seen it unset (set earlier, it would return without
    any wake-up); the waiter checks liveness (and the key) an hour apart, so only the set's
    event can wake it."""
    monkeypatch.setattr(rendezvous, "LIVENESS_INTERVAL", EVENTS_ONLY)
    rv = rendezvous_for(store)
    key = rv.new_key()
    seen_unset = threading.Event()
    exists = rv.exists

    def exists_seen(k: Any) -> bool:
        found = exists(k)
        if not found:
            seen_unset.set()
        return found

    monkeypatch.setattr(rv, "exists", exists_seen)
    woken: list[bool] = []
    waiter = threading.Thread(target=lambda: woken.append(rv.wait(key, 60)), daemon=True)
    waiter.start()
    assert seen_unset.wait(30), "the waiter never looked at the key"
    assert rv.set_once(key, dumps(1))
    waiter.join(30)
    assert woken == [True], "the waiter was not woken by the set"
    assert rv.wait(key, 0)  # set already: no wait at all
    rv.forget(key)


def test_a_wait_times_out_with_false(store: Store[Any]) -> None:
    rv = rendezvous_for(store)
    key = rv.new_key()
    rv.claim(key)  # by this process, alive: the wait ends by its timeout, not as lost
    start = time.monotonic()
    assert rv.wait(key, 0.3) is False
    assert time.monotonic() - start >= 0.3
    assert not rv.exists(key)
    rv.forget(key)


def _claim_until_killed(spec: str, key: Any, conn: Any) -> None:
    rendezvous_for(get_store(spec)).claim(key)
    conn.send("claimed")
    conn.recv()  # nothing is sent: it waits until it is killed


def test_a_claimant_that_dies_is_lost_after_the_grace_period(
    store: Store[Any], store_spec: str
) -> None:
    rv = rendezvous_for(store)
    key = rv.new_key()
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    claimant = ctx.Process(target=_claim_until_killed, args=(store_spec, key, child))
    claimant.start()
    assert parent.recv() == "claimed"
    os.kill(claimant.pid, signal.SIGKILL)  # type: ignore[arg-type]
    claimant.join(30)
    died = time.monotonic()
    with pytest.raises(ProducerLostError):
        rv.wait(key, 100)  # measured: lost after 2.5 s (shm), 7 s (Redis: the lease expires)
    assert time.monotonic() - died > GRACE
    rv.forget(key)


def test_forget_removes_the_value_and_the_claim(store: Store[Any]) -> None:
    rv = rendezvous_for(store)
    claimed, written = rv.new_key(), rv.new_key()
    rv.claim(claimed)
    rv.claim(written)
    assert rv.set_once(written, dumps(1))
    rv.forget(claimed)
    rv.forget(written)
    assert not rv.exists(written)
    assert count_entries(store) == 0
