"""Benchmark 1 (headline): front quality per epoch spent, against running everything.

On the default digits task (search_spaces/digits.yaml, no baselines), with the
same number of sampled configurations per method and the same seed per repeat:

(a) random sampling, every trial run to its full budget — the reference;
(b) Ray Tune's stock ASHA on accuracy with single-objective Optuna TPE;
(c) kdtune's default (multi-objective TPE over accuracy and params, Pareto
    halving: ``early_stopping.rule: pareto_asha``, see :mod:`kdtune.scheduler`);
(d) the same with size-aware ASHA (``early_stopping.rule: size_aware_asha``),
    which spends more epochs for the same front but runs more trials to the end
    (more evidence for choosing T).

Quality is the hypervolume of the validation (params, val_acc) front of the
trials that ran their full budget (``kdtune.analysis.hypervolume`` in
(log10 params, accuracy) space), with one reference point for every method:
(2 × the largest student the space allows, accuracy 0). Cost is the total
number of epochs trained (Σ epochs_run). Both are reported as ratios to (a)
of the same repeat.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import common
from common import Report, markdown_table, median, ratio

HV_TARGET = 0.97
EPOCH_TARGET = 0.15
OFFLINE_STOCK_ASHA = 0.14  # measured offline on recorded curves (ray-optuna-facts.md)

METHODS: dict[str, dict[str, Any]] = {
    # The peers draw every configuration at random, first trials included (kdtune's default puts
    # each width's first trial at the middle of the ranges: sampler.first_trials).
    "random, full budget (reference)": {"sampler": {"name": "random", "first_trials": "random"},
                                        "early_stopping": {"rule": "none"}},
    "stock ASHA + TPE on val_acc": {"sampler": {"name": "tpe", "objectives": ["val_acc"], "first_trials": "random"},
                                    "early_stopping": {"rule": "asha"}},
    "kdtune default (pareto_asha)": {},
    "kdtune size_aware_asha": {"early_stopping": {"rule": "size_aware_asha"}},
    # Rule 2 of pareto_asha on, as the default had it until issue 13's anytime curves: what the
    # hypervolume bound saves here (bench/anytime.py shows what it costs).
    "pareto_asha with rule 2 (hv_epsilon 0.04), the former default": {"early_stopping": {"hv_epsilon": 0.04}},
    # TPE choosing the width as well, as the default did until the live comparison with MOASHA
    # (bench/moasha_live.py) showed it crowding the smallest width.
    "pareto_asha, TPE choosing the width too (the former default)": {"sampler": {"balance_sizes": False}},
}
REFERENCE, STOCK, KDTUNE, SIZE_AWARE, RULE_2_ON, WIDTH_BY_TPE = list(METHODS)


def params_range(spec) -> tuple[int, int]:
    """Parameters of the smallest and the largest student the spec's space allows."""
    from kdtune.models import build_model, count_parameters
    from kdtune.search import load_spec_data
    from kdtune.spec import possible_values

    data = load_spec_data(spec)
    widths = [float(w) for w in possible_values(spec.space.width)]
    return tuple(count_parameters(build_model(spec.student.family, data.input_shape, data.num_classes, width,
                                              **spec.student.options)) for width in (min(widths), max(widths)))


def max_params(spec) -> int:
    """Parameters of the largest student the spec's space allows (the reference point's size)."""
    return params_range(spec)[1]


def front_hypervolume(trials, reference: tuple[float, float]) -> float:
    """Hypervolume of the completed search trials' front; 0 when no trial completed."""
    from kdtune.analysis import hypervolume
    from kdtune.errors import ResultsError

    try:
        return hypervolume(trials, size="params", score="val_acc", reference=reference)
    except ResultsError:
        return 0.0


