"""Ownership: reference records kept with the store, counted across processes and threads."""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import pickle
import signal
import threading
import time
import weakref
from typing import Any

import numpy as np
import pytest
from distributed import Client, LocalCluster
from proxystore.proxy import Proxy
from proxystore.store import Store, unregister_store

from dask_helpers import (
    CountingFactory,
    Signal,
    held_sum,
    owned_head,
    owned_ones,
    poll_for,
    wait_until,
)
from proxy_patterns.ownership import (
    MutableBorrowError,
    OwnedProxy,
    ReferenceInvalidError,
    RefProxy,
    borrow,
    clone,
    holders,
    mut_borrow,
    owned,
    owned_scope,
    owned_task,
    release,
)
from proxy_patterns.proxy import key_of
from proxy_patterns.records import ref_table_for
from proxy_patterns.rendezvous import LEASE
from proxy_patterns.shm import SharedMemoryConnector
from proxy_patterns.store import count_entries

both_stores = pytest.mark.parametrize("store_spec", ["shm", "redis"], indirect=True)


def _hold_in_child(p: Any, conn: Any) -> None:
    """Receive a reference (it moves here), report what the child sees, then wait."""
    conn.send((type(p).__name__, float(np.sum(p)), holders(p)))
    conn.recv()  # told to finish (or killed)
    del p


def _start_holder(p: Any) -> tuple[Any, Any]:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_hold_in_child, args=(p, child))
    proc.start()
    return proc, parent


@both_stores
def test_owner_release_evicts_and_use_after_release_raises(store: Store[Any]) -> None:
    p = owned(np.arange(10.0), store)
    assert isinstance(p, np.ndarray)  # isinstance answers without resolving
    assert float(p.sum()) == 45.0 and holders(p) == ["owner"] and count_entries(store) == 2
    release(p)
    assert count_entries(store) == 0  # the object and its record
    with pytest.raises(ReferenceInvalidError, match=r"owner reference to object .* released"):
        p.sum()  # even though this process had resolved it
    with pytest.raises(ReferenceInvalidError, match="released"):
        release(p)  # double release is an error, never a negative count


@both_stores
def test_borrows_keep_the_object_until_the_last_is_released(store: Store[Any]) -> None:
    p = owned(np.ones(100), store)
    r1, r2 = borrow(p), borrow(p)
    assert isinstance(r1, RefProxy) and holders(p) == ["owner", "ref", "ref"]
    release(p)  # the owner goes first: the borrows still hold the object
    assert float(r1.sum()) == 100.0
    r3 = borrow(r1)  # a borrow can be borrowed from
    release(r1)
    release(r2)
    assert float(np.sum(r3)) == 100.0 and count_entries(store) == 2
    del r3  # garbage collection releases too
    gc.collect()
    assert count_entries(store) == 0


@both_stores
def test_mutable_borrow_is_exclusive(store: Store[Any]) -> None:
    p = owned([1, 2, 3], store)
    r = borrow(p)
    with pytest.raises(MutableBorrowError, match="1 shared borrow"):
        mut_borrow(p)
    release(r)
    m = mut_borrow(p)
    with pytest.raises(MutableBorrowError, match="mutably borrowed"):
        borrow(p)
    with pytest.raises(MutableBorrowError, match="mutably borrowed"):
        mut_borrow(p)
    assert list(m) == [1, 2, 3]
    release(m)
    release(borrow(p))
    release(p)
    assert count_entries(store) == 0


@both_stores
def test_clone_is_independent(store: Store[Any]) -> None:
    p = owned({"a": 1}, store)
    c = clone(p)
    assert isinstance(c, OwnedProxy) and key_of(c) != key_of(p)
    release(p)
    assert c == {"a": 1}
    release(c)
    assert count_entries(store) == 0


@both_stores
def test_pickling_moves_a_reference_once(store: Store[Any]) -> None:
    p = owned(np.arange(4.0), store)
    data = pickle.dumps(p)
    with pytest.raises(ReferenceInvalidError, match="moved"):
        p.sum()  # the sender gave it up
    again = pickle.dumps(p)  # serializers may pickle twice: the same move
    received = pickle.loads(data)
    assert isinstance(received, OwnedProxy) and float(received.sum()) == 6.0
    assert holders(received) == ["owner"]
    with pytest.raises(ReferenceInvalidError, match="received already"):
        pickle.loads(again)  # a move is received once
    del p  # a moved proxy's garbage collection releases nothing
    gc.collect()
    assert count_entries(store) == 2
    release(received)
    assert count_entries(store) == 0


