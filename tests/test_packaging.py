"""``plugins/`` installs as ``proxy_patterns.plugins`` in regular and editable installs."""

from __future__ import annotations

import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PLUGINS = ("dask", "parsl", "globus_compute")


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
        "import importlib.util, sys, proxystore.store\n"
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
        assert out[:3] == [str(REPO / "plugins" / f"{n}.py") for n in PLUGINS]
        assert out[3] == str(REPO / "proxy_patterns" / "__init__.py")
    else:
        nested_lib = str(venv / "lib")
        assert all(path.startswith(nested_lib) for path in out), out
        assert all(
            path.endswith(f"proxy_patterns/plugins/{n}.py")
            for path, n in zip(out[:3], PLUGINS, strict=True)
        )
        assert (Path(out[3]).parent / "py.typed").exists()
