#!/usr/bin/env python
"""hpcdask benchmarks: every figure against its alternative or its limit, measured in the same run.

    .venv/bin/python bench/run.py [--quick] [--only SECTION,...] [--image PATH] [--out DIR]

Sections, one module each (see bench/README.md): ready, peers, throughput, transfer, workloads,
scaling; then the model (model.py), the goal table with verdicts (goals.py, report.py) and the
plots (plots.py). The sections measure; only goals.py decides what the numbers mean. A section
that cannot run is recorded with its reason and the others go on. Writes latest.json, latest.md
and the PNG plots into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import model  # noqa: E402
import nworkers  # noqa: E402
import peers  # noqa: E402
import ready  # noqa: E402
import report  # noqa: E402
import scaling  # noqa: E402
import throughput  # noqa: E402
import transfer  # noqa: E402
import workloads  # noqa: E402
from common import T_START, Skip, log, pickle_by_value  # noqa: E402
from env import Setup  # noqa: E402
from plots import plots  # noqa: E402

SECTIONS = {"ready": ready.section, "nworkers": nworkers.section, "peers": peers.section, "throughput": throughput.section,
            "transfer": transfer.section, "workloads": workloads.section,
            "scaling": scaling.section}
ALIASES = {"cluster": "peers"}  # the section's name before the split
# Left out of --quick unless named: the rig's start and 4 peers x 1 repetition take minutes.
NOT_QUICK = ("peers",)
pickle_by_value(ready, throughput, workloads)


def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer sizes and repetitions (< 3 min)")
    p.add_argument("--only", default=None,
                   help=f"comma-separated sections of {','.join(SECTIONS)} (default: all; with "
                        f"--quick all but {','.join(NOT_QUICK)})")
    p.add_argument("--image", default=os.environ.get("HPCDASK_BENCH_IMAGE"),
                   help="image sandbox to use instead of building the test image (the bench runs the SIF "
                        "assembled from it)")
    p.add_argument("--image-timeout", type=float, default=900,
                   help="seconds allowed for the (cached) test image build")
    p.add_argument("--out", type=Path, default=HERE / "results", help="results folder")
    args = p.parse_args(argv)
    if args.only is None:
        args.only = ",".join(s for s in SECTIONS if not (args.quick and s in NOT_QUICK))
    args.only = [ALIASES.get(s.strip(), s.strip()) for s in args.only.split(",") if s.strip()]
    bad = [s for s in args.only if s not in SECTIONS]
    if bad:
        print(f"bench: unknown section(s) {', '.join(bad)}; use --only with some of "
              f"{','.join(SECTIONS)}", file=sys.stderr)
        sys.exit(2)
    return args


def meta() -> dict:
    import dask
    import distributed
    import psutil

    return {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(),
            "cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "dask": dask.__version__,
            "distributed": distributed.__version__, "load_avg_at_start": os.getloadavg(),
            "command": " ".join([Path(sys.executable).name, *sys.argv])}


def run_section(name: str, args, setup: Setup, tmp: Path) -> dict:
    log(f"== {name}")
    t0, load0 = time.perf_counter(), os.getloadavg()
    try:
        out = SECTIONS[name](args, setup, tmp)
    except Skip as e:
        out = {"skipped": str(e)}
        log(f"{name}: not measured: {e}")
    except Exception as e:
        out = {"skipped": f"failed: {type(e).__name__}: {e}"[:600],
               "traceback": traceback.format_exc()[-2000:]}
        log(f"{name}: FAILED: {e}")
    out.update(load_before=load0, load_after=os.getloadavg(),
               section_s=round(time.perf_counter() - t0, 1))
    return out


def main(argv=None) -> int:
    args = parse(argv)
    import warnings

    from distributed.versions import VersionMismatchWarning

    # The bench's client talks to roles in the image and the bare venv; hpcdask checks the
    # roles' identity among themselves.
    warnings.simplefilter("ignore", VersionMismatchWarning)
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="hpcdask-bench-", dir="/tmp"))
    tmp.chmod(0o700)
    res: dict = {"meta": {"quick": args.quick, **meta()}, "sections": {}}
    setup = Setup(args, tmp)
    try:
        for name in SECTIONS:
            if name not in args.only:
                res["sections"][name] = {"skipped": "not in a --quick run (--only peers runs it)"
                                         if args.quick and name in NOT_QUICK
                                         else "not selected (--only)"}
                continue
            res["sections"][name] = run_section(name, args, setup, tmp)
    finally:
        setup.teardown()
        shutil.rmtree(tmp, ignore_errors=True)
    res["meta"].update(image=setup.image_info, cluster=setup.cluster_state,
                       load_avg_at_end=os.getloadavg())
    try:
        res["sections"]["model"] = model.from_results(res["sections"])
    except Exception as e:
        res["sections"]["model"] = {"skipped": f"{type(e).__name__}: {e}"}
    try:
        res["plots"] = plots(res, args.out)
    except Exception as e:
        res["plots"] = []
        res["meta"]["plot_error"] = f"{type(e).__name__}: {e}"
        log(f"plots FAILED: {e}")
    res["meta"]["duration_s"] = round(time.perf_counter() - T_START, 1)
    tmpjson = args.out / "latest.json.tmp"
    tmpjson.write_text(json.dumps(_finite(res), indent=1, default=_json_default,
                                  allow_nan=False) + "\n")
    tmpjson.replace(args.out / "latest.json")
    md = report.render_markdown(res)
    (args.out / "latest.md").write_text(md)
    log(f"done in {res['meta']['duration_s']:.0f}s: {args.out / 'latest.md'}")
    print(md)
    return 0


def _finite(o):
    """NaN (a failed repetition) becomes null: latest.json stays strict JSON."""
    if isinstance(o, float) and o != o:
        return None
    if isinstance(o, dict):
        return {str(k): _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    return str(o)


if __name__ == "__main__":
    sys.exit(main())
