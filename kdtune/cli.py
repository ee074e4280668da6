"""The ``kdtune`` command line.

User errors (a bad spec, a missing folder, a wrong flag) print one message and
exit with status 2, without a traceback; an interrupted search exits with 130
after printing how to resume it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import click

from kdtune import __version__
from kdtune.errors import KdtuneError
from kdtune.results.export_formats import DEFAULT_FORMAT, DEPRECATED_FORMATS, FORMATS
from kdtune.results.tracking import DEFAULT_TRACKER, TRACKER_PACKAGES
from kdtune.study import HISTORY_TABLE, META_FILE, TRIALS_TABLE, final_files

if TYPE_CHECKING:  # the search (and Ray) is imported only by the commands that run one
    from kdtune.search.pipeline import SearchInterrupted


def _fail(message: str, code: int = 2) -> None:
    click.echo(f"kdtune: error: {message}", err=True)
    sys.exit(code)


class _Group(click.Group):
    """Turns :class:`KdtuneError` from any command into one line and exit status 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KdtuneError as exc:
            _fail(str(exc), exc.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kdtune")
def main() -> None:
    """Search knowledge-distillation hyperparameters (T, alpha, beta, noise, student width)."""


@main.command()
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
def validate(spec: Path) -> None:
    """Check a search spec (and the data and checkpoints it names) without running anything."""
    from kdtune.search import check_inputs, preflight
    from kdtune.spec import load_spec

    parsed = load_spec(spec)
    preflight(parsed, str(spec))
    _tracker(parsed, None, str(spec))
    data = check_inputs(parsed, str(spec))
    from kdtune.search.plan import family_warnings

    for warning in family_warnings(parsed, data):
        click.echo(f"{spec}: warning: {warning}", err=True)
    searched = ", ".join(parsed.space.searched()) or "nothing"
    click.echo(f"{spec}: ok: study '{parsed.study}', {parsed.num_samples} trials on {parsed.data.dataset}, "
               f"searching {searched}")


@main.command()
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--num-samples", type=click.IntRange(min=1), help="Trials to run (overrides the spec's num_samples).")
@click.option("--name", help="Study name (default: the spec's `study`); results go to RESULTS_ROOT/NAME.")
@click.option("--address", help="Join a running Ray cluster: 'auto', 'host:6379' or 'ray://host:10001'.")
@click.option("--storage", help="Where Ray keeps the experiment: a path every node sees, or a URI (s3://...).")
@click.option("--resume", is_flag=True, help="Continue an interrupted study of the same spec.")
@click.option("--dashboard", is_flag=True, help="Start Ray's dashboard, bound to 127.0.0.1 only.")
@click.option("--results", "results_root", default="results", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="Results root folder.")
@click.option("--budget", help="Stop sampling once spent: epochs of search trials (500) or time (2h, 90m).")
@click.option("--track", type=click.Choice(list(TRACKER_PACKAGES)),
              help="Log the study to an experiment tracker when the search ends (overrides the spec's tracking).")
def search(spec: Path, num_samples: int | None, name: str | None, address: str | None, storage: str | None,
           resume: bool, dashboard: bool, results_root: Path, budget: str | None, track: str | None) -> None:
    """Run a distillation search described by SPEC (a YAML file)."""
    from kdtune.search import SearchInterrupted, resume_command
    from kdtune.search import search as run_search
    from kdtune.spec import load_spec

    # The tracker and its package are checked before anything starts.
    tracker = _tracker(load_spec(spec), track, str(spec))
    try:
        result = run_search(spec, num_samples=num_samples, name=name, address=address, storage=storage,
                            resume=resume, dashboard=dashboard, results_root=results_root, budget=budget,
                            log=lambda m: click.echo(m, err=False))
    except SearchInterrupted as exc:
        _interrupted(exc)
    except KeyboardInterrupt:
        study_dir = results_root.expanduser().resolve() / (name or _spec_study(spec))
        if (study_dir / META_FILE).exists():
            _interrupted(SearchInterrupted(study_dir, resume_command(spec, study_dir, name)))
        click.echo("search interrupted before it started; nothing was written", err=True)
        sys.exit(130)
    if tracker is not None:
        _track_study(result.study_dir, *tracker)
    if result.interrupted:
        _interrupted(SearchInterrupted(result.study_dir, result.resume_command))
    _print_front(result.trials, result.study_dir)


def _tracker(parsed: Any, track: str | None, source: str) -> tuple[str, str | None] | None:
    """(tracker, uri) the search logs to, checked: ``--track``, else the spec's ``tracking``."""
    from kdtune.results.tracking import check_tracker_available

    if track is None and parsed.tracking is None:
        return None
    name = track or parsed.tracking.tracker
    uri = parsed.tracking.uri if parsed.tracking is not None else None
    try:
        check_tracker_available(name)
    except KdtuneError as exc:
        raise KdtuneError(f"{source}: tracking.tracker: {exc}") from None
    return name, uri


def _track_study(study_dir: Path, tracker: str, uri: str | None) -> None:
    from kdtune.results.tracking import log_study

    outcome = log_study(study_dir, tracker=tracker, uri=uri, log=click.echo)
    if tracker == "mlflow":
        click.echo(f"open it with: mlflow ui --backend-store-uri {outcome.location}")


def _interrupted(exc: SearchInterrupted) -> None:
    """Say where the study is kept and how to resume it; exit 130 (as after Ctrl-C)."""
    click.echo(str(exc), err=True)
    sys.exit(exc.exit_code)


def _spec_study(spec: Path) -> str:
    from kdtune.spec import load_spec

    try:
        return load_spec(spec).study
    except KdtuneError:
        return ""


def _print_front(trials: Any, study_dir: Path) -> None:
    from kdtune.results.analysis import pareto_front
    from kdtune.results.report import format_terminal_table

    counts = trials[trials["phase"] == "search"]["status"].value_counts().to_dict()
    click.echo(f"done: {sum(counts.values())} trials ({', '.join(f'{v} {k}' for k, v in counts.items())}); "
               f"tables in {study_dir}/{TRIALS_TABLE} and {HISTORY_TABLE}")
    from kdtune.study import read_meta

    objectives = read_meta(study_dir).get("objectives") or ["val_acc", "params"]
    size = objectives[1] if len(objectives) > 1 and objectives[1] in trials.columns else "params"
    try:
        front = pareto_front(trials, size=size)
    except KdtuneError as exc:
        click.echo(f"no Pareto front: {exc}")
        return
    click.echo(f"validation Pareto front ({size} vs accuracy):")
    columns = ["width", "params", "macs", "val_acc", "kd_gain", "soft_loss", "temperature", "alpha", "trial_id"]
    click.echo(format_terminal_table(front, [c for c in columns if c in front.columns]))


def _study_command(fn: Callable) -> Callable:
    return click.argument("results", type=click.Path(file_okay=False, path_type=Path))(fn)


def _trials_with_finished_search(results: Path) -> Any:
    """The study's trials, or a :class:`ResultsError` when no search trial ran its
    full budget (a study interrupted early, or one whose trials all stopped early)."""
    from kdtune.errors import ResultsError
    from kdtune.results.analysis import counted_trials, load_results, read_study_meta

    trials = load_results(results)
    if counted_trials(trials).empty:
        state = read_study_meta(results).get("state", "unknown")
        advice = ("every trial stopped early or failed: start a new study with more trials or a later first rung"
                  if state == "complete" else "finish the search first (kdtune search SPEC --resume)")
        raise ResultsError(f"{results}: no search trial has completed yet ({len(trials)} trial(s) recorded, "
                           f"study state '{state}'); {advice}")
    return trials


@main.command("best-t")
@_study_command
@click.option("--race", is_flag=True, help="Race the contenders with seeded runs per size (the evidence-based answer).")
@click.option("--param", default="temperature", show_default=True,
              help="The hyperparameter to race (a searched one, e.g. soft_loss for the methods at the best trial's "
                   "T); two joined by a comma for their cross product (soft_loss,temperature: every method at every "
                   "T of the grid, and whether the method matters beyond T); or recipe: each method's published "
                   "recipe (kd, kd+standardize, dkd, dist).")
@click.option("--widths", help="Comma-separated sizes to race (default: the sizes on the validation front).")
@click.option("--max-seeds", type=click.IntRange(min=3), default=10, show_default=True, help="Rounds at most.")
@click.option("--alpha", "alpha_level", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.05,
              show_default=True, help="Whole-race rate of false eliminations.")
@click.option("--grid", type=click.IntRange(min=2), default=8, show_default=True,
              help="Contender values over the searched range (plus the no-distillation baseline).")
@click.option("--resume", is_flag=True, help="With --race: continue an interrupted race without rerunning finished runs.")
@click.option("--score-pool", is_flag=True,
              help="With --race and a spec with train_subset: score runs on the validation images and the "
                   "training images no student saw (less noise per run).")
def best_t(results: Path, race: bool, param: str, widths: str | None, max_seeds: int, alpha_level: float,
           grid: int, resume: bool, score_pool: bool) -> None:
    """Recommend a temperature per student size from a finished study (with --race: by racing it)."""
    from kdtune.results.analysis import best_temperature, counted_trials, parameter_importance, untested_sizes
    from kdtune.results.report import format_terminal_table

    if race:
        _race(results, param, widths, max_seeds, alpha_level, grid, resume, score_pool)
        return
    if resume or score_pool:
        flag = "--resume" if resume else "--score-pool"
        raise KdtuneError(f"{flag} goes with --race: kdtune best-t RESULTS --race {flag}")
    trials = _trials_with_finished_search(results)
    table = best_temperature(trials)
    click.echo(format_terminal_table(table, list(table.columns)))
    untested = untested_sizes(table)
    if untested:
        from kdtune.search.race import race_bound

        searched = trials[trials["phase"] == "search"] if "phase" in trials.columns else trials
        sizes = ", ".join(f"{b:g}" if isinstance(b, (int, float)) else str(b) for b in untested)
        click.echo(f"too few trials to compare temperatures for size(s) {sizes}: {len(counted_trials(trials))} of "
                   f"{len(searched)} search trials ran their full budget. `kdtune best-t {results} --race` answers "
                   f"it with seeded runs per size: at most {race_bound(results, param, None, max_seeds)} epochs "
                   f"(usually far fewer: contenders significantly worse are dropped from the third round on)")
    try:
        importance = parameter_importance(results)
        click.echo("parameter importance for validation accuracy (Optuna fANOVA):")
        for name, value in importance.items():
            click.echo(f"  {name:<14} {value:.3f}")
    except KdtuneError as exc:
        click.echo(f"parameter importance unavailable: {exc}")


def _race(results: Path, param: str, widths: str | None, max_seeds: int, alpha_level: float, grid: int,
          resume: bool, score_pool: bool) -> None:
    from kdtune.results.report import format_terminal_table, plot_race
    from kdtune.search.race import run_race

    sizes = None
    if widths:
        try:
            sizes = [float(w) for w in widths.split(",") if w.strip()]
        except ValueError:
            raise KdtuneError(f"--widths {widths!r}: expected comma-separated numbers, e.g. 8,64") from None
    outcome = run_race(results, param=param, widths=sizes, max_seeds=max_seeds, alpha=alpha_level, resume=resume,
                       grid=grid, score_pool=score_pool, log=click.echo)
    columns = ["width", "recommended", "indistinguishable", "best_mean", "kd_gain", "kd_gain_low", "kd_gain_high",
               "rounds", "epochs", "outcome"]
    click.echo(format_terminal_table(outcome.best, columns))
    for _, row in outcome.best.iterrows():
        click.echo(f"width {row['width']:g}: {row['verdict']}")
    click.echo(f"wrote {plot_race(results)}")
    if outcome.interrupted:
        click.echo(f"the race was interrupted; continue it with: kdtune best-t {results} --race --resume", err=True)
        sys.exit(130)


@main.command()
@_study_command
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Folder for summary.md and PNGs (default: the study folder).")
@click.option("--html", "as_html", is_flag=True,
              help="Also write report.html: one self-contained page (figures embedded, no script, no network).")
def report(results: Path, out: Path | None, as_html: bool) -> None:
    """Write summary.md and plots (Pareto front, accuracy vs T, learning curves)."""
    from kdtune.results.analysis import load_history
    from kdtune.results.report import write_report

    written = write_report(results, _trials_with_finished_search(results), load_history(results), out)
    if as_html:
        from kdtune.results.report_html import write_html_report

        written["html"] = write_html_report(written["summary"])
    for name, path in written.items():
        click.echo(f"wrote {path}")


@main.command()
@_study_command
@click.option("--seeds", type=click.IntRange(min=1), default=3, show_default=True, help="Fresh seeds per configuration.")
@click.option("--race", "race", is_flag=True,
              help="Evaluate the race's winner of each size (after best-t --race) instead of the front.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Training processes at once [default: as many as the CPU cores hold at the search's threads "
                   "per trial, when a run takes 10 s or more (estimated from the search's epoch times); 1 on a GPU].")
@click.option("--full-data", "full_data", is_flag=True,
              help="Train every run on the whole training split (a study searched on data.train_subset); "
                   "writes final_full.csv.")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="With --full-data: epochs of each run [default: the trial's].")
def evaluate(results: Path, seeds: int, race: bool, workers: int | None, full_data: bool, epochs: int | None) -> None:
    """Re-train the Pareto front (or the race's winners) and baselines with fresh seeds; test once; write final.csv."""
    from kdtune.results.evaluate import final_evaluation
    from kdtune.results.report import format_terminal_table

    table = final_evaluation(results, seeds=seeds, log=click.echo, race=race, workers=workers, full_data=full_data,
                             epochs=epochs)
    shown = ["width", "params", *(["param", "recommended"] if race else []), "temperature", "alpha",
             "test_acc_mean", "test_acc_std", "baseline_test_acc_mean", "kd_gain_mean", "kd_gain_std", "latency_ms"]
    click.echo(format_terminal_table(table, [c for c in shown if c in table.columns]))
    click.echo(f"all columns in {results}/{final_files(race, full_data)[0]}")


@main.command()
@_study_command
@click.option("--trial", "trial_id", help="Trial id to export.")
@click.option("--pareto-index", type=click.IntRange(min=0), help="Index on the Pareto front (0 = smallest).")
@click.option("--format", "fmt", type=click.Choice(list(FORMATS)), default=DEFAULT_FORMAT,
              show_default=True, help="pt2: torch.export archive (dynamic batch); state_dict: weights only; "
              "torchscript: deprecated upstream in favour of torch.export; onnx: needs pip install 'kdtune[onnx]'.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Output file (default: in RESULTS/exports/).")
def export(results: Path, trial_id: str | None, pareto_index: int | None, fmt: str, out: Path | None) -> None:
    """Export a trained student with a JSON sidecar, checking it reproduces its val accuracy."""
    from kdtune.results.export import export_student

    if (trial_id is None) == (pareto_index is None):
        raise KdtuneError("export: give exactly one of --trial ID or --pareto-index K")
    if fmt in DEPRECATED_FORMATS:
        click.echo(f"note: {fmt} is {DEPRECATED_FORMATS[fmt]}", err=True)
    path, sidecar = export_student(results, trial_id=trial_id, pareto_index=pareto_index, fmt=fmt, out=out)
    click.echo(f"wrote {path} and {sidecar}")


@main.command()
@_study_command
@click.option("--tracker", type=click.Choice(list(TRACKER_PACKAGES)), default=DEFAULT_TRACKER, show_default=True,
              help="Experiment tracker: mlflow (pip install 'kdtune[mlflow]') or wandb, offline "
              "(pip install 'kdtune[wandb]').")
@click.option("--uri", help="MLflow tracking URI (default: sqlite:///RESULTS/mlflow.db, no server needed).")
def track(results: Path, tracker: str, uri: str | None) -> None:
    """Log a study to an experiment tracker: a run per study, a nested run per trial with per-epoch metrics.

    Trials already logged are skipped, so running it again after a resumed search logs only the new ones.
    """
    _track_study(results, tracker, uri)


if __name__ == "__main__":  # pragma: no cover
    main()
