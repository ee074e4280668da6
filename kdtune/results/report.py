"""A study's report: ``summary.md`` plus three figures, and compact terminal tables.

Figures are drawn on standalone :class:`matplotlib.figure.Figure` objects and
saved through the Agg renderer, so that writing a report never touches pyplot's
global state or needs a display.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, NullFormatter

from kdtune.results.analysis import (
    best_temperature,
    counted_trials,
    hypervolume,
    pareto_front,
    read_study_meta,
    size_buckets,
    temperature_curve,
)
from kdtune.errors import ConfigError, ResultsError
from kdtune.study import RACE_CONTENDERS_TABLE, RACE_PLOT, RACE_TABLE, SUMMARY_FILE
from kdtune.tables import read_csv_table

FRONT_COLUMNS = ["width", "params", "bytes", "val_acc", "kd_gain", "temperature", "alpha"]
TEMPERATURE_COLUMNS = [
    "bucket", "recommended_t", "t_low", "t_high", "best_mean", "best_std", "n_trials", "verdict",
]
FIGURES = {
    "pareto": "pareto.png",
    "accuracy_vs_temperature": "accuracy_vs_temperature.png",
    "learning_curves": "learning_curves.png",
}
_MISSING = "n/a"
_SIGNED_COLUMNS = {"kd_gain"}
_DPI = 150
_MAX_FRONT_LABELS = 10


# --------------------------------------------------------------------------- tables


def _format_cell(value: object, column: str = "") -> str:
    """One table cell: integers with thousands separators, floats to 4 significant digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return _MISSING
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if column in _SIGNED_COLUMNS:
            return f"{value:+.4f}"
        # Integral floats (a width or params column that went through NaN) read as integers.
        if value.is_integer() and abs(value) < 1e15:
            return f"{int(value):,}"
        return f"{value:.4g}"
    return str(value)


def _cells(df: pd.DataFrame, columns: Sequence[str]) -> list[list[str]]:
    return [[_format_cell(row[c], c) for c in columns] for _, row in df.iterrows()]


def _check_columns(df: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ConfigError(
            "columns", f"not in the table: {', '.join(missing)}; available: {', '.join(map(str, df.columns))}"
        )


def _is_numeric_column(df: pd.DataFrame, column: str) -> bool:
    return pd.api.types.is_numeric_dtype(df[column]) and not pd.api.types.is_bool_dtype(df[column])


def format_terminal_table(df: pd.DataFrame, columns: Sequence[str], max_rows: int = 20) -> str:
    """``df[columns]`` as a compact fixed-width text table for the terminal.

    Numbers are right-aligned (integers with thousands separators, floats to 4
    significant digits, ``kd_gain`` signed), text left-aligned, missing values
    shown as ``n/a``. Only the first ``max_rows`` rows are shown, followed by a
    line saying how many were left out. Raises :class:`ConfigError` naming any
    column not in ``df``.
    """
    columns = list(columns)
    _check_columns(df, columns)
    if max_rows < 1:
        raise ConfigError("max_rows", f"must be >= 1, got {max_rows}")
    shown = df.head(max_rows)
    body = _cells(shown, columns)
    widths = [max([len(c)] + [len(r[i]) for r in body]) for i, c in enumerate(columns)]
    numeric = [_is_numeric_column(df, c) for c in columns]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.rjust(width) if right else cell.ljust(width) for cell, width, right in zip(cells, widths, numeric)
        ).rstrip()

    lines = [line(columns), "  ".join("-" * w for w in widths)]
    lines += [line(row) for row in body]
    if df.empty:
        lines.append("(no rows)")
    elif len(df) > max_rows:
        lines.append(f"… {len(df) - max_rows} more rows")
    return "\n".join(lines)


def _markdown_table(df: pd.DataFrame, columns: Sequence[str]) -> str:
    """A GitHub-flavoured Markdown table of ``df[columns]`` (columns absent from ``df`` are skipped)."""
    columns = [c for c in columns if c in df.columns]
    rows = _cells(df, columns)
    align = ["---:" if _is_numeric_column(df, c) else ":---" for c in columns]
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- figures


