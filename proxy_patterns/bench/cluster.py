"""A Dask cluster on this node whose scheduler runs in its own process, so it can be measured.

``LocalCluster`` runs its scheduler inside the client process; to count what crosses the
scheduler (bytes it reads from sockets, its memory) it must be a process of its own. This
starts ``dask scheduler`` and ``dask worker`` exactly as a user would from the command line.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

from proxy_patterns.bench import scheduler_meter


@dataclass
class SchedulerProbe:
    """Counters of the scheduler process."""

    address: str

    def bytes_read(self) -> int:
        """Bytes of TCP messages the scheduler has read since it started."""
        from distributed import Client

        with Client(self.address) as client:
            return int(client.run_on_scheduler(scheduler_meter.bytes_read))


def _wait_for(path: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("dask scheduler did not start")
        time.sleep(0.05)


@contextlib.contextmanager
def measured_cluster(
    n_workers: int = 2, threads: int = 1, timeout: float = 60
) -> Iterator[tuple[str, SchedulerProbe]]:
    """Start a scheduler and ``n_workers`` worker processes; yield (address, probe)."""
    from distributed import Client

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
        workers = None
        address: str | None = None
        try:
            _wait_for(scheduler_file, scheduler, timeout)
            with open(scheduler_file) as f:
                address = json.load(f)["address"]
            workers = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "distributed.cli.dask_worker",
                    address,
                    "--nworkers",
                    str(n_workers),
                    "--nthreads",
                    str(threads),
                    "--host",
                    "127.0.0.1",
                    "--no-dashboard",
                    "--local-directory",
                    tmp,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd=tmp,
            )
            with Client(address, timeout=timeout) as client:
                client.wait_for_workers(n_workers, timeout=timeout)
            yield address, SchedulerProbe(address)
        finally:
            if address is not None:  # quicker than SIGTERM, on which nannies wait seconds
                with contextlib.suppress(Exception), Client(address, timeout=5) as client:
                    client.shutdown()
            for proc in (workers, scheduler):
                if proc is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(5 if address is not None else 0)
                    if proc.poll() is None:
                        proc.terminate()
            for proc in (workers, scheduler):
                if proc is not None:
                    try:
                        proc.wait(timeout)
                    except subprocess.TimeoutExpired:
                        proc.kill()
