"""Properties over generated objects (Hypothesis): what the serializer writes it reads back;
what the policy proxies comes back equal, and only what is over the threshold is proxied; a
damaged payload is refused, never read as something else."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from proxystore.store import Store

from proxy_patterns.policy import ProxyPolicy
from proxy_patterns.proxy import TransitProxy, is_proxy, key_of, materialize, proxy
from proxy_patterns.serialize import HMAC_KEY_ENV, PayloadSignatureError, deserialize, dumps

arrays = hnp.arrays(
    dtype=st.sampled_from([np.uint8, np.int32, np.int64, np.float32, np.float64, np.bool_]),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=40),
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=300)
    | st.binary(max_size=3000)
)
objects = st.recursive(
    scalars | arrays,
    lambda children: (
        st.lists(children, max_size=6)
        | st.tuples(children, children)
        | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=25,
)


def equal(a: Any, b: Any) -> bool:
    """Deep equality that compares arrays by value, dtype and shape."""
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return bool(a == b)


@given(objects)
def test_what_is_written_reads_back_equal(obj: Any) -> None:
    payload = dumps(obj).join()
    assert equal(deserialize(payload), obj)
    assert equal(deserialize(bytes(payload)), obj)  # read-only payloads (Redis) too


@settings(max_examples=60)
@given(objects, st.data())
def test_a_signed_payload_damaged_anywhere_is_refused(obj: Any, data: st.DataObject) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(HMAC_KEY_ENV, "s3cret")
        payload = dumps(obj).join()
        at = data.draw(st.integers(0, len(payload) - 1), label="byte flipped")
        payload[at] ^= 0xFF
        try:
            back = deserialize(payload)
        except (PayloadSignatureError, ValueError):
            return  # refused, as it must be
        # Only a flip in padding, which nothing reads, may pass: the object is unchanged.
        assert equal(back, obj)


@settings(max_examples=40)
@given(objects)
def test_a_truncated_payload_is_an_error_not_a_wrong_object(obj: Any) -> None:
    payload = dumps(obj).join()
    for size in {0, 8, len(payload) // 2, len(payload) - 65}:
        if size <= 0 or size >= len(payload):
            continue
        try:
            back = deserialize(payload[:size])
        except Exception:
            continue
        assert equal(back, obj)  # only padding was cut


@pytest.fixture
def store(shm_store: Store[Any]) -> Iterator[Store[Any]]:
    yield shm_store


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=60)
@given(obj=objects, threshold=st.sampled_from([0, 64, 512, 4096]))
def test_the_policy_proxies_only_what_is_over_the_threshold_and_loses_nothing(
    store: Store[Any], obj: Any, threshold: int
) -> None:
    policy = ProxyPolicy(threshold=threshold)
    made: list[Any] = []

    def make_proxy(value: Any, frames: Any) -> Any:
        assert frames.nbytes > threshold  # only what is over the threshold
        p = proxy(store, value, keep_target=False, frames=frames, cls=TransitProxy)
        made.append(key_of(p))
        return p

    try:
        judged = policy.apply(obj, make_proxy)
        if not made:
            assert judged is obj
        else:
            assert is_proxy(judged) or isinstance(judged, (list, tuple, dict))
        assert equal(materialize(judged, policy.max_depth), obj)
    finally:
        for key in made:
            store.evict(key)
