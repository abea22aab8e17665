"""``{hpcdask-modules}``: a table of the package's modules, each with its docstring's first paragraph.

design.md lists what each module of src/hpcdask holds; reading the docstrings (with ``ast``, no
import) at build time keeps that list current as modules are added, split or moved. A module
without a docstring is a build warning (an error under ``-W``): each module says what it holds.
"""

from __future__ import annotations

import ast
from pathlib import Path

from docutils import nodes
from docutils.parsers.rst import Directive
from sphinx.util import logging

logger = logging.getLogger(__name__)


def modules(package: Path) -> list[tuple[str, str]]:
    """(module path relative to the package's parent, first docstring paragraph), sorted."""
    out = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "__main__.py" or any(p.startswith("_") and p != "__init__.py"
                                             for p in path.relative_to(package).parts):
            continue
        doc = ast.get_docstring(ast.parse(path.read_text()))
        first = " ".join((doc or "").split("\n\n")[0].split())
        out.append((str(path.relative_to(package.parent)), first))
    return out


class HpcdaskModules(Directive):
    """The argument is the package folder, relative to the docs folder."""

    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        env = self.state.document.settings.env
        package = (Path(env.srcdir) / self.arguments[0]).resolve()
        table = nodes.table()
        group = nodes.tgroup(cols=2)
        table += group
        group += nodes.colspec(colwidth=25)
        group += nodes.colspec(colwidth=75)
        head = nodes.thead()
        group += head
        head += self._row("module", "holds", literal=False)
        body = nodes.tbody()
        group += body
        for name, first in modules(package):
            env.note_dependency(str(package.parent / name))
            if not first:
                logger.warning("%s has no docstring; every module says what it holds", name,
                               location=(env.docname, self.lineno))
            body += self._row(name, first, literal=True)
        return [table]

    @staticmethod
    def _row(name: str, text: str, literal: bool) -> nodes.row:
        row = nodes.row()
        for i, cell in enumerate((name, text)):
            entry = nodes.entry()
            content = nodes.literal(cell, cell) if literal and i == 0 else nodes.Text(cell)
            entry += nodes.paragraph("", "", content)
            row += entry
        return row


def setup(app):
    app.add_directive("hpcdask-modules", HpcdaskModules)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
