"""Shared helpers of kdtune's benchmarks: machine facts, tables, specs, Ray, teacher cache.

Every benchmark module exposes ``run(quick: bool) -> Report``; :class:`Report`
prints itself and writes ``results/bench/<name>.md`` with the machine, the
versions, the tables and one line per target (MET / NOT MET with the measured
figure). Absolute times on a shared 2-core machine are noise; the ratios
measured side by side in one run are the result, so every report records the
load average before and after it ran.

The pure functions here (tables, medians, ratios, spec merging, the efficiency
formulas) have no Ray or torch dependency and are smoke-tested in
``tests/test_bench_smoke.py``.
"""

from __future__ import annotations

import copy
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "results" / "bench"
DEFAULT_SPEC = REPO / "search_spaces" / "digits.yaml"


def make_kdtune_importable() -> None:
    """Let this process and Ray's workers import ``kdtune`` from the checkout.

    ``python bench/run_all.py`` puts ``bench/`` on ``sys.path``, not the repo, and
    the venv may not have kdtune installed in editable mode; Ray workers inherit
    ``PYTHONPATH`` from the environment of the process that starts Ray.
    """
    root = str(REPO)
    if root not in sys.path:
        sys.path.insert(0, root)
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *parts])


# --------------------------------------------------------------------------- pure helpers


