"""The topology store across simulated hosts (own ``/dev/shm`` and hostname each, one loopback
network): objects of every type cross each host boundary once, peer to peer, and stay in shared
memory within a host; records are kept on the object's host; everything is freed on both hosts;
another host's shared memory fails at once, with what to configure."""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import parsl
import pytest
import task_objects
from distributed import Client
from parsl import Config

from parsl_helpers import fingerprint_app, make_app, simulated_hosts_htex
from proxy_patterns import get_store, key_of, proxy
from proxy_patterns.bench.cluster import SchedulerProbe, simulated_dask_cluster
from proxy_patterns.futures import ProxyFuture
from proxy_patterns.hosts import StoreUnreachableError
from proxy_patterns.ownership import borrow, owned
from proxy_patterns.plugins.dask import register
from proxy_patterns.plugins.parsl import proxied
from proxy_patterns.records import ref_table_for
from proxy_patterns.simhosts import Host, namespaces_available, simulated_hosts
from proxy_patterns.store import count_entries, entries_left_after_eviction
from proxy_patterns.streams import StreamProducer
from proxy_patterns.topology import bytes_served

pytestmark = [
    pytest.mark.skipif(namespaces_available() is not None, reason=str(namespaces_available())),
    pytest.mark.timeout(300),
]

CASES = sorted(task_objects.CASES)


@pytest.fixture
def hosts() -> Iterator[list[Host]]:
    """Host A (this machine, the test process) and host B (simulated)."""
    with simulated_hosts(2) as both:
        yield both


@pytest.fixture
def topology_dir(hosts: list[Host]) -> Iterator[str]:
    """A store directory of the same name on both hosts, so other tests' entries never count."""
    directory = tempfile.mkdtemp(prefix="pp-topology-", dir="/dev/shm")
    os.makedirs(hosts[1].shm_path(os.path.basename(directory)), mode=0o700)
    try:
        yield directory
        for host in hosts:
            assert host.count_entries(directory) == 0, f"entries left on {host.name}"
    finally:
        shutil.rmtree(directory)


