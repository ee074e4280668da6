"""Does the distillation method matter more than the temperature? Two or three races per task (issue 18).

    PYTHONPATH=. python bench/methods_race.py [--spec search_spaces/digits.yaml] [--results DIR]

1. **Vanilla KD.** The spec as shipped (method ``kd``) is searched, then
   ``kdtune best-t --race`` races the temperature at each size on its front:
   KD's best T per size, and how far apart the temperatures are.
2. **Every method.** The same spec with ``method: {choice: [kd, dkd, dist]}``
   (DKD's β searched over [1, 10], the other weights at their published
   defaults) is searched over the sizes race 1 covered (with as many trials per
   size as the KD search had), then ``best-t --race --param soft_loss`` races the
   methods at each of those sizes that the search completed, at its best trial
   (its T, α, lr, ...), the no-distillation baseline included.

Both races use the same seeds (``spec.seed + 2000 + round``, common random
numbers across the two studies as within each), so per size the best method of
race 2 is compared, paired by round, with vanilla KD at its best T from race 1:
mean difference and 95% t-interval. The summary states per size whether the
method matters beyond T: the spread of means across temperatures (race 1)
against the spread across methods (race 2), and whether the best method's
interval against KD at its best T excludes zero.

3. **Published recipes** (``--recipes``). A copy of the KD study raced with
   ``best-t --race --param recipe``: kd, kd+standardize, dkd and dist as their
   papers' code trains them, at the same best trials and seeds as race 1, so each
   recipe is compared with KD at its best T paired by round.

On a costly task, ``--kd-study`` reuses a finished search of the spec as shipped
(e.g. the study of ``bench/real_task.py``: it is copied, then raced) and its
teacher cache; ``--widths`` searches and races only those sizes (the methods
search gets the same number of trials per size as the KD search had), ``--grid``
sets the number of temperatures raced and ``--max-seeds`` the rounds:

    PYTHONPATH=. python bench/methods_race.py --spec search_spaces/fashion_mnist.yaml \
        --kd-study results/real_task/fashion_mnist --widths 0.25 0.5 --grid 4 --max-seeds 6

The methods search scores validation only at its rungs and last epoch
(``early_stopping.validate_at: rungs``): the same decisions, less time.

Not part of ``make bench`` (about 80 seconds on a quiet 2-core machine for digits). Writes
results/bench/methods_race.md (``methods_race_<study>.md`` for another spec).
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

from kdtune.racing import DEFAULT_MAX_SEEDS  # noqa: E402

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
                    log: Any, grid: int = 8, max_seeds: int = DEFAULT_MAX_SEEDS) -> tuple[Path, float]:
    """Search ``spec`` and race ``param`` (:func:`searched`, then :func:`raced`); the study and seconds."""
    started = time.perf_counter()
    study = searched(spec, results, log)
    raced(study, param, widths, log, grid, max_seeds)
    return study, time.perf_counter() - started


def searched(spec: dict[str, Any], results: Path, log: Any) -> Path:
    """The study of ``spec`` under ``results``, searched: a finished search is skipped, and
    one cut short is resumed."""
    from kdtune.search import search
    from kdtune.study import META_FILE

    study = results / spec["study"]
    spec_path = _write(spec, results / "specs")
    if not (study / "trials.parquet").exists():
        search(spec_path, results_root=results, resume=(study / META_FILE).exists(), log=log)
    return study


def raced(study: Path, param: str, widths: list[float] | None, log: Any, grid: int = 8,
          max_seeds: int = DEFAULT_MAX_SEEDS) -> None:
    """Race ``param`` at ``widths`` (every size of the study's front if None); a race cut
    short continues from its records, a finished one is kept."""
    from kdtune.search.race import run_race
    from kdtune.study import RACE_TABLE, load_records

    if not (study / RACE_TABLE).exists():
        run_race(study, param=param, widths=widths, resume=bool(load_records(study, "race")), grid=grid,
                 max_seeds=max_seeds, log=log)


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


def reuse_study(source: Path, target: Path) -> None:
    """Copy a finished KD study (searched from the same spec) to ``target``, once."""
    import shutil

    if not (source / "trials.parquet").exists():
        raise SystemExit(f"--kd-study {source}: no finished study there (trials.parquet is missing)")
    if not target.exists():
        # Without its races (race/, records/race/, race_runs/) and evaluations: a study searched, not raced.
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("race", "race_runs", "final*.csv", ".lock"))


def methods_spec(base: dict[str, Any], widths: list[float] | None) -> dict[str, Any]:
    """The spec with the method searched; over ``widths`` only, with as many trials per size."""
    space = {**base["space"], **METHODS_SPACE}
    spec = {**base, "study": f"{base['study']}_methods", "space": space,
            "early_stopping": {**base.get("early_stopping", {}), "validate_at": "rungs"}}
    sizes = (base["space"].get("width") or {}).get("choice") if isinstance(base["space"].get("width"), dict) else None
    if widths and sizes:
        space["width"] = {"choice": [w for w in sizes if float(w) in widths]}
        spec["num_samples"] = max(1, round(base.get("num_samples", 40) * len(space["width"]["choice"]) / len(sizes)))
    return spec


def recipes_section(report: Report, base: dict[str, Any], results: Path, kd_study: Path, kd_best: Any,
                    kd_scores: dict, max_seeds: int, log: Any) -> float:
    """Race 3: every method's published recipe (``--param recipe``) at the KD study's best trial
    of each size, on a copy of that study, so the rounds share race 1's seeds and base configs;
    each recipe against KD at its best T, paired by round. Returns the seconds it took."""
    import pandas as pd

    from kdtune.core.objectives import RECIPE
    from kdtune.study import RACE_CONTENDERS_TABLE

    spec = {**base, "study": f"{base['study']}_recipes"}
    reuse_study(kd_study, results / spec["study"])
    sizes = [float(w) for w in kd_best["width"]]
    study, seconds = search_and_race(spec, results, RECIPE, sizes, log, max_seeds=max_seeds)
    contenders = pd.read_csv(study / RACE_CONTENDERS_TABLE)
    scores = round_scores(study)
    rows = []
    for _, entry in contenders.iterrows():
        size = float(entry["width"])
        best_t = kd_best.loc[kd_best["width"] == size, "recommended"].iloc[0]
        diff, low, high, n = paired_ci(scores.get((size, str(entry["contender"])), {}), kd_scores.get((size, best_t), {}))
        rows.append([f"{size:g}", entry["contender"], f"{entry['mean']:.4f}", int(entry["n_seeds"]),
                     entry.get("status", ""), f"{best_t}", f"{diff:+.4f} ({low:+.4f}, {high:+.4f})", n])
    report.add("Each method's published recipe (race 3, `--param recipe`), against vanilla KD at its best T "
               "(race 1), paired by round",
               markdown_table(["width", "recipe", "mean val acc", "seeds", "status", "KD's best T",
                               "diff vs KD at best T (95% CI)", "paired rounds"], rows))
    return seconds


def run(spec_path: Path, results: Path, kd_source: Path | None = None, widths: list[float] | None = None,
        grid: int = 8, max_seeds: int = DEFAULT_MAX_SEEDS, with_recipes: bool = False) -> Report:
    import pandas as pd

    from kdtune.spec import parse_spec
    from kdtune.study import RACE_CONTENDERS_TABLE, RACE_TABLE, TEACHER_DIR
    from kdtune.tables import read_csv_table

    log = print
    base = _spec_dict(spec_path)
    kd_spec = {**base, "study": f"{base['study']}_kd"}
    if kd_source is not None:
        reuse_study(kd_source.resolve(), results / kd_spec["study"])
    kd_study, kd_s = search_and_race(kd_spec, results, "temperature", widths, log, grid, max_seeds)
    kd_best = read_csv_table(kd_study / RACE_TABLE)
    sizes = [float(w) for w in kd_best["width"]]
    # The methods are compared with KD at the sizes KD's race covered (its front, or --widths):
    # the methods search covers those sizes only, and its race those it completed.
    all_spec = methods_spec(base, widths or sizes)
    all_dir = results / all_spec["study"]
    if (kd_study / TEACHER_DIR).exists():  # the same teacher on the same data: its cache entry is reused
        common.TeacherCache(kd_study / TEACHER_DIR).seed(parse_spec(all_spec, "methods spec"), all_dir)
    started = time.perf_counter()
    all_study = searched(all_spec, results, log)
    done = pd.read_parquet(all_study / "trials.parquet")
    completed = set(done.loc[done["status"] == "completed", "width"])
    common_sizes = [w for w in sizes if w in completed]
    if not common_sizes:
        raise SystemExit(f"the methods search ({all_study}) completed no trial at the sizes KD was raced at "
                         f"({', '.join(f'{w:g}' for w in sizes)}): nothing to compare; run it with more trials "
                         f"(num_samples in the spec)")
    raced(all_study, "soft_loss", common_sizes, log, grid, max_seeds)
    all_s = time.perf_counter() - started
    all_best = read_csv_table(all_study / RACE_TABLE)
    kd_contenders = pd.read_csv(kd_study / RACE_CONTENDERS_TABLE)
    all_contenders = pd.read_csv(all_study / RACE_CONTENDERS_TABLE)
    kd_scores, all_scores = round_scores(kd_study), round_scores(all_study)

    rows, verdicts = [], []
    for _, best in all_best.iterrows():
        size = float(best["width"])
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
        best_method = str(best["recommended"])
        diff, low, high, _ = paired_ci(all_scores.get((size, best_method), {}), kd_at_best_t)
        beyond = not math.isnan(low) and (low > 0 or high < 0)
        verdicts.append([f"{size:g}", f"{t_spread:.4f}", f"{m_spread:.4f}", best_method,
                         f"{diff:+.4f} ({low:+.4f}, {high:+.4f})",
                         ("the method matters beyond T" if beyond else "no measurable gain over KD at its best T")
                         + ("; T matters more than the method" if t_spread > m_spread else
                            "; the method matters more than T")])
    name = "methods_race" if base["study"] == "digits" else f"methods_race_{base['study']}"
    report = Report(name, f"Methods vs vanilla KD at its best T ({spec_path.name})")
    report.add("Each method at each size (race 2), against vanilla KD at its best T (race 1), paired by round",
               markdown_table(["width", "method", "mean val acc", "seeds", "status", "KD's best T",
                               "diff vs KD at best T (95% CI)", "paired rounds"], rows))
    report.add("Per size: does the method matter beyond T?",
               markdown_table(["width", "spread over T (race 1)", "spread over methods (race 2)", "best method",
                               "best method − KD at best T (95% CI)", "verdict"], verdicts))
    times = [["KD search + T race", kd_s], ["methods search + method race", all_s]]
    if with_recipes:
        times.append(["recipe race", recipes_section(report, base, results, kd_study, kd_best, kd_scores,
                                                     max_seeds, log)])
    report.add("Wall time", markdown_table(["step", "s"], times))
    report.target("a verdict for every raced size", f"{len(verdicts)} of {len(all_best)} sizes",
                  len(verdicts) == len(all_best) and bool(verdicts))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=common.DEFAULT_SPEC)
    parser.add_argument("--results", type=Path, default=common.REPO / "results" / "methods_race")
    parser.add_argument("--kd-study", type=Path, default=None,
                        help="a finished search of SPEC as shipped to reuse (copied) instead of searching again")
    parser.add_argument("--widths", type=float, nargs="+", default=None, help="search and race only these sizes")
    parser.add_argument("--grid", type=int, default=8, help="temperatures raced (default 8)")
    parser.add_argument("--max-seeds", type=int, default=DEFAULT_MAX_SEEDS, help="most rounds of each race")
    parser.add_argument("--recipes", action="store_true",
                        help="race 3: each method's published recipe at the KD study's best trials")
    args = parser.parse_args()
    common.make_kdtune_importable()
    before, started = common.load_average(), time.perf_counter()
    report = run(args.spec, args.results.resolve(), args.kd_study, args.widths, args.grid, args.max_seeds,
                 args.recipes)
    report.wall_s = time.perf_counter() - started
    report.load_before, report.load_after = before, common.load_average()
    command = " ".join(["python bench/methods_race.py", *sys.argv[1:]])
    path = report.write(command, common.RESULTS_DIR)
    print(report.to_markdown(command))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
