"""Arrays allocated in the store: filled in place, published without a copy, never leaked."""

from __future__ import annotations

import ctypes
import gc
import multiprocessing
import os
import pickle
import signal
from concurrent.futures import InvalidStateError
from typing import Any

import numpy as np
import pytest
from proxystore.proxy import Proxy, extract
from proxystore.store import Store
from proxystore.store.factory import StoreFactory

from proxy_patterns import shm
from proxy_patterns.allocation import AllocationError
from proxy_patterns.futures import ProxyFuture
from proxy_patterns.proxy import key_of, proxy
from proxy_patterns.serialize import dumps
from proxy_patterns.shm import SEGMENT_PREFIX
from proxy_patterns.store import empty, get_store


def _inode_mapped_at(address: int) -> int:
    """The inode of the file whose mapping holds ``address`` in this process (0: anonymous)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= address < hi:
                return int(fields[4])
    raise LookupError(f"{address:#x} is not mapped")


def _segment(store: Store[Any], key: Any) -> str:
    return os.path.join(store.connector.directory, key.name)


def _files(directory: str) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith(SEGMENT_PREFIX))


def _remote(p: Proxy[Any]) -> Proxy[Any]:
    return pickle.loads(pickle.dumps(p))


# --- publishing without a copy ------------------------------------------------------------
def _produce_in_place(fut: ProxyFuture[np.ndarray], n: int, conn: Any) -> None:
    """A producer process: fills its future's buffer and publishes it; reports the inode its
    buffer's memory belonged to before and after publishing, and where the buffer lay."""
    buffer = fut.buffer(n, np.float64)
    buffer[:] = np.arange(n)
    before = _inode_mapped_at(buffer.ctypes.data)
    fut.set_result(buffer)
    conn.send((before, _inode_mapped_at(buffer.ctypes.data)))


def _consume_and_report_inode(p: Proxy[Any], conn: Any) -> None:
    value = extract(p)
    conn.send((float(value.sum()), _inode_mapped_at(value.ctypes.data)))


def test_a_buffer_filled_in_another_process_is_the_value_consumers_map(
    shm_store: Store[Any],
) -> None:
    n = 2_000_000
    fut: ProxyFuture[np.ndarray] = ProxyFuture(shm_store)
    ctx = multiprocessing.get_context("spawn")
    consumer_end, consumer_conn = ctx.Pipe()
    consumer = ctx.Process(target=_consume_and_report_inode, args=(fut.proxy(), consumer_conn))
    consumer.start()  # waits for the value
    producer_end, producer_conn = ctx.Pipe()
    producer = ctx.Process(target=_produce_in_place, args=(fut, n, producer_conn))
    producer.start()
    filled_inode, kept_inode = producer_end.recv()
    total, consumer_inode = consumer_end.recv()
    producer.join(30)
    consumer.join(30)
    published_inode = os.stat(_segment(shm_store, fut.key)).st_ino
    # The producer wrote into the very file consumers map: publishing copied nothing.
    assert filled_inode == published_inode == consumer_inode == kept_inode
    assert total == float(np.arange(n).sum())
    fut.evict()


def test_proxy_of_an_allocation_publishes_it_without_a_copy(shm_store: Store[Any]) -> None:
    array = empty((1000, 300), np.float32, shm_store)
    array[:] = 3.0
    address, inode = array.ctypes.data, _inode_mapped_at(array.ctypes.data)
    p = proxy(shm_store, array)
    assert os.stat(_segment(shm_store, key_of(p))).st_ino == inode
    assert array.ctypes.data == address  # the producer's array stays where it was
    assert float(extract(_remote(p)).sum()) == 3.0 * 300_000
    shm_store.evict(key_of(p))


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [
        ((250_000,), np.float64),
        ((7, 9), np.int16),
        ((), np.complex128),
        ((0, 3), np.float64),
        ((5,), np.dtype([("a", "<i4"), ("b", "<f8")])),
    ],
    ids=["1d", "2d-odd-size", "0d", "empty", "structured"],
)
def test_the_published_segment_is_the_segment_of_a_put(
    shm_store: Store[Any], shape: tuple[int, ...], dtype: Any
) -> None:
    array = empty(shape, dtype, shm_store)
    data = array.reshape(-1).view(np.uint8)
    data[:] = np.arange(data.size) % 251
    expected = array.copy()
    key = key_of(proxy(shm_store, array))
    with open(_segment(shm_store, key), "rb") as f:
        published = f.read()
    assert published == b"".join(bytes(c) for c in dumps(expected).chunks())
    got = extract(Proxy(StoreFactory(key, store_config=shm_store.config())))
    assert got.shape == shape and got.dtype == dtype
    np.testing.assert_array_equal(got, expected)
    shm_store.evict(key)


def test_after_publishing_the_producers_writes_stay_its_own(shm_store: Store[Any]) -> None:
    array = empty(100_000, np.float64, shm_store)
    view = array[10:20]  # made before publishing
    array[:] = 1.0
    fut: ProxyFuture[np.ndarray] = ProxyFuture(shm_store)
    fut.set_result(array)
    array[:] = 2.0
    view[:] = 3.0
    assert array[0] == 2.0 and array[15] == 3.0  # still a writable array for its producer
    got = extract(_remote(fut.proxy()))
    assert got.min() == got.max() == 1.0  # but the value is what was published
    fut.evict()


def test_an_allocation_is_published_once_then_copied_like_any_array(
    shm_store: Store[Any],
) -> None:
    first: ProxyFuture[np.ndarray] = ProxyFuture(shm_store)
    second: ProxyFuture[np.ndarray] = ProxyFuture(shm_store)
    array = first.buffer(1000, np.int64)
    array[:] = 7
    first.set_result(array)
    with pytest.raises(InvalidStateError, match="already set"):
        first.set_result(array)
    second.set_result(array)  # an ordinary array by now: its contents are copied
    first_inode = os.stat(_segment(shm_store, first.key)).st_ino
    assert os.stat(_segment(shm_store, second.key)).st_ino != first_inode
    assert int(second.result().sum()) == 7000
    first.evict()
    second.evict()


