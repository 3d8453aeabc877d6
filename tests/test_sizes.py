"""Byte sizes read as Dask reads them, without Dask: settings mean what they meant before."""

from __future__ import annotations

import re

import pytest

from proxy_patterns.sizes import parse_bytes
from proxy_patterns.store import connector_from_spec

KiB, MiB = 2**10, 2**20


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1 MiB", MiB),
        ("1MB", 10**6),
        ("100 kB", 100_000),
        ("1024", 1024),
        ("0", 0),
        (" 1 MiB ", MiB),
        ("1.5GiB", 3 * 2**29),
        ("5.4 kB", 5400),
        ("1e6", 10**6),
        ("1e6 kB", 10**9),
        ("1M", 10**6),
        ("1Mi", MiB),
        ("1 mib", MiB),
        ("KiB", KiB),
        ("MB", 10**6),
        ("1 B", 1),
        ("1 PB", 10**15),
        ("1 PiB", 2**50),
        ("-1 MB", -(10**6)),  # a number of bytes; whether a setting allows it is its own rule
    ],
)
def test_dask_syntax_is_read(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["junk", "5 foos", "1 XB", "10 Bytes", "--1", "1e400", "", "  "])
def test_anything_else_raises_naming_the_text(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"cannot read {text!r} as a size in bytes")):
        parse_bytes(text)


def test_store_specs_read_sizes_the_same_way(shm_dir: str) -> None:
    connector = connector_from_spec(f"shm://{shm_dir}?spare_bytes=1Mi")
    assert connector.spare_bytes == MiB  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="'1 XB'"):
        connector_from_spec(f"shm://{shm_dir}?spare_bytes=1 XB")
