"""The bench's statistics: quantiles, summaries, paired ratios, the run order, a line fit.

Pure functions (no timing, no I/O), checked in bench/tests/test_bench.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

# --- statistics ---------------------------------------------------------------------------------

def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation between order statistics (numpy's default)."""
    xs = sorted(float(v) for v in values)
    if not xs:
        raise ValueError("quantile of no values")
    if not 0 <= q <= 1:
        raise ValueError(f"q must be within 0..1, not {q}")
    pos = (len(xs) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """median, min, max, quartiles and n of the repetitions (the raw values are kept too)."""
    xs = [float(v) for v in values]
    if not xs:
        return {"n": 0}
    return {"n": len(xs), "median": quantile(xs, 0.5), "min": min(xs), "max": max(xs),
            "q1": quantile(xs, 0.25), "q3": quantile(xs, 0.75), "values": xs}


def paired_ratios(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Summary of a[i] / b[i]: each repetition's A against the B measured next to it.

    Pairing the interleaved repetitions cancels slow drift (other load on the machine) that a
    ratio of two medians would keep.
    """
    if len(a) != len(b):
        raise ValueError(f"paired ratios need as many A as B values ({len(a)} != {len(b)})")
    ratios = [x / y for x, y in zip(a, b) if y]
    return summarize(ratios)


def interleave(variants: Sequence[str], reps: int) -> list[tuple[int, str]]:
    """The run order: repetition by repetition, each round rotated (A B C, B C A, C A B, ...),
    so no variant always runs first (when caches are cold) or last."""
    order = []
    k = len(variants)
    for r in range(reps):
        for i in range(k):
            order.append((r, variants[(i + r) % k]))
    return order


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of ys against xs; slope 0 from a single distinct x."""
    n = len(xs)
    if n == 0 or n != len(ys):
        raise ValueError("linear_fit needs as many x as y values, at least one")
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return my, 0.0
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - slope * mx, slope


def first_reaching(xs: Sequence[float], ys: Sequence[float], target: float):
    """The first x whose running-best score y reaches target (None if never)."""
    for x, y in zip(xs, ys):
        if y >= target - 1e-12:
            return x
    return None


# --- formatting ---------------------------------------------------------------------------------

def fmt_num(x: float | None, digits: int = 3) -> str:
    """A number with ``digits`` significant digits, no scientific notation for usual sizes."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if x == 0:
        return "0"
    mag = math.floor(math.log10(abs(x)))
    decimals = max(0, digits - 1 - mag)
    return f"{x:,.{decimals}f}"


def fmt_ratio(s: dict[str, Any] | None) -> str:
    """'1.23x (1.10-1.40, n=3)' from a summary of ratios."""
    if not s or not s.get("n"):
        return "-"
    if s["n"] == 1:
        return f"{fmt_num(s['median'])}x (n=1)"
    return f"{fmt_num(s['median'])}x ({fmt_num(s['min'])}-{fmt_num(s['max'])}, n={s['n']})"


def fmt_value(s: dict[str, Any] | None, unit: str) -> str:
    """'2.31 s [2.10-2.52]' from a summary of measurements."""
    if not s or not s.get("n"):
        return "-"
    if s["n"] == 1:
        return f"{fmt_num(s['median'])} {unit}"
    return f"{fmt_num(s['median'])} {unit} [{fmt_num(s['min'])}-{fmt_num(s['max'])}]"


def markdown_table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    """A GitHub Markdown table; '|' in cells is escaped."""
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        if len(r) != len(header):
            raise ValueError(f"row {r!r} has {len(r)} cells, the header {len(header)}")
        lines.append("| " + " | ".join(cell(c) for c in r) + " |")
    return "\n".join(lines) + "\n"
