"""Process tags name one process, whichever process reads them; a tag of a gone process is dead."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import psutil
import pytest

from proxy_patterns import liveness
from proxy_patterns.liveness import process_tag, start_time, tag_alive

# Prints its own tag and whether it sees the tag in argv alive, then waits for stdin to close.
_CHILD = (
    "import sys\n"
    "from proxy_patterns.liveness import process_tag, tag_alive\n"
    "print(process_tag(), tag_alive(sys.argv[1]), flush=True)\n"
    "sys.stdin.read()\n"
)


@pytest.fixture
def child() -> Iterator[subprocess.Popen[str]]:
    """A live Python process, blocked until its stdin is closed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, process_tag()],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    yield proc
    proc.kill()
    proc.wait()
    for pipe in (proc.stdin, proc.stdout):
        assert pipe is not None
        pipe.close()


def _tag_of(pid: int) -> str:
    return f"{pid}-{start_time(pid)}"


def test_a_live_process_has_one_tag_whoever_reads_it(child: subprocess.Popen[str]) -> None:
    assert child.stdout is not None
    own_tag, sees_parent = child.stdout.readline().split()
    assert own_tag == _tag_of(child.pid)  # read by another process, the same tag
    assert sees_parent == "True" and tag_alive(own_tag)
    pid, _, start = own_tag.partition("-")
    assert pid == str(child.pid) and start.isdigit()  # no "-" or "." for names that embed it
    with open(f"/proc/{pid}/stat") as stat:  # the kernel's start ticks, which no clock moves
        assert start == stat.read().rsplit(")", 1)[1].split()[19]
    assert process_tag() == _tag_of(os.getpid()) == process_tag()


def test_a_reaped_child_is_dead(child: subprocess.Popen[str]) -> None:
    tag = _tag_of(child.pid)
    assert tag_alive(tag) and child.stdin is not None
    child.stdin.close()  # it exits
    child.wait()  # reaped
    assert not tag_alive(tag) and start_time(child.pid) is None


def test_an_exited_child_not_yet_reaped_is_dead(child: subprocess.Popen[str]) -> None:
    """A zombie still has a pid and a start time, but will never release what it holds."""
    tag = _tag_of(child.pid)
    assert tag_alive(tag) and child.stdin is not None  # seen alive: checked through psutil
    child.stdin.close()
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, left unreaped
    assert psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE
    assert not tag_alive(tag)
    assert start_time(child.pid) is None and not tag_alive(tag)  # and when first seen a zombie


def test_a_pid_with_another_start_time_is_another_process(child: subprocess.Popen[str]) -> None:
    """A reused pid: same pid, another start time. So is a malformed tag, dead."""
    start = start_time(child.pid)
    assert start is not None
    assert not tag_alive(f"{child.pid}-{start + 1}")
    assert not tag_alive(f"{os.getpid()}-{start_time(os.getpid())}1")
    for malformed in ("", "no-tag", f"{child.pid}", f"{child.pid}-", f"{child.pid}-1.5"):
        assert not tag_alive(malformed), malformed


def test_a_clock_step_while_reading_does_not_kill_a_process(
    child: subprocess.Popen[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """psutil gives start times since the epoch, through the boot time, which a step of the
    system clock moves: a reading across a step is off by it, and is read again."""
    tag = _tag_of(child.pid)
    boot = psutil.boot_time()

    def step_once(readings: list[float]) -> None:
        monkeypatch.setattr(psutil, "boot_time", lambda: readings.pop(0) if readings else boot)

    step_once([boot + 1])
    assert tag_alive(tag)
    step_once([boot + 1])
    monkeypatch.setattr(liveness, "_process_tags", {})
    assert process_tag() == _tag_of(os.getpid())


def test_checks_are_cheap_after_the_first(
    child: subprocess.Popen[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """tag_alive runs for every holder whenever a record is read: this process's own tag asks
    the system nothing, and a tag seen alive reads no start time or boot time again."""
    own, other = process_tag(), _tag_of(child.pid)
    assert tag_alive(other)

    def unexpected(*args: object) -> None:
        raise AssertionError("read again")

    monkeypatch.setattr(liveness, "_running", unexpected)
    monkeypatch.setattr(liveness, "_ticks_since_boot", unexpected)
    assert tag_alive(own) and tag_alive(other)
    assert child.stdin is not None
    child.stdin.close()
    child.wait()
    assert not tag_alive(other)  # the process psutil found for it is gone
