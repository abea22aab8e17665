"""Checks the relative links of the repository's markdown outside docs/, offline.

Sphinx and MyST check the links between the pages under docs/ (a missing page or heading anchor
is a warning). README.md and the other markdown files named in ``local_links_files`` are read
on GitHub, not built, so this extension reads their links with markdown-it (MyST's parser) and
warns, under ``-W`` fails, when a relative link names a file that does not exist or a heading
anchor (``docs/slurm.md#memory``) that the target file does not have. External links
(``https:`` and the like) are never fetched: this build must work without the internet.

The same pass reads every inline code span of those files and of the pages under docs/ that
names a path in the repository (```src/hpcdask/project.py```, ```tests/cluster/cluster.sh```):
a path that no longer exists, because a file moved, is a warning too.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

from markdown_it import MarkdownIt
from myst_parser.mdit_to_docutils.base import default_slugify
from sphinx.util import logging

logger = logging.getLogger(__name__)
REPO_PATH = re.compile(r"^((?:src|tests|containers|jobscripts|bench|docs)/[A-Za-z0-9_.+/-]*[A-Za-z0-9_/])")


def _tokens(text: str):
    for token in MarkdownIt("commonmark").enable("table").parse(text):
        yield token
        yield from token.children or ()


def anchors(path: Path) -> set[str]:
    """The heading anchors of a markdown file, as GitHub and MyST make them."""
    out, heading = set(), False
    for token in _tokens(path.read_text()):
        if token.type == "heading_open":
            heading = True
        elif heading and token.type == "inline":
            slug = default_slugify(token.content)
            n = 0
            while (slug if n == 0 else f"{slug}-{n}") in out:
                n += 1
            out.add(slug if n == 0 else f"{slug}-{n}")
            heading = False
    return out


def bad_links(path: Path) -> list[str]:
    """One line per relative link of ``path`` that does not resolve."""
    problems = []
    for token in _tokens(path.read_text()):
        target = token.attrs.get("href") if token.type == "link_open" else (
            token.attrs.get("src") if token.type == "image" else None)
        if not target:
            continue
        parts = urlsplit(str(target))
        if parts.scheme or parts.netloc:
            continue  # external: never fetched here
        dest = (path.parent / unquote(parts.path)).resolve() if parts.path else path
        if not dest.exists():
            problems.append(f"{target}: no such file {dest}")
        elif parts.fragment and dest.suffix == ".md" and parts.fragment not in anchors(dest):
            problems.append(f"{target}: {dest.name} has no heading with anchor #{parts.fragment}")
    return problems


def missing_paths(path: Path, root: Path) -> list[str]:
    """Repository paths named in ``path``'s inline code that do not exist under ``root``."""
    out = []
    for token in _tokens(path.read_text()):
        m = REPO_PATH.match(token.content) if token.type == "code_inline" else None
        if m and not m[1].startswith("docs/_build") and not (root / m[1]).exists() \
                and m[1] not in out:
            out.append(m[1])
    return out


def check(app, exception) -> None:
    if exception is not None:
        return
    root = Path(app.srcdir)
    repo = root.parent
    files = [(root / name).resolve() for name in app.config.local_links_files]
    for path in files:
        for problem in bad_links(path):
            logger.warning("%s: broken link %s", path.relative_to(repo), problem)
    for path in files + sorted(root.glob("*.md")):
        for name in missing_paths(path, repo):
            logger.warning("%s: names %s, which does not exist", path.relative_to(repo), name)


def setup(app):
    app.add_config_value("local_links_files", [], "env")
    app.connect("build-finished", check)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
