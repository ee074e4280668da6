"""Answers drawn from a study's tables: Pareto front, hypervolume, best temperature.

Everything here is plain pandas/numpy/scipy on the tidy tables a search writes
(``trials``: one row per trial; ``history``: one row per trial per epoch), so it
runs without Ray and can be pointed at any results folder after the fact.

Conventions shared by every function:

* Only rows with ``status == "completed"`` (a trial that ran its full epoch
  budget) count, and, when the table has a ``phase`` column, only
  ``phase == "search"``: stopped-early trials were judged on fewer epochs and
  the hard-label baselines answer a different question (what distillation adds).
* Rows whose size or score is missing (NaN) are ignored.
* "Size" is minimised and "score" maximised.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from kdtune.errors import ConfigError, ResultsError
from kdtune.pareto import counted_trials, front_hypervolume, pareto_front, power_of_two_label, require_columns
from kdtune.study import JOURNAL_FILE, read_meta
from kdtune.tables import load_tables

#: Widths with at most this many distinct values are used as buckets as they are.
MAX_DISCRETE_WIDTHS = 12
#: Temperatures with at most this many distinct values are used as bins as they are.
MAX_DISCRETE_TEMPERATURES = 8
#: Number of log-spaced temperature bins when temperatures are continuous.
DEFAULT_TEMPERATURE_BINS = 8

_NO_DIFFERENCE = "T makes no measurable difference for this size"
#: Verdicts of :func:`best_temperature` for a size whose temperatures could not be compared at all.
_ONE_T_PREFIX = "only T = "
_UNTESTABLE = "cannot tell whether T matters for this size: no temperature bin has 2+ trials"


#: The parsed ``study.json`` of a study folder (see :func:`kdtune.study.read_meta`).
read_study_meta = read_meta


def _study_dirs(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    if isinstance(paths, (str, Path)):
        return [Path(paths)]
    return [Path(p) for p in paths]


def _load_table(study_dir: Path, name: str) -> pd.DataFrame:
    """One of a study's tables (see :func:`kdtune.tables.load_tables`: nothing is written)."""
    if not study_dir.is_dir():
        raise ResultsError(f"{study_dir}: no such folder; give the folder of a study, e.g. results/digits")
    trials, history = load_tables(study_dir)
    return trials if name == "trials" else history


def load_results(paths: str | Path | Sequence[str | Path]) -> pd.DataFrame:
    """One row per trial of one or several study folders (a ``study`` column tells them apart).

    Reads ``trials.parquet``; for a study whose search was killed before it wrote
    the tables, they are rebuilt from its trial records (nothing is written; the
    trials that had not ended are left out until the search is resumed).
    """
    frames = [_load_table(d, "trials") for d in _study_dirs(paths)]
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def load_history(paths: str | Path | Sequence[str | Path]) -> pd.DataFrame:
    """One row per trial per epoch of one or several study folders (``history.parquet``)."""
    frames = [_load_table(d, "history") for d in _study_dirs(paths)]
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def hypervolume(
    df: pd.DataFrame,
    size: str = "params",
    score: str = "val_acc",
    reference: tuple[float, float] | None = None,
    log_size: bool = True,
) -> float:
    """Area of (size, score) space dominated by the Pareto front of ``df``.

    The area is measured in (log10(size), score) space, or (size, score) when
    ``log_size`` is False, and bounded by ``reference = (size_ref, score_ref)``:
    it is the union over front points (s, y) of the rectangles
    [s, size_ref] × [score_ref, y]. Front points with ``size >= size_ref`` or
    ``score <= score_ref`` contribute nothing.

    The default reference is (2 × the largest size among the counted rows, 0.0),
    which depends on the study itself: to compare studies or methods, pass the
    same explicit ``reference`` to each.

    Raises what :func:`pareto_front` raises, and :class:`ConfigError` for a
    non-positive size or reference size when ``log_size`` is True.
    """
    front = pareto_front(df, size=size, score=score)
    if reference is None:
        largest = counted_trials(df, size, score)[size].max()
        reference = (2.0 * float(largest), 0.0)
    size_ref, score_ref = (float(v) for v in reference)
    sizes = front[size].to_numpy(float)
    if log_size:
        if size_ref <= 0:
            raise ConfigError("reference", f"size reference must be > 0 for a log size axis, got {size_ref}")
        if (sizes <= 0).any():
            raise ConfigError(size, f"all sizes must be > 0 for a log size axis, got {sizes.min()}")
    return front_hypervolume(zip(sizes, front[score].to_numpy(float)), size_ref, score_ref, log_size)


