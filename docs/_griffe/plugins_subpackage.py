"""Griffe extension: document ``plugins/`` as ``proxy_patterns.plugins``, as it is installed.

pyproject.toml maps the top-level folder ``plugins/`` to the subpackage ``proxy_patterns.plugins``
(``[tool.setuptools.package-dir]``). Griffe reads the source tree, where ``proxy_patterns/`` has
no ``plugins`` folder, so ``::: proxy_patterns.plugins.dask`` would not be found. Once
``proxy_patterns`` is loaded, this loads ``plugins/`` and attaches it under that name: every
object then has the path users import it by.
"""

from __future__ import annotations

from typing import Any

import griffe


class PluginsSubpackage(griffe.Extension):
    """Attach the top-level ``plugins`` package to ``proxy_patterns`` as ``plugins``."""

    def on_package(
        self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any
    ) -> None:
        """Graft ``plugins`` under ``proxy_patterns`` once ``proxy_patterns`` is loaded."""
        if pkg.path != "proxy_patterns" or "plugins" in pkg.members:
            return
        plugins = loader.load("plugins")
        del loader.modules_collection["plugins"]  # reachable only by its installed name
        pkg.set_member("plugins", plugins)
