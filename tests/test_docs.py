"""Every public name has a docstring, and every public module a page in the API reference.

The reference (``docs/reference/``) is made by mkdocstrings from ``::: module`` directives, and
shows each public member that has a docstring. So a public function or class is in the
reference exactly when it has a docstring, its module has a directive, and no option of the
directive (or of mkdocs.yml) narrows the members shown. This checks the three from the source
alone, without importing the package or needing mkdocs (CI builds the site itself, strictly).

Public means: modules whose dotted name has no part starting with ``_``; in each, the functions
and classes it defines at top level whose names do not start with ``_``, and those named in its
``__all__``. Module-level data (constants, type variables) cannot carry a ``__doc__`` and is not
checked.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# Source folder -> installed package name, as [tool.setuptools.package-dir] in pyproject.toml.
PACKAGES = {ROOT / "proxy_patterns": "proxy_patterns", ROOT / "plugins": "proxy_patterns.plugins"}

DIRECTIVE = re.compile(r"^::: *(?P<module>[\w.]+) *$")
MEMBER_OPTION = re.compile(r"^\s*(?P<option>members|filters):", re.MULTILINE)


def public_modules() -> dict[str, Path]:
    """Dotted name -> source file of every public module of the package and its plugins."""
    modules = {}
    for folder, package in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            if not any(part.startswith("_") for part in parts):
                modules[".".join([package, *parts])] = path
    return modules


def public_definitions(
    tree: ast.Module,
) -> list[ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef]:
    """The functions and classes ``tree`` defines at top level that are public."""
    exported: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "__all__" for target in node.targets
        ):
            exported = set(ast.literal_eval(node.value))
    return [
        node
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        and (not node.name.startswith("_") or node.name in exported)
    ]


def undocumented(tree: ast.Module) -> list[str]:
    """The public functions and classes of ``tree`` that have no docstring."""
    return [node.name for node in public_definitions(tree) if not ast.get_docstring(node)]


def reference_directives(docs: Path = DOCS) -> dict[str, str]:
    """Module -> the options block of its ``::: module`` directive, over every page of ``docs``."""
    directives = {}
    for page in sorted(docs.rglob("*.md")):
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            match = DIRECTIVE.match(line)
            if match:
                options = []
                for following in lines[i + 1 :]:
                    if following and not following.startswith(" "):
                        break
                    options.append(following)
                directives[match["module"]] = "\n".join(options)
    return directives


MODULES = public_modules()


def test_public_modules_are_found() -> None:
    # The discovery itself must see the package, its subpackages and the plugins' installed names.
    assert {
        "proxy_patterns",
        "proxy_patterns.store",
        "proxy_patterns.brokers.redis",
        "proxy_patterns.plugins.dask.scheduler",
        "proxy_patterns.plugins.parsl",
    } <= set(MODULES)
    assert not any(name.endswith("__main__") for name in MODULES)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_public_names_have_docstrings(module: str) -> None:
    tree = ast.parse(MODULES[module].read_text())
    assert ast.get_docstring(tree), f"module {module} has no docstring"
    missing = undocumented(tree)
    assert not missing, (
        f"public names of {module} without a docstring (so not in the API reference): {missing}; "
        "give each one, or make it private (a leading _)"
    )


def test_every_public_module_is_in_the_reference() -> None:
    directives = reference_directives()
    missing = sorted(set(MODULES) - set(directives))
    assert not missing, (
        f"public modules without a page in the API reference: {missing}; add "
        "docs/reference/<module>.md holding '::: <module>' and list it in mkdocs.yml's nav"
    )
    unknown = sorted(set(directives) - set(MODULES))
    assert not unknown, f"reference pages of modules that are not public modules: {unknown}"


def test_reference_shows_every_member() -> None:
    narrowed = {
        module: MEMBER_OPTION.findall(options)
        for module, options in reference_directives().items()
        if MEMBER_OPTION.search(options)
    }
    assert not narrowed, f"directives whose options narrow the members shown: {narrowed}"
    handler_options = (ROOT / "mkdocs.yml").read_text().split("mkdocstrings:", 1)[1]
    assert not MEMBER_OPTION.search(handler_options), (
        "mkdocs.yml's mkdocstrings options narrow the members shown in every page"
    )


def test_the_checks_catch_what_they_look_for(tmp_path: Path) -> None:
    # The checks above pass only because nothing is missing, not because they see nothing.
    tree = ast.parse(
        '"""Module."""\n__all__ = ["_exported"]\n'
        'def shown(): pass\ndef documented():\n    """Doc."""\n'
        "def _private(): pass\ndef _exported(): pass\nclass Shown: pass\n"
    )
    assert undocumented(tree) == ["shown", "_exported", "Shown"]
    (tmp_path / "page.md").write_text(
        "# Page\n\n::: proxy_patterns.store\n    options:\n      members: [get_store]\n\n"
        "::: proxy_patterns.proxy\n\nText.\n"
    )
    directives = reference_directives(tmp_path)
    assert set(directives) == {"proxy_patterns.store", "proxy_patterns.proxy"}
    assert MEMBER_OPTION.search(directives["proxy_patterns.store"])
    assert not MEMBER_OPTION.search(directives["proxy_patterns.proxy"])
