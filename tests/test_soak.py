"""A short soak (issue 16's load test, ``proxy-patterns bench soak``): the plugin, a stream and
owned proxies all at once, then plain Dask; nothing lost, nothing left, memory back."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from proxy_patterns.bench import soak
from proxy_patterns.cli import build_parser

DURATION = 6.0
"""Seconds per soak: enough for every size class, stream items and owned rounds to run."""


def test_a_short_soak_loses_nothing_and_leaves_nothing(
    shm_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    proxies = soak.run_soak(DURATION, f"shm://{shm_dir}", shm_dir)
    plain = soak.run_soak(DURATION, None)

    for s in (proxies, plain):
        assert s.tally.errors == [], s.mode
        assert all(s.tally.latencies.values()), f"{s.mode}: a size class never ran"
        assert s.shm[1] - s.shm[0] <= soak.TOLERANCE, s.mode
    growth = (proxies.rss[1] - proxies.rss[0]) - (plain.rss[1] - plain.rss[0])
    assert growth <= soak.RSS_MARGIN
    # The stream and owned proxies ran alongside, with the plugin only.
    assert proxies.tally.stream_done and proxies.tally.owned_rounds
    assert len(proxies.tally.stream_done) == len(proxies.tally.stream_sent)
    assert not plain.tally.stream_done and not plain.tally.owned_rounds
    # Nothing of the store is left: no object, record, topic or spare.
    assert proxies.keys_left == 0
    assert os.listdir(shm_dir) == []

    soak.report([proxies, plain])
    output = capsys.readouterr().out
    assert "goal: 0 errors: 0 [met]" in output
    assert "goal: 0 keys left in the store: 0 [met]" in output
    assert output.count("[met]") == 4 and "NOT met" not in output
    plot = tmp_path / "soak.png"
    soak.plot_latencies([proxies, plain], str(plot))
    assert plot.stat().st_size > 10_000


def test_the_soak_is_a_benchmark_of_the_command() -> None:
    args = build_parser().parse_args(["bench", "soak", "--quick"])
    assert (args.name, args.quick) == ("soak", True)
