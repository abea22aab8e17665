"""A dask.dataframe ETL pipeline: the workload writes partitioned Parquet itself (under the
output folder, which on a cluster is on the shared filesystem every worker sees), reads it
back, cleans it (missing values, duplicates, types), joins a dimension table and aggregates.
The baseline is pandas doing the same on the same Parquet files on one machine: the results
must be equal after sorting; integers exactly, floats to a relative 1e-9 (sums are added in a
different order).  The Parquet data is deleted at the end unless it is small (< 32 MiB).
"""

from __future__ import annotations

DESCRIPTION = ("dask.dataframe ETL: write partitioned Parquet, read, clean, join, groupby-"
               "aggregate; equal to pandas after sorting")

CATEGORIES = ["books", "games", "garden", "music", "tools", "toys"]
REGIONS = ["north", "south", "east", "west"]
USERS = 5_000
KEEP_BYTES = 32 << 20


def make_events(part: int, rows: int, seed: int):
    """One partition of raw events: some missing values, some duplicated rows, numbers as text."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng([seed, part])
    cat = np.array(CATEGORIES, dtype=object)[rng.integers(0, len(CATEGORIES), rows)]
    cat[rng.random(rows) < 0.01] = None
    amount = np.round(rng.gamma(2.0, 20.0, rows), 2)
    amount[rng.random(rows) < 0.02] = np.nan
    df = pd.DataFrame({
        "event_id": np.arange(part * rows, (part + 1) * rows, dtype=np.int64),
        "user": rng.integers(0, USERS, rows),
        "category": cat,
        "amount": amount,
        "quantity": rng.integers(1, 10, rows).astype(str),  # text on input: cast when cleaning
        "ts": pd.Timestamp("2026-01-01") + pd.to_timedelta(rng.integers(0, 365 * 86400, rows),
                                                            unit="s"),
    })
    dupes = df.sample(frac=0.02, random_state=int(rng.integers(2**31)))
    return pd.concat([df, dupes], ignore_index=True)


def make_users(seed: int):
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng([seed, 1 << 40])
    return pd.DataFrame({"user": np.arange(USERS),
                         "region": np.array(REGIONS, dtype=object)[rng.integers(0, 4, USERS)],
                         "vip": rng.random(USERS) < 0.1})


def clean(df):
    """Works on a pandas and a dask DataFrame alike."""
    df = df.dropna(subset=["category", "amount"]).drop_duplicates()
    return df.astype({"quantity": "int64", "category": "string", "amount": "float64"})


def aggregate(events, users):
    """(per region x category, per user joined with the user table)."""
    merged = events.merge(users, on="user", how="inner")
    by_region = merged.groupby(["region", "category"]).agg(
        revenue=("amount", "sum"), mean_amount=("amount", "mean"),
        events=("event_id", "count"), items=("quantity", "sum"))
    per_user = events.groupby("user").agg(spent=("amount", "sum"), events=("event_id", "count"))
    vip = per_user.join(users.set_index("user"), how="inner")
    return by_region, vip


def _tidy(df):
    import pandas as pd

    df = df.reset_index()
    for c in df.columns:  # string dtypes differ between dask (pyarrow) and pandas: compare values
        if not pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c]):
            df[c] = df[c].astype(object)
    return df.sort_values(list(df.columns[:2])).reset_index(drop=True)


def run(ctx) -> dict:
    import shutil

    import dask.dataframe as dd
    import pandas as pd

    rows = ctx.pick(50_000, 250_000, 2_000_000)  # per partition
    nparts = ctx.pick(2, 6, 24) * ctx.nworkers
    data = ctx.outdir / "data"
    events_path, users_path = data / "events", data / "users"

    with ctx.step("write partitioned Parquet on the cluster"):
        raw = dd.from_map(make_events, range(nparts), rows=rows, seed=ctx.seed,
                          meta=make_events(0, 0, ctx.seed), enforce_metadata=False)
        raw.to_parquet(str(events_path), write_index=False)
        dd.from_pandas(make_users(ctx.seed), npartitions=1).to_parquet(str(users_path),
                                                                         write_index=False)
    files = sorted(events_path.glob("*.parquet"))
    nbytes = sum(f.stat().st_size for f in data.rglob("*") if f.is_file())

    with ctx.step("read, clean, join, aggregate on the cluster", side="cluster"):
        events = clean(dd.read_parquet(str(events_path)))
        users = dd.read_parquet(str(users_path))
        by_region, vip = aggregate(events, users)
        n_raw = dd.read_parquet(str(events_path)).shape[0]
        by_region, vip, n_clean, n_raw = ctx.client.compute(
            [by_region, vip, events.shape[0], n_raw], sync=True)

    with ctx.step("pandas baseline on the same files", side="baseline"):
        pevents = pd.read_parquet(events_path)
        p_raw = len(pevents)
        pevents = clean(pevents)
        pusers = pd.read_parquet(users_path)
        p_region, p_vip = aggregate(pevents, pusers)

    a, b = _tidy(by_region), _tidy(p_region)
    c, e = _tidy(vip), _tidy(p_vip)
    # equal after sorting: integers exactly, floats to rtol 1e-9 (different summation order)
    pd.testing.assert_frame_equal(a, b, check_dtype=False, check_exact=False, rtol=1e-9)
    pd.testing.assert_frame_equal(c, e, check_dtype=False, check_exact=False, rtol=1e-9)

    def max_rel(x, y, cols):
        return max(float(((x[k] - y[k]).abs() / y[k].abs().clip(lower=1e-300)).max())
                   for k in cols)

    kept = nbytes < KEEP_BYTES
    if not kept:
        shutil.rmtree(data)
    return {
        "metric": "rows after cleaning",
        "score": int(n_clean),
        "baseline_score": len(pevents),
        "rows_raw": int(n_raw),
        "baseline_rows_raw": int(p_raw),
        "groups": len(a),
        "users": len(c),
        "equal_after_sorting": True,  # the assert_frame_equal above would have failed the run
        "max_relative_difference": {
            "by_region": max_rel(a, b, ["revenue", "mean_amount"]),
            "per_user": max_rel(c, e, ["spent"])},
        "float_tolerance": "rtol 1e-9",
        "parquet": {"partitions": nparts, "files": len(files), "bytes": int(nbytes),
                    "kept": "data/" if kept else False},
        "revenue_total": float(a["revenue"].sum()),
    }
