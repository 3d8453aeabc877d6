"""Hosts simulated on this machine, so that what crosses hosts can be tested on one node.

A simulated host is a mount and UTS namespace (``unshare --mount --uts``, as root) with its own
tmpfs on ``/dev/shm`` and its own hostname: shared memory is really not shared with the machine
or with another simulated host, while the network (loopback) is. Processes run on it with
``nsenter``; it lives while its anchor process (a ``sleep``) does, and closing it kills every
process in it, so that its mount vanishes with them, as a host that is switched off.

The machine itself is the first host (:func:`this_host`): the process that uses this module
(a test, a benchmark: the Dask client) cannot move into a namespace once it runs threads, and it
must see its host's ``/dev/shm``. Its default store directory is the machine's, shared with any
other process of the same user that runs there at the same time.

::

    with simulated_hosts(2) as (a, b):
        b.popen(["python", "-c", "open('/dev/shm/x', 'w')"]).wait()
        assert os.path.exists(b.shm_path("x")) and not os.path.exists(a.shm_path("x"))
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

from proxy_patterns.shm import DEFAULT_DIRECTORY, SEGMENT_PREFIX

SHM_SIZE = "8g"
"""Size limit of each simulated host's ``/dev/shm`` (a tmpfs takes memory only as it fills)."""

_SETUP = 'mount -t tmpfs -o "size=$1,mode=1777" tmpfs /dev/shm && hostname "$2"'
"""Shell commands that make a fresh namespace a host: its own ``/dev/shm``, its hostname."""

_UNSHARE = ["unshare", "--mount", "--uts", "--propagation", "private"]


@functools.cache
def namespaces_available() -> str | None:
    """None if hosts can be simulated here, else why not (for a test's skip reason).

    Tried once for real: a namespace is made, given a tmpfs and a hostname, and left.
    """
    if os.geteuid() != 0:
        return "simulated hosts need root (unshare --mount --uts, mount)"
    missing = [tool for tool in ("unshare", "nsenter") if shutil.which(tool) is None]
    if missing:
        return f"simulated hosts need {' and '.join(missing)} (util-linux)"
    trial = subprocess.run(
        [*_UNSHARE, "sh", "-c", _SETUP, "sh", "1m", "pp-trial"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if trial.returncode != 0:
        return f"cannot make a mount and UTS namespace here: {trial.stderr.strip()}"
    return None


def _count_entries(directory: str) -> int:
    """Entries of a shared-memory store directory, counted as
    :func:`proxy_patterns.store.count_entries` counts them (0 if there is no directory)."""
    try:
        return sum(name.startswith(SEGMENT_PREFIX) for name in os.listdir(directory))
    except FileNotFoundError:
        return 0


class Host:
    """This machine, as a host processes run on (see :func:`this_host`).

    :class:`SimulatedHost` is the same for a simulated host.
    """

    @property
    def name(self) -> str:
        """The hostname processes on this host see."""
        return socket.gethostname()

    def command(self, args: Sequence[str], cwd: str | None = None) -> list[str]:
        """``args`` as a command that runs on this host, in ``cwd`` (default: the caller's
        working directory at the time the command runs)."""
        return list(args) if cwd is None else ["env", "-C", cwd, *args]

    def popen(self, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``args`` on this host: ``subprocess.Popen`` with its keyword arguments
        (``cwd`` defaults to the temporary directory, where no source tree shadows the
        installed package; the environment is passed on unless ``env`` is given)."""
        cwd = kwargs.pop("cwd", None) or tempfile.gettempdir()
        return subprocess.Popen(self.command(args, cwd), cwd=cwd, **kwargs)

    def path(self, path: str) -> str:
        """``path`` (absolute) on this host, as a path this process can open."""
        return path

    def shm_path(self, *parts: str) -> str:
        """Path, seen from this process, of ``/dev/shm/<parts>`` on this host."""
        return self.path(os.path.join("/dev/shm", *parts))

    def count_entries(self, directory: str = DEFAULT_DIRECTORY) -> int:
        """Entries left in this host's shared-memory store ``directory`` (a path on the
        host, by default the store of spec ``shm``): objects, records, claims."""
        return _count_entries(self.path(directory))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


@functools.cache
def this_host() -> Host:
    """The machine this process runs on, host A of a simulated cluster."""
    return Host()


class SimulatedHost(Host):
    """A host simulated in a mount and UTS namespace; a context manager (closing kills every
    process on it and so drops its ``/dev/shm``).

    Args:
        name: Its hostname.
        shm_size: Size limit of its ``/dev/shm`` (``mount -o size=``).
        timeout: Seconds to wait for it to start and for its processes to exit at close.
    """

    def __init__(self, name: str, shm_size: str = SHM_SIZE, timeout: float = 30) -> None:
        reason = namespaces_available()
        if reason is not None:
            raise RuntimeError(f"cannot simulate host {name!r}: {reason}")
        self._name = name
        self.timeout = timeout
        script = f"{_SETUP} && echo ready && exec sleep infinity"
        self.anchor = subprocess.Popen(
            [*_UNSHARE, "sh", "-c", script, "sh", shm_size, name],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd="/",
        )
        assert self.anchor.stdout is not None
        if self.anchor.stdout.readline().strip() != "ready":
            _, error = self.anchor.communicate(timeout=timeout)
            raise RuntimeError(f"simulated host {name!r} did not start: {error.strip()}")
        self.namespace = os.readlink(f"/proc/{self.anchor.pid}/ns/mnt")
        self._started: list[subprocess.Popen[bytes]] = []

    @property
    def name(self) -> str:
        return self._name

    def command(self, args: Sequence[str], cwd: str | None = None) -> list[str]:
        directory = cwd if cwd is not None else os.getcwd()
        target = ["--target", str(self.anchor.pid), "--mount", "--uts"]
        return ["nsenter", *target, f"--wd={directory}", "--", *args]

    def popen(self, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        process = super().popen(args, **kwargs)
        self._started.append(process)
        return process

    def path(self, path: str) -> str:
        # The anchor's root, seen through /proc, is this host's file system.
        return f"/proc/{self.anchor.pid}/root{os.path.abspath(path)}"

    def processes(self) -> list[int]:
        """Process ids of every process running on this host (the anchor among them)."""
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):  # gone, or a zombie (no namespace left)
                    if os.readlink(f"/proc/{entry}/ns/mnt") == self.namespace:
                        pids.append(int(entry))
        return pids

    def close(self) -> None:
        """Kill every process on this host and wait until none is left."""
        deadline = time.monotonic() + self.timeout
        ours: list[subprocess.Popen[Any]] = [self.anchor, *self._started]
        # Also this process's own children (one may not have entered the host yet), by the
        # Popen that holds their pid until they are reaped.
        while (pids := self.processes()) or any(p.poll() is None for p in ours):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)  # again: one may have forked meanwhile
            for process in ours:
                process.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(0.1)
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes {pids} of simulated host {self.name!r} survive")
        for stream in (self.anchor.stdout, self.anchor.stderr):
            if stream is not None:
                stream.close()

    def __enter__(self) -> SimulatedHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def simulated_hosts(count: int, shm_size: str = SHM_SIZE) -> Iterator[list[Host]]:
    """``count`` hosts: this machine (host A, where the caller runs), then simulated hosts
    named ``pp-host-b``, ``pp-host-c``...; the simulated ones are closed on exit."""
    with contextlib.ExitStack() as stack:
        hosts = [this_host()]
        for i in range(1, count):
            name = f"pp-host-{chr(ord('a') + i)}"
            hosts.append(stack.enter_context(SimulatedHost(name, shm_size)))
        yield hosts
