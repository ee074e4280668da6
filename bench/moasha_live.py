"""Corrected MOASHA live, inside a kdtune search, against kdtune's default (issue 13).

``bench/anytime.py`` compares the early-stopping rules offline, on recorded
curves, with random sampling for every rule. This benchmark runs them live:
real Ray trials on the default digits task (search_spaces/digits.yaml, or another
spec with ``--spec``; no baselines), two trials at a time, each method spending the same epoch budget
as the offline replay (40 configurations × the full budget: 3,240 epochs),
on the same seeds:

* kdtune's default: ``pareto_asha`` with multi-objective TPE, every width given as
  many trials as any other (``sampler.balance_sizes``), the first trial of each
  width at the middle of every range, its learning rate raised for narrower widths
  (``sampler.first_trials: size_scaled``);
* corrected MOASHA (:class:`MOASHAScheduler`: Syne Tune 0.16's ``Bracket`` with
  :class:`moasha.CorrectedPriority`), random sampling, as MOASHA has no searcher;
* optionally (``--methods``) the default with every first trial at the middle of
  every range (``midpoint``, the default from the twelfth to the fourteenth session)
  or at random (``random_first``, the default before), ``pareto_asha`` with random
  sampling, which separates the rule from the sampler (offline, both used random
  sampling), and with TPE choosing the width as well (``tpe_unbalanced``). Every
  method but the default and ``midpoint`` draws its first trials at random, as Syne
  Tune's MOASHA does.

The MOASHA rule is plugged in the way kdtune takes any rule: one registration
in :data:`kdtune.search.early_stopping.EARLY_STOPPING` (:func:`register_rules`),
named in the spec's ``early_stopping.rule``. kdtune's code is unchanged.

Each rule's scheduler logs, in the driver, when each trial was added and each
result it judged (:class:`EventLog`). From the log: every trial that reached its
full budget is an event at (epochs spent by all trials at that moment, params,
val_acc) and at (seconds since the first trial, params, val_acc); the epochs
of a trial between its reports are interpolated linearly (kdtune trials report
only at the rungs and at the end). The anytime curves, area and hypervolume are
``bench/anytime.py``'s (:func:`anytime.hv_at_budgets`, :func:`anytime.area`):
HV of the completed trials' front in (log10 params, val_acc), reference point
(2 × the largest student, accuracy 0), as a ratio to the final HV of random
search running 40 configurations to the end with the same seed (run here too).

    python bench/moasha_live.py                      # 3 seeds (~15-25 min on 2 cores)
    python bench/moasha_live.py --spec search_spaces/digits_cnn.yaml --seeds 0 1 2 3 4
    python bench/moasha_live.py --seeds 0 1 --methods kdtune moasha pareto_random
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import common
import numpy as np
from anytime import (GRID, area, budgets_behind, counted, finish_anytime_plot, hv_at_budgets, hv_lost_by_size,
                     median_bootstrap, paired_bootstrap, regret_per_size, spans)
from common import Report, markdown_table, median
from moasha import MOASHARule
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from search_efficiency import REFERENCE as REFERENCE_NAME
from search_efficiency import METHODS as EFFICIENCY_METHODS
from search_efficiency import params_range

common.make_kdtune_importable()

from kdtune.search.early_stopping import EARLY_STOPPING, StoppingRule  # noqa: E402
from kdtune.search.rules import ParetoASHA, SizeAwareASHA  # noqa: E402

SAMPLES = 40  # the reference's configurations; the budget is SAMPLES × the full budget, as offline
CONCURRENT = 2
MAX_TRIALS = 5000  # num_samples of the budgeted methods: the epoch budget ends them first
EVENTS_FILE = "scheduler_events.jsonl"
DONE_FILE = "bench_done.json"  # written after a search ends: its wall time; the study is then reused
#: bench/RESULTS.md, offline (bench/anytime.py, 60 draws): area(kdtune default) − area(MOASHA corrected) per study.
OFFLINE_AREA_DIFF = {"digits": 0.0151, "digits_cnn": 0.0328}
KDTUNE, MOASHA = ("kdtune default (pareto_asha + TPE, sizes balanced, first trials scaled by size)",
                  "MOASHA corrected (random)")
#: The first trials as every method but the default draws them: its width fixed, the rest random.
RANDOM_FIRST = {"first_trials": "random"}

#: Method key → (name in the report, spec overrides, logged rule). The rule names are
#: registered by register_rules(); each is the named rule with an event log added.
METHODS: dict[str, tuple[str, dict[str, Any], str]] = {
    "kdtune": (KDTUNE, {}, "pareto_asha+log"),
    "moasha": (MOASHA, {"sampler": {"name": "random", **RANDOM_FIRST}}, "moasha+log"),
    "random_first": ("pareto_asha + TPE, sizes balanced, random first trials (the default before session 12)",
                     {"sampler": RANDOM_FIRST}, "pareto_asha+log"),
    "midpoint": ("pareto_asha + TPE, sizes balanced, midpoint first trials (the default, sessions 12-14)",
                 {"sampler": {"first_trials": "midpoint"}}, "pareto_asha+log"),
    "pareto_random": ("pareto_asha + random (contrast)", {"sampler": {"name": "random", **RANDOM_FIRST}},
                      "pareto_asha+log"),
    "size_aware": ("size_aware_asha + TPE", {}, "size_aware_asha+log"),
    "tpe_unbalanced": ("pareto_asha + TPE choosing the width too, random first trials",
                       {"sampler": {"balance_sizes": False, **RANDOM_FIRST}}, "pareto_asha+log"),
}

#: The anytime target of issue 13: this share of the reference's final HV at 10% of its epochs.
HV_AT_10_TARGET = 0.97

Event = tuple[float, float, float]  # (epochs spent or seconds, params, val_acc)


# --------------------------------------------------------------------------- the adapter


class MOASHAScheduler(FIFOScheduler):
    """Ray Tune scheduler: Syne Tune's MOASHA (one ``Bracket``, corrected ranking by
    default) on error = 1 − ``val_acc`` and log10 ``params`` scaled to [0, 1].

    At each rung a trial's normalised objectives join those recorded there; it
    continues only if its non-dominated rank (ε-net tie-breaks) is in the top 1/η,
    the first trial at a rung always continuing (:class:`moasha.MOASHARule`).
    Results at ``max_t`` are not ranked. :attr:`milestones` are the epochs at which
    trials must report (:func:`moasha.bracket_milestones`): kdtune passes them to
    its trials as ``report_epochs``.

    Args:
        max_t: the full budget in ``time_attr`` units (epochs).
        params_range: the smallest and largest parameter count of the space (for
            the size objective's scale).
        grace_period, reduction_factor: as ASHA; rungs at grace·η^k below ``max_t``.
        corrected: the corrected ranking (False: Syne Tune's as shipped).
        time_attr, metric, size_attr: the result fields read.
    """

    def __init__(self, max_t: int, params_range: tuple[float, float], grace_period: int = 1,
                 reduction_factor: float = 3.0, corrected: bool = True, time_attr: str = "epoch",
                 metric: str = "val_acc", size_attr: str = "params") -> None:
        super().__init__()
        self.rule = MOASHARule(max_t, params_range, corrected=corrected, grace_period=grace_period,
                               reduction_factor=reduction_factor, metric=metric)
        self.max_t, self.milestones = self.rule.max_t, self.rule.milestones
        self.time_attr, self._metric, self.size_attr = time_attr, metric, size_attr
        self.stopped: set[str] = set()

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        # The scheduler ranks its own two objectives; the searcher may be multi-objective.
        return True

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        if any(_missing(result.get(key)) for key in (self.time_attr, self._metric, self.size_attr)):
            return TrialScheduler.CONTINUE
        view = {"epoch": int(result[self.time_attr]), self._metric: result[self._metric],
                "params": result[self.size_attr]}
        if self.rule.on_trial_result(tune_controller, trial, view) == "STOP":
            self.stopped.add(trial.trial_id)
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def debug_string(self) -> str:
        return f"MOASHAScheduler: rungs at {self.milestones}, {len(self.stopped)} stopped"


def _missing(value: Any) -> bool:
    try:
        return value is None or not math.isfinite(float(value))
    except (TypeError, ValueError):
        return True


# --------------------------------------------------------------------------- the event log


class EventLog:
    """Mixin for a Ray scheduler: appends, as JSON lines to :attr:`events_path`, when each
    trial was added (≈ started: with ``max_concurrent_trials`` Ray adds a trial when a
    slot frees) and each result it judged, with its decision, on the driver's monotonic clock.

    A file rather than a list: Ray may copy the scheduler it is given."""

    events_path: str | None = None

    def _log(self, **event: Any) -> None:
        if self.events_path is not None:
            with open(self.events_path, "a") as out:
                out.write(json.dumps({"t": time.monotonic(), **event}) + "\n")

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._log(kind="add", trial=trial.trial_id)
        super().on_trial_add(tune_controller, trial)  # type: ignore[misc]

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)  # type: ignore[misc]
        self._log(kind="result", trial=trial.trial_id, epoch=result.get("epoch"), params=result.get("params"),
                  val_acc=result.get("val_acc"), decision=decision)
        return decision


class LoggedParetoASHA(EventLog, ParetoASHA):
    """kdtune's ParetoASHA, its decisions unchanged, with an event log."""


class LoggedSizeAwareASHA(EventLog, SizeAwareASHA):
    """kdtune's SizeAwareASHA, its decisions unchanged, with an event log."""


class LoggedMOASHA(EventLog, MOASHAScheduler):
    """The MOASHA adapter with an event log."""


LOGGED = {ParetoASHA: LoggedParetoASHA, SizeAwareASHA: LoggedSizeAwareASHA, MOASHAScheduler: LoggedMOASHA}


def moasha_rule(settings: Any, max_epochs: int, study_dir: Path) -> StoppingRule:
    """Syne Tune's MOASHA, corrected (bench/moasha.py), on error and log10 params; random sampling.

    The size objective's scale is the space's parameter range, from the spec the search
    stored in the study folder (a rule factory is given only the early-stopping settings)."""
    from kdtune.spec import load_spec
    from kdtune.study import SPEC_FILE

    scheduler = MOASHAScheduler(max_epochs, params_range(load_spec(Path(study_dir) / SPEC_FILE)),
                                grace_period=settings.grace_period, reduction_factor=settings.reduction_factor)
    return StoppingRule(scheduler, scheduler.milestones)


def logged(base: str) -> Any:
    """A rule factory: the rule registered as ``base``, its scheduler given an event log in
    the study folder (the scheduler's class swapped for its logged subclass, so that its
    settings stay exactly those of the registered factory)."""

    def factory(settings: Any, max_epochs: int, study_dir: Path) -> StoppingRule:
        rule = EARLY_STOPPING.get(base)(settings, max_epochs, study_dir)
        rule.scheduler.__class__ = LOGGED[type(rule.scheduler)]
        rule.scheduler.events_path = str(Path(study_dir) / EVENTS_FILE)
        return rule

    factory.__name__ = factory.__qualname__ = f"logged_{base}"
    factory.__doc__ = f"{base}, with an event log of its results (bench/moasha_live.py)."
    return factory


def register_rules() -> None:
    """Register ``moasha`` and the logged rules (``<rule>+log``) once per process."""
    if "moasha" not in EARLY_STOPPING:
        EARLY_STOPPING.register("moasha")(moasha_rule)
    for base in ("pareto_asha", "size_aware_asha", "moasha"):
        if f"{base}+log" not in EARLY_STOPPING:
            EARLY_STOPPING.register(f"{base}+log")(logged(base))


# --------------------------------------------------------------------------- anytime events (pure)


def load_events(path: Path) -> list[dict[str, Any]]:
    """The event log of one search (empty if none was written)."""
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def completion_events(log: Sequence[dict[str, Any]], max_t: int) -> tuple[list[Event], list[Event], float, float]:
    """From a search's event log: ``(by_epochs, by_seconds, epochs, seconds)``.

    ``by_epochs`` holds (epochs spent by all trials, params, val_acc) and ``by_seconds``
    (seconds since the first trial was added, params, val_acc) for each trial when it
    reported its full budget ``max_t``, in time order. A trial's epochs between its
    reports are interpolated linearly from (added, 0) through each reported
    (time, epoch), and held at its last report afterwards. ``epochs`` and
    ``seconds`` are the totals at the last event."""
    added = {e["trial"]: e["t"] for e in log if e["kind"] == "add"}
    results = sorted((e for e in log if e["kind"] == "result" and not _missing(e.get("epoch"))), key=lambda e: e["t"])
    if not results:
        return [], [], 0.0, 0.0
    start = min([*added.values(), results[0]["t"]])
    curves: dict[str, tuple[list[float], list[float]]] = {}
    for event in results:
        times, epochs = curves.setdefault(event["trial"], ([added.get(event["trial"], start)], [0.0]))
        times.append(event["t"])
        epochs.append(float(event["epoch"]))

    def spent(at: float) -> float:
        return float(sum(np.interp(at, times, epochs, left=0.0) for times, epochs in curves.values()))

    by_epochs, by_seconds = [], []
    for event in results:
        if int(event["epoch"]) >= max_t:
            point = (float(event["params"]), float(event["val_acc"]))
            by_epochs.append((spent(event["t"]), *point))
            by_seconds.append((event["t"] - start, *point))
    end = max(e["t"] for e in log)
    return by_epochs, by_seconds, spent(end), end - start


# --------------------------------------------------------------------------- the benchmark


def search_once(spec: Any, root: Path, study: str, budget: Any = None) -> tuple[Any, float]:
    """(trials table, wall seconds) of the search ``study`` in ``root``: run now, or read back
    when an earlier run of the benchmark with the same ``root`` finished it (a search it did
    not finish is removed and run again). Lets a long comparison be run seed by seed."""
    import shutil

    from kdtune.tables import load_tables

    folder = Path(root) / study
    if (folder / DONE_FILE).exists():
        return load_tables(folder)[0], float(json.loads((folder / DONE_FILE).read_text())["wall_s"])
    if folder.exists():
        shutil.rmtree(folder)
    result, wall = common.timed_search(spec, root, study, common.shared_teachers(), budget=budget)
    (folder / DONE_FILE).write_text(json.dumps({"wall_s": wall}))
    return result.trials, wall


def run(quick: bool = False, seeds: Sequence[int] | None = None, methods: Sequence[str] = ("kdtune", "moasha"),
        plot_dir: Path | None = None, samples: int = SAMPLES, epochs: int | None = None,
        root: Path | None = None, spec_path: Path = common.DEFAULT_SPEC) -> Report:
    """Run the live comparison and return its report (``quick``: one seed). ``samples``
    sets the reference's configurations (the budget is ``samples`` × the full budget) and
    ``epochs`` the trials' full budget (default: the spec's), for a smoke run. ``root``
    keeps the studies (default: a new temporary folder); searches finished there by an
    earlier run with the same settings are read back, not run again. ``spec_path`` is
    the task (default: the digits spec); its early-stopping rule and sampler are the
    methods' to set, the rest (space, data, teacher, budget) is the task's."""
    from kdtune.search import max_epochs
    from kdtune.search.plan import Budget

    register_rules()
    seeds = list(seeds if seeds is not None else ([0] if quick else [0, 1, 2]))
    root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="kdtune-bench-moasha-live-"))
    base = {"baselines": False, "resources": {"max_concurrent_trials": CONCURRENT},
            **({"space": {"epochs": epochs}} if epochs else {})}

    def task_spec(overrides: dict[str, Any]) -> Any:
        return common.digits_spec(overrides, spec_path)

    default = task_spec(base)
    task = default.study
    report = Report("moasha_live" if task == "digits" else f"moasha_live_{task}",
                    f"Live anytime fronts: kdtune's default against corrected MOASHA ({task})", quick=quick)
    reference_size = 2.0 * params_range(default)[1]
    max_t = max_epochs(default)
    budget = samples * max_t
    names = [METHODS[m][0] for m in methods]

    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    references = []
    for seed in seeds:
        spec = task_spec(common.deep_merge({**base, "seed": seed, "num_samples": samples},
                                           EFFICIENCY_METHODS[REFERENCE_NAME]))
        all_trials, wall = search_once(spec, root, f"live-s{seed}-reference-{samples}x{max_t}")
        trials = all_trials[(all_trials["phase"] == "search") & (all_trials["status"] == "completed")]
        ref_points = [(0.0, float(p), float(a)) for p, a in zip(trials["params"], trials["val_acc"])]
        ref_hv = float(hv_at_budgets(ref_points, [0.0], reference_size)[0])
        sizes = sorted({p for _, p, _ in ref_points})
        ref_pairs = [(p, a) for _, p, a in ref_points]
        references.append([seed, REFERENCE_NAME, samples, len(trials), int(all_trials["epochs_run"].sum()),
                           ref_hv, 1.0, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan, wall])
        print(f"seed {seed}: reference HV {ref_hv:.4f} ({wall:.0f} s)", flush=True)
        measured = {}
        for key in methods:
            name, overrides, rule = METHODS[key]
            spec = task_spec(common.deep_merge(
                {**base, "seed": seed, "num_samples": MAX_TRIALS, "early_stopping": {"rule": rule}}, overrides))
            study = f"live-s{seed}-{key}-{samples}x{max_t}"
            all_trials, wall = search_once(spec, root, study, Budget(epochs=budget))
            by_epochs, by_seconds, logged, seconds = completion_events(load_events(root / study / EVENTS_FILE), max_t)
            search_trials = all_trials[all_trials["phase"] == "search"]
            curve = hv_at_budgets(by_epochs, GRID * budget, reference_size) / ref_hv
            final = float(hv_at_budgets(by_epochs, [math.inf], reference_size)[0]) / ref_hv
            within = [(p, a) for spent, p, a in by_epochs if spent <= budget]
            measured[name] = m = {
                "seed": seed, "curve": curve, "area": area(curve), "final": final, "by_seconds": by_seconds,
                "seconds": seconds, "epochs": int(search_trials["epochs_run"].sum()), "logged_epochs": logged,
                "wall": wall, "trials": len(search_trials), "completed": len(by_epochs), "ref_hv": ref_hv,
                "regret": float(np.nanmax(regret_per_size(within, ref_pairs, sizes))),
                "sizes": tuple(sizes), "lost_at_10": hv_lost_by_size(
                    [(p, a) for spent, p, a in by_epochs if spent <= GRID[9] * budget], ref_pairs, sizes,
                    reference_size)}
            runs[name].append(m)
            print(f"seed {seed}: {name}: HV ratio {final:.4f}, area {m['area']:.4f}, {m['trials']} trials, "
                  f"{m['epochs']} epochs, {seconds:.0f} s ({wall:.0f} s with setup)", flush=True)
        # Wall-clock view: each method's HV ratio over the seed's shortest run, so that all
        # are judged over the same seconds.
        horizon = min(m["seconds"] for m in measured.values())
        for m in measured.values():
            m["horizon"] = horizon
            m["time_curve"] = hv_at_budgets(m["by_seconds"], GRID * horizon, reference_size) / ref_hv
            m["time_area"] = area(m["time_curve"])

    summary, rows = [], list(references)
    for name, per_seed in runs.items():
        summary.append([name, median(m["area"] for m in per_seed), median(m["curve"][9] for m in per_seed),
                        median(m["curve"][24] for m in per_seed), median(m["curve"][-1] for m in per_seed),
                        median(m["final"] for m in per_seed), median(m["regret"] for m in per_seed),
                        median(m["time_area"] for m in per_seed), median(m["epochs"] for m in per_seed),
                        median(m["seconds"] for m in per_seed), round(median(m["trials"] for m in per_seed)),
                        round(median(m["completed"] for m in per_seed))])
        rows += [[m["seed"], name, m["trials"], m["completed"], m["epochs"], m["final"] * m["ref_hv"], m["final"],
                  m["area"], m["curve"][9], m["curve"][-1], m["regret"], m["time_area"], m["seconds"], m["wall"]]
                 for m in per_seed]
    rows.sort(key=lambda row: row[0])
    if KDTUNE in runs:
        at_10 = [m["curve"][9] for m in runs[KDTUNE]]  # GRID[9] = 10% of the budget
        middle, low, high = median_bootstrap(at_10)
        report.target(f"live: median HV at 10% of the budget ≥ {HV_AT_10_TARGET} of the reference's final HV "
                      "(kdtune default)", f"{middle:.4f} (seeds {min(at_10):.3f}–{max(at_10):.3f}; 95% bootstrap "
                      f"interval of the median {low:.4f}–{high:.4f})", middle >= HV_AT_10_TARGET)
    report.add(
        f"Summary: median over {len(seeds)} seed(s) ({', '.join(map(str, seeds))})",
        f"Budget per method {budget:,} epochs ({samples} configurations × {max_t}), {CONCURRENT} trials at a time; "
        f"no new trial starts once the trials have reported that many epochs, running ones finish. HV of the trials "
        f"that ran their full {max_t} epochs, reference point ({reference_size:,.0f} params, accuracy 0), as a "
        f"ratio to random search running {samples} configurations to the end with the same seed. Area: mean HV ratio "
        f"from 5% to 100% of the epoch budget (bench/anytime.py's); HV @x%: at x% of the budget; final: every trial "
        f"completed, the ones that finished after the budget included; worst regret: over the sizes, the "
        f"reference's best accuracy at that size or smaller minus the method's at 100% of the budget; time area: "
        f"the mean HV ratio over the seconds of the seed's shortest run (of the methods compared), from its first "
        f"trial; "
        f"seconds: first trial added to last result.\n\n"
        + markdown_table(["method", "area 5–100% (epochs)", "HV @10%", "HV @25%", "HV @100%", "final HV",
                          "worst regret", "time area", "epochs", "seconds", "trials", "completed"], summary))
    if len({m["sizes"] for per_seed in runs.values() for m in per_seed}) == 1:
        # Which sizes the shortfall at 10% comes from (when every seed's reference has the same sizes).
        lost_rows = []
        for name, per_seed in runs.items():
            lost = np.array([m["lost_at_10"] for m in per_seed])
            lost_rows.append([name, *(f"{x:.4f}" for x in np.median(lost, axis=0)), f"{np.median(lost.sum(axis=1)):.4f}"])
        report.add("Where the hypervolume at 10% of the budget is lost, by size",
                   "For each size (params), the reference's best accuracy at that size or smaller minus the method's "
                   "among the trials completed by 10% of the budget, times the log10-params slab the size owns, "
                   "as a share of the reference's final HV (bench/anytime.py's hv_lost_by_size); median over seeds. "
                   "A seed's shares sum to 1 − its HV ratio at 10%.\n\n"
                   + markdown_table(["method", *(f"{p:,.0f}" for p in sizes), "total"], lost_rows))
    report.add("Per seed", "HV = hypervolume (absolute), ratio = final HV to the seed's reference; wall = the "
               "whole search() call, Ray and teacher setup included.\n\n"
               + markdown_table(["seed", "method", "trials", "completed", "epochs", "HV", "HV ratio", "area",
                                 "HV @10%", "HV @100%", "worst regret", "time area", "seconds", "wall s"], rows))
    if KDTUNE in runs and len(runs) > 1:
        # What each alternative (an earlier default, MOASHA) gains or loses against the default.
        against = []
        for name, per_seed in runs.items():
            if name == KDTUNE:
                continue
            row = [name]
            for value in (lambda m: m["area"], lambda m: m["curve"][9]):
                diffs = np.array([value(a) - value(b) for a, b in zip(per_seed, runs[KDTUNE])])
                mean, low, high = paired_bootstrap(diffs, np.zeros(len(diffs)))
                row += [f"{mean:+.4f} ({low:+.4f}, {high:+.4f})", f"{int((diffs > 0).sum())} of {len(diffs)}"]
            against.append(row)
        report.add("Each method against the default, paired by seed",
                   "Mean paired difference (method − default) over seeds, with its 95% percentile bootstrap "
                   "interval (10,000 resamples), and the seeds on which the method is ahead.\n\n"
                   + markdown_table(["method", "area − default's", "seeds ahead", "HV @10% − default's",
                                     "seeds ahead at 10%"], against))
    if MOASHA in runs:
        # Each rule against MOASHA, paired by seed (anytime.py's bootstrap, as offline).
        offline = OFFLINE_AREA_DIFF.get(task)
        contrasts = []
        for name, per_seed in runs.items():
            if name == MOASHA:
                continue
            diffs = [a["area"] - b["area"] for a, b in zip(per_seed, runs[MOASHA])]
            time_diffs = [a["time_area"] - b["time_area"] for a, b in zip(per_seed, runs[MOASHA])]
            mean, low, high = paired_bootstrap(np.array(diffs), np.zeros(len(diffs)))
            contrasts.append([name, f"{mean:+.4f}", f"{low:+.4f}", f"{high:+.4f}", sum(d > 0 for d in diffs),
                              len(diffs), ", ".join(f"{d:+.4f}" for d in diffs), f"{np.mean(time_diffs):+.4f}"])
            if name == KDTUNE:
                report.target(
                    "live: area(kdtune default) − area(MOASHA) > 0, paired bootstrap 95% CI over seeds excluding 0"
                    + (f" (offline: +{offline})" if offline is not None else ""),
                    f"{mean:+.4f} ({low:+.4f}, {high:+.4f}); ahead on {contrasts[-1][4]} of {len(diffs)} seeds",
                    low > 0)
        # Where the default's median curve dips below MOASHA's (the issue asks for every budget).
        medians = {name: np.median([m["curve"] for m in per_seed], axis=0) for name, per_seed in runs.items()}
        behind = []
        for name, per_seed in runs.items():
            if name == MOASHA:
                continue
            gap = np.where(counted(), medians[name] - medians[MOASHA], np.inf)
            worst = int(np.argmin(gap))
            paired = [a["curve"][worst] - b["curve"][worst] for a, b in zip(per_seed, runs[MOASHA])]
            mean, low, high = paired_bootstrap(np.array(paired), np.zeros(len(paired)))
            behind.append([name, spans(budgets_behind(medians[name], medians[MOASHA])), f"{GRID[worst]:.0%}",
                           f"{gap[worst]:+.4f}", f"{mean:+.4f} ({low:+.4f}, {high:+.4f})"])
        report.add("Budgets at which the median HV is below MOASHA's",
                   "Grid points from 5% to 100% of the epoch budget (1% apart) at which the method's median HV "
                   "ratio over seeds is lower than MOASHA's; the budget where the difference of the medians is "
                   "smallest (negative when behind somewhere), that difference, and there the mean paired "
                   "difference over seeds with its 95% bootstrap interval.\n\n"
                   + markdown_table(["method", "budgets behind MOASHA", "closest budget", "median − MOASHA's",
                                     "paired difference there (95% CI)"], behind))
        report.add("Each rule against MOASHA, paired by seed",
                   "Area difference (epochs view) with its 95% percentile bootstrap interval over seeds "
                   "(10,000 resamples); time area: the mean wall-clock area difference.\n\n"
                   + markdown_table(["method", "area − MOASHA", "CI low", "CI high", "seeds ahead", "seeds",
                                     "per seed", "time area − MOASHA"], contrasts))
    report.notes.append(
        "Live differs from offline in three ways: kdtune's default samples with TPE (offline: random for every rule; "
        "the pareto_asha + random contrast, when run, isolates the rule), halving is asynchronous on real timings, and "
        "each trial costs Ray's per-trial overhead, which matters in the wall-clock view when a rule starts many "
        "short trials.")
    report.notes.append(
        "The epochs column is Σ epochs_run of the search's trials (trials running when the budget was reached finish, "
        "so it may exceed the budget); the anytime curves are cut at the budget.")
    if plot_dir is not None:
        plot_path = Path(plot_dir) / f"{report.name}_time.png"
        plot_time(runs, plot_path, reference_size, task)
        report.notes.append(f"Plot of HV ratio against seconds (median over seeds): {plot_path}")
    return report


