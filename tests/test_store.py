"""The embedded shared-memory store and the other connectors behind the same store API."""

from __future__ import annotations

import errno
import gc
import multiprocessing
import os
import pickle
import shutil
import signal
import stat
import subprocess
import sys
import time
import weakref
from typing import Any

import numpy as np
import pandas as pd
import pytest
from proxystore.proxy import Proxy, extract
from proxystore.store import Store

from conftest import assert_empty_and_close
from dask_helpers import wait_until
from proxy_patterns import shm
from proxy_patterns.futures import ProxyFuture
from proxy_patterns.ownership import owned, release
from proxy_patterns.proxy import key_of, proxy
from proxy_patterns.shm import (
    SEGMENT_PREFIX,
    SharedMemoryConnector,
    SharedMemoryKey,
    StoreCapacityError,
)
from proxy_patterns.store import (
    connector_from_spec,
    count_entries,
    count_objects,
    get_store,
    put,
    redis_client_of,
)


def _segments(directory: str) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith(SEGMENT_PREFIX))


def _remote(p: Proxy[Any]) -> Proxy[Any]:
    """The proxy as another process receives it: pickled, with no target attached."""
    return pickle.loads(pickle.dumps(p))


@pytest.mark.parametrize(
    "obj",
    [
        np.arange(300_000, dtype=np.float64),
        np.zeros((0, 3)),
        np.arange(20).reshape(4, 5).T,  # non-contiguous: pickled in band
        pd.DataFrame({"a": np.arange(50_000), "b": np.linspace(0, 1, 50_000)}),
        b"x" * 200_000,
        {"nested": [np.ones(10), "text", 3]},
    ],
    ids=["array", "empty", "strided", "frame", "bytes", "dict"],
)
def test_round_trip(store: Store[Any], obj: Any) -> None:
    p = proxy(store, obj)
    got = extract(_remote(p))
    if isinstance(obj, pd.DataFrame):
        pd.testing.assert_frame_equal(got, obj)
    elif isinstance(obj, np.ndarray):
        np.testing.assert_array_equal(got, obj)
    elif isinstance(obj, dict):
        np.testing.assert_array_equal(got["nested"][0], obj["nested"][0])
        assert got["nested"][1:] == obj["nested"][1:]
    else:
        assert got == obj
    store.evict(key_of(p))


def test_resolved_objects_are_writable_private_copies(store: Store[Any]) -> None:
    p = proxy(store, np.zeros(100_000))
    first, second = extract(_remote(p)), extract(_remote(p))
    first += 1
    assert second.sum() == 0 and first.sum() == 100_000
    assert extract(_remote(p)).sum() == 0
    store.evict(key_of(p))


def _mapped_file_of(address: int) -> str | None:
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= address < hi:
                return fields[5].strip() if len(fields) > 5 else None
    return None


def test_resolve_200mb_is_zero_copy(shm_store: Store[Any]) -> None:
    array = np.random.default_rng(0).random(25 * 2**20)  # 200 MiB
    p = proxy(shm_store, array)
    key = key_of(p)
    timings = []
    for _ in range(3):
        remote = _remote(p)
        start = time.perf_counter()
        resolved = extract(remote)
        timings.append(time.perf_counter() - start)
        # The array's memory is the segment's: its data lies inside a mapping of the file.
        assert _mapped_file_of(resolved.ctypes.data) == os.path.join(
            shm_store.connector.directory, key.name
        )
        assert resolved[12345] == array[12345] and resolved[-1] == array[-1]
        del remote, resolved
    assert min(timings) < 0.005, f"resolving 200 MiB took {min(timings) * 1e3:.2f} ms"
    shm_store.evict(key)


def test_view_outlives_eviction(shm_store: Store[Any]) -> None:
    p = proxy(shm_store, np.arange(1_000_000))
    resolved = extract(_remote(p))
    shm_store.evict(key_of(p))
    assert not shm_store.exists(key_of(p))
    assert resolved.sum() == np.arange(1_000_000).sum()  # mapping still valid after unlink


