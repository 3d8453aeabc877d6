"""The simulated hosts issue 17 is proven on: separate ``/dev/shm`` and hostnames, one
loopback network, and Dask and Parsl HTEX clusters with a worker on each host."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import parsl
import pytest
from distributed import Client
from parsl import Config

from parsl_helpers import meet, simulated_hosts_htex
from proxy_patterns.bench.cluster import simulated_dask_cluster
from proxy_patterns.simhosts import Host, SimulatedHost, namespaces_available, simulated_hosts

pytestmark = pytest.mark.skipif(
    namespaces_available() is not None, reason=str(namespaces_available())
)


@pytest.fixture
def hosts() -> Iterator[list[Host]]:
    """Host A (this machine) and host B (simulated)."""
    with simulated_hosts(2) as both:
        yield both


def _run_on(host: Host, code: str) -> str:
    process = host.popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    out, _ = process.communicate(timeout=30)
    assert process.returncode == 0
    return out.decode().strip()


def test_a_simulated_host_has_its_own_shared_memory_and_hostname(hosts: list[Host]) -> None:
    a, b = hosts
    name = f"pp-test-{uuid.uuid4().hex}"
    code = f"import socket; open('/dev/shm/{name}', 'w').close(); print(socket.gethostname())"
    assert _run_on(b, code) == b.name == "pp-host-b" != a.name == socket.gethostname()
    assert os.path.exists(b.shm_path(name)) and not os.path.exists(a.shm_path(name))
    with SimulatedHost("pp-host-c") as c:  # nor is it another simulated host's
        assert not os.path.exists(c.shm_path(name))
        assert _run_on(c, "import os; print(os.getcwd())") == os.path.realpath("/tmp")


def test_entries_of_a_host_store_are_counted_from_outside(hosts: list[Host]) -> None:
    a, b = hosts
    before = a.count_entries()
    code = (
        "import os\n"
        "from proxy_patterns.shm import DEFAULT_DIRECTORY, SEGMENT_PREFIX\n"
        "os.makedirs(DEFAULT_DIRECTORY)\n"
        "for name in (SEGMENT_PREFIX + 'x', SEGMENT_PREFIX + 'x.refs', 'other'):\n"
        "    open(os.path.join(DEFAULT_DIRECTORY, name), 'w').close()\n"
    )
    _run_on(b, code)
    assert b.count_entries() == 2 and a.count_entries() == before  # 'other' is no entry


def test_closing_a_host_kills_every_process_on_it() -> None:
    with SimulatedHost("pp-host-b") as b:
        # A grandchild in its own session, which its parent does not wait for.
        code = (
            "import subprocess\n"
            "subprocess.Popen(['sleep', '600'], start_new_session=True, stdout=subprocess.DEVNULL)"
        )
        _run_on(b, code)
        left = [pid for pid in b.processes() if pid != b.anchor.pid]
        assert len(left) == 1
        assert Path(f"/proc/{left[0]}/cmdline").read_bytes().startswith(b"sleep")
    assert not b.processes()
    assert not os.path.exists(f"/proc/{left[0]}/ns/mnt")  # gone, not even a zombie in B


def test_a_dask_cluster_runs_a_worker_on_each_host(hosts: list[Host]) -> None:
    a, b = hosts
    name = f"pp-test-{uuid.uuid4().hex}"
    with simulated_dask_cluster(hosts) as cluster, Client(cluster.address) as client:
        assert set(cluster.workers) == {a.name, b.name}
        on_b = client.submit(Path.touch, Path("/dev/shm", name), workers=[b.name])
        on_b.result()
        seen = {
            host.name: client.submit(
                os.path.exists, f"/dev/shm/{name}", workers=[host.name], pure=False
            )
            for host in hosts
        }
        assert {host: future.result() for host, future in seen.items()} == {
            a.name: False,
            b.name: True,
        }
        hostnames = client.run(socket.gethostname)
    assert hostnames == {cluster.workers[a.name]: a.name, cluster.workers[b.name]: b.name}


def test_parsl_htex_runs_a_manager_on_each_host(hosts: list[Host], tmp_path: Path) -> None:
    htex = simulated_hosts_htex(hosts)
    dfk = parsl.load(Config(executors=[htex], run_dir=str(tmp_path / "runinfo")))
    try:
        with socket.create_server(("127.0.0.1", 0)) as server:
            server.settimeout(120)
            apps = [meet(server.getsockname()) for _ in hosts]
            # Both apps hold their worker until both have called: one app on each host.
            connections = [server.accept()[0] for _ in hosts]
            heard = sorted(c.makefile().readline().strip() for c in connections)
            for connection in connections:
                connection.sendall(b"go")
                connection.close()
        assert heard == sorted(host.name for host in hosts)
        assert sorted(app.result(timeout=60) for app in apps) == heard
    finally:
        dfk.cleanup()
        parsl.clear()