@both_stores
def test_borrows_from_two_processes_at_once_count(store: Store[Any]) -> None:
    p = owned(np.full(1000, 2.0), store)
    children = [_start_holder(borrow(p)) for _ in range(2)]  # each borrow moves to a child
    for _, conn in children:
        kind, total, seen = conn.recv()
        assert kind == "RefProxy" and total == 2000.0 and {"owner", "ref"} <= set(seen)
    assert holders(p) == ["owner", "ref", "ref"]  # both children's borrows count here
    release(p)
    assert count_entries(store) == 2  # still borrowed by the children
    for proc, conn in children:
        conn.send("done")
        proc.join(30)
    # The children released their borrows when they exited; the last one evicted the object.
    assert poll_for(lambda: count_entries(store) == 0, timeout=5)


@both_stores
def test_killed_borrower_does_not_pin_the_object(store: Store[Any]) -> None:
    p = owned(np.ones(10), store)
    proc, conn = _start_holder(borrow(p))
    assert conn.recv()[0] == "RefProxy"
    release(p)
    assert count_entries(store) == 2
    os.kill(proc.pid, signal.SIGKILL)  # never releases its borrow
    proc.join(30)
    # Its lease expires (at once on shared memory, after LEASE seconds on Redis) and this
    # process, which released its own reference while the child held one, evicts it.
    assert poll_for(lambda: count_entries(store) == 0, timeout=LEASE + 5)


@both_stores
def test_eight_threads_borrowing_concurrently_lose_no_update(store: Store[Any]) -> None:
    p = owned(np.zeros(10), store)
    errors: list[BaseException] = []

    def churn() -> None:
        try:
            for _ in range(25):
                refs = [borrow(p) for _ in range(3)]
                for r in refs:
                    release(r)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=churn) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and holders(p) == ["owner"]
    release(p)
    assert count_entries(store) == 0


@both_stores
def test_owned_scope_releases_what_was_not_moved_out(store: Store[Any]) -> None:
    with owned_scope() as scope:
        dropped = owned(np.ones(10), store)
        kept = owned(np.ones(10), store)
        scope.keep(kept)
        moved = pickle.dumps(owned(np.ones(10), store))
        assert count_entries(store) == 6
    assert count_entries(store) == 4  # `dropped` is gone; `kept` and the moved one stay
    with pytest.raises(ReferenceInvalidError):
        dropped.sum()
    release(kept)
    release(pickle.loads(moved))
    assert count_entries(store) == 0


@owned_task
def _concatenate(a: Any, b: Any) -> Any:
    made = owned(np.zeros(5), a.__proxy_factory__.get_store())  # released on return
    return owned(np.concatenate([a, b, made]), a.__proxy_factory__.get_store())


@both_stores
def test_owned_task_releases_its_arguments_but_not_its_result(store: Store[Any]) -> None:
    keep = owned(np.ones(3), store)
    given = owned(np.ones(2), store)
    result = _concatenate(borrow(keep), given)  # `given` moves into the task
    assert isinstance(result, OwnedProxy) and float(np.sum(result)) == 5.0
    with pytest.raises(ReferenceInvalidError):
        given.sum()
    assert holders(keep) == ["owner"]  # the borrow was given back
    assert count_entries(store) == 4  # `keep` and the result
    release(keep)
    release(result)
    assert count_entries(store) == 0


@both_stores
def test_a_failed_record_leaves_nothing(store: Store[Any], monkeypatch: Any) -> None:
    table = ref_table_for(store)

    def broken(key: Any) -> str:
        raise OSError("no room for the record")

    monkeypatch.setattr(table, "create", broken)
    with pytest.raises(OSError, match="no room"):
        owned(np.ones(10), store)
    assert count_entries(store) == 0


