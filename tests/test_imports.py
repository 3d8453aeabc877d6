"""The core imports no framework: a Parsl user does not pay for Dask, nor a Dask user for Parsl."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
import tempfile
from typing import Any

import pytest
from proxystore.store import Store

import proxy_patterns
from proxy_patterns.extras import ExtraNotInstalledError, requires_extra

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


# --- without the extras ---------------------------------------------------------------------

# What `pip install proxy-patterns` does not install: the frameworks, the Redis client, and
# what only the extras bring (numpy, pandas, tqdm). A meta-path finder in front of the others
# makes them look uninstalled in a subprocess.
NOT_IN_THE_CORE = (*FRAMEWORKS, "redis", "numpy", "pandas", "tqdm")
WITHOUT_EXTRAS = f"""
import sys

class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {NOT_IN_THE_CORE!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
"""


def _run_without_extras(code: str) -> subprocess.CompletedProcess[str]:
    # Outside the repository, whose source tree does not hold plugins/ as proxy_patterns.plugins.
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_EXTRAS + code],
        cwd=tempfile.gettempdir(),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("plugin", "extra"), [("dask", "dask"), ("parsl", "parsl"), ("globus_compute", "globus")]
)
def test_plugin_without_its_framework_says_which_extra_to_install(plugin: str, extra: str) -> None:
    result = _run_without_extras(
        "try:\n"
        f"    import proxy_patterns.plugins.{plugin}\n"
        "except ImportError as error:\n"
        "    print(type(error).__name__, error)\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(
        f"ExtraNotInstalledError proxy_patterns.plugins.{plugin} needs the '{extra}' extra"
    )
    assert result.stdout.rstrip().endswith(f"pip install 'proxy-patterns[{extra}]'")


def test_core_works_without_any_extra(shm_store: Store[Any], shm_dir: str) -> None:
    result = _run_without_extras(
        "import pickle\n"
        "from proxystore.proxy import extract\n"
        "from proxy_patterns import ProxyPolicy, get_store, key_of, proxy\n"
        "from proxy_patterns.cli import main\n"
        "from proxy_patterns.futures import ProxyFuture\n"
        "from proxy_patterns.ownership import owned, release\n"
        "assert ProxyPolicy(threshold='1 MiB').threshold == 2**20\n"
        f"store = get_store('shm://{shm_dir}')\n"
        "p = proxy(store, b'x' * 2**20)\n"
        "assert extract(pickle.loads(pickle.dumps(p))) == b'x' * 2**20\n"
        "store.evict(key_of(p))\n"
        "future = ProxyFuture(store)\n"
        "future.set_result([1, 2])\n"
        "assert extract(future.proxy()) == [1, 2]\n"
        "future.evict()\n"
        "o = owned({'a': 1}, store)\n"
        "assert o['a'] == 1\n"
        "release(o)\n"
        "try:\n"
        "    get_store('redis://localhost:1')\n"
        "except ImportError as error:\n"
        "    print(error)\n"
        f"assert main(['clean', '--directory', '{shm_dir}']) == 0\n"
        f"print('loaded:', [m for m in {NOT_IN_THE_CORE!r} if m in sys.modules])\n"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == (
        "the store 'redis://localhost:1' needs the 'redis' extra (No module named 'redis'): "
        "pip install 'proxy-patterns[redis]'"
    )
    assert lines[1:] == [f"0 stale segment(s) removed from {shm_dir}", "loaded: []"]


@pytest.mark.parametrize(
    ("command", "extra"),
    [
        (["demo"], "dask"),
        (["bench", "dask"], "bench"),
        (["bench", "parsl"], "bench"),
        (["bench", "globus"], "bench"),
    ],
)
def test_command_without_its_extra_says_which_to_install(command: list[str], extra: str) -> None:
    result = _run_without_extras(f"from proxy_patterns.cli import main\nsys.exit(main({command}))")
    assert result.returncode == 2
    assert result.stderr.startswith(
        f"proxy-patterns: error: proxy-patterns {' '.join(command)} needs the '{extra}' extra ("
    )
    assert result.stderr.endswith(f"pip install 'proxy-patterns[{extra}]'\n")
    assert "Traceback" not in result.stderr


def test_a_command_built_on_a_plugin_names_its_own_extra_and_the_missing_module() -> None:
    with (
        pytest.raises(ExtraNotInstalledError) as raised,
        requires_extra("bench", "proxy-patterns bench dask"),
        requires_extra("dask", "proxy_patterns.plugins.dask"),
    ):
        importlib.import_module("proxy_patterns_no_such_module")
    assert str(raised.value) == (
        "proxy-patterns bench dask needs the 'bench' extra "
        "(No module named 'proxy_patterns_no_such_module'): pip install 'proxy-patterns[bench]'"
    )
    assert raised.value.name == "proxy_patterns_no_such_module"
