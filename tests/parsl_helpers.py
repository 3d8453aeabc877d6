"""Parsl apps for ``test_parsl_plugin.py``, in an importable module so that HTEX workers load
them by reference (the test directory is on the workers' ``PYTHONPATH``, see conftest)."""

from __future__ import annotations

import os
import shlex
import socket
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
import task_objects
from parsl import HighThroughputExecutor, python_app
from parsl.launchers.base import Launcher
from parsl.providers import LocalProvider

from proxy_patterns.proxy import is_proxy
from proxy_patterns.simhosts import Host

HTEX = "htex"
THREADS = "threads"


@python_app(executors=[HTEX])
def total(x: Any, *rest: Any) -> float:
    """Sum of the first argument (the others are only carried along)."""
    return float(np.sum(x))


@python_app(executors=[HTEX])
def received_as(x: Any) -> tuple[str, bool]:
    """How the app received its argument: its type, and whether it is a proxy."""
    return type(x).__name__, is_proxy(x)


@python_app(executors=[HTEX])
def fingerprint_app(x: Any) -> tuple[str, Any]:
    return task_objects.fingerprint(x)


@python_app(executors=[HTEX])
def fingerprint_when(gate: Any, x: Any) -> tuple[str, Any]:
    """``fingerprint_app`` once ``gate`` (a proxy of a future) is set: it holds ``x`` until."""
    assert gate
    return task_objects.fingerprint(x)


@python_app(executors=[HTEX])
def make_app(case: str, seed: int) -> Any:
    return task_objects.make(case, seed)


@python_app(executors=[HTEX])
def make_when(gate: Any, case: str, seed: int) -> Any:
    """``make_app`` once ``gate`` (a proxy of a future) is set."""
    assert gate
    return task_objects.make(case, seed)


@python_app(executors=[HTEX])
def fails_with(x: Any, message: str) -> None:
    raise ValueError(message)


@python_app(executors=[HTEX])
def text(n: int) -> str:
    return "t" * n


@python_app(executors=[HTEX], cache=True)
def cached_length(x: str) -> int:
    return len(x)


@python_app(executors=[HTEX])
def filled(n: int, value: float) -> np.ndarray:
    return np.full(n, value)


@python_app(executors=[HTEX])
def double(x: Any) -> Any:
    return x * 2.0


@python_app(executors=[HTEX])
def waits_for(x: Any, started: Any) -> float:
    """Say it started, then touch ``x`` (a proxy of a future), which waits for the value."""
    started.set_result(True)
    return float(np.sum(x))


@python_app(executors=[HTEX])
def fails_once(x: Any, marker: str) -> float:
    """Raise the first time (no ``marker`` file yet), succeed on the retry."""
    if not os.path.exists(marker):
        open(marker, "w").close()
        raise RuntimeError("first attempt fails")
    return float(np.sum(x))


@python_app(executors=[HTEX])
def frame_rows(df: Any) -> int:
    return len(df)


@python_app(executors=[HTEX])
def stream_item_app(x: Any, gate: Any) -> tuple[bool, int, float]:
    return task_objects.stream_item(x, gate)


@python_app(executors=[THREADS])
def threads_received_as(x: Any) -> tuple[str, bool]:
    return type(x).__name__, is_proxy(x)


class Large:
    """A large object holding ``extra``, which decides whether it can be pickled."""

    def __init__(self, extra: Any) -> None:
        self.data = np.ones(2**20)
        self.extra = extra

    def __sizeof__(self) -> int:
        return int(self.data.nbytes)


@python_app(executors=[HTEX])
def large_total(x: Large) -> float:
    return float(np.sum(x.data))


@python_app(executors=[HTEX], cache=True)
def checkpointed_text(n: int) -> str:
    """A large result, cached (and so checkpointed when the DataFlowKernel checkpoints)."""
    return "c" * n


@python_app(executors=[HTEX])
def dies_once(x: Any, marker: str, what: str) -> float:
    """SIGKILL this worker (``what="worker"``) or its manager (``"manager"``) the first time
    (no ``marker`` file yet); the retry reads ``x`` and returns its sum."""
    import signal

    if not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid() if what == "worker" else os.getppid(), signal.SIGKILL)
    return float(np.sum(x))


@python_app(executors=[HTEX])
def meet(address: tuple[str, int]) -> str:
    """Tell the test at ``address`` this worker's hostname, and return it once the test has
    heard from every worker it waits for (so that each app runs on a worker of its own)."""
    with socket.create_connection(address) as connection:
        connection.sendall(socket.gethostname().encode() + b"\n")
        assert connection.recv(2) == b"go"
    return socket.gethostname()


class SimulatedHostsLauncher(Launcher):
    """Starts a block's command once on each host of ``hosts``, as ``srun`` starts it on each
    node of a job: one HTEX manager per simulated host (``nodes_per_block=len(hosts)``)."""

    def __init__(self, hosts: Sequence[Host]) -> None:
        super().__init__(debug=False)
        self.hosts = hosts

    def __call__(
        self, command: str, tasks_per_node: int, nodes_per_block: int, script_dir: str = ""
    ) -> str:
        if nodes_per_block != len(self.hosts):
            raise ValueError(f"nodes_per_block={nodes_per_block}, for {len(self.hosts)} hosts")
        cwd = tempfile.gettempdir()  # no source tree there to shadow the installed package
        starts = [shlex.join(host.command(["bash", "-c", command], cwd)) for host in self.hosts]
        return "\n".join([*(f"{start} &" for start in starts), "wait"])


def simulated_hosts_htex(hosts: Sequence[Host]) -> HighThroughputExecutor:
    """An HTEX (not started) with one manager of one worker on each of ``hosts``."""
    return HighThroughputExecutor(
        label=HTEX,
        address="127.0.0.1",
        max_workers_per_node=1,
        provider=LocalProvider(
            nodes_per_block=len(hosts),
            launcher=SimulatedHostsLauncher(hosts),
            init_blocks=1,
            min_blocks=1,
            max_blocks=1,
        ),
    )