def plot_time(runs: dict[str, list[dict[str, Any]]], path: Path, reference_size: float, task: str = "digits") -> None:
    """Median over seeds of HV ratio against seconds since the first trial (each seed's
    curve on one grid up to the longest run; a run's curve holds its value after it ends)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    longest = max(m["seconds"] for per_seed in runs.values() for m in per_seed)
    grid = np.linspace(0.0, longest, 200)
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, per_seed in runs.items():
        curves = np.array([hv_at_budgets(m["by_seconds"], grid, reference_size) / m["ref_hv"] for m in per_seed])
        ax.plot(grid, np.median(curves, axis=0), label=name)
    finish_anytime_plot(fig, ax, path, "seconds since the first trial started",
                        "HV of completed trials / reference's final",
                        f"{task}, live, median over {len(next(iter(runs.values())))} seed(s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=common.DEFAULT_SPEC, help="the task (default: the digits spec)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=["kdtune", "moasha"])
    parser.add_argument("--teacher-cache", type=Path, default=None)
    parser.add_argument("--samples", type=int, default=SAMPLES, help="the reference's configurations (budget = "
                                                                      "samples × the full budget)")
    parser.add_argument("--epochs", type=int, default=None, help="the trials' full budget (default: the spec's)")
    parser.add_argument("--root", type=Path, default=None, help="keep the studies here; searches an earlier run "
                                                                 "finished here are read back (run seed by seed)")
    args = parser.parse_args()
    common.shared_teachers(args.teacher_cache)
    common.start_ray()
    started, load_before = time.perf_counter(), common.load_average()
    report = run(seeds=args.seeds, methods=args.methods, plot_dir=common.RESULTS_DIR, samples=args.samples,
                 epochs=args.epochs, root=args.root, spec_path=args.spec)
    report.wall_s = time.perf_counter() - started
    report.load_before, report.load_after = load_before, common.load_average()
    command = ("python bench/moasha_live.py"
               + (f" --spec {args.spec}" if args.spec != common.DEFAULT_SPEC else "")
               + " --seeds " + " ".join(map(str, args.seeds))
               + " --methods " + " ".join(args.methods)
               + (f" --samples {args.samples}" if args.samples != SAMPLES else "")
               + (f" --epochs {args.epochs}" if args.epochs else ""))
    path = report.write(command)
    print(report.to_markdown(command))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
