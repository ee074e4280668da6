"""Compare two studies' tables column by column: does a refactor change results?

    python bench/compare_tables.py results_before/digits results_after/digits

The same spec and seed with ``max_concurrent_trials: 1`` must give the same trial
configurations and the same per-epoch metrics. Ray's trial ids are random, so rows
are matched by (phase, configuration); timing and node columns are ignored, as are
columns present in only one table when every value there is missing (a newly
declared hyperparameter a study does not use). Exits 1 and names every difference.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

IGNORED = {"trial_id", "wall_time_s", "node_id", "epoch_time_s", "samples_per_s", "error"}
KEY = ["phase", "width", "temperature", "alpha", "beta", "noise", "lr", "weight_decay", "batch_size", "epochs"]


def _keyed(trials: pd.DataFrame) -> pd.DataFrame:
    frame = trials.copy()
    frame["_key"] = frame[KEY].astype(str).agg("|".join, axis=1)
    if frame["_key"].duplicated().any():
        raise SystemExit("two trials share a configuration: cannot match rows")
    return frame.set_index("_key").sort_index()


def _differences(a: pd.DataFrame, b: pd.DataFrame, what: str, new_ok: bool = False) -> list[str]:
    problems = []
    only = set(a.columns) ^ set(b.columns)
    for column in sorted(only):
        side = a if column in a.columns else b
        if side[column].notna().any() and not (new_ok and column in b.columns):
            problems.append(f"{what}: column {column!r} only in {'before' if column in a.columns else 'after'}")
    if list(a.index) != list(b.index):
        problems.append(f"{what}: different rows ({len(a)} vs {len(b)})")
        return problems
    for column in sorted((set(a.columns) & set(b.columns)) - IGNORED):
        left, right = a[column], b[column]
        if pd.api.types.is_numeric_dtype(left) and pd.api.types.is_numeric_dtype(right):
            same = np.isclose(left.astype(float), right.astype(float), rtol=0, atol=0, equal_nan=True)
        else:
            same = (left.astype(str) == right.astype(str)).to_numpy()
        if not same.all():
            problems.append(f"{what}: column {column!r} differs in {int((~same).sum())} row(s)")
    return problems


def compare(before: Path, after: Path, new_ok: bool = False, phase: str | None = None) -> list[str]:
    """Every difference between the two studies' tables (empty: identical); with
    ``new_ok`` a column only the later study has (a feature added since) is no difference;
    ``phase`` compares only that phase's trials (e.g. "search")."""
    tables = [pd.read_parquet(d / "trials.parquet") for d in (before, after)]
    if phase is not None:
        tables = [t[t["phase"] == phase] for t in tables]
    trials = [_keyed(t) for t in tables]
    problems = _differences(*trials, "trials.parquet", new_ok)
    histories = []
    for study, keyed in zip((before, after), trials):
        history = pd.read_parquet(study / "history.parquet")
        keys = dict(zip(keyed["trial_id"], keyed.index))
        history = history[history["trial_id"].isin(keys)]
        history["_key"] = history["trial_id"].map(keys)
        histories.append(history.set_index(["_key", "epoch"]).sort_index())
    problems += _differences(*histories, "history.parquet", new_ok)
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--new-columns-ok", action="store_true",
                        help="columns only the second study has (features added since) are not differences")
    parser.add_argument("--phase", help="compare only this phase's trials (search or baseline)")
    args = parser.parse_args()
    problems = compare(args.before, args.after, args.new_columns_ok, args.phase)
    trials = pd.read_parquet(args.before / "trials.parquet")
    if problems:
        print("\n".join(problems))
        sys.exit(1)
    print(f"identical: {len(trials)} trials and their per-epoch metrics (timing and node columns ignored)")


if __name__ == "__main__":
    main()