def test_segment_names_permissions_and_eviction(shm_store: Store[Any]) -> None:
    directory = shm_store.connector.directory
    keys = [put(shm_store, np.ones(1000)) for _ in range(3)]
    names = _segments(directory)
    assert sorted(k.name for k in keys) == names
    assert len({n.rsplit("-", 1)[1] for n in names}) == 3  # random tokens
    assert all(len(n.rsplit("-", 1)[1]) == 32 for n in names)
    for name in names:
        assert stat.S_IMODE(os.stat(os.path.join(directory, name)).st_mode) == 0o600
    for key in keys:
        shm_store.evict(key)
    assert _segments(directory) == []


def test_close_removes_everything_the_store_created(shm_dir: str) -> None:
    store = get_store(f"shm://{shm_dir}")
    for _ in range(3):
        put(store, np.ones(1000))
    assert len(_segments(shm_dir)) == 3
    store.close()
    assert _segments(shm_dir) == []
    assert_empty_and_close(store)


def _put_and_report(directory: str, conn: Any) -> None:
    store = get_store(f"shm://{directory}")
    conn.send(key_of(proxy(store, np.arange(10))))
    conn.recv()  # wait until told to exit, normally or by a kill


def _start_producer(directory: str) -> tuple[Any, Any, SharedMemoryKey]:
    """A process that has put one object in the store and waits; (process, pipe, key)."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_put_and_report, args=(directory, child))
    proc.start()
    return proc, parent, parent.recv()


def test_segments_removed_at_interpreter_exit(shm_dir: str) -> None:
    proc, parent, key = _start_producer(shm_dir)
    assert _segments(shm_dir) == [key.name]
    parent.send("exit")
    proc.join(30)
    assert proc.exitcode == 0
    assert _segments(shm_dir) == []


def test_stale_segments_of_a_killed_process_are_cleaned(shm_dir: str) -> None:
    proc, _, key = _start_producer(shm_dir)
    assert shm.remove_stale_segments(shm_dir) == []  # its creator is alive: not stale
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(30)
    assert _segments(shm_dir) == [key.name]  # a killed process cannot clean up itself
    result = subprocess.run(
        [sys.executable, "-m", "proxy_patterns", "clean", "--directory", shm_dir],
        capture_output=True,
        text=True,
        check=True,
    )
    assert key.name in result.stdout
    assert _segments(shm_dir) == []


def test_stale_segments_are_cleaned_when_a_connector_starts(shm_dir: str) -> None:
    stale = os.path.join(shm_dir, f"{SEGMENT_PREFIX}999999999-1-{'0' * 32}")
    open(stale, "wb").close()
    shm._swept_directories.discard(shm_dir)
    SharedMemoryConnector(shm_dir)
    assert not os.path.exists(stale)


def _sum_of_proxy(p: Proxy[Any]) -> float:
    return float(extract(p).sum())


def _make_proxy(directory: str) -> Proxy[Any]:
    return proxy(get_store(f"shm://{directory}"), np.full(1000, 2.0))


def test_proxies_cross_processes_and_recreate_the_store(shm_store: Store[Any]) -> None:
    directory = shm_store.connector.directory
    ctx = multiprocessing.get_context("spawn")
    pool = ctx.Pool(1)  # the worker has never seen the store: it re-creates it
    p = proxy(shm_store, np.arange(1000.0))
    assert pool.apply(_sum_of_proxy, (p,)) == np.arange(1000.0).sum()
    shm_store.evict(key_of(p))
    made = pool.apply(_make_proxy, (directory,))
    assert extract(made).sum() == 2000.0
    assert len(_segments(directory)) == 1  # owned by the worker process...
    pool.close()
    pool.join()
    assert _segments(directory) == []  # ...and removed when it exits


def test_capacity_error_names_sizes_and_leaves_nothing(
    shm_store: Store[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shm, "_free_bytes", lambda directory: 4096)
    with pytest.raises(StoreCapacityError, match=r"cannot put 8\d{5} bytes .*only 4096 bytes"):
        put(shm_store, np.ones(100_000))
    assert os.listdir(shm_store.connector.directory) == []


def test_disk_full_during_write_leaves_no_partial_segment(
    shm_store: Store[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(StoreCapacityError, match=r"cannot put \d+ bytes"):
        put(shm_store, np.ones(100_000))
    assert os.listdir(shm_store.connector.directory) == []


def test_unpicklable_object_names_its_type_and_leaves_nothing(store: Store[Any]) -> None:
    with pytest.raises(TypeError, match="lock"):
        put(store, {"ok": np.ones(10), "bad": __import__("threading").Lock()})


def test_plain_proxystore_store_works_on_the_connector(shm_dir: str) -> None:
    store = Store("plain-proxystore", SharedMemoryConnector(shm_dir), register=True)
    p = store.proxy(np.arange(100))
    assert extract(_remote(p)).sum() == 4950
    store.evict(key_of(p))
    assert_empty_and_close(store)


def test_default_spec_is_shared_memory_and_env_selects_another(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    assert isinstance(get_store().connector, SharedMemoryConnector)
    monkeypatch.setenv("PROXY_PATTERNS_STORE", f"file://{tmp_path}")
    assert type(get_store().connector).__name__ == "FileConnector"
    assert count_entries(get_store()) == 0


@pytest.mark.parametrize("spec", ["nope", "redis://", "ftp://x", "file://"])
def test_bad_spec_is_named(spec: str) -> None:
    with pytest.raises(ValueError, match="unknown store spec"):
        connector_from_spec(spec)


def test_missing_directory_is_named() -> None:
    with pytest.raises(FileNotFoundError, match="/no/such/dir"):
        connector_from_spec("shm:///no/such/dir")


def test_redis_client_of_recognises_redis_stores_only(store: Store[Any], store_spec: str) -> None:
    client = redis_client_of(store.connector)
    if not store_spec.startswith("redis://"):
        assert client is None
        return
    assert client is not None and redis_client_of(store.connector) is client  # built once
    key = put(store, np.arange(10))
    assert client.exists(key.redis_key)  # the connector's own server and database
    store.evict(key)


def test_a_redis_client_lives_as_long_as_its_connector(redis_url: str) -> None:
    """Kept by connector object, not by ``id`` (a later connector may reuse a freed one's):
    a freed connector's client goes with it, and another connector gets a client of its own."""
    from proxystore.connectors.redis import RedisConnector

    host, port = redis_url.removeprefix("redis://").split(":")
    connector = RedisConnector(host, int(port))
    client = weakref.ref(redis_client_of(connector))
    assert client() is not None
    connector.close()
    del connector
    gc.collect()
    assert client() is None
    other = RedisConnector(host, int(port) + 1)  # no server there: the client never connects
    assert redis_client_of(other).connection_pool.connection_kwargs["port"] == int(port) + 1  # type: ignore[union-attr]
    other.close()


def test_recognising_stores_imports_no_redis() -> None:
    """``redis`` is an optional extra: a shared-memory user never imports it."""
    code = (
        "import sys\n"
        "from proxy_patterns.store import count_entries, get_store, redis_client_of\n"
        "store = get_store('shm')\n"
        "assert redis_client_of(store.connector) is None and count_entries(store) >= 0\n"
        "assert 'redis' not in sys.modules, 'redis imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_objects_are_counted_apart_from_records_claims_and_markers(
    store: Store[Any], store_spec: str
) -> None:
    """count_entries sees everything a leak would leave; count_objects only values put."""
    file = store_spec.startswith("file://")
    key = put(store, np.arange(10))
    assert count_objects(store) == 1
    assert count_entries(store) == (2 if file else 1)  # a file and its "ready" marker
    store.evict(key)
    if file:  # no records or claims: ownership and futures need shared memory or Redis
        return
    future: ProxyFuture[int] = ProxyFuture(store)
    assert (count_objects(store), count_entries(store)) == (0, 2)  # its claim, its record
    p = owned(np.arange(10), store)
    assert (count_objects(store), count_entries(store)) == (1, 4)  # + an object, its record
    future.set_result(1)
    assert count_objects(store) == 2
    future.evict()
    release(p)
    assert (count_objects(store), count_entries(store)) == (0, 0)


def test_a_redis_server_that_stops_gives_our_error_and_work_resumes_after_a_restart() -> None:
    """Redis down: a put and a resolve raise StoreUnavailableError naming the store and what
    failed (the key, for a resolve), not whatever the caller made of redis's error; once the
    server is back, new work succeeds (issue 16, found by a fault probe)."""
    import socket

    from proxy_patterns.availability import StoreUnavailableError
    from proxy_patterns.bench.redis_server import redis_server_binary

    binary = redis_server_binary()
    assert binary is not None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ]

    def start() -> subprocess.Popen[bytes]:
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        wait_until(lambda: _accepts(port), message="redis-server accepts connections")
        return server

    server = start()
    store = get_store(f"redis://127.0.0.1:{port}")
    try:
        kept = proxy(store, b"kept" * 1000, keep_target=False)
        server.terminate()
        server.wait(30)
        with pytest.raises(StoreUnavailableError, match=rf"{store.name} is unavailable: putting"):
            proxy(store, b"new" * 1000)
        with pytest.raises(
            StoreUnavailableError, match=rf"reading key .*{key_of(kept).redis_key}"
        ):
            extract(kept)
        server = start()  # empty: the kept object is gone with the old server
        again = proxy(store, b"again" * 1000, keep_target=False)
        assert extract(again) == b"again" * 1000
        store.evict(key_of(again))
    finally:
        try:
            assert_empty_and_close(store)
        finally:
            server.terminate()
            server.wait(30)


