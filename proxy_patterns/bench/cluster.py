"""Dask clusters whose scheduler runs in its own process, started as a user would from the
command line (``dask scheduler``, ``dask worker``).

``LocalCluster`` runs its scheduler inside the client process; to count what crosses the
scheduler (bytes it reads from sockets, its memory) it must be a process of its own
(:func:`measured_cluster`). And workers on several hosts, simulated on this machine, need
their own processes on each (:func:`simulated_dask_cluster`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from distributed import Client

from proxy_patterns.bench import scheduler_meter
from proxy_patterns.simhosts import Host


@dataclass
class SchedulerProbe:
    """Counters of the scheduler process."""

    address: str

    def bytes_read(self) -> int:
        """Bytes of TCP messages the scheduler has read since it started."""
        with Client(self.address) as client:
            return int(client.run_on_scheduler(scheduler_meter.bytes_read))


def _wait_for(path: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("dask scheduler did not start")
        time.sleep(0.05)


def _worker_command(address: str, local_directory: str, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "distributed.cli.dask_worker",
        address,
        *("--host", "127.0.0.1", "--no-dashboard", "--local-directory", local_directory),
        *args,
    ]


@contextlib.contextmanager
def _scheduler_and_workers(
    start_workers: Callable[[str, str], list[subprocess.Popen[bytes]]], timeout: float
) -> Iterator[str]:
    """Start a scheduler on this host, then ``start_workers(address, tmp)``; yield the
    address; shut all down on exit (workers first)."""
    with tempfile.TemporaryDirectory(prefix="pp-cluster-") as tmp:
        scheduler_file = os.path.join(tmp, "scheduler.json")
        scheduler = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "distributed.cli.dask_scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--dashboard-address",
                ":0",
                "--no-show",
                "--scheduler-file",
                scheduler_file,
                "--preload",
                scheduler_meter.__name__,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=tmp,  # not the caller's: `python -m` would import a source tree found there
        )
        workers: list[subprocess.Popen[bytes]] = []
        address: str | None = None
        try:
            _wait_for(scheduler_file, scheduler, timeout)
            with open(scheduler_file) as f:
                address = json.load(f)["address"]
            workers = start_workers(address, tmp)
            yield address
        finally:
            if address is not None:  # quicker than SIGTERM, on which nannies wait seconds
                with contextlib.suppress(Exception), Client(address, timeout=5) as client:
                    client.shutdown()
            for proc in (*workers, scheduler):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5 if address is not None else 0)
                if proc.poll() is None:
                    proc.terminate()
            for proc in (*workers, scheduler):
                try:  # (a nanny whose worker was killed can take a minute over SIGTERM)
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@contextlib.contextmanager
def measured_cluster(
    n_workers: int = 2, threads: int = 1, timeout: float = 60
) -> Iterator[tuple[str, SchedulerProbe]]:
    """Start a scheduler and ``n_workers`` worker processes; yield (address, probe)."""

    def start_workers(address: str, tmp: str) -> list[subprocess.Popen[bytes]]:
        args = ("--nworkers", str(n_workers), "--nthreads", str(threads))
        worker = subprocess.Popen(
            _worker_command(address, tmp, *args),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=tmp,
        )
        return [worker]

    with _scheduler_and_workers(start_workers, timeout) as address:
        with Client(address, timeout=timeout) as client:
            client.wait_for_workers(n_workers, timeout=timeout)
        yield address, SchedulerProbe(address)


@dataclass
class SimulatedCluster:
    """A Dask cluster across simulated hosts (see :func:`simulated_dask_cluster`)."""

    address: str
    """The scheduler's address (on the first host, this machine)."""
    workers: dict[str, str]
    """Each host's name -> the address of its worker (also named after its host, so that
    ``submit(..., workers=[host.name])`` runs a task there)."""


@contextlib.contextmanager
def simulated_dask_cluster(
    hosts: Sequence[Host],
    threads: int = 1,
    timeout: float = 60,
    env: Mapping[str, str] | None = None,
) -> Iterator[SimulatedCluster]:
    """A scheduler on this machine and one ``dask worker`` (with its nanny) on each host of
    ``hosts`` (from :func:`~proxy_patterns.simhosts.simulated_hosts`), as a user starts them
    on a cluster; yields once every worker has joined and reported its host's name.

    ``env``: the workers' environment (default: this process's), for example
    ``DASK_PROXY_PATTERNS__STORE``.
    """

    def start_workers(address: str, tmp: str) -> list[subprocess.Popen[bytes]]:
        return [
            host.popen(
                _worker_command(address, tmp, "--nthreads", str(threads), "--name", host.name),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=None if env is None else dict(env),
            )
            for host in hosts
        ]

    with _scheduler_and_workers(start_workers, timeout) as address:
        with Client(address, timeout=timeout) as client:
            client.wait_for_workers(len(hosts), timeout=timeout)
            names = client.run(socket.gethostname)
        expected = {host.name for host in hosts}
        if sorted(names.values()) != sorted(expected):
            raise RuntimeError(
                f"workers report hostnames {names}, expected one on each of {expected}"
            )
        yield SimulatedCluster(address, {name: worker for worker, name in names.items()})