def _several_methods(trials: pd.DataFrame) -> bool:
    """Whether the study searched the distillation method (then the front says each point's)."""
    return "soft_loss" in trials.columns and trials["soft_loss"].dropna().nunique() > 1


def _bucket_palette(labels: Iterable[object]) -> dict[object, tuple]:
    """One colour per size bucket, from small (dark) to large (light) along viridis."""
    from matplotlib import colormaps

    labels = list(labels)
    cmap = colormaps["viridis"]
    # Stop before viridis' yellow end, which is hard to see on white.
    positions = np.linspace(0.0, 0.85, max(len(labels), 1))
    return {label: cmap(p) for label, p in zip(labels, positions)}


def _bucket_name(label: object) -> str:
    """Legend text for a bucket: "width 8", or "2¹⁰–2¹¹ params" typeset with mathtext."""
    if isinstance(label, (int, np.integer, float, np.floating)):
        return f"width {label:g}"
    return re.sub(r"2\^(\d+)", r"$2^{\1}$", str(label)) + " params"


def _plain_log_ticks(ax, values: Sequence[float] | None = None) -> None:
    """Log x axis with plain-number tick labels (2, 4, 8 rather than 10^0.3)."""
    ax.set_xscale("log")
    if values is not None and 0 < len(values) <= 12:
        ax.set_xticks(sorted(values))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))


def _empty_note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.4")
    # Ticks of an empty axis would suggest a scale that means nothing.
    ax.set_xticks([])
    ax.set_yticks([])


def _plot_pareto(path: Path, study: str, trials: pd.DataFrame, teacher: dict) -> None:
    fig = Figure(figsize=(8.5, 5.5), layout="constrained")
    ax = fig.add_subplot()
    plotted = trials.dropna(subset=[c for c in ("params", "val_acc") if c in trials.columns])
    phase = plotted["phase"] if "phase" in plotted.columns else pd.Series("search", index=plotted.index)
    status = plotted["status"] if "status" in plotted.columns else pd.Series("completed", index=plotted.index)
    search_done = plotted[(phase == "search") & (status == "completed")]
    search_other = plotted[(phase == "search") & (status != "completed")]
    baselines = plotted[(phase == "baseline") & (status == "completed")]

    if not search_other.empty:
        ax.scatter(
            search_other["params"], search_other["val_acc"], s=22, facecolors="none",
            edgecolors="0.75", linewidths=0.8, label="not completed (stopped early, diverged, …)",
        )
    if not search_done.empty:
        ax.scatter(search_done["params"], search_done["val_acc"], s=22, color="0.45", alpha=0.7,
                   label="completed trials")
    if not baselines.empty:
        ax.scatter(baselines["params"], baselines["val_acc"], s=40, marker="x", color="black",
                   label="hard-label baseline (α=1, β=0)")
    try:
        front = pareto_front(trials)
    except ResultsError:
        front = None
    if front is not None:
        ax.step(front["params"], front["val_acc"], where="post", color="tab:red", linewidth=1.8, zorder=3)
        ax.scatter(front["params"], front["val_acc"], s=55, color="tab:red", edgecolors="white",
                   linewidths=0.8, zorder=4, label=f"Pareto front ({len(front)} trials)")
        # Labelling a long front only stacks unreadable text; the summary table has the details.
        for _, row in front.iterrows() if len(front) <= _MAX_FRONT_LABELS else ():
            parts = []
            if "width" in row and not pd.isna(row["width"]):
                parts.append(f"w={row['width']:g}")
            if "temperature" in row and not pd.isna(row["temperature"]):
                parts.append(f"T={row['temperature']:.3g}")
            if _several_methods(trials) and not pd.isna(row.get("soft_loss")):
                parts.append(str(row["soft_loss"]))
            if parts:
                # Up and to the left of each point lies clear of the step line, which leaves rightwards.
                ax.annotate(", ".join(parts), (row["params"], row["val_acc"]), textcoords="offset points",
                            xytext=(-5, 5), ha="right", va="bottom", fontsize=7, color="tab:red")
    teacher_params, teacher_acc = teacher.get("params"), teacher.get("val_acc")
    if teacher_params and teacher_acc is not None:
        ax.scatter([teacher_params], [teacher_acc], marker="*", s=260, color="gold", edgecolors="black",
                   linewidths=0.8, zorder=5, label=f"teacher ({int(teacher_params):,} params)")
    if not ax.has_data():
        _empty_note(ax, "no trials with a size and an accuracy yet")
    else:
        ax.set_xscale("log")
        ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
    ax.set_xlabel("parameters (count)")
    ax.set_ylabel("validation accuracy")
    ax.set_title(f"{study}: validation accuracy vs student size")
    ax.grid(True, which="major", alpha=0.3)
    fig.savefig(path, dpi=_DPI)


