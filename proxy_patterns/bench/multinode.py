"""``proxy-patterns bench multinode``: Dask across two hosts, plain against the plugin's stores.

Two hosts, simulated on this machine (:mod:`proxy_patterns.simhosts`: host B has its own
``/dev/shm`` and hostname, the network is loopback): the scheduler and the client on host A,
one worker of one thread on each host, a fresh cluster per mode. Workloads a and b of
``bench dask`` (:mod:`proxy_patterns.bench.dask_plugin`):

* ``a`` — 10 tasks, each given its own 100 MB array and returning 100 MB, gathered;
* ``b`` — one 100 MB array passed to 20 tasks, small results gathered.

Modes: plain Dask; the plugin on Redis (a ``redis-server`` on host A, the cluster-wide store
a user has today); the plugin on the topology-aware store (``topology``: shared memory within
a host, bytes pulled peer to peer across hosts). Each workload
runs once untimed, then ``repeats`` times (the median is reported). After each run every
store must drain to zero entries on each host (Redis: in the server); the table shows what
was left.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from proxy_patterns.bench.dask_plugin import WORKLOADS
from proxy_patterns.bench.report import print_table
from proxy_patterns.simhosts import Host

MULTINODE_WORKLOADS = [w for w in WORKLOADS if w.name in ("a", "b")]
GOALS = {("topology", "a"): 2.0, ("topology", "b"): 5.0, ("redis", "a"): 0.8, ("redis", "b"): 1.0}
"""Speed-up over plain Dask each mode must reach on each workload (issue 17)."""


@dataclass
class Mode:
    """One way to run the workloads: ``spec`` the plugin's store (None: plain Dask), and
    ``entries_left`` what that store holds on each host (or its server)."""

    name: str
    spec: str | None
    entries_left: Callable[[], dict[str, int]]


def _no_store() -> dict[str, int]:
    return {}


def _redis_mode(url: str) -> Mode:
    from proxy_patterns.store import count_entries, get_store

    return Mode("redis", url, lambda: {"server": count_entries(get_store(url))})


@contextlib.contextmanager
def _topology_mode(hosts: Sequence[Host]) -> Iterator[Mode]:
    """The topology store in a directory of its own on each host's ``/dev/shm`` (host A's
    is this machine's, shared with whatever else runs here)."""
    directory = f"/dev/shm/pp-bench-multinode-{uuid.uuid4().hex[:8]}"
    for host in hosts:
        os.mkdir(host.path(directory), mode=0o700)
    try:
        yield Mode(
            "topology",
            f"topology://{directory}",
            lambda: {host.name: host.count_entries(directory) for host in hosts},
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)  # (other hosts' copies go with them)


