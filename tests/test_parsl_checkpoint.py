"""Parsl checkpoints of proxied results (their own DataFlowKernels: one per process at a time).

A checkpoint must hold the result itself, not a proxy of a key that is evicted once the app
is done: a second DataFlowKernel reads it back after the first one and its store are gone.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import parsl
from parsl import Config, HighThroughputExecutor
from parsl.dataflow.memoization import BasicMemoizer
from parsl.providers import LocalProvider
from parsl.utils import get_all_checkpoints

from parsl_helpers import HTEX, checkpointed_text
from proxy_patterns.plugins.parsl import proxied
from proxy_patterns.store import count_entries, get_store

MiB = 2**20


def _config(spec: str, run_dir: Path, checkpoint_files: list[str] | None) -> Config:
    htex = HighThroughputExecutor(
        label=HTEX,
        address="127.0.0.1",
        max_workers_per_node=1,
        provider=LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1),
    )
    memoizer = BasicMemoizer(checkpoint_mode="task_exit", checkpoint_files=checkpoint_files)
    return Config(
        executors=[proxied(htex, threshold="1 MiB", store=spec)],
        run_dir=str(run_dir),
        memoizer=memoizer,
    )


def test_a_checkpointed_result_is_read_back_by_another_dataflowkernel(tmp_path: Path) -> None:
    directory = tempfile.mkdtemp(prefix="pp-test-parsl-checkpoint-", dir="/dev/shm")
    spec = f"shm://{directory}"
    try:
        dfk = parsl.load(_config(spec, tmp_path / "first", None))
        try:
            first = checkpointed_text(2 * MiB).result()
        finally:
            dfk.cleanup()
            parsl.clear()
        assert count_entries(get_store(spec)) == 0  # the first run's keys are gone
        checkpoints = list(get_all_checkpoints(str(tmp_path / "first")))
        assert checkpoints
        dfk = parsl.load(_config(spec, tmp_path / "second", checkpoints))
        try:
            again = checkpointed_text(2 * MiB)
            assert again.result() == first  # from the checkpoint, not from an evicted key
            assert again.task_record["from_memo"]
        finally:
            dfk.cleanup()
            parsl.clear()
        assert count_entries(get_store(spec)) == 0
    finally:
        shutil.rmtree(directory, ignore_errors=True)
