"""Griffe extension: render the docstrings' reST markup as Markdown.

The docstrings are Google style with some reST in them: Sphinx roles (:func:`get_store`,
:class:`~x.y.Z`), literal blocks introduced by a paragraph ending in ``::`` and simple tables
(columns under ``=====  =====`` borders). Markdown would show all three verbatim. Before
mkdocstrings renders a docstring:

* each role becomes an *optional* cross-reference: a link when its target is documented on the
  site, the name in code font otherwise (an object of another library, a private helper), so a
  strict build never fails on a reference to something outside the reference pages;
* a trailing ``::`` becomes ``:``, and a ``::`` alone on its line goes, as reST renders them
  (the indented block after it is a code block in Markdown too);
* a simple table becomes a Markdown table.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:func|meth|class|mod|data|attr|exc|obj):`(?P<target>[^`]+)`(?:\\ )?")
"""A Sphinx role with its target, e.g. :func:`~proxy_patterns.store.get_store` (and the escaped
space that glues a suffix to it in reST, as in :class:`Proxy`\\ s)."""

TRAILING_LITERAL_MARKER = re.compile(r"(?<=\S)::$", flags=re.MULTILINE)
"""A reST literal-block marker at the end of a paragraph: ``text::`` renders as ``text:``."""

LONE_LITERAL_MARKER = re.compile(r"^[ \t]*::[ \t]*$", flags=re.MULTILINE)
"""A reST literal-block marker alone on a line, which renders as nothing."""

TABLE_BORDER = re.compile(r"^=+(?: +=+)+ *$")
"""A border line of a reST simple table: runs of ``=`` separated by spaces, one per column."""


class RestMarkup(griffe.Extension):
    """Rewrite the reST markup of every docstring of ``proxy_patterns`` as Markdown."""

    def on_package(
        self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any
    ) -> None:
        """Rewrite the docstrings once the whole package (with its plugins) is loaded."""
        if pkg.path == "proxy_patterns":
            _rewrite(pkg, loader.modules_collection)


def _rewrite(obj: griffe.Object, collection: griffe.ModulesCollection) -> None:
    if obj.docstring is not None:
        text = ROLE.sub(lambda match: _link(match["target"], obj, collection), obj.docstring.value)
        text = TRAILING_LITERAL_MARKER.sub(":", text)
        text = LONE_LITERAL_MARKER.sub("", text)
        obj.docstring.value = _tables(text)
    for member in obj.members.values():
        if not member.is_alias:
            _rewrite(member, collection)  # type: ignore[arg-type]


def _link(target: str, context: griffe.Object, collection: griffe.ModulesCollection) -> str:
    short = target.startswith("~")
    name = target.lstrip("~.")
    title = name.rsplit(".", 1)[-1] if short else name
    identifier = _resolve(name, context, collection) or name
    return f'<autoref identifier="{identifier}" optional><code>{title}</code></autoref>'


def _resolve(
    name: str, context: griffe.Object, collection: griffe.ModulesCollection
) -> str | None:
    """The full path of ``name`` as seen from ``context`` (its scopes outwards), if it exists."""
    candidates = [name, f"proxy_patterns.{name}"]
    scope: griffe.Object | None = context
    while scope is not None:
        candidates.append(f"{scope.path}.{name}")
        scope = scope.parent
    for candidate in candidates:
        try:
            found = collection.get_member(candidate)
        except (KeyError, ValueError, griffe.AliasResolutionError):
            continue
        return str(found.path)
    return None


def _tables(text: str) -> str:
    """``text`` with each reST simple table replaced by a Markdown table."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        if not TABLE_BORDER.match(lines[i]):
            out.append(lines[i])
            i += 1
            continue
        columns = [(m.start(), m.end()) for m in re.finditer(r"=+", lines[i])]
        body: list[str | None] = []
        borders, i = 1, i + 1
        while i < len(lines) and borders < 3:
            if TABLE_BORDER.match(lines[i]):
                borders += 1
                if i + 1 < len(lines) and lines[i + 1].strip():  # a header separator: more rows
                    body.append(None)
                else:
                    break
            else:
                body.append(lines[i])
            i += 1
        out.extend(_markdown_table(body, columns))
        i += 1
    return "\n".join(out)


def _markdown_table(body: list[str | None], columns: list[tuple[int, int]]) -> list[str]:
    """The rows of a simple table (None marks the end of its header) as Markdown lines.

    A line whose first cell is blank continues the row above it."""
    rows: list[list[str]] = []
    header_rows = body.index(None) if None in body else 0
    for line in body:
        if line is None:
            continue
        cells = [
            _cell(line, start, columns[k + 1][0] if k + 1 < len(columns) else None)
            for k, (start, _) in enumerate(columns)
        ]
        if rows and not cells[0]:
            rows[-1] = [f"{old} {new}".strip() for old, new in zip(rows[-1], cells, strict=True)]
        else:
            rows.append(cells)
    header = rows[:header_rows] or [[""] * len(columns)]
    lines = ["| " + " | ".join(header[0]) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows[header_rows:]]
    return ["", *lines, ""]


def _cell(line: str, start: int, end: int | None) -> str:
    return line[start:end].strip()
