"""The core imports no framework: a Parsl user does not pay for Dask, nor a Dask user for Parsl."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import proxy_patterns

FRAMEWORKS = ("dask", "distributed", "parsl", "globus_compute_sdk")
CORE = sorted(
    f"proxy_patterns.{m.name}"
    for m in pkgutil.iter_modules(proxy_patterns.__path__)
    if m.name not in ("plugins", "bench", "__main__")
)


def test_every_core_module_is_checked() -> None:
    assert {"proxy_patterns.policy", "proxy_patterns.store", "proxy_patterns.futures"} <= set(CORE)


@pytest.mark.parametrize("module", ["proxy_patterns", *CORE])
def test_core_module_imports_no_framework(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        f"loaded = [m for m in {FRAMEWORKS!r} if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
