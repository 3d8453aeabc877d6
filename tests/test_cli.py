"""The ``proxy-patterns`` command as a user runs it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from proxy_patterns.simhosts import namespaces_available


def _run(*args: str, env: dict[str, str] | None = None) -> str:
    # Outside the repository: `python -m` would import its source tree, which does not hold
    # the plugins/ subpackage the way an installed copy does.
    result = subprocess.run(
        [sys.executable, "-m", "proxy_patterns", *args],
        cwd=tempfile.gettempdir(),
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _table_rows(output: str) -> list[list[str]]:
    lines = [line for line in output.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def test_demo_moves_nothing_through_the_scheduler_and_leaves_no_entries() -> None:
    output = _run("demo", "--size-mb", "8", "--tasks", "3")
    rows = {row[0]: row for row in _table_rows(output)}
    plain, proxied = rows["plain Dask"], rows["Dask + proxy-patterns plugin"]
    # 3 arguments of 8 MB and one fetched result pass through the scheduler without proxies.
    assert float(plain[2]) > 30
    assert float(proxied[2]) < 0.5
    assert plain[3] == proxied[3] == "0"
    assert "speed-up:" in output


@pytest.mark.skipif(namespaces_available() is not None, reason=str(namespaces_available()))
def test_demo_on_two_simulated_hosts_picks_the_topology_store() -> None:
    output = _run("demo", "--hosts", "2", "--size-mb", "8", "--tasks", "3")
    rows = {row[0]: row for row in _table_rows(output)}
    plain, proxied = rows["plain Dask"], rows["Dask + proxy-patterns plugin"]
    assert float(plain[2]) > 30 and float(proxied[2]) < 0.5
    assert plain[3] == proxied[3] == "0 / 0"  # entries left on host A / host B
    assert "on a worker on each of 2 simulated hosts; store: TopologyConnector" in output


def test_bench_store_prints_every_backend_and_plots(tmp_path: Path) -> None:
    plot = tmp_path / "store.png"
    output = _run("bench", "store", "--quick", "--plot", str(plot))
    backends = {row[1] for row in _table_rows(output)}
    expected = {"shm", "shm-fresh", "file", "redis", "pickle"}
    assert expected <= backends <= expected | {"shm-huge"}  # shm-huge: if a mount exists
    assert "resolve 100 MB >= 100x faster" in output and "put 100 MB within 2x" in output
    assert plot.stat().st_size > 10_000


def test_bench_memory_leaves_nothing_with_owned_and_graph_driven(tmp_path: Path) -> None:
    plot = tmp_path / "memory.png"
    output = _run("bench", "memory", "--quick", "--plot", str(plot))
    rows = {row[0]: row for row in _table_rows(output)}
    peak, left = 1, 3  # columns: peak store MB, left MB
    assert float(rows["no proxies"][peak]) == 0
    assert float(rows["default proxies"][left]) > 0  # never evicted: the leak the others fix
    for mode in ("manual eviction", "owned", "graph-driven"):
        assert float(rows[mode][left]) == 0 and rows[mode][left + 1] == "0", mode
        assert 0 < float(rows[mode][peak]) < float(rows["default proxies"][left]), mode
    assert plot.stat().st_size > 10_000


def test_bench_parsl_compares_plain_proxied_htex_and_the_dask_plugin() -> None:
    # As `venv/bin/proxy-patterns` runs without the virtualenv activated: its scripts (Parsl's
    # interchange.py among them) are not on PATH.
    scripts = os.path.dirname(sys.executable)
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != scripts)
    output = _run("bench", "parsl", "--quick", env={**os.environ, "PATH": path})
    rows = _table_rows(output)
    assert [row[0][0] for row in rows] == ["a", "b", "c"]
    for row in rows:
        assert all(float(row[i]) > 0 for i in (1, 2, 4, 5))  # times, and proxied / Dask
        assert row[7] == "+0", "the interchange saw the bytes of proxied arguments"
    assert "entries left in the store after DataFlowKernel.cleanup(): 0" in output
    assert "goal: proxied HTEX within 1.5x of the Dask plugin on b:" in output


def test_bench_streaming_runs_both_modes_on_both_frameworks_and_leaves_no_keys(
    tmp_path: Path,
) -> None:
    plot = tmp_path / "streaming.png"
    output = _run("bench", "streaming", "--quick", "--plot", str(plot))
    rows = {(row[0], row[2]): row for row in _table_rows(output)}
    assert set(rows) == {("Dask", "10 kB"), ("Parsl", "1 MB"), ("Dask", "50 MB")}
    default, proxies, keys_left = 3, 4, 8  # columns: tasks/s of each mode, keys left
    for row in rows.values():
        assert float(row[default]) > 0 and float(row[proxies]) > 0
        assert row[keys_left] == "0"
    # 50 MB by value through the queue and the scheduler cannot keep up with 2 workers.
    assert float(rows[("Dask", "50 MB")][proxies]) > 1.5 * float(rows[("Dask", "50 MB")][default])
    assert "goal: 0 keys left in the store after each streamed run: 0 [met]" in output
    assert plot.stat().st_size > 10_000


def test_bench_globus_runs_the_workflow_plain_and_through_the_store(tmp_path: Path) -> None:
    plot = tmp_path / "globus.png"
    output = _run("bench", "globus", "--quick", "--plot", str(plot))
    rows = {row[0]: row for row in _table_rows(output)}
    tasks, makespan, requests, submitted, returned, keys_left = range(1, 7)
    plain, proxies = rows["plain"], rows["proxies"]
    # Plain: 5 x 12 MB cut in two pieces each, twice through the service (to stage 1, then
    # to the merge) and base64-encoded; the merged calls (15 MB) once more to each analysis.
    assert (plain[tasks], plain[requests]) == ("26", "26")
    assert float(plain[submitted]) > 150 and float(plain[returned]) > 60
    assert plain[keys_left] == "-"
    # Proxies: one task per chunk, a merge and two analyses; only proxies through the service.
    assert proxies[tasks] == "8"
    assert float(proxies[submitted]) < 0.1 and float(proxies[returned]) < 0.1
    assert proxies[keys_left] == "0"
    assert float(proxies[makespan]) < float(plain[makespan])
    assert "goal: proxies >= 1.3x faster than plain:" in output
    assert "goal: 0 keys left in the store after each proxies run: 0 [met]" in output
    assert plot.stat().st_size > 10_000


@pytest.mark.skipif(namespaces_available() is not None, reason=str(namespaces_available()))
def test_bench_multinode_runs_across_two_simulated_hosts_and_leaves_no_keys() -> None:
    output = _run("bench", "multinode", "--quick")
    header = next(line for line in output.splitlines() if line.startswith("|"))
    modes = ["redis", "topology"]
    assert [c.strip() for c in header.strip("|").split("|")][2 : 2 + len(modes)] == [
        f"plugin {mode} (s)" for mode in modes
    ]
    rows = _table_rows(output)
    assert [row[0][0] for row in rows] == ["a", "b"]
    left = {"redis": "server=0", "topology": f"{socket.gethostname()}=0, pp-host-b=0"}
    for row in rows:
        assert all(float(t) > 0 for t in row[1 : 2 + len(modes)])
        assert row[-1] == "; ".join(f"{mode}: {left[mode]}" for mode in modes)
    assert f"hosts {socket.gethostname()}, pp-host-b: 1 worker x 1 thread each" in output
    assert "goal: 0 entries left on each host after each run: 0 left [met]" in output


def test_unknown_benchmark_is_refused() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy_patterns", "bench", "nope"], capture_output=True, text=True
    )
    assert result.returncode == 2 and "invalid choice: 'nope'" in result.stderr


@pytest.mark.parametrize("entry", [["proxy-patterns"], [sys.executable, "-m", "proxy_patterns"]])
def test_help_lists_the_commands(entry: list[str]) -> None:
    output = subprocess.run([*entry, "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("demo", "bench", "clean"):
        assert command in output


def test_clean_store_evicts_what_dead_processes_held(redis_url: str) -> None:
    from conftest import assert_empty_and_close
    from dask_helpers import wait_until
    from proxy_patterns.store import LEASE_PREFIX, count_objects, get_store, redis_client_of

    dies_holding = (
        "import os, sys\n"
        "from proxy_patterns.ownership import owned\n"
        "from proxy_patterns.store import get_store\n"
        "p = owned(b'x' * 100, get_store(sys.argv[1]))\n"
        "os._exit(0)  # no release, no atexit: its holder is left in the record\n"
    )
    subprocess.run(
        [sys.executable, "-c", dies_holding, redis_url], check=True, cwd=tempfile.gettempdir()
    )
    store = get_store(redis_url)
    client = redis_client_of(store.connector)
    assert client is not None and count_objects(store) == 1
    wait_until(
        lambda: not list(client.scan_iter(match=LEASE_PREFIX + "*")),
        timeout=30,
        message="the dead process's lease expires",
    )
    output = _run("clean", "--store", redis_url)
    assert f"{redis_url}: 2 entries before the sweep, 0 after" in output  # object and record
    assert_empty_and_close(store)