def test_part_of_an_allocation_is_copied_and_the_rest_removed(shm_store: Store[Any]) -> None:
    directory = shm_store.connector.directory
    array = empty((100, 10), np.float64, shm_store)
    array[:] = np.arange(1000).reshape(100, 10)
    for part in (array[:50], array.T, array.reshape(1000), array.view(np.int64)):
        p = proxy(shm_store, part)
        np.testing.assert_array_equal(extract(_remote(p)), part)
        shm_store.evict(key_of(p))
    assert len(_files(directory)) == 1  # the allocation, still unpublished
    del array, part, p  # the proxies held their parts as their targets
    gc.collect()
    assert _files(directory) == []


# --- nothing is leaked ----------------------------------------------------------------------
def test_an_unpublished_allocation_is_removed_with_its_last_view(shm_store: Store[Any]) -> None:
    directory = shm_store.connector.directory
    array = empty(1_000_000, np.uint8, shm_store)
    view = array[::2]
    del array
    gc.collect()
    assert len(_files(directory)) == 1  # the view keeps it
    del view
    gc.collect()
    assert _files(directory) == []


def test_evicting_a_future_removes_its_unpublished_buffer(shm_store: Store[Any]) -> None:
    directory = shm_store.connector.directory
    fut: ProxyFuture[np.ndarray] = ProxyFuture(shm_store)
    array = fut.buffer(1000, np.float64)
    fut.evict()
    assert _files(directory) == []
    array[:] = 1.0  # the memory stays valid for whoever still holds the array
    with pytest.raises(AllocationError, match="was removed before it was published"):
        proxy(shm_store, array)
    assert _files(directory) == []


def _allocate_and_wait(directory: str, conn: Any) -> None:
    array = empty(1_000_000, np.float64, get_store(f"shm://{directory}"))
    array[:] = 1.0
    conn.send("allocated")
    conn.recv()  # wait until told to exit, normally or by a kill


@pytest.mark.parametrize("ending", ["exit", "kill"])
def test_a_producers_unpublished_allocations_go_with_it(shm_dir: str, ending: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_allocate_and_wait, args=(shm_dir, child))
    proc.start()
    assert parent.recv() == "allocated"
    assert len(_files(shm_dir)) == 1
    assert shm.remove_stale_segments(shm_dir) == []  # its process is alive: not stale
    assert len(_files(shm_dir)) == 1
    if ending == "exit":
        parent.send("exit")
    else:
        os.kill(proc.pid, signal.SIGKILL)
    proc.join(30)
    if ending == "kill":  # a killed process cannot clean up: the next sweep does
        assert len(_files(shm_dir)) == 1
        shm.remove_stale_segments(shm_dir)
    assert _files(shm_dir) == []


# --- errors -------------------------------------------------------------------------------
def test_a_write_out_of_bounds_is_refused_and_nothing_is_published(
    shm_store: Store[Any],
) -> None:
    directory = shm_store.connector.directory
    fut: ProxyFuture[np.ndarray] = ProxyFuture(shm_store)
    array = fut.buffer(1000, np.float64)
    array[:] = 1.0
    ctypes.memset(array.ctypes.data - 8, 0x55, 8)  # the 8 bytes just before the array
    with pytest.raises(AllocationError, match=r"overwritten \(a write out of the array's"):
        fut.set_result(array)
    assert not fut.done()
    fut.set_result(array.copy())  # the future can still be set
    assert fut.result().sum() == 1000.0
    fut.evict()
    del array
    gc.collect()
    assert _files(directory) == []


def test_a_future_set_already_leaves_the_buffer_unpublished(shm_store: Store[Any]) -> None:
    directory = shm_store.connector.directory
    fut: ProxyFuture[Any] = ProxyFuture(shm_store)
    array = fut.buffer(10, np.float64)
    fut.set_result("something else")
    with pytest.raises(InvalidStateError, match="already set"):
        fut.set_result(array)
    assert fut.result() == "something else"
    del array
    gc.collect()
    fut.evict()
    assert _files(directory) == []


@pytest.mark.parametrize("dtype", [object, "datetime64[ns]"])
def test_dtypes_pickled_in_band_cannot_be_allocated(shm_store: Store[Any], dtype: Any) -> None:
    with pytest.raises(TypeError, match="cannot be allocated in the store"):
        empty(10, dtype, shm_store)
    assert _files(shm_store.connector.directory) == []


# --- stores that cannot be written in place ---------------------------------------------
@pytest.mark.parametrize("store_spec", ["redis", "file"], indirect=True)
def test_other_stores_give_ordinary_arrays_published_by_copy(store: Store[Any]) -> None:
    array = empty((100, 3), np.int32, store)
    assert array.base is None  # numpy's own memory
    array[:] = 4
    p = proxy(store, array)
    array[:] = 5  # published by copy: the value is what it was at publishing
    assert int(extract(_remote(p)).sum()) == 1200
    store.evict(key_of(p))


@pytest.mark.parametrize("store_spec", ["redis"], indirect=True)
def test_a_future_buffer_on_redis_is_set_by_copy(store: Store[Any]) -> None:
    fut: ProxyFuture[np.ndarray] = ProxyFuture(store)
    array = fut.buffer(1000, np.float64)
    array[:] = 2.0
    fut.set_result(array)
    assert float(extract(_remote(fut.proxy())).sum()) == 2000.0
    fut.evict()
