"""Every notebook in ``notebooks/`` runs top to bottom (each asserts its own results)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from proxy_patterns.simhosts import namespaces_available

NEEDS_NAMESPACES = {"cluster"}
"""Notebooks that simulate hosts (as ``tests/test_topology.py`` does): skipped where that
cannot be done, with the reason."""
NOTEBOOKS = [
    pytest.param(
        path,
        id=path.stem,
        marks=pytest.mark.skipif(
            path.stem in NEEDS_NAMESPACES and namespaces_available() is not None,
            reason=str(namespaces_available()),
        ),
    )
    for path in sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
]


@pytest.mark.parametrize("path", NOTEBOOKS)
def test_notebook_runs(path: Path, shm_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The notebooks use the default store and check it is left empty: a private directory
    # (inherited by the kernel and the workers it starts) keeps other processes' entries out.
    monkeypatch.setenv("PROXY_PATTERNS_STORE", f"shm://{shm_dir}")
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    ).execute()