def _baseline_means(trials: pd.DataFrame) -> dict[float, float]:
    """Mean hard-label baseline accuracy per width (empty when there are none)."""
    needed = {"phase", "status", "width", "val_acc"}
    if not needed <= set(trials.columns):
        return {}
    rows = trials[(trials["phase"] == "baseline") & (trials["status"] == "completed")].dropna(
        subset=["width", "val_acc"]
    )
    return {float(w): float(v) for w, v in rows.groupby("width")["val_acc"].mean().items()}


def _plot_temperature(path: Path, study: str, trials: pd.DataFrame, curve: pd.DataFrame,
                      best: pd.DataFrame, palette: dict) -> None:
    fig = Figure(figsize=(8.5, 5.5), layout="constrained")
    ax = fig.add_subplot()
    if curve.empty:
        _empty_note(ax, "no completed search trials yet")
    else:
        baselines = _baseline_means(trials)
        recommended = dict(zip(best["bucket"], best["recommended_t"]))
        drew_baseline = False
        for bucket, rows in curve.groupby("bucket", observed=True, sort=True):
            colour = palette.get(bucket, "0.5")
            ax.errorbar(rows["t_bin_center"], rows["mean"], yerr=rows["std"].fillna(0.0), marker="o",
                        markersize=4, capsize=3, linewidth=1.4, color=colour, label=_bucket_name(bucket))
            t_best = recommended.get(bucket)
            if t_best is not None:
                at = rows[rows["t_bin_center"] == t_best]
                ax.scatter(at["t_bin_center"], at["mean"], s=110, facecolors="none", edgecolors=colour,
                           linewidths=1.6, zorder=4)
            if isinstance(bucket, (int, np.integer, float, np.floating)) and float(bucket) in baselines:
                ax.axhline(baselines[float(bucket)], color=colour, linestyle="--", linewidth=1.0, alpha=0.8)
                drew_baseline = True
        handles, names = ax.get_legend_handles_labels()
        handles.append(Line2D([], [], marker="o", markersize=9, markerfacecolor="none",
                              markeredgecolor="0.3", linestyle="none"))
        names.append("best mean T")
        if drew_baseline:
            handles.append(Line2D([], [], color="0.3", linestyle="--"))
            names.append("hard-label baseline")
        ax.legend(handles, names, fontsize=8, title="student", title_fontsize=8, framealpha=0.9)
        _plain_log_ticks(ax, sorted(curve["t_bin_center"].unique()))
    ax.set_xlabel("temperature T")
    ax.set_ylabel("validation accuracy (mean ± std)")
    ax.set_title(f"{study}: accuracy vs distillation temperature (completed trials)")
    ax.grid(True, alpha=0.3)
    fig.savefig(path, dpi=_DPI)


_STATUS_STYLE = {"completed": "-", "stopped_early": "--"}
_OTHER_STYLE = "-."


