"""The documentation builds offline with warnings as errors, and its checks catch what they claim.

`make docs` runs the same sphinx-build; here it runs into a temporary folder so `make test` (and
CI) fails on a broken page, a link between pages or to a heading that does not resolve, a broken
relative link in README.md, a repository path named in `code` that no longer exists, or a setting of hpcdask.yaml without its comment. No network: the
build never fetches anything (no intersphinx, no linkcheck).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"


def sphinx(src: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-n", "-q",
                           "-b", "html", str(src), str(out)],
                          capture_output=True, text=True, timeout=600)


def yaml_keys(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out += yaml_keys(value, name + ".") if isinstance(value, dict) else [name]
    return out


def test_docs_build_without_warnings(tmp_path):
    result = sphinx(DOCS, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    # The generated pages hold what they are generated from.
    config = (tmp_path / "configuration.html").read_text()
    keys = yaml_keys(yaml.safe_load((REPO / "src/hpcdask/hpcdask.yaml").read_text()))
    assert len(keys) > 20
    missing = [k for k in keys if f">{k}<" not in config]
    assert not missing, f"configuration page lacks {missing}"
    cli = (tmp_path / "cli.html").read_text()
    from hpcdask.cli import main
    absent = [name for name in main.commands if f'id="hpcdask-{name}"' not in cli]
    assert len(main.commands) >= 10 and not absent, f"CLI reference lacks {absent}"
    bench = (tmp_path / "benchmarks.html").read_text()
    first_row = next(line for line in (REPO / "bench/results/latest.md").read_text().splitlines()
                     if line.startswith("| time to ready"))
    assert first_row.split("|")[3].strip() in bench  # included, so the committed run's figure


def test_checks_fail_on_broken_links_a_moved_path_and_an_uncommented_key(tmp_path):
    """A small project using the same extensions: each defect is one error naming it."""
    src = tmp_path / "docs"
    (src / "_ext").mkdir(parents=True)
    for ext in (DOCS / "_ext").glob("*.py"):
        (src / "_ext" / ext.name).write_text(ext.read_text())
    (src / "conf.py").write_text(textwrap.dedent("""\
        import sys
        sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), "_ext"))
        extensions = ["myst_parser", "hpcdask_config", "local_links"]
        myst_heading_anchors = 3
        local_links_files = ["../README.md"]
        """))
    (src / "index.md").write_text(textwrap.dedent("""\
        # Index

        ## Present

        ```{hpcdask-config} ../settings.yaml
        ```

        [a page that is not there](other.md) and [a heading that is not there](#absent)
        """))
    (tmp_path / "settings.yaml").write_text("hpcdask:\n  commented: 1   # has a comment\n"
                                            "  bare: 2\n")
    (tmp_path / "README.md").write_text(textwrap.dedent("""\
        # Readme

        [fine](docs/index.md#present) [gone](docs/nowhere.md) [no anchor](docs/index.md#nope)
        [external](https://example.invalid/never-fetched)
        `src/hpcdask/gone.py` moved away; `docs/index.md` is there.
        """))
    result = sphinx(src, tmp_path / "out")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "key hpcdask.bare has no comment" in output
    assert "key hpcdask.commented" not in output
    assert "target not found: 'other.md'" in output, output
    assert "target not found: 'absent'" in output
    assert "docs/nowhere.md: no such file" in output
    assert "docs/index.md#nope: index.md has no heading with anchor #nope" in output
    assert "docs/index.md#present" not in output
    assert "example.invalid" not in output
    assert "README.md: names src/hpcdask/gone.py, which does not exist" in output
    assert "names docs/index.md" not in output
