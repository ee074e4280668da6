"""Anytime fronts offline: every early-stopping rule on the same recorded learning curves.

Given N epochs of compute, which rule gives the best size-vs-accuracy front? Each
simulated search (a *draw*) takes the recorded curves of one recording seed
(``bench/scheduler_sim.py --record``) in a random order, one configuration per
width first as kdtune's searcher enqueues them, and every method works through
that same stream with the same two workers and the same epoch timings
(:func:`scheduler_sim.simulate`), starting new configurations until it has spent
the reference's epochs. A method that stops trials early samples more
configurations than were recorded per seed; the pool is then drawn again in a
new order (sampling with replacement from the recorded configurations). The reference is random search running the stream's
first 40 configurations to their full budget (the search-efficiency
benchmark's reference); its epochs are the budget, 100%.

For each method and draw, every trial that completes its full budget is an
event (epochs spent so far, params, val_acc). From the events:

* **anytime curve**: hypervolume of the front of the completed trials at
  each budget, as a ratio to the reference's final hypervolume (one reference
  point per task: 2 × the largest recorded student, accuracy 0; HV in (log10
  params, accuracy) as :func:`kdtune.analysis.front_hypervolume`);
* **area** under that curve from 5% to 100% of the budget (normalised by the
  width of the interval), with a paired bootstrap CI over draws for kdtune's
  default minus corrected MOASHA;
* **accuracy regret per size**: for every size of the space, the reference's
  best full-budget accuracy at that size or smaller minus the method's; worst
  and mean over sizes;
* **the hindsight ceiling at 10% of the budget** (the issue's target budget),
  which pays for only a few full runs: the HV of the best 1, 2, … of them chosen
  with hindsight from the recorded pool (:func:`hindsight_ceiling`).

Random sampling only: offline replay cannot include TPE (it needs the live
results to choose the next configuration), so the stream is the same for every
method.

    python bench/anytime.py --draws 300                                    # digits MLP
    python bench/anytime.py --curves results/bench/digits_cnn_curves.jsonl --task digits_cnn
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import common
import numpy as np
from scheduler_sim import DEFAULT_CURVES, WORKERS, load_curves, simulate

common.make_kdtune_importable()

SAMPLES = 40  # configurations of the reference (random search run to the end)
GRID = np.linspace(0.01, 1.0, 100)  # budgets, as fractions of the reference's epochs
AREA_FROM = 0.05
REPEAT_UP_TO = 3000  # configurations per stream (the recorded pool repeated in new orders)
KDTUNE, MOASHA = "kdtune default (pareto_asha)", "MOASHA, corrected"
RULE_2_ON = "pareto_asha with rule 2 (hv_epsilon 0.04), the former default"

Event = tuple[int, float, float]  # (epochs spent when the trial completed, params, val_acc)


# --------------------------------------------------------------------------- metrics (pure)


def hv_at_budgets(events: Sequence[Event], budgets: Sequence[float], reference: float) -> np.ndarray:
    """Hypervolume of the front of the trials completed within each budget (0 where none)."""
    from kdtune.analysis import front_hypervolume

    out = []
    for budget in budgets:
        points = [(params, acc) for spent, params, acc in events if spent <= budget]
        out.append(front_hypervolume(points, reference) if points else 0.0)
    return np.array(out)


def counted(grid: np.ndarray = GRID, start: float = AREA_FROM) -> np.ndarray:
    """Which budgets of ``grid`` the area and the comparisons count: those from ``start`` on."""
    return np.asarray(grid) >= start - 1e-12


def area(curve: np.ndarray, grid: np.ndarray = GRID, start: float = AREA_FROM) -> float:
    """Mean height of ``curve`` over [start, grid[-1]] (trapezoids on the grid points inside)."""
    inside = counted(grid, start)
    x, y = grid[inside], curve[inside]
    return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)) / (x[-1] - x[0]))


def best_at_or_below(points: Sequence[tuple[float, float]], sizes: Sequence[float]) -> np.ndarray:
    """For each size, the best accuracy among ``points`` (params, acc) no larger (NaN if none)."""
    return np.array([max((acc for params, acc in points if params <= size), default=math.nan) for size in sizes])


def regret_per_size(method: Sequence[tuple[float, float]], reference: Sequence[tuple[float, float]],
                    sizes: Sequence[float]) -> np.ndarray:
    """Reference's best accuracy at each size or smaller minus the method's (a method
    with nothing at or below a size counts 0 there); NaN where the reference has nothing."""
    ref = best_at_or_below(reference, sizes)
    got = np.nan_to_num(best_at_or_below(method, sizes), nan=0.0)
    return ref - got


def hindsight_ceiling(pool: Sequence[tuple[float, float]], trials: int, reference_size: float) -> float:
    """The largest hypervolume that ``trials`` full-budget trials can reach when chosen with
    hindsight from ``pool`` ((params, final val_acc) of every recorded configuration): the
    best configuration of each size, in the best subset of at most ``trials`` sizes.

    No rule can do better within a budget that pays for only ``trials`` full runs, and one
    that also explores pays for that out of the same runs."""
    import itertools

    from kdtune.analysis import front_hypervolume

    best: dict[float, float] = {}
    for params, acc in pool:
        best[float(params)] = max(best.get(float(params), -math.inf), float(acc))
    choices = list(best.items())
    return max((front_hypervolume(list(subset), reference_size)
                for subset in itertools.combinations(choices, min(trials, len(choices)))), default=0.0)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int = 10000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``a − b`` over paired draws and its 95% percentile bootstrap interval."""
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)
    return float(diff.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def hv_lost_by_size(method: Sequence[tuple[float, float]], reference: Sequence[tuple[float, float]],
                    sizes: Sequence[float], reference_size: float) -> np.ndarray:
    """Where a front's hypervolume falls short of the reference's, size by size, as shares
    of the reference's hypervolume: for each size, (the reference's best accuracy at that
    size or smaller − the method's, 0 where it has none) × the width in log10 params of the
    slab that size owns (up to the next size, the last one up to ``reference_size``).
    With discrete ``sizes`` holding every point's size the shares sum to 1 − the HV ratio."""
    from kdtune.pareto import front_hypervolume

    edges = np.log10([*sizes, reference_size])
    ref = np.nan_to_num(best_at_or_below(reference, sizes), nan=0.0)
    got = np.nan_to_num(best_at_or_below(method, sizes), nan=0.0)
    return (ref - got) * np.diff(edges) / front_hypervolume(reference, reference_size)


def median_bootstrap(values: Sequence[float], resamples: int = 10000, seed: int = 0) -> tuple[float, float, float]:
    """Median of ``values`` (one per seed) and its 95% percentile bootstrap interval: how
    far the median of this many seeds can move, before calling a target met or missed by it."""
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    medians = np.median(values[rng.integers(0, len(values), size=(resamples, len(values)))], axis=1)
    return float(np.median(values)), float(np.quantile(medians, 0.025)), float(np.quantile(medians, 0.975))


def budgets_behind(curve: np.ndarray, other: np.ndarray, grid: np.ndarray = GRID,
                   start: float = AREA_FROM) -> list[float]:
    """The budgets of ``grid`` from ``start`` on at which ``curve`` lies below ``other``
    (e.g. the median HV of one method against another's)."""
    return [float(x) for x, a, b, inside in zip(grid, curve, other, counted(grid, start)) if inside and a < b]


def spans(points: Sequence[float], step: float = GRID[1] - GRID[0]) -> str:
    """Budgets (fractions) as runs of consecutive grid points: [0.1, 0.11, 0.12, 0.3] → "10–12%, 30%"."""
    runs: list[list[float]] = []
    for x in points:
        if runs and x - runs[-1][-1] <= step * 1.5:
            runs[-1].append(x)
        else:
            runs.append([x])
    return ", ".join(f"{r[0]:.0%}" if len(r) == 1 else f"{r[0] * 100:.0f}–{r[-1]:.0%}" for r in runs) or "none"


# --------------------------------------------------------------------------- rules not in kdtune


class RunToEnd:
    """No early stopping: every trial runs its full budget."""

    milestones: list[int] = []

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        return "CONTINUE"


class StockASHA:
    """ASHA on one metric over all trials (Ray's ASHAScheduler's rule: keep the top 1/η)."""

    def __init__(self, max_t: int, metric: str = "val_acc", mode: str = "max", reduction_factor: float = 3) -> None:
        from kdtune.scheduler import HalvingRungs, rung_milestones

        self.max_t, self.metric = max_t, metric
        self.milestones = rung_milestones(1, max_t, reduction_factor)
        self.rungs = HalvingRungs(self.milestones, reduction_factor, mode)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        if result["epoch"] >= self.max_t:
            return "CONTINUE"
        return self.rungs.on_result(trial.trial_id, int(result["epoch"]), result[self.metric])


def hyperband(configs: list[dict[str, Any]], max_t: int, budget: int, reduction_factor: int = 3,
              metric: str = "val_acc", completed: list[int] | None = None) -> list[Event]:
    """Synchronous Hyperband on accuracy (Li et al. 2018), brackets s = s_max..0 repeated
    until ``budget`` epochs are spent: bracket s starts n = ⌈(s_max+1)/(s+1)·η^s⌉
    configurations at max_t·η^−s epochs and keeps the top 1/η at each rung; paused
    trials resume where they stopped. Configurations come from ``configs`` in order;
    ``completed`` receives the index in ``configs`` of each trial that completes."""
    s_max = int(round(math.log(max_t) / math.log(reduction_factor)))
    spent, events, nxt, s = 0, [], 0, s_max
    while spent < budget and nxt < len(configs):
        n = math.ceil((s_max + 1) / (s + 1) * reduction_factor**s)
        bracket, first = configs[nxt:nxt + n], nxt
        nxt += n
        trained = [0] * len(bracket)
        alive = list(range(len(bracket)))
        for i in range(s + 1):
            epochs = int(round(max_t * reduction_factor ** (i - s)))
            for k in alive:
                spent += epochs - trained[k]
                trained[k] = epochs
                if epochs >= max_t:
                    events.append((spent, float(bracket[k]["params"]), bracket[k]["val_acc"][-1]))
                    if completed is not None:
                        completed.append(first + k)
            if epochs >= max_t:
                break
            keep = max(1, len(alive) // reduction_factor)
            alive = sorted(alive, key=lambda k: -bracket[k][metric][epochs - 1])[:keep]
        s = s - 1 if s > 0 else s_max
    return events


def methods(max_t: int, params_range: tuple[float, float]) -> dict[str, Callable[[], Any] | None]:
    """The methods compared (name → scheduler factory; None: Hyperband, simulated synchronously)."""
    from moasha import MOASHARule

    from kdtune.scheduler import ParetoASHA, SizeAwareASHA

    return {
        "random, full budget (reference)": RunToEnd,
        KDTUNE: lambda: ParetoASHA(max_t=max_t),
        "pareto_asha, rule 1 as before (contrast)": lambda: _old_rule_1(ParetoASHA(max_t=max_t, hv_epsilon=0.04)),
        RULE_2_ON: lambda: ParetoASHA(max_t=max_t, hv_epsilon=0.04),
        "size_aware_asha": lambda: SizeAwareASHA(max_t=max_t),
        "stock ASHA on val_acc": lambda: StockASHA(max_t),
        "Hyperband on val_acc (synchronous)": None,
        MOASHA: lambda: MOASHARule(max_t, params_range, corrected=True),
        "MOASHA, as shipped (contrast)": lambda: MOASHARule(max_t, params_range, corrected=False),
    }


def _old_rule_1(scheduler: Any) -> Any:
    """The ParetoASHA of before this change: rule 1 stops any trial that a trial with at
    most as many parameters beats, and rule 2 has no min_gain guard."""
    rungs = scheduler.rungs
    rungs.outranked = rungs.dominated
    rungs.min_gain = math.inf
    return scheduler


# --------------------------------------------------------------------------- the replay


def streams(curves: list[dict[str, Any]], draws: int) -> list[list[dict[str, Any]]]:
    """One configuration stream per draw: a recording seed's curves in a random order, one
    per width first (as kdtune's searcher enqueues them)."""
    by_seed: dict[int, list[dict[str, Any]]] = {}
    for row in curves:
        by_seed.setdefault(row["seed"], []).append(row)
    seeds = sorted(by_seed)
    out = []
    for draw in range(draws):
        pool = by_seed[seeds[draw % len(seeds)]]
        rng = np.random.default_rng(draw)
        shuffled = [pool[i] for i in rng.permutation(len(pool))]
        widths = sorted({c["width"] for c in shuffled})
        first = [next(c for c in shuffled if c["width"] == w) for w in widths]
        stream = first + [c for c in shuffled if all(c is not f for f in first)]
        # Early stopping spends a few epochs per configuration, so a method may sample more
        # configurations than were recorded: the pool is then drawn again, in a new order.
        while len(stream) < REPEAT_UP_TO:
            stream += [pool[i] for i in rng.permutation(len(pool))]
        out.append(stream)
    return out


def replay(curves: list[dict[str, Any]], draws: int, only: str = "",
           extra: dict[str, Callable[[], Any]] | None = None) -> dict[str, Any]:
    """Run every method on every draw, and the ``extra`` ones (name → scheduler factory); returns
    the events and the derived metrics."""
    max_t = len(curves[0]["val_acc"])
    params = [float(c["params"]) for c in curves]
    reference_size = 2.0 * max(params)
    sizes = sorted(set(params))
    budget = SAMPLES * max_t
    made = methods(max_t, (min(params), max(params))) | dict(extra or {})
    # The shipped MOASHA sorts every rung with Syne Tune's O(n²) loops (about a minute per
    # draw): it runs only when asked for by name (--only shipped).
    names = [n for n in made if (only in n if only else "shipped" not in n) or n.startswith("random")
             or n in (KDTUNE, MOASHA) or n in (extra or {})]
    out: dict[str, Any] = {"max_t": max_t, "budget": budget, "sizes": sizes, "draws": draws,
                           "curves": {n: [] for n in names}, "regret": {n: [] for n in names},
                           "regret10": {n: [] for n in names}, "spent": {n: [] for n in names}, "ref_best": [],
                           "ceiling10": [], "early10": {n: [] for n in names}}
    # Full runs that 10% of the budget pays for (the target's budget): at most this many
    # trials can have completed by then, whatever the rule.
    out["full_runs10"] = int(0.10 * budget // max_t)
    pools = {seed: [(float(c["params"]), c["val_acc"][-1]) for c in curves if c["seed"] == seed]
             for seed in {c["seed"] for c in curves}}
    for draw, stream in enumerate(streams(curves, draws)):
        reference = [(float(c["params"]), c["val_acc"][-1]) for c in stream[:SAMPLES]]
        ref_hv = hv_at_budgets([(0, *p) for p in reference], [0], reference_size)[0]
        out["ref_best"].append(best_at_or_below(reference, sizes))
        pool = pools[stream[0]["seed"]]  # the recording seed the draw's stream comes from
        out["ceiling10"].append([hindsight_ceiling(pool, k, reference_size) / ref_hv
                                 for k in range(1, out["full_runs10"] + 1)])
        for name in names:
            if made[name] is None:
                order: list[int] = []
                events = hyperband(stream, max_t, budget, completed=order)
                spent = events[-1][0] if events else 0
            else:
                events, order = [], []
                spent, _ = simulate(stream, made[name](), max_t, np.random.default_rng(draw), budget, events, order)
            curve = hv_at_budgets(events, GRID * budget, reference_size) / ref_hv
            out["curves"][name].append(curve)
            out["spent"][name].append(spent / budget)
            # Completions by 10% of the budget, and how many of them are among the first
            # 2 × WORKERS configurations the stream starts (before rungs hold peers).
            early = [index for (spent_then, _, _), index in zip(events, order) if spent_then <= 0.10 * budget]
            out["early10"][name].append((len(early), sum(index < 2 * WORKERS for index in early)))
            for key, share in (("regret", 1.0), ("regret10", 0.10)):
                done = [(p, a) for s, p, a in events if s <= share * budget]
                out[key][name].append(regret_per_size(done, reference, sizes))
    return out


def sizes_beyond_spread(regret: np.ndarray, spread: np.ndarray, sizes: Sequence[float]) -> str:
    """The sizes whose median regret over the draws exceeds the reference's draw-to-draw spread
    at that size: "none", or "k of n: size, size"."""
    beyond = [size for size, r, s in zip(sizes, np.nanmedian(regret, axis=0), spread) if r > s]
    return "none" if not beyond else f"{len(beyond)} of {len(sizes)}: " + ", ".join(f"{s:,.0f}" for s in beyond)


def summarise(out: dict[str, Any]) -> tuple[list[list[Any]], tuple[float, float, float], np.ndarray]:
    """Table rows per method, the paired bootstrap of the area difference (kdtune − MOASHA),
    and the reference's draw-to-draw spread (std) of its best accuracy at each size or smaller."""
    spread = np.nanstd(np.array(out["ref_best"]), axis=0)
    rows = []
    areas = {n: np.array([area(c) for c in curves]) for n, curves in out["curves"].items()}
    for name, curves in out["curves"].items():
        c = np.array(curves)
        at = {f: np.median(c[:, int(round(f * 100)) - 1]) for f in (0.05, 0.10, 0.25, 1.0)}
        reach = [next((GRID[i] for i in range(len(GRID)) if row[i] >= 0.97), math.nan) for row in c]
        regret, regret10 = np.array(out["regret"][name]), np.array(out["regret10"][name])
        rows.append([name, float(np.median(areas[name])), at[0.05], at[0.10], at[0.25], at[1.0],
                     float(np.nanmedian(reach)) if not all(map(math.isnan, reach)) else math.nan,
                     float(np.median(np.nanmax(regret10, axis=1))), float(np.median(np.nanmax(regret, axis=1))),
                     float(np.median(np.nanmean(regret, axis=1))), sizes_beyond_spread(regret, spread, out["sizes"])])
    boot = paired_bootstrap(areas[KDTUNE], areas[MOASHA])
    return rows, boot, spread


def plot(out: dict[str, Any], path: Path, title: str) -> None:
    """Median anytime curve per method with the 25–75% band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, curves in out["curves"].items():
        c = np.array(curves)
        style = "--" if "contrast" in name else "-"
        line, = ax.plot(GRID * 100, np.median(c, axis=0), style, label=name)
        ax.fill_between(GRID * 100, np.quantile(c, 0.25, axis=0), np.quantile(c, 0.75, axis=0),
                        color=line.get_color(), alpha=0.12)
    ax.axhline(0.97, color="grey", lw=0.6, ls=":")
    ax.axvline(10, color="grey", lw=0.6, ls=":")
    ax.set_xscale("log")
    finish_anytime_plot(fig, ax, path, "epochs spent, % of the reference's (random search, 40 configurations "
                        "to the end)", "hypervolume of completed trials / reference's final", title, legend_size=7)


def finish_anytime_plot(fig, ax, path: Path, xlabel: str, ylabel: str, title: str, legend_size: int = 8) -> None:
    """The common end of an anytime-HV plot: the HV-ratio range, labels, legend, saved to ``path``."""
    ax.set_ylim(0.5, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=legend_size, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--curves", type=Path, default=DEFAULT_CURVES)
    parser.add_argument("--task", default="digits")
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--only", default="", help="substring of the method names to run (plus the reference, "
                                                   "kdtune's default and corrected MOASHA)")
    args = parser.parse_args()
    curves = load_curves(args.curves)
    out = replay(curves, args.draws, args.only)
    rows, boot, spread = summarise(out)
    print(f"{args.task}: {len(curves)} recorded configurations ({out['max_t']} epochs), {args.draws} draws, "
          f"budget {out['budget']} epochs = 100%\n")
    print(common.markdown_table(
        ["method", "area 5–100% (median)", "HV @5%", "HV @10%", "HV @25%", "HV @100%", "first budget with HV ≥ 0.97 (median of the draws that reach it)",
         "worst regret @10%", "worst regret @100%", "mean regret @100%",
         "sizes whose median regret @100% exceeds the spread there"], rows))
    print(f"\narea(kdtune default) − area(MOASHA corrected), paired over draws: {boot[0]:+.4f} "
          f"(95% bootstrap CI {boot[1]:+.4f} to {boot[2]:+.4f})")
    print("draw-to-draw spread (std) of the reference's best accuracy at each size or smaller: "
          + ", ".join(f"{size:,.0f}: {s:.4f}" for size, s in zip(out["sizes"], spread)))
    ceiling = np.median(np.array(out["ceiling10"]), axis=0)
    print(f"10% of the budget pays for {out['full_runs10']} full runs of {out['max_t']} epochs; the HV (median ratio "
          f"to the reference's final) of the best 1..{out['full_runs10']} configurations chosen with hindsight from the "
          f"draw's recorded pool: " + ", ".join(f"{c:.3f}" for c in ceiling))
    print(f"trials completed by 10% of the budget (mean per draw), and the share of them that are among the first "
          f"{2 * WORKERS} configurations the draw's stream starts ({WORKERS} workers):")
    for name, early in out["early10"].items():
        done, first = np.array(early).sum(axis=0)
        print(f"- {name}: {done / len(early):.2f}, {first / done if done else math.nan:.0%}")
    path = common.RESULTS_DIR / f"anytime_{args.task}.png"
    plot(out, path, f"{args.task}: anytime fronts, {args.draws} draws (median, 25–75%)")
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
