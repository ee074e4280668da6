"""Does the distillation method matter more than the temperature? Two races per task (issue 18).

    PYTHONPATH=. python bench/methods_race.py [--spec search_spaces/digits.yaml] [--results DIR]

1. **Vanilla KD.** The spec as shipped (method ``kd``) is searched, then
   ``kdtune best-t --race`` races the temperature at each size on its front:
   KD's best T per size, and how far apart the temperatures are.
2. **Every method.** The same spec with ``method: {choice: [kd, dkd, dist]}``
   (DKD's β searched over [1, 10], the other weights at their published
   defaults) is searched, then ``best-t --race --param soft_loss`` races the
   methods at each size's best trial (its T, α, lr, ...), the no-distillation
   baseline included.

Both races use the same seeds (``spec.seed + 2000 + round``, common random
numbers across the two studies as within each), so per size the best method of
race 2 is compared, paired by round, with vanilla KD at its best T from race 1:
mean difference and 95% t-interval. The summary states per size whether the
method matters beyond T: the spread of means across temperatures (race 1)
against the spread across methods (race 2), and whether the best method's
interval against KD at its best T excludes zero.

Not part of ``make bench`` (about 10 minutes on 2 cores for digits). Writes
results/bench/methods_race.md.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import Report, markdown_table  # noqa: E402

METHODS_SPACE = {"method": {"choice": ["kd", "dkd", "dist"]}, "dkd_beta": {"loguniform": [1.0, 10.0]}}


def _spec_dict(path: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(path.read_text())


def _write(spec: dict[str, Any], folder: Path) -> Path:
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{spec['study']}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def search_and_race(spec: dict[str, Any], results: Path, param: str, widths: list[float] | None,
                    log: Any) -> tuple[Path, float]:
    """Search ``spec`` (resuming a finished study is a no-op) and race ``param``; the study and seconds."""
    from kdtune.search import search
    from kdtune.search.race import run_race
    from kdtune.study import RACE_TABLE, load_records

    started = time.perf_counter()
    study = results / spec["study"]
    spec_path = _write(spec, results / "specs")
    if not (study / "trials.parquet").exists():
        search(spec_path, results_root=results, log=log)
    if not (study / RACE_TABLE).exists():  # a race cut short continues from its records
        run_race(study, param=param, widths=widths, resume=bool(load_records(study, "race")), log=log)
    return study, time.perf_counter() - started


def round_scores(study: Path) -> dict[tuple[float, str], dict[int, float]]:
    """(size, contender as text) → round → score, from the race's records."""
    from kdtune.search.race import run_score
    from kdtune.study import load_records
    from kdtune.tables import epoch_rows

    scores: dict[tuple[float, str], dict[int, float]] = {}
    for record in load_records(study, "race").values():
        race = (record.get("config") or {}).get("race")
        if not race:
            continue
        rows = epoch_rows(list(record.get("results") or []))
        score = run_score(rows[-1] if rows else None, record.get("ray_status") == "ERROR")
        scores.setdefault((float(race["size"]), str(race["contender"])), {})[int(race["round"])] = score
    return scores


def paired_ci(a: dict[int, float], b: dict[int, float]) -> tuple[float, float, float, int]:
    """Mean of a − b over the rounds both ran, with a 95% t-interval, and how many rounds."""
    import numpy as np
    from scipy import stats

    common_rounds = sorted(set(a) & set(b))
    diff = np.array([a[r] - b[r] for r in common_rounds])
    if len(diff) < 2:
        return (float(diff.mean()) if len(diff) else math.nan), math.nan, math.nan, len(diff)
    half = stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / math.sqrt(len(diff))
    return float(diff.mean()), float(diff.mean() - half), float(diff.mean() + half), len(diff)


def spread(contenders: Any, size: float) -> float:
    """Best minus worst mean among a size's distilling contenders (the baseline left out)."""
    rows = contenders[(contenders["width"] == size) & ~contenders["baseline"]]
    return float(rows["mean"].max() - rows["mean"].min()) if len(rows) else math.nan


