"""bench/: the benchmark's pure functions (statistics, verdicts, the scaling model, the report).

No timings are asserted: the bench measures, it never passes or fails on seconds. These check
that the numbers it is given are summarised, judged and rendered correctly.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import goals as G  # noqa: E402
import model as M  # noqa: E402
import report as R  # noqa: E402
import stats as S  # noqa: E402


# --- statistics ---------------------------------------------------------------------------------

def test_quantile_matches_numpy_linear():
    np = pytest.importorskip("numpy")
    xs = [3.0, 1.0, 7.0, 2.0, 10.0]
    for q in (0, 0.25, 0.5, 0.75, 1):
        assert S.quantile(xs, q) == pytest.approx(float(np.quantile(xs, q)))
    with pytest.raises(ValueError):
        S.quantile([], 0.5)
    with pytest.raises(ValueError):
        S.quantile([1.0], 1.5)


def test_summarize():
    s = S.summarize([4, 1, 3, 2])
    assert s["n"] == 4 and s["median"] == 2.5 and s["min"] == 1 and s["max"] == 4
    assert s["q1"] == pytest.approx(1.75) and s["q3"] == pytest.approx(3.25)
    assert s["values"] == [4.0, 1.0, 3.0, 2.0]
    assert S.summarize([]) == {"n": 0}


def test_paired_ratios_pair_each_repetition():
    r = S.paired_ratios([2.0, 3.0, 8.0], [1.0, 3.0, 4.0])
    assert r["values"] == [2.0, 1.0, 2.0]
    assert r["median"] == 2.0 and r["min"] == 1.0 and r["max"] == 2.0
    with pytest.raises(ValueError):
        S.paired_ratios([1.0], [1.0, 2.0])
    assert S.paired_ratios([1.0, 2.0], [0.0, 1.0])["n"] == 1  # a zero denominator is dropped


def test_interleave_rotates_and_covers_every_variant_each_round():
    order = S.interleave(["a", "b", "c"], 3)
    rounds = [[v for r, v in order if r == i] for i in range(3)]
    assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert S.interleave(["a", "b"], 2) == [(0, "a"), (0, "b"), (1, "b"), (1, "a")]


def test_linear_fit():
    a, b = S.linear_fit([1, 2, 4, 8], [3, 5, 9, 17])
    assert a == pytest.approx(1) and b == pytest.approx(2)
    assert S.linear_fit([2, 2], [1, 3]) == (2.0, 0.0)
    with pytest.raises(ValueError):
        S.linear_fit([], [])


def test_first_reaching():
    assert S.first_reaching([1, 5, 9], [0.5, 0.8, 0.9], 0.8) == 5
    assert S.first_reaching([1, 5], [0.5, 0.6], 0.8) is None
    assert S.first_reaching([], [], 0.1) is None
    assert not math.isnan(S.first_reaching([3], [1.0], 1.0))


def test_fmt():
    assert S.fmt_num(1234.5) == "1,234"
    assert S.fmt_num(0.012345) == "0.0123"
    assert S.fmt_num(None) == "-" and S.fmt_num(float("nan")) == "-" and S.fmt_num(0) == "0"
    assert S.fmt_value(S.summarize([2.0, 3.0]), "s") == "2.50 s [2.00-3.00]"
    t = S.markdown_table([["a|b", "1"]], ["x", "y"])
    assert t.splitlines() == ["| x | y |", "|---|---|", "| a\\|b | 1 |"]
    with pytest.raises(ValueError):
        S.markdown_table([["only one"]], ["x", "y"])


# --- verdicts -----------------------------------------------------------------------------------

@pytest.mark.parametrize("values, op, thr, want", [
    ([0.98, 1.01, 1.04], "<=", 1.05, G.MET),
    ([1.06, 1.10, 1.20], "<=", 1.05, G.NOT_MET),
    ([1.00, 1.04, 1.08], "<=", 1.05, G.INCONCLUSIVE),   # the spread straddles the goal
    ([0.85, 0.90, 0.95], ">=", 0.80, G.MET),
    ([0.40, 0.45, 0.50], ">=", 0.80, G.NOT_MET),
    ([0.70, 0.85, 0.90], ">=", 0.80, G.INCONCLUSIVE),
    ([1.05, 1.05, 1.05], "<=", 1.05, G.MET),            # on the line is on the goal's side
    ([5.0, 6.0, 7.0], "within", [4.0, 8.0], G.MET),
    ([9.0, 9.5, 10.0], "within", [4.0, 8.0], G.NOT_MET),
    ([7.0, 8.5, 9.0], "within", [4.0, 8.0], G.INCONCLUSIVE),
    ([0.5, 0.6], ">=", 0.80, G.INCONCLUSIVE),           # fewer than MIN_N repetitions
])
def test_verdict(values, op, thr, want):
    assert G.verdict(S.summarize(values), op, thr) == want


def test_verdict_of_nothing_and_bad_operator():
    assert G.verdict(None, ">=", 1) == G.NOT_MEASURED
    assert G.verdict({"n": 0}, ">=", 1) == G.NOT_MEASURED
    with pytest.raises(ValueError):
        G.verdict(S.summarize([1, 2, 3]), "==", 1)


def test_goal_rows_read_the_sections_and_name_why_not_measured():
    ratios = S.paired_ratios([1.0, 1.02, 1.01], [1.0, 1.0, 1.0])
    sections = {
        "ready": {"workers": [1, 4], "ratios": {"container/bare": {"1": ratios, "4": ratios},
                                                "kernel/bare": {"1": ratios, "4": ratios}}},
        "transfer": {"sizes": [400_000_000], "ratios": {"400000000": {
            "TLS/raw ssl": S.summarize([0.5, 0.55, 0.6]),
            "TCP/raw TCP": S.summarize([0.7, 0.85, 0.9]),
            "TLS/TCP": S.summarize([0.9, 0.95, 1.0]),
            "TLS/raw ssl cold": S.summarize([0.7, 0.9, 1.1])}}},
        "peers": {"skipped": "the test cluster rig is not there"},
    }
    rows = {r["figure"]: r for r in G.goal_rows({"sections": sections})}
    ready = [r for f, r in rows.items() if f.startswith("time to ready, scheduler + ")]
    assert len(ready) == 4 and all(r["verdict"] == G.MET and r["goal"] == "<= 1.05x"
                                   for r in ready)
    tls = next(r for f, r in rows.items() if "Dask TLS / raw Python ssl (same cipher)" in f)
    assert tls["verdict"] == G.NOT_MET and tls["goal"] == ">= 0.800x"
    assert tls["measured"] == "0.550x (0.500-0.600, n=3)"
    tcp = next(r for f, r in rows.items() if "Dask TCP / raw TCP" in f)
    assert tcp["verdict"] == G.INCONCLUSIVE
    cold = next(r for f, r in rows.items() if "cold receive memory: Dask TLS / raw" in f)
    assert cold["verdict"] == G.INCONCLUSIVE and cold["measured"].startswith("0.900x (0.700-1.10")
    # both measures of TLS's cost are rows: small messages and bulk
    assert any("tiny tasks/s, hpcdask TLS / hpcdask --no-tls" in f for f in rows)
    assert any("Dask TLS / Dask TCP" in f for f in rows)
    peer = next(r for f, r in rows.items() if f.startswith("peers: hpcdask time"))
    assert peer["verdict"] == G.NOT_MEASURED and peer["note"] == "the test cluster rig is not there"
    gs = next(r for f, r in rows.items() if f.startswith("grid search"))
    assert gs["verdict"] == G.NOT_MEASURED and gs["goal"] == ">= 1.60x"


# --- the scaling model --------------------------------------------------------------------------

def test_heartbeat_interval_is_distributeds():
    sched = pytest.importorskip("distributed.scheduler")
    for n in (1, 10, 11, 49, 50, 199, 200, 1000, 5000):
        assert M.heartbeat_interval(n) == pytest.approx(sched.heartbeat_interval(n))


def test_fit_ready_and_band():
    pts = [(1, 3.0), (2, 3.6), (4, 4.4), (8, 7.0), (16, 11.0)]
    f = M.fit_ready(pts)
    a, b = f["fit"]
    assert f["margin"] == pytest.approx(max(y - (a + b * x) for x, y in pts))
    assert f["margin"] > 0 and f["fitted_on"] == [1, 2, 4, 8, 16]
    lo, hi = M.ready_band(32, ready_one=3.0, join_cpu=0.01, fit=f["fit"], margin=f["margin"])
    assert lo == pytest.approx(3.0 + 31 * 0.01) and hi == pytest.approx(a + b * 32 + f["margin"])
    # every fitted point lies inside its own band
    for x, y in pts:
        band = M.ready_band(x, ready_one=3.0, join_cpu=0.01, fit=f["fit"], margin=f["margin"])
        assert M.in_band(y, band)
    assert not M.in_band(100.0, [1.0, 2.0])


def test_scaling_model_arithmetic():
    m = M.scaling_model(ready_one=3.0, join_cpu=0.01, ready_fit=(2.0, 0.5), task_cpu=2e-4,
                        task_wall=5e-4, heartbeat_cpu=1e-4, margin=1.0)
    assert "extrapolation" in m["kind"] and m["assumptions"]
    r100, r1000 = m["rows"]
    assert r100["ready_s"] == [pytest.approx(3.0 + 99 * 0.01), pytest.approx(2.0 + 50 + 1.0)]
    assert r100["heartbeats_per_s"] == 50.0
    load = 50 * 1e-4
    assert r100["tasks_per_s"] == [round((1 - load) / 5e-4), round((1 - load) / 2e-4)]
    assert r1000["tasks_per_s"][1] <= r100["tasks_per_s"][1]
    json.dumps(m)


def _scaling_sections(measured: dict[int, list[float]]):
    runs = {str(n): [{"ready_s": v, "join_cpu_s": 0.01} for v in vs] for n, vs in measured.items()}
    return {
        "scaling": {"runs": runs, "summary": {n: S.summarize([x["ready_s"] for x in r])
                                              for n, r in runs.items()},
                    "prediction": {"fitted_on": [1, 2, 4], "ready_one_s": 3.0, "join_cpu_s": 0.01,
                                   "bands": {"8": [3.1, 9.0]}},
                    "idle_cpu_rate": {"1": [0.01], "4": [0.02]}},
        "throughput": {"summary": {"hpcdask TLS": {
            "tasks_per_s": S.summarize([1000.0]),
            "scheduler_cpu_per_task_s": S.summarize([3e-4])}}},
    }


def test_model_from_results_band_contains_every_measured_point():
    sec = _scaling_sections({1: [3.0, 3.1], 2: [3.5, 3.6], 4: [4.5, 4.4], 8: [7.0, 7.5]})
    m = M.from_results(sec)
    assert m["band_contains"]["median"] == 1.0 and m["band_contains"]["n"] == 4
    assert [r["workers"] for r in m["rows"]] == [100, 1000]
    assert G.verdict(m["band_contains"], ">=", 1.0) == G.MET


def test_model_band_that_misses_a_point_is_not_met():
    # a measurement far below the optimistic edge (one worker's start + serial joins)
    sec = _scaling_sections({1: [3.0, 3.0], 2: [3.5, 3.5], 4: [4.5, 4.5], 8: [0.5, 0.5]})
    m = M.from_results(sec)
    assert m["band_contains"]["median"] == 0.75
    assert G.verdict(m["band_contains"], ">=", 1.0) == G.NOT_MET
    assert M.from_results({})["skipped"]


# --- the report ---------------------------------------------------------------------------------

def test_render_markdown_opens_with_the_goal_table():
    ratios = S.paired_ratios([1.2, 1.3, 1.25], [1.0, 1.0, 1.0])
    results = {
        "meta": {"quick": False, "started": "T", "host": "h", "cpus": 2, "memory_gib": 24,
                 "dask": "2026.8.0", "duration_s": 100.0, "load_avg_at_start": [1.0, 0.5, 0.2],
                 "load_avg_at_end": [2.0, 1.0, 0.5]},
        "sections": {"ready": {"workers": [1], "ratios": {"container/bare": {"1": ratios}},
                               "load_before": [1.0, 0.5, 0.2], "load_after": [1.5, 0.6, 0.3],
                               "section_s": 10.0},
                     "transfer": {"skipped": "needs root"}},
        "plots": ["goals.png"],
    }
    md = R.render_markdown(results)
    lines = md.splitlines()
    first_table = next(i for i, line in enumerate(lines) if line.startswith("|"))
    assert lines[first_table] == ("| figure | goal | measured: median (min-max, n) | verdict | "
                                  "note |")
    assert ("| time to ready, scheduler + 1 worker(s), loopback TLS: image (FUSE mount, "
            "unprivileged Apptainer's; Debian's single-threaded squashfuse) / bare | <= 1.05x | "
            "1.25x (1.20-1.30, n=3) | **not met** |") in md
    assert "Dask TLS / raw Python ssl (same cipher) | >= 0.800x | - | **not measured** | " \
           "needs root |" in md
    assert "| ready | 1.0 / 0.50 / 0.20 | 1.5 / 0.60 / 0.30 | 10.0 |" in md
    assert "- transfer: needs root" in md and "[goals.png](goals.png)" in md


def test_peers_table_names_what_was_left_and_keeps_the_runners_mounts_apart():
    """The peers' left-behind column, from /proc lines as rig.user_processes reads them (the
    program by its full path): the test runner's squashfuse mounts are counted apart, anything
    else is named by its program."""
    import peers as P

    sif = "/var/cache/hpcdask-bench/dask-0697845bc0595773.sif"
    mount = f"450 /usr/bin/squashfuse_ll -o ro,offset=53248 {sif} /var/lib/hpcdask-test/hpcd/"
    stray = "451 /opt/hpcdask/venv/bin/python3 -m distributed.cli.dask_worker tls://10.0.0.1:1"
    assert P.split_runner_mounts({mount, stray}) == ([stray], [mount])
    assert P.split_runner_mounts({"9 squashfuse -f a b"}) == ([], ["9 squashfuse -f a b"])
    assert P.split_runner_mounts({"9 /usr/bin/squashfuser x"}) == (["9 /usr/bin/squashfuser x"], [])

    one = S.summarize([1.0, 1.1, 1.2])
    nothing = {k: [] for k in ("jobs", "node_tmp", "epilog_tmpdir", "processes", "workdir",
                               "shared_dir")}
    runs = {"hpcdask": [{"left": nothing, "runner_mounts_left": 0}],
            "seeds": [{"left": {**nothing, "processes": [stray],
                                "node_tmp": ["/x/nodes/node1/tmp/dask-scratch-space"]},
                       "runner_mounts_left": 3}]}
    md = "".join(R._peers({"summary": {p: {"ready_s": one, "tasks_per_s": one, "teardown_s": one}
                                       for p in runs},
                           "runs": runs, "workers": 3, "nodes": 3, "reps": 1}))
    assert "| hpcdask | 1.10 s [1.00-1.20] |" in md and md.count("| nothing |") == 1
    assert ("| node_tmp: dask-scratch-space; processes: python3; the test runner's squashfuse "
            "mounts still up 1 s after: up to 3 |") in md


# --- the transfer section's raw references -------------------------------------------------------

def test_transfer_variant_names():
    import transfer as T

    assert T.variant("dask TLS") == ("dask", "tls", "warm")
    assert T.variant("raw ssl cold") == ("raw", "ssl", "cold")
    assert {T.variant(v)[:2] for v in T.VARIANTS} == {
        ("dask", "tls"), ("dask", "tcp"), ("raw", "ssl"), ("raw", "tcp")}


@pytest.mark.parametrize("kind,memory", [("tcp", "warm"), ("ssl", "cold")])
def test_rawsock_moves_every_message_over_one_connection(tmp_path, kind, memory):
    """The raw limit runs for real on loopback: COUNT messages arrive whole, each timed, and the
    ssl side negotiates through hpcdask's own credentials (so the same cipher as Dask's TLS)."""
    import os
    import subprocess
    import time

    from hpcdask import security

    creds = tmp_path / "creds"
    creds.mkdir(mode=0o700)
    security.create(creds, "bench-test")
    extra = [str(creds)] if kind == "ssl" else []
    portfile = tmp_path / "port"
    script = str(BENCH / "rawsock.py")
    recv = subprocess.Popen([sys.executable, script, "recv", kind, "127.0.0.1", str(portfile),
                             "3000000", "2", memory, *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not portfile.exists():
            assert recv.poll() is None, recv.stderr.read()
            assert time.monotonic() < deadline, "the receiver wrote no port file in 60 s"
            time.sleep(0.05)
        send = subprocess.run([sys.executable, script, "send", kind, "127.0.0.1",
                               portfile.read_text(), "3000000", "2", *extra],
                              capture_output=True, text=True, timeout=60)
        assert send.returncode == 0, send.stderr
        out, err = recv.communicate(timeout=60)
    finally:
        if recv.poll() is None:
            recv.kill()
    assert recv.returncode == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["bytes"] == 3_000_000 and len(res["messages"]) == 2
    assert res["bandwidth"] == pytest.approx(S.quantile(res["messages"], 0.5))  # the median
    assert all(b > 0 for b in res["messages"])
    if kind == "ssl":
        assert res["cipher"][1] == "TLSv1.3"
    else:
        assert res["cipher"] is None
    assert not os.path.exists(str(portfile) + ".tmp")
