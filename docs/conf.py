"""Sphinx configuration of hpcdask's documentation (`make docs`).

Pages are MyST markdown (`.md`), so anyone can add one beside the others and list it in
index.md's toctree. Two pages are generated, never copied by hand: the configuration table from
the comments of src/hpcdask/hpcdask.yaml (_ext/hpcdask_config.py) and the CLI reference from
click (sphinx-click on hpcdask.cli:main). Nothing here reaches the network: the build is
`sphinx-build -W --keep-going -n`, and the links of the repository's own markdown outside
docs/ (README.md, bench/README.md) are checked against the files and headings they name
(_ext/local_links.py).
"""

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))
sys.path.insert(0, str(DOCS.parent / "src"))

project = "hpcdask"
author = "the hpcdask developers"
copyright = "the hpcdask developers"  # noqa: A001 - Sphinx's name

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx_click",
    "hpcdask_config",
    "hpcdask_modules",
    "local_links",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# MyST: GitHub-style anchors for headings down to ###, so [text](slurm.md#memory) links are
# checked by the build (a missing page or anchor is a warning, and -W makes it an error).
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

# autodoc (compat.py's docstring on the Workloads page): signatures without type hints, since
# the build is offline (no intersphinx) and Python's or Dask's types could not be linked.
autodoc_typehints = "none"

html_theme = "alabaster"
html_title = "hpcdask"
html_theme_options = {"description": "Containerised, reproducible Dask on HPC clusters",
                      "fixed_sidebar": True}


# The markdown outside docs/ that readers open on GitHub: its relative links are checked offline.
local_links_files = ["../README.md", "../bench/README.md"]
