"""bench/analysis.py: the benchmark's pure functions (statistics, scaling model, tables).

No timings are asserted: the bench measures, it never passes or fails on seconds.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


A = _load("analysis")


def test_quantile_matches_numpy_linear():
    np = pytest.importorskip("numpy")
    xs = [3.0, 1.0, 7.0, 2.0, 10.0]
    for q in (0, 0.25, 0.5, 0.75, 1):
        assert A.quantile(xs, q) == pytest.approx(float(np.quantile(xs, q)))
    with pytest.raises(ValueError):
        A.quantile([], 0.5)
    with pytest.raises(ValueError):
        A.quantile([1.0], 1.5)


def test_summarize():
    s = A.summarize([4, 1, 3, 2])
    assert s["n"] == 4 and s["median"] == 2.5 and s["min"] == 1 and s["max"] == 4
    assert s["q1"] == pytest.approx(1.75) and s["q3"] == pytest.approx(3.25)
    assert s["values"] == [4.0, 1.0, 3.0, 2.0]
    assert A.summarize([]) == {"n": 0}


def test_paired_ratios_pair_each_repetition():
    r = A.paired_ratios([2.0, 3.0, 8.0], [1.0, 3.0, 4.0])
    assert r["values"] == [2.0, 1.0, 2.0]
    assert r["median"] == 2.0 and r["min"] == 1.0 and r["max"] == 2.0
    with pytest.raises(ValueError):
        A.paired_ratios([1.0], [1.0, 2.0])
    # a zero denominator is dropped, not a ZeroDivisionError
    assert A.paired_ratios([1.0, 2.0], [0.0, 1.0])["n"] == 1


def test_interleave_rotates_and_covers_every_variant_each_round():
    order = A.interleave(["a", "b", "c"], 3)
    assert len(order) == 9
    rounds = [[v for r, v in order if r == i] for i in range(3)]
    assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert A.interleave(["a", "b"], 2) == [(0, "a"), (0, "b"), (1, "b"), (1, "a")]


def test_linear_fit():
    a, b = A.linear_fit([1, 2, 4, 8], [3, 5, 9, 17])
    assert a == pytest.approx(1) and b == pytest.approx(2)
    assert A.linear_fit([2, 2], [1, 3]) == (2.0, 0.0)
    with pytest.raises(ValueError):
        A.linear_fit([], [])


def test_heartbeat_interval_is_distributeds():
    sched = pytest.importorskip("distributed.scheduler")
    for n in (1, 10, 11, 49, 50, 199, 200, 1000, 5000):
        assert A.heartbeat_interval(n) == pytest.approx(sched.heartbeat_interval(n))


def _model(**over):
    kw = dict(ready_one=3.0, join_cpu=0.01, ready_fit=(2.0, 0.5), task_cpu=2e-4,
              task_wall=5e-4, heartbeat_cpu=1e-4)
    kw.update(over)
    return A.scaling_model(**kw)


def test_scaling_model_arithmetic():
    m = _model()
    assert "extrapolation" in m["kind"] and m["assumptions"]
    r100, r1000 = m["rows"]
    assert r100["workers"] == 100 and r1000["workers"] == 1000
    # ready: optimistic = one worker's start + serial joins; pessimistic = this machine's fit
    assert r100["ready_s"] == [pytest.approx(3.0 + 99 * 0.01), pytest.approx(2.0 + 0.5 * 100)]
    # heartbeats: 100 workers every 2 s; 1000 workers every 6 s
    assert r100["heartbeats_per_s"] == 50.0
    assert r1000["heartbeats_per_s"] == pytest.approx(1000 / 6, abs=0.1)
    load = 50 * 1e-4
    assert r100["heartbeat_load"] == pytest.approx(load)
    assert r100["tasks_per_s"] == [round((1 - load) / 5e-4), round((1 - load) / 2e-4)]
    # more workers: never faster to ready, never more tasks/s (heartbeats only add load)
    assert r1000["ready_s"][0] > r100["ready_s"][0]
    assert r1000["tasks_per_s"][1] <= r100["tasks_per_s"][1]


def test_scaling_model_ranges_are_ordered_and_load_is_capped():
    m = _model(ready_fit=(0.0, 0.0), heartbeat_cpu=1.0, workers=(10, 100))
    for row in m["rows"]:
        assert row["ready_s"][0] <= row["ready_s"][1]
        assert row["tasks_per_s"][0] <= row["tasks_per_s"][1]
        assert row["heartbeat_load"] <= 0.95
    json.dumps(m)  # plain data, for latest.json


def test_fmt():
    assert A.fmt_num(1234.5) == "1,234"
    assert A.fmt_num(0.012345) == "0.0123"
    assert A.fmt_num(2.0) == "2.00"
    assert A.fmt_num(None) == "-" and A.fmt_num(float("nan")) == "-" and A.fmt_num(0) == "0"
    assert A.fmt_ratio(A.summarize([1.0, 1.2, 1.5])) == "1.20x (1.00-1.50, n=3)"
    assert A.fmt_ratio(A.summarize([2.0])) == "2.00x (n=1)"
    assert A.fmt_ratio(None) == "-" and A.fmt_ratio({"n": 0}) == "-"
    assert A.fmt_value(A.summarize([2.0, 3.0]), "s") == "2.50 s [2.00-3.00]"


def test_markdown_table():
    t = A.markdown_table([["a|b", "1"]], ["x", "y"])
    assert t.splitlines() == ["| x | y |", "|---|---|", "| a\\|b | 1 |"]
    with pytest.raises(ValueError):
        A.markdown_table([["only one"]], ["x", "y"])


def test_render_markdown_headlines_model_and_skips():
    results = {
        "meta": {"quick": True, "started": "T", "host": "h", "cpus": 2, "memory_gib": 24,
                 "dask": "2026.8.0", "duration_s": 100.0},
        "headlines": [
            {"figure": "time to ready, 1 worker", "a": "image", "b": "bare", "unit": "s",
             "a_value": A.summarize([4.0, 5.0]), "b_value": A.summarize([4.0, 4.0]),
             "ratio": A.paired_ratios([4.0, 5.0], [4.0, 4.0]), "note": "loopback"},
            {"figure": "transfer", "skipped": "needs root"},
        ],
        "scaling_model": _model(),
        "sections": {"transfer": {"skipped": "needs root"}, "ready": {"runs": {}}},
        "plots": ["ready.png"],
    }
    md = A.render_markdown(results)
    assert "# hpcdask benchmarks (quick run)" in md
    assert "| time to ready, 1 worker | image: 4.50 s [4.00-5.00] | bare: 4.00 s [4.00-4.00] | " \
           "1.12x (1.00-1.25, n=2) | loopback |" in md
    assert "| transfer | - | - | not measured | needs root |" in md
    assert "extrapolation" in md and "| 1000 |" in md
    assert "- transfer: needs root" in md
    assert "[ready.png](ready.png)" in md
    rows = A.headline_rows(results)
    assert len(rows) == 2 and all(len(r) == 5 for r in rows)


def test_fits_to_reach():
    assert A.fits_to_reach([1, 5, 9], [0.5, 0.8, 0.9], 0.8) == 5
    assert A.fits_to_reach([1, 5], [0.5, 0.6], 0.8) is None
    assert A.fits_to_reach([], [], 0.1) is None
    assert not math.isnan(A.fits_to_reach([3], [1.0], 1.0))
