"""Another local user, unprivileged, tries to read, plant and delete our objects and records:
in the shared-memory store and in a password-protected Redis. Every attempt fails, and our
workload goes on unaffected. The intruder is a real account, made for the test (as root), and
uses only the system's tools (``ls``, ``cat``, ``touch``, ``rm``, bash's ``/dev/tcp``)."""

from __future__ import annotations

import os
import pwd
import subprocess
from collections.abc import Iterator
from urllib.parse import urlparse

import numpy as np
import pytest

from conftest import assert_empty_and_close
from proxy_patterns.bench.redis_server import local_redis_server
from proxy_patterns.ownership import owned, release
from proxy_patterns.proxy import key_of
from proxy_patterns.store import count_entries, get_store

INTRUDER = "pp-intruder"
PASSWORD = "0nly-us"


@pytest.fixture(scope="module")
def intruder() -> Iterator[pwd.struct_passwd]:
    """An unprivileged account of its own, removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("making a second user needs root")
    made = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/bin/sh", INTRUDER],
        capture_output=True,
    )
    if made.returncode not in (0, 9):  # 9: it exists already (a test run killed earlier)
        pytest.skip(f"cannot make a user: {made.stderr.decode().strip()}")
    try:
        yield pwd.getpwnam(INTRUDER)
    finally:
        subprocess.run(["userdel", INTRUDER], capture_output=True)


def _as(user: pwd.struct_passwd, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(command),
        user=user.pw_uid,
        group=user.pw_gid,
        extra_groups=[],
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_shared_memory_objects_and_records_are_out_of_reach(
    intruder: pwd.struct_passwd, shm_dir: str
) -> None:
    store = get_store(f"shm://{shm_dir}")
    kept = owned(np.arange(1000), store)  # an object with a record
    key = key_of(kept)
    segment = store.connector.path(key)  # type: ignore[attr-defined]
    record = f"{segment}.refs"
    attempts = {
        "list the store": ("ls", shm_dir),
        "read a segment": ("cat", segment),
        "plant a segment": ("touch", os.path.join(shm_dir, "proxy-patterns-planted")),
        "delete a segment": ("rm", "-f", segment),
        "list a record": ("ls", record),
        "add a holder": ("touch", os.path.join(record, "owner.1-1.planted")),
        "delete a record": ("rm", "-rf", record),
    }
    for attempt, command in attempts.items():
        done = _as(intruder, *command)
        assert done.returncode != 0, f"{attempt} succeeded as {INTRUDER}"
        assert "Permission denied" in done.stderr, (attempt, done.stderr)
    assert int(kept.sum()) == sum(range(1000))  # our workload goes on
    assert os.path.isdir(record) and os.path.exists(segment)
    release(kept)
    assert_empty_and_close(store)


def _redis_as(user: pwd.struct_passwd, port: int, *command: str) -> str:
    """One command sent to the server as ``user``, in the protocol's own framing."""
    frame = f"*{len(command)}\r\n" + "".join(f"${len(a)}\r\n{a}\r\n" for a in command)
    script = (
        f'exec 3<>/dev/tcp/127.0.0.1/{port}; printf %s "$1" >&3; '
        'read -r -t 5 reply <&3; echo "$reply"'
    )
    return _as(user, "bash", "-c", script, "intruder", frame).stdout


@pytest.fixture
def secured_redis() -> Iterator[str]:
    with local_redis_server(password=PASSWORD) as url:
        host, port = urlparse(url).hostname, urlparse(url).port
        yield f"redis://:{PASSWORD}@{host}:{port}"


def test_a_password_protected_redis_refuses_the_intruder(
    intruder: pwd.struct_passwd, secured_redis: str
) -> None:
    store = get_store(secured_redis)
    kept = owned(np.arange(1000), store)
    key = key_of(kept).redis_key
    port = urlparse(secured_redis).port
    assert port is not None
    for command in (("KEYS", "*"), ("GET", key), ("SET", key, "planted"), ("DEL", key)):
        reply = _redis_as(intruder, port, *command)
        assert reply.startswith("-NOAUTH"), (command, reply)
    assert int(kept.sum()) == sum(range(1000))
    assert count_entries(store) == 2  # the object and its record, untouched
    release(kept)
    assert_empty_and_close(store)