def _accepts(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("planted_by", ["a writable mode", "another user"])
def test_a_segment_that_is_not_ours_alone_is_refused(
    shm_store: Store[Any], planted_by: str
) -> None:
    """Segment names are listed in the world-readable /dev/shm: another local user could write
    one first (a future's key, before its value is set) with a crafted pickle. Reading it would
    run their code, so a segment another user owns, or others may write, is refused."""
    from proxy_patterns.shm import UntrustedSegmentError

    if planted_by == "another user" and os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    key = put(shm_store, b"x" * 100)
    path = shm_store.connector.path(key)  # type: ignore[attr-defined]
    assert shm_store.connector.get(key) is not None  # ours alone: read
    if planted_by == "a writable mode":
        os.chmod(path, 0o622)
    else:
        os.chown(path, 65534, 65534)  # nobody
    with pytest.raises(UntrustedSegmentError, match="another user may have planted it"):
        shm_store.connector.get(key)
    shm_store.evict(key)


def test_a_future_claim_is_readable_by_this_user_only(shm_store: Store[Any]) -> None:
    future: ProxyFuture[int] = ProxyFuture(shm_store)
    claim = shm_store.connector.path(future.key) + ".claim"  # type: ignore[attr-defined]
    assert stat.S_IMODE(os.stat(claim).st_mode) == 0o600
    future.evict()


def test_other_users_files_are_neither_removed_nor_reused(shm_dir: str) -> None:
    """In the sticky /dev/shm, another user's entries look like ours (a stale segment, a
    record, a spare of a process that is gone): the sweep must not remove them, nor a put
    reuse their pages (it would write our data into a file they own)."""
    if os.geteuid() != 0:
        pytest.skip("giving files to another user needs root")
    MiB = 2**20
    dead = "999999-1"  # a process tag no process has
    planted = {
        f"{SEGMENT_PREFIX}{dead}-{'a' * 32}": 100,
        f"{shm.SPARE_PREFIX}{dead}-{4 * MiB}-{'b' * 16}": 4 * MiB,
    }
    for name, nbytes in planted.items():
        with open(os.path.join(shm_dir, name), "wb") as f:
            f.truncate(nbytes)
    record = os.path.join(shm_dir, f"{SEGMENT_PREFIX}{dead}-{'c' * 32}{shm.REFS_SUFFIX}")
    os.mkdir(record, 0o700)
    open(os.path.join(record, f"owner.{dead}.{'d' * 16}"), "w").close()
    for name in [*planted, os.path.basename(record)]:
        os.chown(os.path.join(shm_dir, name), 65534, 65534)  # nobody's
    try:
        assert shm.remove_stale_segments(shm_dir) == []
        store = get_store(f"shm://{shm_dir}")
        key = put(store, np.ones(3 * MiB // 8))  # would fit the planted spare
        spare = os.path.join(shm_dir, next(n for n in planted if n.startswith(shm.SPARE_PREFIX)))
        assert os.stat(spare).st_uid == 65534  # still theirs, untouched
        assert os.stat(store.connector.path(key)).st_uid == os.geteuid()  # type: ignore[attr-defined]
        store.evict(key)
        assert all(os.path.exists(os.path.join(shm_dir, n)) for n in planted)
        assert os.path.isdir(record)
    finally:
        for name in planted:
            os.unlink(os.path.join(shm_dir, name))
        shutil.rmtree(record)
    assert_empty_and_close(store)


def test_the_default_store_lives_in_a_directory_of_this_user_alone() -> None:
    connector = SharedMemoryConnector()
    st = os.lstat(connector.directory)
    assert connector.directory == shm.DEFAULT_DIRECTORY
    assert os.path.dirname(connector.directory) == "/dev/shm"
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()
    assert stat.S_IMODE(st.st_mode) == 0o700


@pytest.mark.parametrize("planted", ["open to others", "a link", "another user's"])
def test_a_store_directory_that_is_not_ours_alone_is_refused(shm_dir: str, planted: str) -> None:
    """Whoever can write in the store's directory can plant what we unpickle: a directory
    already there, but open to others, a link, or another user's, is refused."""
    path = os.path.join(shm_dir, "store")
    if planted == "open to others":
        os.mkdir(path, 0o700)
        os.chmod(path, 0o755)
    elif planted == "a link":
        os.mkdir(os.path.join(shm_dir, "elsewhere"), 0o700)
        os.symlink(os.path.join(shm_dir, "elsewhere"), path)
    else:
        if os.geteuid() != 0:
            pytest.skip("giving a directory to another user needs root")
        os.mkdir(path, 0o700)
        os.chown(path, 65534, 65534)
    with pytest.raises(shm.UntrustedDirectoryError, match="refusing to keep objects in"):
        shm.private_directory(path)
    fresh = shm.private_directory(os.path.join(shm_dir, "fresh"))  # created as it should be
    assert stat.S_IMODE(os.lstat(fresh).st_mode) == 0o700


@pytest.fixture
def small_tmpfs(tmp_path: Any) -> Any:
    """A 200 MB tmpfs of its own (mounting one needs root)."""
    path = tmp_path / "small"
    path.mkdir(mode=0o700)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=200m,mode=0700", "tmpfs", str(path)],
        capture_output=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield str(path)
    subprocess.run(["umount", str(path)], check=True)


def test_two_puts_racing_for_the_last_room_one_succeeds(small_tmpfs: str) -> None:
    """Two threads each put 120 MB into 200 MB: one must succeed, and the other's error must
    say how much was left when it failed, not the size of the whole file system (issue 16,
    found by a fault probe: both failed in 5 of 5 trials)."""
    import threading

    connector = SharedMemoryConnector(small_tmpfs, spare_bytes=0)
    payload = np.ones(15_000_000)  # 120 MB

    def put_one(start: threading.Barrier, outcomes: list[Any]) -> None:
        start.wait()
        try:
            outcomes.append(connector.put(payload.data))
        except StoreCapacityError as e:
            outcomes.append(e)

    for _ in range(5):
        start, outcomes = threading.Barrier(2), []
        threads = [threading.Thread(target=put_one, args=(start, outcomes)) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        keys = [o for o in outcomes if isinstance(o, SharedMemoryKey)]
        errors = [o for o in outcomes if isinstance(o, StoreCapacityError)]
        assert len(keys) == 1 and len(errors) == 1, outcomes
        free = int(str(errors[0]).rsplit("only ", 1)[1].split()[0])
        assert free < 120_000_000, errors[0]  # less than asked for: not the whole 200 MB
        connector.evict(keys[0])
    assert os.listdir(small_tmpfs) == []
