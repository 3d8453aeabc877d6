"""The Parsl option with Parsl's monitoring enabled (its own DataFlowKernel: one per process)."""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from pathlib import Path

import numpy as np
import parsl
from parsl import Config, HighThroughputExecutor
from parsl.providers import LocalProvider

from parsl_helpers import HTEX, double, total
from proxy_patterns.plugins.parsl import proxied
from proxy_patterns.store import count_entries, get_store


def test_apps_run_and_are_monitored(tmp_path: Path) -> None:
    from parsl.monitoring import MonitoringHub

    directory = tempfile.mkdtemp(prefix="pp-test-parsl-monitoring-", dir="/dev/shm")
    spec = f"shm://{directory}"
    database = tmp_path / "monitoring.db"
    htex = HighThroughputExecutor(
        label=HTEX,
        address="127.0.0.1",
        max_workers_per_node=2,
        provider=LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1),
    )
    config = Config(
        executors=[proxied(htex, threshold="1 MiB", store=spec)],
        run_dir=str(tmp_path / "runinfo"),
        monitoring=MonitoringHub(
            logging_endpoint=f"sqlite:///{database}",
            resource_monitoring_interval=1,
        ),
    )
    try:
        dfk = parsl.load(config)
        try:
            x = np.ones(2**20 // 4)  # 2 MiB
            result = double(x).result()
            assert type(result) is np.ndarray and float(total(result).result()) == 2.0 * x.size
            assert dfk.executors[HTEX].proxy_patterns.stats()["bytes_proxied"] >= 2 * x.nbytes  # type: ignore[attr-defined]
        finally:
            dfk.cleanup()
            parsl.clear()
        assert count_entries(get_store(spec)) == 0
        with sqlite3.connect(database) as db:
            names = {row[0] for row in db.execute("SELECT task_func_name FROM task")}
        assert {"double", "total"} <= names
    finally:
        shutil.rmtree(directory, ignore_errors=True)
