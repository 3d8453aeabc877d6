"""Evicted shared-memory segments are reused by later puts, never while anyone maps them."""

from __future__ import annotations

import multiprocessing
import os
import time
from typing import Any

import numpy as np
import pytest
from proxystore.store import Store

from dask_helpers import wait_until
from proxy_patterns import shm
from proxy_patterns.liveness import process_tag
from proxy_patterns.proxy import key_of, proxy
from proxy_patterns.shm import SPARE_PREFIX, SharedMemoryConnector
from proxy_patterns.store import connector_from_spec, count_entries, get_store, put, spec_owned_by

MiB = 2**20


def _spares(directory: str) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith(SPARE_PREFIX))


def _inode(store: Store[Any], key: Any) -> int:
    return os.stat(store.connector.path(key)).st_ino


def _filled(value: float, nbytes: int = 2 * MiB) -> np.ndarray:
    return np.full(nbytes // 8, value)


def test_an_evicted_segment_is_reused_by_a_put_of_its_size(shm_store: Store[Any]) -> None:
    directory = shm_store.connector.directory
    key = put(shm_store, _filled(1.0))
    inode = _inode(shm_store, key)
    shm_store.evict(key)
    assert count_entries(shm_store) == 0 and len(_spares(directory)) == 1  # a spare is no key
    key = put(shm_store, _filled(2.0, 2 * MiB - 4096))  # a little smaller fits too
    assert _inode(shm_store, key) == inode and _spares(directory) == []
    assert (shm_store.get(key) == 2.0).all() and shm_store.get(key).nbytes == 2 * MiB - 4096
    shm_store.evict(key)


def test_small_segments_and_a_zero_limit_keep_no_spares(shm_dir: str) -> None:
    small = get_store(f"shm://{shm_dir}")
    small.evict(put(small, _filled(1.0, MiB // 2)))
    assert _spares(shm_dir) == []
    connector = SharedMemoryConnector(shm_dir, spare_bytes=0)
    connector.evict(connector.put(bytes(2 * MiB)))
    assert _spares(shm_dir) == [] and os.listdir(shm_dir) == []
    assert SharedMemoryConnector.from_config(connector.config()).spare_bytes == 0
    spec = f"shm://{shm_dir}?spare_bytes=1MiB"
    assert connector_from_spec(spec).spare_bytes == MiB  # type: ignore[attr-defined]
    owned = connector_from_spec(spec_owned_by(spec, "1-2"))
    assert owned.config() == {"directory": shm_dir, "owner": "1-2", "spare_bytes": MiB}
    small.close()


def test_a_mapped_spare_is_not_reused_until_unmapped(shm_store: Store[Any]) -> None:
    first = put(shm_store, _filled(1.0))
    inode = _inode(shm_store, first)
    view = shm_store.get(first)  # maps the segment
    shm_store.evict(first)
    second = put(shm_store, _filled(2.0))
    assert _inode(shm_store, second) != inode  # fresh pages: the spare is still mapped
    assert (view == 1.0).all()
    del view
    third = put(shm_store, _filled(3.0))
    assert _inode(shm_store, third) == inode
    for key in (second, third):
        shm_store.evict(key)


def _hold_mapping_in_a_fork(store: Store[Any], key: Any) -> tuple[int, Any]:
    """Fork a child that inherits a mapping of ``key``, checks it when told, and exits."""
    read, write = os.pipe()
    view = store.get(key)
    pid = os.fork()
    if pid == 0:  # pragma: no cover (child)
        os.close(write)
        os.read(read, 1)
        os._exit(0 if (view == 1.0).all() else 1)
    os.close(read)
    return pid, write


def test_a_mapping_inherited_by_a_forked_child_keeps_its_spare(shm_store: Store[Any]) -> None:
    first = put(shm_store, _filled(1.0))
    inode = _inode(shm_store, first)
    pid, go = _hold_mapping_in_a_fork(shm_store, first)  # the parent's view is gone again
    shm_store.evict(first)
    second = put(shm_store, _filled(2.0))
    assert _inode(shm_store, second) != inode
    os.write(go, b"x")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0  # the child still saw its own object
    third = put(shm_store, _filled(3.0))
    assert _inode(shm_store, third) == inode
    for key in (second, third):
        shm_store.evict(key)


def _check_every_object(directory: str, keys: Any, mapped: Any, bad: Any) -> None:
    """Map every key sent, say whether it could, then hold it a moment and check it."""
    store = get_store(f"shm://{directory}")
    while (sent := keys.get()) is not None:
        key, value = sent
        data = store.connector.get(key)
        mapped.put(data is not None)
        if data is not None:
            time.sleep(0.002)  # meanwhile the key is evicted and more objects are put
            bad.value += not (np.frombuffer(data, dtype=np.float64) == value).all()


def test_readers_racing_evictions_and_reuse_never_see_another_object(shm_dir: str) -> None:
    connector = SharedMemoryConnector(shm_dir)
    ctx = multiprocessing.get_context("spawn")
    keys, mapped, bad = ctx.Queue(), ctx.Queue(), ctx.Value("i", 0)
    reader = ctx.Process(target=_check_every_object, args=(shm_dir, keys, mapped, bad))
    reader.start()
    inodes, maps = set(), 0
    for i in range(200):
        key = connector.put(memoryview(_filled(float(i))).cast("B"))
        inodes.add(os.stat(connector.path(key)).st_ino)
        keys.put((key, float(i)))
        if i % 2:
            connector.evict(key)  # racing the reader's open and lock
            maps += mapped.get(timeout=30)
        else:
            maps += mapped.get(timeout=30)
            connector.evict(key)  # while the reader maps it; the next put must not reuse it
            connector.evict(connector.put(memoryview(_filled(-1.0)).cast("B")))
    keys.put(None)
    reader.join(60)
    assert reader.exitcode == 0
    assert bad.value == 0
    assert maps >= 100 and len(inodes) < 200  # objects were mapped, and pages reused
    assert count_entries(get_store(f"shm://{shm_dir}")) == 0


def test_unused_spares_are_removed(shm_store: Store[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shm, "SPARE_IDLE_SECONDS", 0.2)
    directory = shm_store.connector.directory
    shm_store.evict(put(shm_store, _filled(1.0)))
    assert len(_spares(directory)) == 1
    wait_until(lambda: not _spares(directory), 5, "the spare was not removed after 0.2 s idle")


def test_spares_of_a_dead_process_are_stale(shm_dir: str) -> None:
    stale = os.path.join(shm_dir, f"{SPARE_PREFIX}999999999-1-{2 * MiB}-{'0' * 16}")
    open(stale, "wb").close()
    assert shm.remove_stale_segments(shm_dir) == []  # removed, but spares are no keys
    assert not os.path.exists(stale)


def test_a_forked_child_leaving_by_os_exit_leaves_no_spares(shm_store: Store[Any]) -> None:
    directory = shm_store.connector.directory
    key = put(shm_store, _filled(1.0))
    pid = os.fork()
    if pid == 0:  # pragma: no cover (child): evicts, then leaves without atexit handlers
        shm_store.evict(key)
        os._exit(0 if len(_spares(directory)) == 1 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert len(_spares(directory)) == 1  # the child's spare, its maker gone
    shm_store.evict(put(shm_store, _filled(2.0, 8 * MiB)))  # lists the spares: too large to reuse
    (left,) = _spares(directory)  # the 8 MiB one, made here; the child's is gone
    assert left.startswith(f"{SPARE_PREFIX}{process_tag()}-")


def test_spares_make_room_before_a_put_fails(
    shm_store: Store[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = shm_store.connector.directory
    shm_store.evict(put(shm_store, _filled(1.0)))
    assert len(_spares(directory)) == 1
    # A full file system until the spare is gone; the put is too large to reuse it.
    monkeypatch.setattr(shm, "_free_bytes", lambda d: 0 if _spares(d) else 10**9)
    p = proxy(shm_store, _filled(2.0, 5 * MiB))
    assert _spares(directory) == []
    shm_store.evict(key_of(p))