def size_buckets(df: pd.DataFrame, size_key: str = "width") -> pd.Series:
    """A size-bucket label for each row of ``df``, as an ordered categorical Series.

    When ``size_key`` has at most 12 distinct values (discrete widths), the label
    is the value itself (an int when every value is integral) and buckets sort by
    value. Otherwise (or when ``size_key`` is not a column) rows are binned by
    ``params`` on a log2 scale, labelled like ``"2^10–2^11"`` (params in
    [1024, 2048)). Rows with a missing size get a missing label.

    Raises :class:`ConfigError` when neither ``size_key`` nor ``params`` is usable.
    """
    if size_key in df.columns:
        values = df[size_key]
        distinct = np.sort(values.dropna().unique())
        if len(distinct) <= MAX_DISCRETE_WIDTHS:
            if len(distinct) and np.all(np.mod(distinct.astype(float), 1.0) == 0.0):
                distinct = distinct.astype(int)
                values = values.astype("Int64")
            labels = pd.Categorical(values, categories=distinct, ordered=True)
            return pd.Series(labels, index=df.index, name="bucket")
    if "params" not in df.columns:
        raise ConfigError(
            "size_key", f"column {size_key!r} is missing or continuous and there is no 'params' column to bin"
        )
    params = df["params"].astype(float)
    if (params <= 0).any():
        raise ConfigError("params", f"must be > 0 to bin on a log2 scale, got {params.min()}")
    exponents = np.floor(np.log2(params))
    present = sorted({int(e) for e in exponents.dropna()})
    labels = [None if math.isnan(e) else power_of_two_label(int(e)) for e in exponents]
    categories = [power_of_two_label(e) for e in present]
    return pd.Series(pd.Categorical(labels, categories=categories, ordered=True), index=df.index, name="bucket")


def _temperature_bins(
    temperatures: pd.Series, bins: int | Sequence[float] | None
) -> tuple[pd.Series, dict[object, float]]:
    """Bin key per row and {bin key: centre}.

    Exact values when ``bins`` is None and there are few distinct temperatures;
    otherwise log-spaced bins whose centre is the geometric mean of their edges.
    """
    distinct = np.sort(temperatures.unique())
    if bins is None and len(distinct) <= MAX_DISCRETE_TEMPERATURES:
        return temperatures.astype(float), {float(t): float(t) for t in distinct}
    if bins is None or isinstance(bins, (int, np.integer)):
        count = DEFAULT_TEMPERATURE_BINS if bins is None else int(bins)
        if count < 1:
            raise ConfigError("bins", f"must be a positive number of bins, got {count}")
        low, high = float(distinct[0]), float(distinct[-1])
        edges = np.logspace(math.log10(low), math.log10(high), count + 1)
        # logspace round-trips through log10: pin the ends so that min and max fall inside.
        edges[0], edges[-1] = low, high
    else:
        edges = np.asarray(list(bins), dtype=float)
        if edges.size < 2 or (edges <= 0).any() or (np.diff(edges) <= 0).any():
            raise ConfigError("bins", f"must be >= 2 strictly increasing positive bin edges, got {list(bins)}")
    if len(np.unique(edges)) < len(edges):
        # All temperatures equal: one bin.
        return temperatures.astype(float), {float(t): float(t) for t in distinct}
    index = pd.cut(temperatures, edges, labels=False, include_lowest=True)
    centres = {i: float(math.sqrt(edges[i] * edges[i + 1])) for i in range(len(edges) - 1)}
    return index, centres