def run(spec_path: Path, results: Path) -> Report:
    import pandas as pd

    from kdtune.study import RACE_CONTENDERS_TABLE, RACE_TABLE

    log = print
    base = _spec_dict(spec_path)
    kd_spec = {**base, "study": f"{base['study']}_kd"}
    kd_study, kd_s = search_and_race(kd_spec, results, "temperature", None, log)
    kd_best = pd.read_csv(kd_study / RACE_TABLE, dtype={"recommended": str})
    sizes = [float(w) for w in kd_best["width"]]
    all_spec = {**base, "study": f"{base['study']}_methods", "space": {**base["space"], **METHODS_SPACE}}
    trials_path = results / all_spec["study"] / "trials.parquet"
    widths = None
    if trials_path.exists():  # a rerun: race the sizes both studies completed
        done = pd.read_parquet(trials_path)
        widths = [w for w in sizes if w in set(done.loc[done["status"] == "completed", "width"])]
    all_study, all_s = search_and_race(all_spec, results, "soft_loss", widths, log)
    all_best = pd.read_csv(all_study / RACE_TABLE, dtype={"recommended": str})
    kd_contenders = pd.read_csv(kd_study / RACE_CONTENDERS_TABLE)
    all_contenders = pd.read_csv(all_study / RACE_CONTENDERS_TABLE)
    kd_scores, all_scores = round_scores(kd_study), round_scores(all_study)

    rows, verdicts = [], []
    for _, raced in all_best.iterrows():
        size = float(raced["width"])
        kd_row = kd_best[kd_best["width"] == size]
        methods = all_contenders[(all_contenders["width"] == size) & ~all_contenders["baseline"]]
        if kd_row.empty or methods.empty:
            continue
        best_t = kd_row["recommended"].iloc[0]
        kd_at_best_t = kd_scores.get((size, best_t), {})
        for _, method in methods.iterrows():
            diff, low, high, n = paired_ci(all_scores.get((size, str(method["contender"])), {}), kd_at_best_t)
            rows.append([f"{size:g}", method["contender"], f"{method['mean']:.4f}", int(method["n_seeds"]),
                         method["status"], f"{best_t}", f"{diff:+.4f} ({low:+.4f}, {high:+.4f})", n])
        t_spread, m_spread = spread(kd_contenders, size), spread(all_contenders, size)
        best_method = str(raced["recommended"])
        diff, low, high, _ = paired_ci(all_scores.get((size, best_method), {}), kd_at_best_t)
        beyond = not math.isnan(low) and (low > 0 or high < 0)
        verdicts.append([f"{size:g}", f"{t_spread:.4f}", f"{m_spread:.4f}", best_method,
                         f"{diff:+.4f} ({low:+.4f}, {high:+.4f})",
                         ("the method matters beyond T" if beyond else "no measurable gain over KD at its best T")
                         + ("; T matters more than the method" if t_spread > m_spread else
                            "; the method matters more than T")])
    report = Report("methods_race", f"Methods vs vanilla KD at its best T ({spec_path.name})")
    report.add("Each method at each size (race 2), against vanilla KD at its best T (race 1), paired by round",
               markdown_table(["width", "method", "mean val acc", "seeds", "status", "KD's best T",
                               "diff vs KD at best T (95% CI)", "paired rounds"], rows))
    report.add("Per size: does the method matter beyond T?",
               markdown_table(["width", "spread over T (race 1)", "spread over methods (race 2)", "best method",
                               "best method − KD at best T (95% CI)", "verdict"], verdicts))
    report.add("Wall time", markdown_table(["step", "s"], [["KD search + T race", kd_s],
                                                           ["methods search + method race", all_s]]))
    report.target("a verdict for every raced size", f"{len(verdicts)} of {len(all_best)} sizes",
                  len(verdicts) == len(all_best) and bool(verdicts))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=common.DEFAULT_SPEC)
    parser.add_argument("--results", type=Path, default=common.REPO / "results" / "methods_race")
    args = parser.parse_args()
    common.make_kdtune_importable()
    before, started = common.load_average(), time.perf_counter()
    report = run(args.spec, args.results.resolve())
    report.wall_s = time.perf_counter() - started
    report.load_before, report.load_after = before, common.load_average()
    command = f"python bench/methods_race.py --spec {args.spec.relative_to(common.REPO) if args.spec.is_absolute() else args.spec}"
    path = report.write(command, common.RESULTS_DIR)
    print(report.to_markdown(command))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