def run(quick: bool = False) -> Report:
    """Run the search-efficiency benchmark and return its report."""
    from kdtune.analysis import pareto_front
    from kdtune.errors import ResultsError
    from kdtune.search import max_epochs
    from kdtune.spec import possible_values

    report = Report("search_efficiency", "Search efficiency: front hypervolume vs epochs spent", quick=quick)
    samples = 27 if quick else 40
    repeats = 1 if quick else 3
    root = Path(tempfile.mkdtemp(prefix="kdtune-bench-efficiency-"))
    teachers = common.shared_teachers()
    base = {"baselines": False, "num_samples": samples}
    default = common.digits_spec(base)
    reference_point = (2.0 * max_params(default), 0.0)
    widths, budget = len(possible_values(default.space.width)), max_epochs(default)

    rows, per_method = [], {m: {"hv": [], "epochs": []} for m in METHODS}
    for repeat in range(repeats):
        seed = repeat
        measured: dict[str, dict[str, Any]] = {}
        for index, (method, overrides) in enumerate(METHODS.items()):
            spec = common.digits_spec(common.deep_merge({**base, "seed": seed}, overrides))
            result, wall = common.timed_search(spec, root, f"eff-s{seed}-m{index}", teachers)
            trials = result.trials[result.trials["phase"] == "search"]
            completed = trials[trials["status"] == "completed"]
            try:
                front = len(pareto_front(trials))
            except ResultsError:
                front = 0
            measured[method] = {
                "hv": front_hypervolume(trials, reference_point), "epochs": int(trials["epochs_run"].sum()),
                "completed": len(completed), "widths": sorted({int(w) for w in completed["width"].dropna()}),
                "front": front, "wall": wall, "trials": len(trials),
            }
        ref = measured[REFERENCE]
        for method, m in measured.items():
            hv_ratio, epoch_ratio = ratio(m["hv"], ref["hv"]), ratio(m["epochs"], ref["epochs"])
            per_method[method]["hv"].append(hv_ratio)
            per_method[method]["epochs"].append(epoch_ratio)
            rows.append([seed, method, m["trials"], m["completed"], " ".join(map(str, m["widths"])) or "-", m["front"],
                         m["hv"], hv_ratio, m["epochs"], epoch_ratio, m["wall"]])

    summary = [[method, median(v["hv"]), min(v["hv"]), max(v["hv"]), median(v["epochs"]), min(v["epochs"]),
                max(v["epochs"]), ratio(median(v["hv"]), median(v["epochs"]))] for method, v in per_method.items()]
    report.add(
        f"Summary over {repeats} repeat(s) (seeds 0..{repeats - 1}), {samples} configurations per method",
        f"Reference point (params, val_acc) = ({reference_point[0]:,.0f}, 0.0), shared by every method; HV in "
        f"(log10 params, val_acc) space. Ratios are to the reference method of the same repeat.\n\n"
        + markdown_table(["method", "HV ratio (median)", "min", "max", "epoch ratio (median)", "min", "max",
                          "HV ratio ÷ epoch ratio"], summary),
    )
    report.add(
        "Per repeat",
        f"completed = trials that ran their full {budget}-epoch budget (only these form the front); widths = the widths "
        "among them; front = points on the validation front; wall = the search() call (informational: the machine "
        "is shared).\n\n"
        + markdown_table(["seed", "method", "trials", "completed", "widths completed", "front", "HV", "HV ratio",
                          "epochs", "epoch ratio", "wall s"], rows),
    )
    for method in (KDTUNE, SIZE_AWARE):
        kd_hv, kd_ep = median(per_method[method]["hv"]), median(per_method[method]["epochs"])
        report.target(f"{method} keeps ≥ {HV_TARGET} of the reference hypervolume (median over repeats)",
                      f"{kd_hv:.3f} (per repeat: {', '.join(f'{v:.3f}' for v in per_method[method]['hv'])})",
                      kd_hv >= HV_TARGET)
        report.target(f"… for ≤ {EPOCH_TARGET:.0%} of the reference's epochs (median over repeats)",
                      f"{kd_ep:.1%} (per repeat: {', '.join(f'{v:.1%}' for v in per_method[method]['epochs'])})",
                      kd_ep <= EPOCH_TARGET)
    st_hv = median(per_method[STOCK]["hv"])
    report.notes.append(
        f"Stock ASHA on accuracy kept {st_hv:.3f} of the reference hypervolume here "
        f"(offline estimate from recorded curves: ~{OFFLINE_STOCK_ASHA}) for {median(per_method[STOCK]['epochs']):.1%} "
        f"of its epochs.")
    report.notes.append(
        "Halving here is asynchronous: which trial reaches a rung first depends on timing, so the epochs a method "
        "spends (and, less often, its front) vary from run to run with the same seeds.")
    grace = default.early_stopping.grace_period
    report.notes.append(
        f"What the epoch share is made of: every trial runs at least its first rung ({grace} of {budget} epochs: "
        f"{grace / budget:.1%} of the reference's epochs in all), each full-budget trial costs 1/{samples} = "
        f"{1 / samples:.1%}, and the first trials (the searcher enqueues one per width, {widths} of them) find "
        f"little or nothing to compare with at their rungs, so the first small students usually run to the end. "
        f"Offline replays of the early-stopping rules on recorded curves: bench/scheduler_sim.py.")
    return report