def temperature_curve(
    df: pd.DataFrame,
    score: str = "val_acc",
    bins: int | Sequence[float] | None = None,
    size_key: str = "width",
) -> pd.DataFrame:
    """Mean, std and count of ``score`` per size bucket per temperature bin.

    Counts completed search-phase rows only. Buckets come from
    :func:`size_buckets` (``size_key``). Temperature bins are shared by every
    bucket so that curves line up:

    * ``bins=None``: the exact temperatures when there are at most 8 distinct
      values, else 8 log-spaced bins from the smallest to the largest T;
    * an int: that many log-spaced bins;
    * a sequence: bin edges (rows outside them are left out).

    Returns one row per non-empty (bucket, bin), sorted by bucket then T, with
    columns ``bucket``, ``t_bin_center`` (the exact T, or the geometric centre of
    a log bin), ``mean``, ``std`` (sample std, NaN for one sample), ``count``, and
    ``t_min``/``t_max`` (smallest and largest T actually in the bin).
    """
    require_columns(df, score=score)
    require_columns(df, temperature="temperature")
    columns = ["bucket", "t_bin_center", "mean", "std", "count", "t_min", "t_max"]
    rows = counted_trials(df, score, "temperature")
    if rows.empty:
        return pd.DataFrame(columns=columns)
    if (rows["temperature"] <= 0).any():
        raise ConfigError("temperature", f"must be > 0, got {rows['temperature'].min()}")
    buckets = size_buckets(rows, size_key=size_key)
    bin_keys, centres = _temperature_bins(rows["temperature"], bins)
    frame = pd.DataFrame(
        {"bucket": buckets, "t_bin": bin_keys, "score": rows[score].astype(float), "t": rows["temperature"]}
    ).dropna(subset=["bucket", "t_bin"])
    grouped = frame.groupby(["bucket", "t_bin"], observed=True, sort=True)
    table = grouped.agg(
        mean=("score", "mean"), std=("score", "std"), count=("score", "size"), t_min=("t", "min"), t_max=("t", "max")
    ).reset_index()
    table["t_bin_center"] = table["t_bin"].map(centres).astype(float)
    return table[columns].reset_index(drop=True)


def _pooled_std(curve: pd.DataFrame) -> tuple[float, int]:
    """Pooled within-bin std of one bucket's bins and its degrees of freedom."""
    repeated = curve[curve["count"] >= 2]
    dof = int((repeated["count"] - 1).sum())
    if dof == 0:
        return math.nan, 0
    variance = float(((repeated["count"] - 1) * repeated["std"] ** 2).sum()) / dof
    return math.sqrt(variance), dof


def _p_value(best: pd.Series, other: pd.Series, pooled_std: float, pooled_dof: int) -> float:
    """Two-sided p-value that ``other``'s mean equals ``best``'s.

    Welch's t-test when both bins have two or more samples; a bin with one
    sample takes the bucket's pooled std, and the test then uses the pooled
    degrees of freedom (the uncertainty of that std is what limits it). NaN when
    no variance can be estimated.
    """
    n1, n2 = int(best["count"]), int(other["count"])
    if n1 >= 2 and n2 >= 2:
        s1, s2 = float(best["std"]), float(other["std"])
        if s1 == 0.0 and s2 == 0.0:
            return 1.0 if best["mean"] == other["mean"] else 0.0
        result = stats.ttest_ind_from_stats(best["mean"], s1, n1, other["mean"], s2, n2, equal_var=False)
        return float(result.pvalue)
    if pooled_dof == 0:
        return math.nan
    s1 = float(best["std"]) if n1 >= 2 else pooled_std
    s2 = float(other["std"]) if n2 >= 2 else pooled_std
    standard_error = math.sqrt(s1**2 / n1 + s2**2 / n2)
    difference = float(best["mean"] - other["mean"])
    if standard_error == 0.0:
        return 1.0 if difference == 0.0 else 0.0
    return float(2.0 * stats.t.sf(abs(difference) / standard_error, pooled_dof))


def _summarise_bucket(bucket: object, curve: pd.DataFrame, alpha_level: float) -> dict:
    curve = curve.reset_index(drop=True)
    # idxmax returns the first maximum: among tied means the lowest T wins.
    best = curve.loc[curve["mean"].idxmax()]
    pooled_std, pooled_dof = _pooled_std(curve)
    similar = [best.name]
    any_repeated_distinguishable = False
    tested_any = False
    for position, other in curve.iterrows():
        if position == best.name:
            continue
        p = _p_value(best, other, pooled_std, pooled_dof)
        if math.isnan(p) or p > alpha_level:
            similar.append(position)
        elif other["count"] >= 2:
            any_repeated_distinguishable = True
        tested_any = tested_any or not math.isnan(p)
    t_low = float(curve.loc[similar, "t_min"].min())
    t_high = float(curve.loc[similar, "t_max"].max())
    recommended = float(best["t_bin_center"])
    if len(curve) == 1:
        verdict = f"{_ONE_T_PREFIX}{recommended:g} was tried for this size"
    elif not tested_any:
        verdict = _UNTESTABLE
    elif any_repeated_distinguishable and len(similar) == 1:
        verdict = f"best T ≈ {recommended:g}; every other temperature tried is measurably worse"
    elif any_repeated_distinguishable:
        verdict = (
            f"best T ≈ {recommended:g}; T in [{t_low:g}, {t_high:g}] is statistically "
            f"indistinguishable from it (Welch p > {alpha_level:g})"
        )
    else:
        verdict = _NO_DIFFERENCE
    return {
        "bucket": bucket,
        "recommended_t": recommended,
        "t_low": t_low,
        "t_high": t_high,
        "best_mean": float(best["mean"]),
        "best_std": float(best["std"]),
        "n_trials": int(curve["count"].sum()),
        "t_matters": bool(any_repeated_distinguishable),
        "verdict": verdict,
    }