def _wait_empty(host: Host, directory: str, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while (left := host.count_entries(directory)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def _run_on(host: Host, code: str, *args: str, env: dict[str, str] | None = None) -> str:
    process = host.popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err.decode()[-3000:]
    return out.decode().strip()


_READ = """
import pickle, sys
from proxystore.proxy import extract
from task_objects import fingerprint
with open(sys.argv[1], "rb") as f:
    proxies = pickle.load(f)
print(repr([fingerprint(extract(p)) for p in proxies]), flush=True)
sys.stdin.read()  # (the replicas it fetched live while it does)
"""


def test_objects_of_every_type_cross_to_another_host_once(
    hosts: list[Host], topology_dir: str, tmp_path: Path
) -> None:
    _, b = hosts
    store = get_store(f"topology://{topology_dir}")
    objects = [task_objects.make(case, seed) for seed, case in enumerate(CASES)]
    proxies = [proxy(store, obj) for obj in objects]
    path = tmp_path / "proxies.pickle"
    path.write_bytes(pickle.dumps(proxies))
    served = bytes_served()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    readers = [
        b.popen(
            [sys.executable, "-c", _READ, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        for _ in range(2)
    ]
    try:
        # Two processes of host B read every object: the second maps the first's replicas.
        seen = [r.stdout.readline().decode().strip() for r in readers if r.stdout]
        assert seen == [repr([task_objects.fingerprint(obj) for obj in objects])] * 2
        assert bytes_served() - served == sum(key_of(p).nbytes for p in proxies)
    finally:
        for reader in readers:
            reader.communicate(b"")
    for p in proxies:
        store.evict(key_of(p))
    assert _wait_empty(b, topology_dir) == 0
    assert count_entries(store) == 0


def test_a_replica_goes_soon_after_its_object(
    hosts: list[Host], topology_dir: str, tmp_path: Path
) -> None:
    _, b = hosts
    store = get_store(f"topology://{topology_dir}")
    p = proxy(store, np.arange(1_000_000))
    (tmp_path / "p").write_bytes(pickle.dumps(p))
    code = (
        "import pickle, sys, time\n"
        "p = pickle.load(open(sys.argv[1], 'rb'))\n"
        "print(int(p.sum()), flush=True)\n"
        "sys.stdin.read()\n"  # stays alive, holding its replica, until the test is done
    )
    reader = b.popen(
        [sys.executable, "-c", code, str(tmp_path / "p")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert reader.stdout is not None
        assert int(reader.stdout.readline()) == sum(range(1_000_000))
        assert b.count_entries(topology_dir) == 2  # the replica and its record
        store.evict(key_of(p))
        assert _wait_empty(b, topology_dir, timeout=10) == 0  # while its reader lives
    finally:
        reader.communicate(b"")


def test_ownership_across_hosts(hosts: list[Host], topology_dir: str, tmp_path: Path) -> None:
    _, b = hosts
    store = get_store(f"topology://{topology_dir}")
    owner = owned(np.ones(500_000), store)
    key = key_of(owner)
    table = ref_table_for(store)
    (tmp_path / "owner").write_bytes(pickle.dumps(owner))
    code = (
        "import pickle, sys\n"
        "from proxy_patterns.ownership import borrow, release\n"
        "from proxy_patterns.ownership import holders\n"
        "owner = pickle.load(open(sys.argv[1], 'rb'))\n"
        "ref = borrow(owner)\n"  # a holder on host A, leased by this process of host B
        "print(float(ref.sum()), len(holders(owner)), flush=True)\n"
        "sys.stdin.readline()\n"
        "release(ref)\n"
        "print(len(holders(owner)), flush=True)\n"
        "sys.stdin.read()\n"
    )
    process = b.popen(
        [sys.executable, "-c", code, str(tmp_path / "owner")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        assert process.stdout.readline().split() == [b"500000.0", b"2"]
        assert len(table.holders(key)) == 2  # the record is on host A, seen from here too
        process.stdin.write(b"\n")
        process.stdin.flush()
        assert process.stdout.readline().strip() == b"1"
    finally:
        process.communicate(b"")
    del owner  # the last holder: the object goes on A, and its replica on B
    assert entries_left_after_eviction(store, timeout=10) == 0
    assert _wait_empty(b, topology_dir) == 0


def test_a_holder_on_a_killed_host_process_ends_with_its_lease(
    hosts: list[Host], topology_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, b = hosts
    monkeypatch.setattr("proxy_patterns.shm.PEER_LEASE_SECONDS", 2.0)
    store = get_store(f"topology://{topology_dir}")
    owner = owned(np.ones(1000), store)
    key = key_of(owner)
    # A borrow sent away moves: the process of host B that loads it holds it, by its lease.
    (tmp_path / "ref").write_bytes(pickle.dumps(borrow(owner)))
    code = (
        "import pickle, sys\n"
        "ref = pickle.load(open(sys.argv[1], 'rb'))\n"
        "print('held', float(ref.sum()), flush=True)\n"
        "sys.stdin.read()\n"
    )
    process = b.popen(
        [sys.executable, "-c", code, str(tmp_path / "ref")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert process.stdout is not None
    assert process.stdout.readline() == b"held 1000.0\n"
    process.send_signal(signal.SIGKILL)
    process.wait()
    table = ref_table_for(store)
    assert len(table.holders(key)) == 2  # its lease runs for a while after its death
    deadline = time.monotonic() + 10
    while len(table.holders(key)) > 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(table.holders(key)) == 1
    del owner
    assert entries_left_after_eviction(store, timeout=10) == 0
    # Its replica on B goes as a killed process's segments do: at the next sweep there.
    assert b.count_entries(topology_dir) == 2
    sweep = "import sys; from proxy_patterns.shm import remove_stale_segments as r; r(sys.argv[1])"
    _run_on(b, sweep, topology_dir)


def test_shared_memory_of_another_host_fails_at_once(hosts: list[Host], tmp_path: Path) -> None:
    a, b = hosts
    store = get_store("shm")
    p = proxy(store, b"x" * 10_000)
    (tmp_path / "p").write_bytes(pickle.dumps(p))
    code = (
        "import pickle, sys, time\n"
        "from proxy_patterns.hosts import StoreUnreachableError\n"
        "p = pickle.load(open(sys.argv[1], 'rb'))\n"
        "start = time.monotonic()\n"
        "try:\n"
        "    len(p)\n"
        "except StoreUnreachableError as e:\n"
        "    print(round(time.monotonic() - start), e)\n"
    )
    try:
        out = _run_on(b, code, str(tmp_path / "p"))
    finally:
        store.evict(key_of(p))
    seconds, message = out.split(" ", 1)
    assert seconds == "0"
    assert a.name in message and "pp-host-b" in message and "'topology'" in message


def test_a_peer_that_is_gone_fails_clearly(hosts: list[Host], topology_dir: str) -> None:
    _, b = hosts
    code = (
        "import pickle, sys\n"
        "from proxy_patterns import get_store, proxy\n"
        f"p = proxy(get_store('topology://{topology_dir}'), b'y' * 10_000)\n"
        "sys.stdout.buffer.write(pickle.dumps(p))\n"
    )
    process = b.popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    blob, _ = process.communicate(timeout=60)
    p = pickle.loads(blob)  # of a process of host B that has exited
    with pytest.raises(StoreUnreachableError, match=r"pp-host-b.*cannot get it.*PEER_ADDRESS"):
        len(p)
    assert count_entries(get_store(f"topology://{topology_dir}")) == 0


def test_requests_need_the_signing_key_when_one_is_set(
    hosts: list[Host], topology_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, b = hosts
    monkeypatch.setenv("PROXY_PATTERNS_HMAC_KEY", "the cluster's key")
    store = get_store(f"topology://{topology_dir}")
    p = proxy(store, b"z" * 10_000)
    (tmp_path / "p").write_bytes(pickle.dumps(p))
    code = (
        "import pickle, sys\n"
        "from proxy_patterns.hosts import StoreUnreachableError\n"
        "p = pickle.load(open(sys.argv[1], 'rb'))\n"
        "try:\n"
        "    print(len(p))\n"
        "except StoreUnreachableError as e:\n"
        "    print(e)\n"
    )
    try:
        signed = _run_on(b, code, str(tmp_path / "p"))
        env = {k: v for k, v in os.environ.items() if k != "PROXY_PATTERNS_HMAC_KEY"}
        unsigned = _run_on(b, code, str(tmp_path / "p"), env=env)
    finally:
        store.evict(key_of(p))
    assert signed == "10000"
    assert "refused the request: request not signed" in unsigned
    assert _wait_empty(b, topology_dir) == 0


def test_dask_picks_the_topology_store_when_workers_are_on_other_hosts(
    hosts: list[Host],
) -> None:
    with simulated_dask_cluster(hosts) as cluster, Client(cluster.address) as client:
        assert register(client).store_spec == "topology"
    with simulated_dask_cluster(hosts[:1]) as cluster, Client(cluster.address) as client:
        assert register(client).store_spec is None  # one host: the default store, shm


def test_dask_across_hosts(hosts: list[Host], topology_dir: str) -> None:
    """Workloads a and b of ``bench dask``, small: the client on host A, a worker on each."""
    _, b = hosts
    spec = f"topology://{topology_dir}"
    with simulated_dask_cluster(hosts) as cluster, Client(cluster.address) as client:
        register(client, threshold="1 MiB", store=spec)
        store = get_store(spec)
        scheduler = SchedulerProbe(cluster.address)
        read_before = scheduler.bytes_read()
        # a: objects of every type, each its own argument, on each host; results gathered.
        served = bytes_served()
        futures = [
            client.submit(
                task_objects.echo, task_objects.make(case, seed), workers=[host.name], pure=False
            )
            for seed, case in enumerate(CASES)
            for host in hosts
        ]
        got = [task_objects.fingerprint(r) for r in client.gather(futures)]
        assert got == [
            task_objects.fingerprint(task_objects.make(case, seed))
            for seed, case in enumerate(CASES)
            for _ in hosts
        ]
        sent_to_b = bytes_served() - served  # the arguments of B's tasks, once each
        sizes = [
            len(pickle.dumps(task_objects.make(case, seed), protocol=5))
            for seed, case in enumerate(CASES)
        ]
        assert sum(sizes) * 0.9 < sent_to_b < sum(sizes) * 1.1
        from_b = sum(client.run(bytes_served, workers=[cluster.workers[b.name]]).values())
        assert sum(sizes) * 0.9 < from_b < sum(sizes) * 1.1  # B's results, to the client
        del futures
        # b: one argument read by tasks on both hosts: it crosses to B once.
        x = np.random.default_rng(0).random(2**20)
        served = bytes_served()
        tasks = [client.submit(np.sum, x, workers=[h.name], pure=False) for h in hosts * 5]
        assert np.allclose(client.gather(tasks), np.sum(x))
        assert x.nbytes < bytes_served() - served < x.nbytes + 4096
        assert scheduler.bytes_read() - read_before < 2**20  # no data went through Dask
        del tasks
        assert entries_left_after_eviction(store, timeout=30) == 0
        assert _wait_empty(b, topology_dir) == 0


def test_a_worker_killed_mid_transfer_recovers(hosts: list[Host], topology_dir: str) -> None:
    _, b = hosts
    spec = f"topology://{topology_dir}"
    x = np.random.default_rng(1).random(50_000_000)  # 400 MB: a transfer of a good while
    with simulated_dask_cluster(hosts) as cluster, Client(cluster.address) as client:
        register(client, threshold="1 MiB", store=spec)
        (pid,) = client.run(os.getpid, workers=[cluster.workers[b.name]]).values()
        served = bytes_served()
        # (Dask pins a task to the address its restriction had: after B's worker dies, the
        # task may run on its successor or on A's worker.)
        task = client.submit(np.sum, x, workers=[b.name], allow_other_workers=True)
        deadline = time.monotonic() + 60
        while bytes_served() == served and time.monotonic() < deadline:
            time.sleep(0.001)
        os.kill(pid, signal.SIGKILL)  # while its bytes are on their way to B
        assert task.result(timeout=120) == np.sum(x)
        del task
        assert entries_left_after_eviction(get_store(spec), timeout=30) == 0
        assert _wait_empty(b, topology_dir) == 0


def test_parsl_across_hosts(hosts: list[Host], topology_dir: str, tmp_path: Path) -> None:
    """HTEX with a manager on each host: arguments and results of every type, each object
    crossing to the other host at most once, everything freed on both hosts."""
    _, b = hosts
    spec = f"topology://{topology_dir}"
    htex = simulated_hosts_htex(hosts)
    config = Config(
        executors=[proxied(htex, threshold="1 MiB", store=spec)],
        run_dir=str(tmp_path / "runinfo"),
    )
    dfk = parsl.load(config)
    try:
        store = get_store(spec)
        objects = [task_objects.make(case, seed) for seed, case in enumerate(CASES)]
        served = bytes_served()
        received = [fingerprint_app(obj) for obj in objects for _ in range(3)]
        made = [make_app(case, seed) for seed, case in enumerate(CASES)]
        expected = [task_objects.fingerprint(obj) for obj in objects]
        assert [app.result(timeout=120) for app in received] == [
            fp for fp in expected for _ in range(3)
        ]
        assert [task_objects.fingerprint(app.result(timeout=120)) for app in made] == expected
        sizes = sum(len(pickle.dumps(obj, protocol=5)) for obj in objects)
        assert bytes_served() - served < sizes * 1.1  # at most once to host B each
        del received, made
        assert entries_left_after_eviction(store, timeout=30) == 0
        assert _wait_empty(b, topology_dir) == 0
    finally:
        dfk.cleanup()
        parsl.clear()


def test_futures_and_streams_across_hosts_ask_for_redis(topology_dir: str) -> None:
    store = get_store(f"topology://{topology_dir}")
    with pytest.raises(TypeError, match=r"proxy futures across hosts need a Redis store"):
        ProxyFuture(store)
    with pytest.raises(TypeError, match=r"streams across hosts need a Redis store"):
        StreamProducer("topic", store)