def _plot_learning_curves(path: Path, study: str, history: pd.DataFrame, trial_buckets: pd.Series,
                          trial_status: pd.Series, palette: dict, rungs: Sequence[int]) -> None:
    fig = Figure(figsize=(8.5, 5.5), layout="constrained")
    ax = fig.add_subplot()
    curves = history
    if not {"trial_id", "epoch", "val_acc"} <= set(curves.columns):
        curves = pd.DataFrame(columns=["trial_id", "epoch", "val_acc"])
    if "phase" in curves.columns:
        curves = curves[curves["phase"] == "search"]
    curves = curves.dropna(subset=["epoch", "val_acc"])
    styles_used: set[str] = set()
    buckets_used: list[object] = []
    for trial_id, rows in curves.groupby("trial_id", sort=False):
        rows = rows.sort_values("epoch")
        bucket = trial_buckets.get(trial_id)
        status = trial_status.get(trial_id, rows["status"].iloc[-1] if "status" in rows.columns else "")
        style = _STATUS_STYLE.get(status, _OTHER_STYLE)
        styles_used.add(style)
        if bucket is not None and not pd.isna(bucket) and bucket not in buckets_used:
            buckets_used.append(bucket)
        # A dot at each scored epoch: a trial stopped at its first rung is one point, and a
        # search with validate_at: rungs scores only at the rungs and the last epoch.
        ax.plot(rows["epoch"], rows["val_acc"], linestyle=style, linewidth=1.0, alpha=0.65,
                color=palette.get(bucket, "0.5"), marker="o", markersize=2.5)
    if curves.empty:
        _empty_note(ax, "no per-epoch history yet")
    else:
        last_epoch = curves["epoch"].max()
        for rung in rungs:
            if rung <= last_epoch:
                ax.axvline(rung, color="0.35", linestyle=":", linewidth=1.0)
                # The epoch alone: "rung 1" and "rung 3" would overlap on a long budget.
                ax.text(rung, 1.005, f"{rung}", transform=ax.get_xaxis_transform(),
                        va="bottom", ha="center", fontsize=7, color="0.35")
        order = {b: i for i, b in enumerate(palette)}
        buckets_used.sort(key=lambda b: order.get(b, len(order)))
        handles = [Line2D([], [], color=palette.get(b, "0.5"), linewidth=2) for b in buckets_used]
        names = [_bucket_name(b) for b in buckets_used]
        for style, name in (("-", "completed"), ("--", "stopped early"), (_OTHER_STYLE, "diverged / error / running")):
            if style in styles_used:
                handles.append(Line2D([], [], color="0.3", linestyle=style))
                names.append(name)
        ax.legend(handles, names, fontsize=8, loc="lower right", framealpha=0.9)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.set_title(f"{study}: learning curves of search trials\n(dotted: early-stopping rungs, at the epochs shown; "
                 f"dots: scored epochs)", pad=14)
    ax.grid(True, alpha=0.3)
    fig.savefig(path, dpi=_DPI)


def _trial_buckets(trials: pd.DataFrame, history: pd.DataFrame) -> tuple[pd.Series, pd.Series, list]:
    """Bucket and final status of every trial (indexed by trial_id), and the buckets from small to large.

    From the trials table, completed with history-only trials (a trial still
    running may not be in the table yet), so that the learning curves and the
    temperature plot colour the same size alike.
    """
    per_trial = [trials] if not trials.empty else []
    if not history.empty and "trial_id" in history.columns:
        known = set(trials["trial_id"]) if "trial_id" in trials.columns else set()
        extra = history[~history["trial_id"].isin(known)].groupby("trial_id", sort=False).tail(1)
        if not extra.empty:
            per_trial.append(extra)
    if not per_trial:
        return pd.Series(dtype=object), pd.Series(dtype=object), []
    frame = pd.concat(per_trial, ignore_index=True).drop_duplicates("trial_id")
    buckets = size_buckets(frame)
    status = frame["status"] if "status" in frame.columns else pd.Series("", index=frame.index)
    index = frame["trial_id"].to_numpy()
    present = set(buckets.dropna())
    order = [label for label in buckets.cat.categories if label in present]
    return pd.Series(buckets.to_numpy(), index=index), pd.Series(status.to_numpy(), index=index), order


# --------------------------------------------------------------------------- summary


def _status_counts(trials: pd.DataFrame) -> str:
    if trials.empty or "status" not in trials.columns:
        return "No trials recorded yet."
    if "phase" in trials.columns:
        counts = pd.crosstab(trials["status"], trials["phase"])
        counts["total"] = counts.sum(axis=1)
    else:
        counts = trials["status"].value_counts().rename("total").to_frame()
    counts = counts.reset_index()
    return _markdown_table(counts, list(counts.columns))