def best_temperature(
    df: pd.DataFrame,
    score: str = "val_acc",
    bins: int | Sequence[float] | None = None,
    alpha_level: float = 0.05,
    size_key: str = "width",
) -> pd.DataFrame:
    """The temperature to use for each size bucket, and how sure that is.

    Built on :func:`temperature_curve` (same filtering, buckets and bins). For
    each bucket:

    * ``recommended_t``: centre (or exact value) of the bin with the highest mean
      ``score``; among tied means the lowest T;
    * ``t_low``, ``t_high``: smallest and largest temperature in the bins whose
      mean is statistically indistinguishable from the best (two-sided Welch
      t-test, p > ``alpha_level``), the best bin included. A bin with a single
      trial is compared assuming the bucket's pooled within-bin std; bins that
      cannot be tested at all (no bin has two trials) count as indistinguishable;
    * ``t_matters``: True when at least one bin with two or more trials is
      distinguishable from the best. When False the ``verdict`` says
      "T makes no measurable difference for this size" rather than naming a
      winner (or says why nothing could be tested);
    * ``best_mean``, ``best_std``: the best bin's mean and std; ``n_trials``: the
      bucket's number of counted trials.

    Each comparison is at level ``alpha_level`` on its own, without correction
    for the number of bins compared: the interval errs on the narrow side.

    Returns one row per bucket (empty table when nothing counts), columns
    ``bucket, recommended_t, t_low, t_high, best_mean, best_std, n_trials,
    t_matters, verdict``.
    """
    if not 0.0 < alpha_level < 1.0:
        raise ConfigError("alpha_level", f"must be in (0, 1), got {alpha_level}")
    curve = temperature_curve(df, score=score, bins=bins, size_key=size_key)
    columns = [
        "bucket", "recommended_t", "t_low", "t_high", "best_mean", "best_std", "n_trials", "t_matters", "verdict",
    ]
    if curve.empty:
        return pd.DataFrame(columns=columns)
    rows = [
        _summarise_bucket(bucket, bucket_curve, alpha_level)
        for bucket, bucket_curve in curve.groupby("bucket", observed=True, sort=True)
    ]
    return pd.DataFrame(rows, columns=columns)


def untested_sizes(table: pd.DataFrame) -> list:
    """The size buckets of a :func:`best_temperature` table whose temperatures could
    not be compared at all: one temperature tried, or no temperature bin with two
    trials. More trials run to the end would tell."""
    if table.empty:
        return []
    verdicts = table["verdict"].astype(str)
    untested = verdicts.str.startswith(_ONE_T_PREFIX) | (verdicts == _UNTESTABLE)
    return table.loc[untested, "bucket"].tolist()


def parameter_importance(study_dir: str | Path) -> pd.Series:
    """fANOVA importance of each searched hyperparameter for validation accuracy.

    Opens the Optuna study persisted at ``<study_dir>/optuna.journal`` (its name
    is ``study.json``'s ``"study"``) and ranks parameters by how much of the
    variance of the first objective (validation accuracy) they explain, over
    COMPLETE trials. Under Ray Tune, trials stopped early by the scheduler reach
    Optuna as COMPLETE with their partial accuracy, so they count here.
    Parameters that took a single value are left out. The evaluator is seeded,
    so the same study gives the same numbers.

    Returns a Series indexed by parameter name, named ``"importance"``, summing
    to 1, sorted from most to least important. Raises :class:`ResultsError` when
    the journal or the study is missing or has fewer than 2 complete trials.
    """
    import optuna  # deferred: optuna is only needed here, and is slow to import
    from optuna.storages.journal import JournalFileBackend

    study_dir = Path(study_dir)
    name = read_study_meta(study_dir)["study"]
    journal = study_dir / JOURNAL_FILE
    if not journal.is_file():
        raise ResultsError(f"{journal}: not found; parameter importance needs the study's Optuna journal")
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(journal)))
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise ResultsError(f"{journal}: holds no study named {name!r}") from None
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2:
        raise ResultsError(
            f"study {name!r} has {len(complete)} complete trial(s); parameter importance needs at least 2"
        )
    importances = optuna.importance.get_param_importances(
        study,
        evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0),
        target=lambda trial: trial.values[0],
    )
    return pd.Series(importances, name="importance", dtype=float).sort_values(ascending=False)