@pytest.mark.parametrize("store_spec", ["shm"], indirect=True)
def test_with_dask_workers(
    store: Store[Any], store_spec: str, monkeypatch: Any, tmp_path: Any
) -> None:
    """Borrows taken for tasks on two worker processes count while the tasks run; owned
    results made on workers move to the client; arguments are released when tasks return."""
    monkeypatch.setenv("PROXY_PATTERNS_STORE", store_spec)  # the workers' default store
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        p = owned(np.ones(1000), store)
        go = Signal(str(tmp_path))
        running = [client.submit(held_sum, borrow(p), go, pure=False) for _ in range(2)]
        wait_until(lambda: holders(p) == ["owner", "ref", "ref"], message="both tasks hold p")
        go.set()
        assert client.gather(running) == [1000.0, 1000.0]
        assert holders(p) == ["owner"]
        release(p)

        parts = [client.submit(owned_ones, 10**5, pure=False) for _ in range(4)]
        head = client.submit(owned_head, *parts).result()
        assert isinstance(head, OwnedProxy) and float(np.sum(head)) == 10.0
        assert holders(head) == ["owner"]  # the parts were released by owned_head
        release(head)
        del running, parts
    assert count_entries(store) == 0


@pytest.mark.parametrize("store_spec", ["redis"], indirect=True)
def test_a_redis_server_that_stops_does_not_let_other_servers_leases_expire(
    store: Store[Any],
) -> None:
    """A store whose server stopped answering (each renewal then takes seconds of redis-py's
    retries) must not delay the renewal of this process's leases on another server: they would
    expire, and their objects be evicted while still held."""
    from proxy_patterns.bench.redis_server import local_redis_server
    from proxy_patterns.store import get_store

    with local_redis_server() as url:
        doomed_store = get_store(url)
        doomed = owned(np.ones(10), doomed_store)  # its lease is renewed on that server
        kept = owned(np.ones(10), store)
    # The doomed server is gone; for two lease periods, the kept object stays held.
    deadline = time.monotonic() + 2 * LEASE
    while time.monotonic() < deadline:
        assert holders(kept) == ["owner"], "a lease on a live server expired"
        time.sleep(0.5)  # sampling the record while time passes: the test is about time
    release(kept)
    with contextlib.suppress(Exception):  # its server is gone: nothing to release there
        release(doomed)
    unregister_store(doomed_store.name)


@pytest.mark.parametrize("store_spec", ["redis"], indirect=True)
def test_lease_renewal_outlives_a_failing_connection(store: Store[Any], store_spec: str) -> None:
    """One client whose connection fails (closed under the renewer) must not stop the
    renewal of every other lease of the process."""
    import redis

    from proxy_patterns.rendezvous import lease_renewer

    failed = threading.Event()

    class BrokenClient:
        def eval(self, *args: Any) -> Any:
            failed.set()
            raise OSError(9, "Bad file descriptor")

    broken = BrokenClient()
    p = owned(np.ones(10), store)
    lease_renewer.add(broken, "broken")
    try:
        assert failed.wait(2 * LEASE), "the renewer never tried the broken client"
        # A lease taken after that failure, and never renewed, expires; had the failure
        # stopped the renewer, this process's lease (last renewed before it) expired first.
        with redis.Redis.from_url(store_spec) as client:
            client.set("test-unrenewed-lease", 1, px=int(LEASE * 1000))
            wait_until(
                lambda: not client.exists("test-unrenewed-lease"),
                timeout=LEASE + 10,
                message="the unrenewed lease expires",
            )
        assert holders(p) == ["owner"]  # this process's lease was renewed all along
    finally:
        lease_renewer.discard(broken, "broken")
    release(p)
    assert count_entries(store) == 0


def test_owned_task_leaves_other_proxies_unresolved() -> None:
    """Finding the references a task was given must not resolve the other proxies it got."""
    factory = CountingFactory(np.arange(3))

    @owned_task
    def size(x: Any) -> int:
        return 1

    assert size(Proxy(factory)) == 1 and size([Proxy(factory)]) == 1
    assert factory.calls == 0


def test_records_are_kept_per_connector_without_keeping_it_alive(
    shm_dir: str, tmp_path: Any
) -> None:
    """Records are found by connector object: a freed connector leaves nothing behind (before,
    tables were kept by ``id`` and held their connector for ever), and another connector, which
    may reuse that ``id``, gets records bound to itself."""
    first = SharedMemoryConnector(shm_dir)
    table = ref_table_for(_StoreOf(first))
    assert table.connector.directory == shm_dir  # type: ignore[attr-defined]
    alive = weakref.ref(first)
    del first, table
    gc.collect()
    assert alive() is None
    second = SharedMemoryConnector(str(tmp_path))
    assert ref_table_for(_StoreOf(second)).connector.directory == str(tmp_path)  # type: ignore[attr-defined]


class _StoreOf:
    """Just enough of a Store for ref_table_for: its connector."""

    def __init__(self, connector: Any) -> None:
        self.connector = connector
