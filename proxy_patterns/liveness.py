"""Process tags: names of processes that stay unique when pids are reused, and their liveness.

Whatever a process leaves in a store for others to find (shared-memory segments and spares,
reference holders, proxy futures' claims) carries its *tag*, ``<pid>-<start>``: its pid and
its start time. Other processes tell with :func:`tag_alive` whether it still runs, and clean
up after it once it does not: killed, or exited and not yet reaped by its parent (a zombie,
which will never release anything either).

The start is the kernel's, in clock ticks since boot, read through :mod:`psutil`. It is an
integer, the same whichever process reads it and whenever, and holds no ``-`` or ``.``, so the
segment and holder names (``kind.tag.token``) that embed a tag split back. psutil gives start
times in seconds since the epoch, the boot time plus the ticks, and the boot time moves when
the system clock is stepped (NTP, a resumed VM); ticks since boot do not.
"""

from __future__ import annotations

import os

import psutil

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
"""Clock ticks per second: the unit of start times (the kernel's, as in ``/proc/<pid>/stat``)."""


def start_time(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot; None if there is no such
    process or it has exited (a zombie, whose parent has not reaped it yet: it will never
    release what it holds).

    One reading: a system clock step during it (between psutil's reading of the boot time and
    this one's) makes it wrong by the step, which :func:`tag_alive` and :func:`process_tag`
    guard against by reading again.
    """
    process = _running(pid)
    return None if process is None else _ticks_since_boot(process)


def _running(pid: int) -> psutil.Process | None:
    try:
        process = psutil.Process(pid)
        return None if process.status() == psutil.STATUS_ZOMBIE else process
    except psutil.NoSuchProcess:  # ZombieProcess included
        return None


def _ticks_since_boot(process: psutil.Process) -> int:
    started: float = process.create_time()  # since the epoch: the boot time + ticks
    boot: float = psutil.boot_time()
    return round((started - boot) * CLOCK_TICKS)


_process_tags: dict[int, str] = {}


def process_tag() -> str:
    """``<pid>-<start>`` of this process: it names this process while it lives, and no other."""
    pid = os.getpid()  # looked up per call: a forked child must not pass as its parent
    if pid not in _process_tags:
        start = start_time(pid)
        while (again := start_time(pid)) != start:  # a clock step during the first reading
            start = again
        _process_tags[pid] = f"{pid}-{start}"
    return _process_tags[pid]


_seen_alive: dict[str, psutil.Process] = {}
"""Tags found alive, with their process: later checks ask psutil whether that very process
still runs, which needs no boot time (psutil tells a reused pid by its start in ticks)."""


def tag_alive(tag: str) -> bool:
    """Whether the process a :func:`process_tag` names still runs (pids may be reused: a
    process with the same pid and another start time is not it).

    Called for every holder whenever a reference record is read, so kept cheap: this
    process's own tag is alive without asking the system, and a tag found alive once is
    checked again through the process psutil found for it.
    """
    if tag == process_tag():
        return True
    process = _seen_alive.get(tag)
    if process is None:
        process = _process_named(tag)
        if process is not None:
            _seen_alive[tag] = process
        return process is not None
    try:
        alive = process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        alive = False
    if not alive:
        _seen_alive.pop(tag, None)
    return bool(alive)


def _process_named(tag: str) -> psutil.Process | None:
    """The running process ``tag`` names, or None."""
    pid, _, start = tag.partition("-")
    if not (pid.isdigit() and start.isdigit()):
        return None
    for _ in range(2):  # a mismatch is read twice: once, a clock step would pass for a death
        process = _running(int(pid))
        if process is None:
            return None
        if _ticks_since_boot(process) == int(start):
            return process
    return None
