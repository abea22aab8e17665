"""``{hpcdask-config}``: the table of every key of src/hpcdask/hpcdask.yaml, from its comments.

hpcdask.yaml is the one place the defaults live, one key per line with a trailing comment (the
dask-jobqueue convention). This directive reads the file at build time, so the page cannot drift
from it: each row is the key's dotted path, its default, the environment variable that overrides
it, and the comment. A key without a comment is a build warning (an error under ``-W``).
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from docutils import nodes
from docutils.parsers.rst import Directive, directives
from sphinx.util import logging

logger = logging.getLogger(__name__)
LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_-]+):(?P<value>[^#]*?)\s*(?:#\s?(?P<comment>.*))?$")


def entries(text: str) -> list[tuple[str, object, str, bool]]:
    """(dotted key, default, comment, is a section) for every key of the YAML text, in file order.

    Defaults come from yaml.safe_load (typed, as Dask reads them); comments from each key's line,
    where a trailing ``...`` continues onto the next key's comment as written.
    """
    data = yaml.safe_load(text)
    stack: list[tuple[int, str]] = []
    out = []
    for line in text.splitlines():
        m = LINE.match(line)
        if not m:
            continue
        indent = len(m["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = [k for _, k in stack] + [m["key"]]
        value = data
        for part in path:
            value = value[part]
        section = isinstance(value, dict)
        out.append((".".join(path), value, (m["comment"] or "").strip(), section))
        if section:
            stack.append((indent, m["key"]))
    return out


def env_names(key: str) -> str:
    """Dask's variable for a dotted key, and hpcdask's short one for its own keys."""
    parts = key.split(".")
    long = "DASK_" + "__".join(p.upper().replace("-", "_") for p in parts)
    if parts[0] == "hpcdask" and len(parts) == 2:
        return f"{long}, HPCDASK_{parts[1].upper().replace('-', '_')}"
    return long


def shown(value: object) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


class HpcdaskConfig(Directive):
    """Renders the table; the argument is the YAML file, relative to the docs folder."""

    required_arguments = 1
    option_spec = {"class": directives.class_option}

    def run(self) -> list[nodes.Node]:
        env = self.state.document.settings.env
        path = (Path(env.srcdir) / self.arguments[0]).resolve()
        env.note_dependency(str(path))
        rows = [e for e in entries(path.read_text()) if not e[3]]
        table = nodes.table()
        group = nodes.tgroup(cols=4)
        table += group
        for width in (22, 14, 24, 40):
            group += nodes.colspec(colwidth=width)
        head = nodes.thead()
        group += head
        head += self._row(["key", "default", "environment", "meaning"], literal=False)
        body = nodes.tbody()
        group += body
        for key, value, comment, _ in rows:
            if not comment:
                logger.warning("%s: key %s has no comment; every key needs one (it becomes this "
                               "table's text)", path.name, key, location=(env.docname, self.lineno))
            body += self._row([key, shown(value), env_names(key), comment],
                              literal=[True, True, True, False])
        return [table]

    @staticmethod
    def _row(cells, literal) -> nodes.row:
        row = nodes.row()
        for i, text in enumerate(cells):
            entry = nodes.entry()
            lit = literal[i] if isinstance(literal, list) else literal
            entry += nodes.paragraph("", "", nodes.literal(text, text) if lit else nodes.Text(text))
            row += entry
        return row


def setup(app):
    app.add_directive("hpcdask-config", HpcdaskConfig)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