def _wait_until_empty(mode: Mode, timeout: float = 30) -> dict[str, int]:
    """What ``mode``'s store holds once pending evictions are done (they follow Dask
    asynchronously), or after ``timeout`` seconds if some never are."""
    deadline = time.monotonic() + timeout
    while any((left := mode.entries_left()).values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@dataclass
class Measured:
    """One mode's median seconds and entries left (per host) on one workload."""

    seconds: float
    left: dict[str, int]


def measure_mode(
    mode: Mode, hosts: Sequence[Host], inputs: dict[str, Any], repeats: int, progress: Any
) -> dict[str, Measured]:
    """Run the workloads on a fresh cluster across ``hosts``, plain or with the plugin."""
    from distributed import Client

    from proxy_patterns.bench.cluster import simulated_dask_cluster
    from proxy_patterns.plugins.dask import register

    results = {}
    with simulated_dask_cluster(hosts) as cluster, Client(cluster.address) as client:
        if mode.spec is not None:
            register(client, store=mode.spec)
        for workload in MULTINODE_WORKLOADS:
            workload.run(client, inputs[workload.name])  # warm-up: first touch of memory
            _wait_until_empty(mode)
            times, left = [], {}
            for _ in range(repeats):
                start = time.perf_counter()
                out = workload.run(client, inputs[workload.name])
                times.append(time.perf_counter() - start)
                del out
                left = _wait_until_empty(mode)
                progress.update()
            results[workload.name] = Measured(statistics.median(times), left)
    return results


def main(quick: bool = False, plot: str | None = None, redis: str | None = None) -> None:
    """Run workloads a and b across two simulated hosts in every mode; print the table and
    the goals."""
    import warnings

    from tqdm import tqdm

    from proxy_patterns.bench.redis_server import local_redis_server, redis_server_binary
    from proxy_patterns.simhosts import namespaces_available, simulated_hosts

    reason = namespaces_available()
    if reason is not None:
        raise SystemExit(f"bench multinode: cannot simulate hosts here: {reason}")
    scale = 0.2 if quick else 1.0
    repeats = 1 if quick else 5
    inputs = {w.name: w.prepare(scale) for w in MULTINODE_WORKLOADS}
    with contextlib.ExitStack() as stack:
        hosts = stack.enter_context(simulated_hosts(2))
        modes = [Mode("plain", None, _no_store)]
        if redis is None and redis_server_binary() is not None:
            redis = stack.enter_context(local_redis_server())
        if redis is not None:
            modes.append(_redis_mode(redis))
        else:
            print("(no redis-server: the Redis mode is skipped)")
        modes.append(stack.enter_context(_topology_mode(hosts)))
        total = len(modes) * len(MULTINODE_WORKLOADS) * repeats
        progress = stack.enter_context(tqdm(total=total, desc="bench multinode", leave=False))
        # Plain Dask warns "Sending large graph" on workloads a and b: that is what is measured.
        warnings.filterwarnings("ignore", message="Sending large graph")
        measured = {m.name: measure_mode(m, hosts, inputs, repeats, progress) for m in modes}
        host_names = [host.name for host in hosts]
    _report(measured, host_names, quick)
    if plot:
        _plot(measured, plot)


def _left_text(left: dict[str, int]) -> str:
    return ", ".join(f"{where}={count}" for where, count in left.items())


def _report(measured: dict[str, dict[str, Measured]], hosts: list[str], quick: bool) -> None:
    plugin_modes = [m for m in measured if m != "plain"]
    header = ["workload", "plain Dask (s)"]
    header += [f"plugin {m} (s)" for m in plugin_modes]
    header += [f"speed-up {m}" for m in plugin_modes] + ["entries left"]
    rows = []
    for w in MULTINODE_WORKLOADS:
        plain = measured["plain"][w.name].seconds
        row = [f"{w.name}: {w.description}", f"{plain:.3f}"]
        row += [f"{measured[m][w.name].seconds:.3f}" for m in plugin_modes]
        row += [f"{plain / measured[m][w.name].seconds:.2f}x" for m in plugin_modes]
        row.append("; ".join(f"{m}: {_left_text(measured[m][w.name].left)}" for m in plugin_modes))
        rows.append(row)
    print(f"hosts {', '.join(hosts)}: 1 worker x 1 thread each; scheduler, client on {hosts[0]}")
    if quick:
        print("(--quick: data sizes x0.2, one repeat)")
    print_table(header, rows)
    for (mode, workload), goal in GOALS.items():
        if mode in measured:
            ratio = measured["plain"][workload].seconds / measured[mode][workload].seconds
            verdict = "met" if ratio >= goal else "NOT met"
            what = f"{workload} with the plugin ({mode}) >= {goal}x plain"
            print(f"goal: {what}: {ratio:.2f}x [{verdict}]")
    left = sum(sum(m.left.values()) for runs in measured.values() for m in runs.values())
    verdict = "met" if not left else "NOT met"
    print(f"goal: 0 entries left on each host after each run: {left} left [{verdict}]")


def _plot(measured: dict[str, dict[str, Measured]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / len(measured)
    names = [w.name for w in MULTINODE_WORKLOADS]
    for i, (mode, runs) in enumerate(measured.items()):
        xs = [j + i * width for j in range(len(names))]
        ax.bar(xs, [runs[name].seconds for name in names], width, label=mode)
    ax.set_xticks([j + width * (len(measured) - 1) / 2 for j in range(len(names))])
    ax.set_xticklabels(names)
    ax.set(ylabel="seconds (median)", title="Dask across 2 simulated hosts")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")
