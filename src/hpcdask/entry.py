"""The console script: catches what must be caught before Dask is even imported."""

from __future__ import annotations

import re
import sys


def main() -> None:
    try:
        from hpcdask.cli import main as cli
    except ValueError as e:
        # `import dask` parses every Dask YAML config file and raises on a malformed one.
        m = re.search(r"config file at '([^']+)' is malformed", str(e))
        if not m:
            raise
        path = m.group(1)
        lines = str(e).split("original error message:", 1)[-1].splitlines()
        what = [ln.strip() for ln in lines if ln.strip() and not ln.startswith(" ")]
        where = re.search(r"line (\d+), column (\d+)", str(e))
        detail = "; ".join(what[-1:] + ([f"line {where.group(1)}"] if where else []))
        print(f"hpcdask: error: Dask config file {path} is malformed ({detail}); "
              f"fix it or move it away: mv {path} {path}.bak", file=sys.stderr)
        sys.exit(2)
    cli()
