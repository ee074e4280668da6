"""Sweep the knobs of kdtune's default early-stopping rule (pareto_asha) on recorded curves.

Each variant of ``ParetoASHA`` (reduction factor η, ``hv_epsilon``, ``min_gain``) is
replayed twice on the same recorded learning curves: in the anytime view of
``bench/anytime.py`` (the front's hypervolume against epochs spent, regret per size)
and in the 40-configuration view of ``bench/scheduler_sim.py`` (hypervolume and epoch
share against the same 40 configurations run to the end). Random sampling only, as in
both. Issue 13 asks whether any setting reaches ≥ 0.97 of the reference's hypervolume
at ≤ 10% of its epochs; this is the evidence.

    python bench/rule_sweep.py --curves results/bench/digits_curves_120.jsonl \\
        --eta 2,3,4 --hv-epsilon 0.04,0.08 --min-gain 0.01,0.02 --draws 30
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import common

common.make_kdtune_importable()

import anytime  # noqa: E402
import scheduler_sim  # noqa: E402


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--curves", type=Path, default=anytime.DEFAULT_CURVES)
    parser.add_argument("--eta", type=floats, default=[2.0, 3.0, 4.0])
    parser.add_argument("--hv-epsilon", type=floats, default=[0.04, 0.08])
    parser.add_argument("--min-gain", type=floats, default=[0.01, 0.02])
    parser.add_argument("--draws", type=int, default=30, help="anytime draws (the 40-configuration view takes 200)")
    args = parser.parse_args()

    from kdtune.scheduler import ParetoASHA

    curves = anytime.load_curves(args.curves)
    max_t = len(curves[0]["val_acc"])
    variants = {
        f"pareto_asha η={eta:g}, ε={eps:g}, min_gain={gain:g}":
            (lambda eta=eta, eps=eps, gain=gain:
             ParetoASHA(max_t=max_t, reduction_factor=eta, hv_epsilon=eps, min_gain=gain))
        for eta, eps, gain in itertools.product(args.eta, args.hv_epsilon, args.min_gain)
    }
    out = anytime.replay(curves, args.draws, only=anytime.KDTUNE, extra=variants)  # + the reference and MOASHA
    rows, _, _ = anytime.summarise(out)
    fixed = {name: scheduler_sim.evaluate(lambda t, make=make: make(), curves, draws=200)
             for name, make in variants.items()}
    fixed[anytime.KDTUNE] = scheduler_sim.evaluate(lambda t: ParetoASHA(max_t=t), curves, draws=200)
    table = []
    for row in rows:
        name, area, hv10, hv100, worst, mean, beyond = row[0], row[1], row[3], row[5], row[8], row[9], row[10]
        f = fixed.get(name)
        table.append([name, area, hv10, hv100, worst, mean, beyond]
                     + ([f["hv"], f["epochs"], f["both"]] if f else ["–"] * 3))
    print(f"{len(curves)} recorded configurations ({max_t} epochs), {args.draws} anytime draws, "
          "200 draws of 40 configurations\n")
    print(common.markdown_table(
        ["rule", "anytime area 5–100%", "HV @10%", "HV @100%", "worst regret @100%", "mean regret @100%",
         "sizes whose median regret exceeds the spread",
         "40 configs: HV ratio", "40 configs: epoch share", "P(HV ≥ 0.97 and epochs ≤ 15%)"], table))


if __name__ == "__main__":
    main()