def _summary(study: str, meta: dict, trials: pd.DataFrame, best: pd.DataFrame, files: dict[str, Path]) -> str:
    lines = [f"# kdtune study `{study}`", ""]
    teacher = meta.get("teacher") or {}
    if teacher:
        parts = []
        if teacher.get("params") is not None:
            parts.append(f"{int(teacher['params']):,} parameters")
        if teacher.get("bytes") is not None:
            parts.append(f"{int(teacher['bytes']):,} bytes")
        if teacher.get("val_acc") is not None:
            parts.append(f"validation accuracy {float(teacher['val_acc']):.4f}")
        lines += [f"Teacher: {', '.join(parts)}.", ""]
    lines += ["## Trials by status", "", _status_counts(trials), ""]

    lines += ["## Pareto front (completed search trials: fewest parameters for each accuracy)", ""]
    try:
        front = pareto_front(trials)
    except ResultsError as exc:
        lines += [f"No Pareto front yet: {exc}.", ""]
    else:
        reference = 2.0 * float(counted_trials(trials, "params", "val_acc")["params"].max())
        volume = hypervolume(trials, reference=(reference, 0.0))
        lines += [
            _markdown_table(front, FRONT_COLUMNS + (["soft_loss"] if _several_methods(trials) else [])),
            "",
            "`kd_gain` is validation accuracy minus the hard-label baseline (α=1, β=0) of the same "
            f"width; `{_MISSING}` where no baseline of that width was run.",
            "",
            f"Hypervolume in (log10 parameters, accuracy) space: {volume:.4f} "
            f"(reference point: {reference:,.0f} parameters, accuracy 0).",
            "",
        ]

    lines += ["## Best temperature per student size", ""]
    if best.empty:
        lines += ["No completed search trials with a temperature yet.", ""]
    else:
        lines += [
            _markdown_table(best, TEMPERATURE_COLUMNS),
            "",
            "`t_low`–`t_high`: temperatures whose mean accuracy is statistically indistinguishable from the "
            "best (Welch t-test, p > 0.05).",
            "",
        ]

    lines += ["## Figures", ""]
    captions = {
        "pareto": "Validation accuracy vs student size",
        "accuracy_vs_temperature": "Accuracy vs temperature per student size",
        "learning_curves": "Learning curves",
    }
    for name, caption in captions.items():
        lines += [f"![{caption}]({files[name].name})", ""]
    return "\n".join(lines)


