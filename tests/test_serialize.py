"""proxy_patterns.serialize: pickle 5 frames that a reader maps instead of copying."""

from __future__ import annotations

import mmap
import pickle
import subprocess
import sys
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from proxy_patterns.serialize import PickleRefused, Serialized, deserialize, dumps


def _mapped(obj: Any) -> tuple[Any, memoryview]:
    """``obj`` serialized into a private writable mapping, as the shared-memory store reads it,
    and deserialized from it; also the mapping."""
    payload = dumps(obj).join()
    region = mmap.mmap(-1, len(payload))
    region[:] = payload
    view = memoryview(region)
    return deserialize(view), view


def _address_range(view: memoryview) -> tuple[int, int]:
    start = np.frombuffer(view, dtype=np.uint8).ctypes.data
    return start, start + view.nbytes


def _inside(array: np.ndarray, view: memoryview) -> bool:
    start, end = _address_range(view)
    return start <= array.ctypes.data < end


def test_arrays_resolve_as_views_on_the_payload() -> None:
    x = np.arange(1000.0)
    y, view = _mapped(x)
    np.testing.assert_array_equal(y, x)
    assert _inside(y, view) and y.flags.writeable


def test_pandas_numeric_blocks_and_arrow_buffers_resolve_as_views() -> None:
    frame, view = _mapped(pd.DataFrame({"a": np.arange(1000.0)}))
    assert _inside(frame["a"].to_numpy(), view)
    table, view = _mapped(pa.table({"a": np.arange(1000.0)}))
    start, end = _address_range(view)
    assert start <= table.column("a").chunk(0).buffers()[1].address < end


def test_a_memoryview_keeps_its_format_and_shape_and_is_a_view() -> None:
    source = memoryview(np.arange(12.0)).cast("B").cast("d", (3, 4))
    out, view = _mapped({"m": source})
    m = out["m"]
    assert type(m) is memoryview and m.format == "d" and m.shape == (3, 4)
    assert m.tolist() == source.tolist()
    start, end = _address_range(view)
    assert start <= np.frombuffer(m, dtype=float).ctypes.data < end


def test_bytes_alone_go_out_of_band_and_come_back_as_bytes() -> None:
    data = bytes(range(256)) * 1000
    frames = dumps(data)
    assert [f.nbytes for f in frames.frames][1:] == [len(data)]  # not copied into the stream
    out, _ = _mapped(data)
    assert type(out) is bytes and out == data


@pytest.mark.parametrize("obj", [bytearray(b"abc" * 1000), "text é" * 1000, b"x" * 10])
def test_other_builtins_come_back_with_their_type(obj: Any) -> None:
    out, _ = _mapped(obj)
    assert type(out) is type(obj) and out == obj


def test_a_read_only_payload_gives_writable_arrays() -> None:
    x = np.arange(10.0)
    y = deserialize(bytes(dumps(x).join()))  # as from Redis or a file
    assert y.flags.writeable
    y[0] = 5.0
    assert x[0] == 0.0


def test_objects_from_main_are_serialized_by_value() -> None:
    code = (
        "import dataclasses, sys\n"
        "from proxy_patterns.serialize import dumps\n"
        "@dataclasses.dataclass\n"
        "class Data:\n"
        "    raw: bytes\n"
        "sys.stdout.buffer.write(dumps(Data(b'abc')).join())\n"
    )
    payload = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout
    data = deserialize(payload)  # in this process, where no __main__.Data exists
    assert type(data).__name__ == "Data" and data.raw == b"abc"


class _Marked:
    pass


@pytest.mark.parametrize("needs_cloudpickle", [False, True])
def test_refused_types_stop_the_serialization(needs_cloudpickle: bool) -> None:
    obj: Any = {"a": [1, _Marked()]}
    if needs_cloudpickle:
        obj["f"] = lambda: 1  # plain pickle fails on it: cloudpickle takes over
    with pytest.raises(PickleRefused) as refused:
        dumps(obj, refuse=lambda cls: cls is _Marked)
    assert type(refused.value.obj) is _Marked


def test_serialized_unpickles_to_the_object_once_per_occurrence() -> None:
    inner = Serialized(dumps({"x": np.arange(3.0)}))
    copies = pickle.loads(pickle.dumps([inner, inner]))
    assert copies[0] is copies[1]
    np.testing.assert_array_equal(copies[0]["x"], np.arange(3.0))


def test_a_foreign_payload_is_refused_naming_what_it_starts_with() -> None:
    with pytest.raises(ValueError, match=r"not a proxy-patterns payload.*PPF1"):
        deserialize(b"\x80\x05junk-bytes")