def median(values: Iterable[float]) -> float:
    """Median of ``values`` (NaN for none)."""
    values = [float(v) for v in values]
    return statistics.median(values) if values else float("nan")


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, NaN when the denominator is 0 or NaN."""
    if denominator == 0 or denominator != denominator:
        return float("nan")
    return float(numerator) / float(denominator)


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``overrides`` merged in (nested dicts merged key by key;
    anything else, lists included, replaced)."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: floats to ``digits`` significant decimals, NaN as '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table; cells go through :func:`fmt`."""
    cells = [[fmt(c) for c in row] for row in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def parallel_efficiency(own_time_s: float, wall_s: float, concurrent: int) -> float:
    """Share of the reserved CPU slots spent on the trials' own work:
    Σ own trial time ÷ (wall × concurrent trials)."""
    return ratio(own_time_s, wall_s * concurrent)


def per_trial_overhead(own_time_s: float, wall_s: float, concurrent: int, trials: int) -> float:
    """Slot time not spent on the trials' own work, per trial: (wall × concurrent − Σ own) ÷ N."""
    return ratio(wall_s * concurrent - own_time_s, trials)


@dataclass
class Target:
    """One performance claim: what it says, what was measured, whether it holds."""

    claim: str
    measured: str
    met: bool | None  # None: not measured in this run

    def line(self) -> str:
        verdict = "MET" if self.met else ("NOT MEASURED" if self.met is None else "NOT MET")
        return f"- **{verdict}**: {self.claim} — measured {self.measured}"


@dataclass
class Report:
    """A benchmark's result: Markdown sections plus its targets."""

    name: str
    title: str
    sections: list[str] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    quick: bool = False
    load_before: tuple[float, float, float] | None = None
    load_after: tuple[float, float, float] | None = None

    def add(self, heading: str, body: str) -> None:
        self.sections.append(f"### {heading}\n\n{body}\n")

    def target(self, claim: str, measured: str, met: bool | None) -> None:
        self.targets.append(Target(claim, measured, met))

    def to_markdown(self, command: str = "") -> str:
        info, vers = machine_info(), versions()
        parts = [f"# {self.title}\n"]
        if command:
            parts.append(f"Command: `{command}`{' (quick pass)' if self.quick else ''}; benchmark wall time {self.wall_s:.0f} s.\n")
        parts.append("Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()) + ".")
        if self.load_before and self.load_after:
            parts.append(
                f"Load average (1/5/15 min) before {'/'.join(f'{x:.2f}' for x in self.load_before)}, "
                f"after {'/'.join(f'{x:.2f}' for x in self.load_after)} "
                f"(the machine is shared: a load above the core count means other work ran alongside).")
        parts.append("Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()) + ".\n")
        if self.targets:
            parts.append("## Targets\n")
            parts.extend(t.line() for t in self.targets)
            parts.append("")
        parts.append("## Results\n")
        parts.extend(self.sections)
        if self.notes:
            parts.append("## Notes\n")
            parts.extend(f"- {n}" for n in self.notes)
        return "\n".join(parts) + "\n"

    def write(self, command: str = "", folder: Path = RESULTS_DIR) -> Path:
        """Write ``<folder>/<name>.md`` and return its path."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.name}.md"
        path.write_text(self.to_markdown(command))
        return path


def shown(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it (a report names it so)."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def report_standalone(script: str, build: Callable[[], Report], argv: Sequence[str] | None = None) -> Path:
    """Build a benchmark's report outside ``run_all`` (as its own script), timed and with the
    load averages around it as ``run_all`` records them; print it and write it to
    :data:`RESULTS_DIR`. ``script`` and ``argv`` (default: this process's) make its command."""
    load_before, started = load_average(), time.perf_counter()
    report = build()
    report.wall_s, report.load_before, report.load_after = time.perf_counter() - started, load_before, load_average()
    command = f"python {script}" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    print(report.to_markdown(command))
    path = report.write(command, RESULTS_DIR)
    print(f"-> {path}")
    return path


# --------------------------------------------------------------------------- machine and versions


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float:
    try:
        import psutil

        return psutil.virtual_memory().total / 2**30
    except ImportError:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def machine_info() -> dict[str, str]:
    """CPU model, cores, RAM and OS of this machine."""
    make_kdtune_importable()
    from kdtune.core.distill import usable_cores

    cores = usable_cores()
    return {
        "CPU": _cpu_model(),
        "cores": str(cores),
        "RAM": f"{_ram_gib():.1f} GiB",
        "OS": f"{platform.system()} {platform.release()}",
    }


def versions() -> dict[str, str]:
    """Versions of Python and the libraries the benchmarks exercise."""
    found = {"python": platform.python_version()}
    for module in ("torch", "ray", "optuna", "kdtune"):
        try:
            found[module] = __import__(module).__version__
        except Exception:  # noqa: BLE001 - a missing library is reported, not fatal
            found[module] = "not importable"
    return found


def load_average() -> tuple[float, float, float]:
    """The 1/5/15-minute load averages (zeros where the OS has none)."""
    try:
        return os.getloadavg()
    except OSError:
        return (0.0, 0.0, 0.0)


# --------------------------------------------------------------------------- specs, Ray, teacher


def digits_spec(overrides: dict[str, Any] | None = None, path: Path = DEFAULT_SPEC):
    """The default digits spec (search_spaces/digits.yaml), or the spec at ``path``, with
    ``overrides`` merged in."""
    import yaml

    from kdtune.spec import parse_spec

    raw = yaml.safe_load(Path(path).read_text())
    return parse_spec(deep_merge(raw, overrides or {}), f"{path} + bench overrides")


def start_ray() -> None:
    """One local Ray instance for every search of the benchmarks (kdtune.search reuses
    it), started as ``kdtune search`` starts its own."""
    import ray

    make_kdtune_importable()
    from kdtune.search.cluster import _quiet_ray_environment, ray_init_kwargs

    _quiet_ray_environment()
    if not ray.is_initialized():
        ray.init(**ray_init_kwargs(None, dashboard=False))


class TeacherCache:
    """Train a spec's teacher once and pre-seed every new study folder with it.

    kdtune caches the teacher per study folder; every benchmark search uses a new
    study, so without this each would retrain the 2×1024 teacher.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.entries: dict[str, Any] = {}

    def prepare(self, spec):
        """The :class:`~kdtune.teacher.PreparedTeachers` of ``spec`` (trained on first use)."""
        from kdtune.search import load_spec_data, teacher_configs
        from kdtune.teacher import prepare_teachers

        marker = repr((spec.teacher, spec.data, spec.uses_features()))
        if marker not in self.entries:
            data = load_spec_data(spec)
            self.entries[marker] = prepare_teachers(teacher_configs(spec), data, self.root,
                                                    with_features=spec.uses_features(), log=lambda m: None)
        return self.entries[marker]

    def seed(self, spec, study_dir: Path) -> None:
        """Copy the teacher cache entry for ``spec`` into ``study_dir/teacher/``."""
        entry = self.prepare(spec).cache_dir
        target = Path(study_dir) / "teacher" / entry.name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(entry, target)


_SHARED_TEACHERS: TeacherCache | None = None


def shared_teachers(root: Path | None = None) -> TeacherCache:
    """The one teacher cache of this process (``root`` is used on the first call only)."""
    global _SHARED_TEACHERS
    if _SHARED_TEACHERS is None:
        import tempfile

        _SHARED_TEACHERS = TeacherCache(Path(root) if root else Path(tempfile.mkdtemp(prefix="kdtune-bench-teachers-")))
    return _SHARED_TEACHERS


def timed_search(spec, root: Path, name: str, teachers: TeacherCache | None = None, budget: Any = None):
    """Run ``kdtune.search.search`` on a validated spec in ``root`` (with ``budget``, a
    :class:`kdtune.search.plan.Budget`, if given); returns (result, wall seconds)."""
    from kdtune.search import search

    named = spec.model_copy(update={"study": name})
    if teachers is not None:
        teachers.seed(named, Path(root).resolve() / name)
    started = time.perf_counter()
    result = search(named, results_root=root, log=lambda m: None, budget=budget)
    return result, time.perf_counter() - started


class EnvVar:
    """Set an environment variable for a block and restore it afterwards."""

    def __init__(self, name: str, value: str | None) -> None:
        self.name, self.value, self.saved = name, value, None

    def __enter__(self) -> "EnvVar":
        self.saved = os.environ.get(self.name)
        if self.value is None:
            os.environ.pop(self.name, None)
        else:
            os.environ[self.name] = self.value
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.saved is None:
            os.environ.pop(self.name, None)
        else:
            os.environ[self.name] = self.saved