def write_report(
    study_dir: str | Path,
    trials: pd.DataFrame,
    history: pd.DataFrame,
    out_dir: str | Path | None = None,
) -> dict[str, Path]:
    """Write ``summary.md`` and the study's figures into ``out_dir`` (default: ``study_dir``).

    ``study_dir`` must hold ``study.json`` (study name, teacher size and accuracy,
    early-stopping rungs). ``trials`` and ``history`` are the study's tables.
    Writes:

    * ``pareto.png``: every trial's accuracy against its parameter count (log
      scale), the Pareto front as a step line, baselines and the teacher;
    * ``accuracy_vs_temperature.png``: mean ± std accuracy per temperature, one
      line per size bucket, hard-label baselines dashed when buckets are widths;
    * ``learning_curves.png``: validation accuracy per epoch of every search
      trial, coloured by size bucket, stopped-early trials dashed, rungs dotted;
    * ``summary.md``: counts by status, the Pareto front and best-temperature
      tables, and links to the figures (relative, so keep them together).

    A study without completed trials or baselines still gets a report that says
    what is missing. Returns ``{"summary": path, "pareto": path,
    "accuracy_vs_temperature": path, "learning_curves": path}``.
    """
    meta = read_study_meta(study_dir)
    study = meta["study"]
    out = Path(out_dir) if out_dir is not None else Path(study_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {name: out / filename for name, filename in FIGURES.items()}

    trial_buckets, trial_status, bucket_order = _trial_buckets(trials, history)
    palette = _bucket_palette(bucket_order)
    curve = temperature_curve(trials) if not trials.empty else pd.DataFrame()
    best = best_temperature(trials) if not trials.empty else pd.DataFrame()

    _plot_pareto(files["pareto"], study, trials, meta.get("teacher") or {})
    _plot_temperature(files["accuracy_vs_temperature"], study, trials, curve, best, palette)
    _plot_learning_curves(files["learning_curves"], study, history, trial_buckets, trial_status, palette,
                          [int(r) for r in meta.get("rungs") or []])

    summary = out / SUMMARY_FILE
    summary.write_text(_summary(study, meta, trials, best, files), encoding="utf-8")
    return {"summary": summary, **files}



def plot_race(study_dir: str | Path, out: str | Path | None = None) -> Path:
    """Plot a race (``race/contenders.csv``): per size, accuracy vs the raced value with
    95% intervals, dropped contenders greyed with the round they fell in, the
    no-distillation contender as a band, the recommended value circled.
    Returns the PNG's path (``race/best_t.png`` by default)."""
    study_dir = Path(study_dir)
    table_path = study_dir / RACE_CONTENDERS_TABLE
    if not table_path.is_file():
        raise ResultsError(f"{table_path}: not found; run kdtune best-t {study_dir} --race first")
    table = pd.read_csv(table_path)
    best = read_csv_table(study_dir / RACE_TABLE)
    sizes = sorted(table["width"].unique())
    fig = Figure(figsize=(5.5 * len(sizes), 4.5), layout="constrained")
    axes = fig.subplots(1, len(sizes), squeeze=False)[0]
    param = str(best["param"].iloc[0]) if "param" in best.columns and len(best) else "temperature"
    for ax, size in zip(axes, sizes):
        rows = table[(table["width"] == size)]
        baseline = rows[rows["baseline"].astype(bool)]
        values = rows[~rows["baseline"].astype(bool)].copy()
        numbers = pd.to_numeric(values["contender"], errors="coerce")
        # Methods (``--param soft_loss``) are categories: one position each, labelled by name.
        categorical = bool(numbers.isna().any())
        values["x"] = np.arange(len(values), dtype=float) if categorical else numbers
        for _, row in baseline.iterrows():
            ax.axhspan(row["ci_low"], row["ci_high"], color="0.85", label="no distillation (95% CI)")
            ax.axhline(row["mean"], color="0.5", linewidth=1.0)
        for dropped, style in ((False, {"color": "tab:blue"}), (True, {"color": "0.65"})):
            part = values[values["status"].eq("dropped") == dropped]
            if part.empty:
                continue
            ax.errorbar(part["x"], part["mean"], yerr=[part["mean"] - part["ci_low"], part["ci_high"] - part["mean"]],
                        fmt="o", capsize=3, label="dropped" if dropped else "survivor", **style)
            if dropped:
                for _, row in part.iterrows():
                    ax.annotate(f"r{int(row['dropped_round'])}", (row["x"], row["mean"]), textcoords="offset points",
                                xytext=(4, -10), fontsize=7, color="0.5")
        chosen = best[best["width"] == size]["recommended"]
        if len(chosen):
            # The baseline may have won: then nothing on the axis matches and nothing is circled.
            at = values[values["contender"].astype(str) == str(chosen.iloc[0])] if categorical else \
                values[values["x"] == pd.to_numeric(chosen.iloc[0], errors="coerce")]
            if len(at):
                ax.scatter(at["x"], at["mean"], s=140, facecolors="none", edgecolors="tab:red", linewidths=1.6,
                           zorder=4, label="recommended")
        if categorical:
            labels = [str(c) for c in values["contender"]]
            # Long names side by side overlap (a method × T race's "dkd, T=4.5"): slanted then.
            slanted = sum(len(label) for label in labels) > 60
            ax.set_xticks(list(values["x"]), labels, rotation=35 if slanted else 0, ha="right" if slanted else "center")
            ax.set_xlim(-0.5, len(values) - 0.5)
        else:
            ax.set_xscale("log" if values["x"].min() > 0 else "linear")
            ax.set_xticks(sorted(values["x"]))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:.2g}"))
        ax.set_title(f"width {size:g}")
        ax.set_xlabel(param)
        ax.set_ylabel("validation accuracy (mean, 95% CI)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    path = Path(out) if out is not None else study_dir / RACE_PLOT
    fig.savefig(path, dpi=_DPI)
    return path
