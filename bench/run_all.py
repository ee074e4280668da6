"""Run kdtune's benchmarks and write their tables to results/bench/<name>.md.

Usage (from the repository root; ``make bench`` runs the first)::

    .venv/bin/python bench/run_all.py                  # everything (12-20 min on a shared 2-core machine)
    .venv/bin/python bench/run_all.py --quick          # a fast pass (~4-7 min)
    .venv/bin/python bench/run_all.py --only search_efficiency --only overhead

One local Ray instance serves every search, and the default teacher is trained
once per run (``--teacher-cache DIR`` keeps it between runs). Benchmarks are
not tests: targets that are not met are reported as NOT MET, never raised.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

common.make_kdtune_importable()

#: Benchmark modules in the order they run (cheapest first, the headline before the slow one).
BENCHMARKS = ("race_offline", "distill_step", "method_step", "augment_speed", "per_epoch_overhead",
              "search_efficiency", "overhead", "bookkeeping")
#: Benchmarks that run without Ray.
WITHOUT_RAY = ("race_offline", "distill_step", "method_step", "augment_speed", "per_epoch_overhead")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, trials and samples: a fast pass")
    parser.add_argument("--only", action="append", choices=BENCHMARKS, metavar="NAME",
                        help=f"run only this benchmark (repeatable; one of {', '.join(BENCHMARKS)})")
    parser.add_argument("--teacher-cache", type=Path, default=None,
                        help="folder to keep the trained default teacher in between runs (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR, help="where the Markdown tables go")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    selected = [b for b in BENCHMARKS if not args.only or b in args.only]
    command = "python bench/run_all.py" + (" --quick" if args.quick else "") + "".join(f" --only {b}" for b in (args.only or []))
    started = time.perf_counter()
    common.shared_teachers(args.teacher_cache)
    if any(b not in WITHOUT_RAY for b in selected):
        common.start_ray()
    summary, failed = [], []
    for name in selected:
        print(f"\n=== {name}{' (quick)' if args.quick else ''} ===", flush=True)
        module = importlib.import_module(name)
        load_before = common.load_average()
        t0 = time.perf_counter()
        try:
            report = module.run(quick=args.quick)
        except Exception:  # noqa: BLE001 - one broken benchmark must not hide the others
            traceback.print_exc()
            failed.append(name)
            continue
        report.wall_s = time.perf_counter() - t0
        report.load_before, report.load_after = load_before, common.load_average()
        path = report.write(command, args.out)
        print(report.to_markdown(command), flush=True)
        print(f"-> {path}", flush=True)
        summary += [(name, t) for t in report.targets]
        summary.append((name, None, report.wall_s))
    total = time.perf_counter() - started
    print("\n=== summary ===")
    for entry in summary:
        if entry[1] is None:
            print(f"{entry[0]}: {entry[2]:.0f} s")
        else:
            print(f"{entry[0]}: {entry[1].line()[2:]}")
    if failed:
        print(f"FAILED to run: {', '.join(failed)}")
    print(f"total wall time {total:.0f} s ({total / 60:.1f} min)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
