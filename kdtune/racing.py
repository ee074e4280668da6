"""Racing statistics: which value of one hyperparameter is best, with as few seeds as the evidence allows.

A race compares a handful of *contenders* (values of one hyperparameter, e.g. the
temperature T, plus the no-distillation baseline as a contender of its own) at
otherwise fixed hyperparameters. It runs in *rounds*: each round trains every
surviving contender once more with one new seed shared by all of them (common
random numbers: within a round contenders differ only in the raced value). After
each round from the third on, contenders that are significantly worse than the
best are dropped; the race stops when one contender is left, when every survivor
is within a practical difference of the others with confidence (equivalence), or
at a maximum number of seeds. Pure numpy/scipy/pandas: no Ray, no torch.

Statistical choices, and why
----------------------------
* **Blocked (paired) analysis.** A round is a block: the scores of one round
  share the seed, so the round's effect (a lucky initialisation helps every
  contender) is removed by the two-way model ``score = contender + round + error``.
  Differences between contenders are then judged against the residual error,
  not the much larger seed-to-seed spread. This is the paired t-test generalised
  to k contenders; with two contenders it *is* the paired t-test.
* **Pooled residual variance** (default, ``variance="pooled"``): the error
  variance is estimated from the residuals of all survivors, with
  ``(k-1)(n-1)`` degrees of freedom (16 with 9 contenders after 3 rounds), where
  a separate paired t-test per pair has ``n-1`` (2 after 3 rounds, whose
  t-quantile at the levels below is above 20: nothing could be dropped before
  the sixth round or so). The price is the assumption that the differences of
  all pairs have about the same variance (sphericity); ``variance="paired"``
  drops that assumption (each pair's own differences, ``n-1`` degrees of
  freedom, Bonferroni over pairs) at the cost of power. The offline benchmark
  (``bench/race_offline.py``) compares both on recorded runs. How much the
  assumption matters, measured on synthetic null races (9 equal contenders, 10
  seeds, no early stop): when one contender's error sd is 1.5×, 2× or 3× the
  others', the whole-race false-elimination rate is 0.058, 0.098 and 0.22
  instead of at most 0.05 (the pooled variance understates the noisy one's
  differences). On the recorded digits runs the noisier contenders are the
  clearly worse ones (T ≤ 2.4 and no distillation: lower accuracy, hence more
  binomial noise on 360 images, and 2-8 points behind), while the pooled
  variance overstates the differences among the quieter leaders, which is
  conservative; replays dropped brute force's best in at most 0.1% of races.
  The table's ``p_paired`` gives each drop's own paired test as a check.
* **Not Wilcoxon.** Rank tests on n paired differences cannot reach small
  p-values with few seeds: the smallest two-sided Wilcoxon p at 8 seeds is
  2/2^8 = 0.0078, already above a Holm threshold of 0.05/8 = 0.00625 for 9
  contenders, so a Wilcoxon race could never drop anything within 8 seeds.
* **Simultaneous intervals for comparison with the best.** "Worse than the
  observed best" is a comparison with a data-chosen contender, so every pairwise
  difference among the survivors gets a simultaneous interval: Tukey's
  studentized range (``q_{1-a}(k, df)``) with the pooled variance, Bonferroni
  over the ``k(k-1)/2`` pairs with ``variance="paired"``. These intervals contain
  Hsu's intervals for multiple comparisons with the best (MCB needs only the
  true best's k-1 comparisons to hold, which protects the true best but not a
  contender tied with it). Using all pairs is what keeps the whole-race
  false-elimination rate at or below ``alpha`` when several contenders are
  equally good, the case "T makes no measurable difference" is about.
  A contender is dropped when the best survivor's mean exceeds its own by more
  than the interval's half-width.
* **Error spent across rounds.** Every round after the second is another look
  at the data, and the error rate must hold for the whole race, not per look.
  With the pooled variance the null distribution of every look's statistic
  (the studentized range of the survivors' means) is pivotal, so the race uses
  a boundary calibrated by simulation (:func:`calibrated_boundary`): one
  per-look level, chosen so that the probability that *any* of the planned looks
  (rounds ``min_rounds..max_seeds``) crosses is ``alpha``. Bonferroni over the
  8 looks (``alpha/8`` each, Tukey per look) would also be valid but wastes
  part of ``alpha`` because consecutive looks share most of their data: for 9
  contenders its whole-race rate is 0.031 at ``alpha`` 0.05 against 0.045 for the
  calibrated boundary (40,000 simulated null races), and its critical values
  are 5-6% wider. With ``variance="paired"`` the statistic is not
  pivotal and Bonferroni over pairs and looks is used. An anytime-valid
  confidence sequence would stay valid beyond ``max_seeds`` but is wider than
  either at the 3-10 seeds a race runs. One set of intervals serves both
  decisions (drops and equivalence), so the whole-race rate of false claims of
  either kind is at most ``alpha`` under the model.
* **Practical difference.** Equivalence is declared when every pairwise
  interval among the survivors lies inside ``±practical``. By default
  ``practical`` is ``practical_multiple`` (1.0) times the measured seed-to-seed
  standard deviation of one run's score, pooled over the survivors: a
  difference between two values smaller than what a single reseeding moves the
  score by is not worth choosing for.
* **How many more seeds.** Each undecided survivor's paired difference from
  the best (mean ``d``, standard deviation ``s``) gives the seeds ``n`` at which
  the race would, with 80% power, drop it (``d > c·s/√n``) or show it within
  ``practical`` (``d + c·s/√n < practical``), ``c`` being the last look's critical
  value; the verdict names the pair that needs the most. With ``futility`` the
  race stops early, unresolved, once even at 50% power no survivor would be
  settled within ``max_seeds`` (stopping early never adds a false elimination).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from kdtune.errors import ConfigError, KdtuneError

#: The label of the no-distillation contender (hard labels only, α = 1).
BASELINE = "no distillation (α=1)"
#: Races drop nothing before this many rounds.
MIN_ROUNDS = 3
DEFAULT_MAX_SEEDS = 10
#: Default practical difference, in units of the measured seed-to-seed standard deviation.
DEFAULT_PRACTICAL_MULTIPLE = 1.0
VARIANCE_MODELS = ("pooled", "paired")
#: Power of the "how many more seeds" estimate.
_POWER = 0.8
#: Beyond this many more seeds the estimate is reported as "more than".
_MAX_MORE_SEEDS = 1000

Contender = Hashable


class RaceError(KdtuneError):
    """A round that does not fit the race (missing or extra contenders, a finished race, a bad score)."""


def _round_sig(value: float, digits: int = 2) -> float:
    return float(f"{value:.{digits}g}")


def contender_grid(lo: float, hi: float, log: bool, n: int = 8, include: Sequence[float] = (1.0,)) -> list[float]:
    """About ``n`` contender values spanning ``[lo, hi]``, ends included.

    Log-spaced for a log-uniform range (``log=True``), linear for a uniform one;
    inner values are rounded to two significant digits so that they read well
    in tables and tick labels. Each value of ``include`` that lies in the range
    replaces the grid value nearest to it (on the grid's own scale), so T = 1 is
    a contender of a temperature race whenever the range allows it. Values
    outside the range are not added.

    >>> contender_grid(1, 20, log=True)
    [1.0, 1.5, 2.4, 3.6, 5.5, 8.5, 13.0, 20.0]
    """
    if n < 1:
        raise ConfigError("n", f"must be >= 1 contenders, got {n}")
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi < lo:
        raise ConfigError("range", f"must be finite with lo <= hi, got [{lo}, {hi}]")
    if log and lo <= 0:
        raise ConfigError("range", f"a log-spaced grid needs lo > 0, got {lo}")
    if n == 1 or lo == hi:
        points = np.array([lo if lo == hi else (math.sqrt(lo * hi) if log else (lo + hi) / 2)])
    elif log:
        points = np.exp(np.linspace(math.log(lo), math.log(hi), n))
    else:
        points = np.linspace(lo, hi, n)
    values = [_round_sig(v) for v in points]
    if len(values) > 1:
        values[0], values[-1] = float(lo), float(hi)
    scale = math.log if log else (lambda v: v)
    for wanted in include:
        if lo <= wanted <= hi and wanted not in values:
            nearest = min(range(len(values)), key=lambda i: abs(scale(values[i]) - scale(wanted)))
            values[nearest] = float(wanted)
    return sorted(set(values))


# --------------------------------------------------------------------------- critical values


def two_way(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Contender means and residual variance of the two-way model ``contender + round + error``.

    ``scores`` is ``(..., k contenders, n rounds)``; returns the means ``(..., k)`` and the
    residual variance ``(...)`` with ``(k-1)(n-1)`` degrees of freedom (round effects removed).
    """
    k, n = scores.shape[-2:]
    means = scores.mean(axis=-1)
    residual = scores - means[..., :, None] - scores.mean(axis=-2)[..., None, :] + means.mean(axis=-1)[..., None, None]
    return means, (residual**2).sum(axis=(-2, -1)) / ((k - 1) * (n - 1))


#: Simulated null races behind each calibrated boundary (Monte Carlo error of the
#: whole-race level about ±0.003 at alpha 0.05), and their fixed seed.
CALIBRATION_SIMS = 20_000
_CALIBRATION_SEED = 20160916


@lru_cache(maxsize=256)
def calibrated_boundary(k: int, min_rounds: int, max_seeds: int, alpha: float) -> tuple[float, ...]:
    """Critical values of the pooled race for ``k`` survivors at the looks after rounds
    ``min_rounds..max_seeds``, in units of the standard error of one pairwise difference.

    Under the null (all ``k`` contenders equal) and the two-way normal model, the
    studentized range of the survivors' means at every look is pivotal: it does
    not depend on the means, the round effects or the error variance. So the
    joint law of the looks is simulated once (``CALIBRATION_SIMS`` races of
    standard normal scores), each look's statistic is turned into its marginal
    tail probability, and one per-look level ``a`` is chosen so that the
    probability that *any* look crosses is ``alpha`` (a Pocock-type boundary:
    ``a`` is the ``alpha``-quantile of the smallest tail probability over the
    looks). Look ``l``'s critical value is its statistic's ``1 - a`` quantile
    divided by √2 (the range of means over √(s²/n), expressed per pairwise
    standard error √(2s²/n)). Deterministic: the simulation has a fixed seed.
    """
    if k < 2:
        return tuple(0.0 for _ in range(min_rounds, max_seeds + 1))
    rng = np.random.default_rng([_CALIBRATION_SEED, k, min_rounds, max_seeds])
    z = rng.standard_normal((CALIBRATION_SIMS, k, max_seeds))
    statistics = []
    for n in range(min_rounds, max_seeds + 1):
        means, s2 = two_way(z[:, :, :n])
        statistics.append((means.max(axis=1) - means.min(axis=1)) / np.sqrt(2.0 * s2 / n))
    looks = np.stack(statistics)  # (looks, sims)
    ordered = np.sort(looks, axis=1)
    # Marginal tail probability of each simulated value at its own look: P(R_l >= r).
    tails = 1.0 - np.stack([np.searchsorted(ordered[l], looks[l], side="left") for l in range(len(looks))]) \
        / CALIBRATION_SIMS
    smallest = np.sort(tails.min(axis=0))
    level = float(smallest[max(int(math.floor(alpha * CALIBRATION_SIMS)) - 1, 0)])
    index = min(int(math.ceil((1.0 - level) * CALIBRATION_SIMS)), CALIBRATION_SIMS - 1)
    return tuple(float(ordered[l][index]) for l in range(len(looks)))


@lru_cache(maxsize=4096)
def _bonferroni_t(k: int, df: int, level: float) -> float:
    """Two-sided t critical value for one of ``k(k-1)/2`` pairs at family level ``level``."""
    if k < 2:
        return 0.0
    pairs = k * (k - 1) / 2
    return float(stats.t.ppf(1.0 - level / (2.0 * pairs), df))


@dataclass
class _Look:
    """The simultaneous intervals of one look: half-width of pair (i, j) is ``half[i, j]``."""

    means: np.ndarray
    half: np.ndarray  # (k, k) interval half-widths; NaN when no variance can be estimated
    critical: float
    diff_sd: np.ndarray  # (k, k) standard deviation of one round's paired difference


def _look(scores: np.ndarray, critical: float, variance: str) -> _Look:
    """Simultaneous intervals for every pairwise difference among the rows of ``scores``
    (survivors × rounds): ``critical`` standard errors either side of each difference."""
    k, n = scores.shape
    means = scores.mean(axis=1)
    nan = np.full((k, k), np.nan)
    if n < 2 or k < 2:
        return _Look(means, nan, math.nan, nan)
    if variance == "pooled":
        diff_sd = np.full((k, k), math.sqrt(2.0 * float(two_way(scores)[1])))
    else:
        differences = scores[:, None, :] - scores[None, :, :]
        diff_sd = differences.std(axis=2, ddof=1)
    np.fill_diagonal(diff_sd, 0.0)
    return _Look(means, critical * diff_sd / math.sqrt(n), critical, diff_sd)


# --------------------------------------------------------------------------- the race


class Race:
    """A race among ``contenders``, driven one round at a time.

    ``Race(contenders, alpha=0.05, max_seeds=10, practical=None)``; then, until
    :attr:`done`, train every contender of :meth:`survivors` with one new seed
    (the same seed for all of them) and pass the scores to :meth:`add_round`.
    :meth:`table` and :meth:`verdict` report the result at any time.

    * ``contenders``: hashable labels, e.g. temperatures, plus :data:`BASELINE`
      for the no-distillation run. Numbers are named ``"<param> = <value>"`` in
      the verdict.
    * ``alpha``: the whole-race rate of false eliminations (and false
      equivalence claims); see the module docstring for how it is spent.
    * ``max_seeds``: rounds after which the race stops unresolved.
    * ``practical``: the practical difference, in score units; None derives it
      as ``practical_multiple`` × the measured seed-to-seed standard deviation.
    * ``variance``: "pooled" (two-way residual, Tukey) or "paired" (per-pair
      paired differences, Bonferroni); see the module docstring.
    * ``futility``: stop early, unresolved, when at the observed gaps and noise
      no survivor would be dropped or shown equivalent within ``max_seeds``
      (their seeds needed with 50% power all exceed it).
    * ``min_rounds``: no decision before this many rounds (3).
    * ``param``, ``scale``, ``unit``: how the verdict names the raced
      hyperparameter and differences (scores × 100 as "points" by default).
    """

    def __init__(
        self,
        contenders: Iterable[Contender],
        alpha: float = 0.05,
        max_seeds: int = DEFAULT_MAX_SEEDS,
        practical: float | None = None,
        *,
        practical_multiple: float = DEFAULT_PRACTICAL_MULTIPLE,
        variance: str = "pooled",
        futility: bool = True,
        min_rounds: int = MIN_ROUNDS,
        param: str = "T",
        scale: float = 100.0,
        unit: str = "points",
    ) -> None:
        self.contenders: list[Contender] = list(contenders)
        if len(self.contenders) < 2:
            raise ConfigError("contenders", f"a race needs at least 2 contenders, got {len(self.contenders)}")
        if len(set(self.contenders)) != len(self.contenders):
            raise ConfigError("contenders", f"must be distinct, got {self.contenders}")
        if not 0.0 < alpha < 1.0:
            raise ConfigError("alpha", f"must be in (0, 1), got {alpha}")
        if int(min_rounds) < 2:
            raise ConfigError("min_rounds", f"must be >= 2 (a variance needs two rounds), got {min_rounds}")
        if int(max_seeds) < int(min_rounds):
            raise ConfigError("max_seeds", f"must be >= min_rounds ({min_rounds}), got {max_seeds}")
        if practical is not None and not practical >= 0:
            raise ConfigError("practical", f"must be >= 0 or None (derived from the seed noise), got {practical}")
        if not practical_multiple >= 0:
            raise ConfigError("practical_multiple", f"must be >= 0, got {practical_multiple}")
        if variance not in VARIANCE_MODELS:
            raise ConfigError("variance", f"allowed: {', '.join(VARIANCE_MODELS)}, got {variance!r}")
        self.alpha, self.max_seeds, self.min_rounds = float(alpha), int(max_seeds), int(min_rounds)
        self.practical_fixed = practical
        self.practical_multiple = float(practical_multiple)
        self.variance, self.param, self.scale, self.unit = variance, param, float(scale), unit
        #: Bonferroni over the planned looks (rounds min_rounds..max_seeds).
        self.looks = self.max_seeds - self.min_rounds + 1
        self.look_level = self.alpha / self.looks
        self.scores: dict[Contender, list[float]] = {c: [] for c in self.contenders}
        self.seeds: list[Any] = []
        self.dropped: dict[Contender, int] = {}  # contender -> round after which it was dropped
        self.dropped_by: dict[Contender, Contender] = {}
        self.equivalent = False
        #: The widest simultaneous interval bound |difference| among the survivors at the last look.
        self.bound = math.nan
        self.futility = bool(futility)
        self.futile = False

    # ------------------------------------------------------------------ state

    @property
    def rounds(self) -> int:
        """Rounds added so far."""
        return len(self.seeds)

    @property
    def runs(self) -> int:
        """Training runs spent so far (one per contender per round it took part in)."""
        return sum(len(v) for v in self.scores.values())

    def survivors(self) -> list[Contender]:
        """Contenders still in the race, in the order given."""
        return [c for c in self.contenders if c not in self.dropped]

    @property
    def done(self) -> bool:
        """True when one contender is left, the survivors are equivalent, ``max_seeds`` rounds ran,
        or (with ``futility``) the observed gaps say that ``max_seeds`` would not resolve the race."""
        return len(self.survivors()) == 1 or self.equivalent or self.futile or self.rounds >= self.max_seeds

    @property
    def resolved(self) -> bool:
        """True when the race ended with an answer (one left, or equivalence), not at the seed limit."""
        return len(self.survivors()) == 1 or self.equivalent

    def critical(self, k: int, n: int) -> float:
        """The critical value (in standard errors of a pairwise difference) for ``k`` survivors
        after ``n`` rounds: the calibrated boundary with the pooled variance, Bonferroni over
        pairs and looks with per-pair variances."""
        if self.variance == "pooled":
            boundary = calibrated_boundary(k, self.min_rounds, self.max_seeds, self.alpha)
            return boundary[min(max(n, self.min_rounds), self.max_seeds) - self.min_rounds]
        return _bonferroni_t(k, max(n, 2) - 1, self.look_level)

    def _matrix(self, members: Sequence[Contender]) -> np.ndarray:
        return np.array([self.scores[c] for c in members], dtype=float)

    def seed_sd(self) -> float:
        """The seed-to-seed standard deviation of one run's score, pooled over the survivors
        (each one's variance over its rounds, weighted by its degrees of freedom): how much a
        single reseeding moves the score of a contender still in the race. NaN before two rounds."""
        num = den = 0.0
        for values in (self.scores[c] for c in self.survivors()):
            if len(values) >= 2:
                num += float(np.var(values, ddof=1)) * (len(values) - 1)
                den += len(values) - 1
        return math.sqrt(num / den) if den else math.nan

    @property
    def practical(self) -> float:
        """The practical difference in score units (fixed, or derived from the seed noise)."""
        if self.practical_fixed is not None:
            return float(self.practical_fixed)
        return self.practical_multiple * self.seed_sd()

    # ------------------------------------------------------------------ rounds

    def add_round(self, scores: Mapping[Contender, float], seed: Any = None) -> list[Contender]:
        """Record one round: ``scores`` holds one score per survivor, all trained with ``seed``.

        Returns the contenders dropped after this round (empty before ``min_rounds``).
        Raises :class:`RaceError` when the race is done, when a survivor is missing
        or a non-survivor is present, or when a score is not a finite number.
        """
        if self.done:
            raise RaceError(f"the race is over after {self.rounds} round(s); no more rounds can be added")
        survivors = self.survivors()
        missing = [c for c in survivors if c not in scores]
        extra = [c for c in scores if c not in survivors]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing {missing}")
            if extra:
                parts.append(f"not in the race (dropped or unknown) {extra}")
            raise RaceError(f"round {self.rounds + 1}: scores must cover exactly the survivors {survivors}: "
                            + "; ".join(parts))
        values = {c: float(scores[c]) for c in survivors}
        bad = {c: v for c, v in values.items() if not math.isfinite(v)}
        if bad:
            raise RaceError(f"round {self.rounds + 1}: scores must be finite numbers, got {bad}")
        for c, v in values.items():
            self.scores[c].append(v)
        self.seeds.append(seed)
        return self._decide()

    def _decide(self) -> list[Contender]:
        survivors = self.survivors()
        if self.rounds < self.min_rounds or len(survivors) < 2:
            return []
        look = _look(self._matrix(survivors), self.critical(len(survivors), self.rounds), self.variance)
        if np.isnan(look.half).all():
            return []
        best = int(np.argmax(look.means))
        gaps = look.means[best] - look.means
        out = [c for i, c in enumerate(survivors) if i != best and gaps[i] > look.half[best, i]]
        for c in out:
            self.dropped[c] = self.rounds
            self.dropped_by[c] = survivors[best]
        remaining = [i for i, c in enumerate(survivors) if c not in self.dropped]
        if len(remaining) >= 2:
            sub = np.ix_(remaining, remaining)
            spread = look.means[remaining][:, None] - look.means[remaining][None, :]
            # Equivalence: every pairwise interval among the survivors inside ±practical.
            bound = float(np.max(np.abs(spread) + look.half[sub]))
            self.equivalent = bound < self.practical
            self.bound = bound
        if self.futility and not self.resolved and self.rounds < self.max_seeds:
            found = self._requirements(0.5)
            # Futility: at the observed gaps no survivor would be dropped or shown equivalent
            # even at max_seeds. Stopping early never adds a false elimination.
            self.futile = bool(found and found[1] and min(n for n, _, _ in found[1]) > self.max_seeds)
        return out

    # ------------------------------------------------------------------ results

    def best(self) -> Contender:
        """The survivor with the highest mean score (the first given among ties)."""
        survivors = self.survivors()
        if self.rounds == 0:
            return survivors[0]
        means = [float(np.mean(self.scores[c])) for c in survivors]
        return survivors[int(np.argmax(means))]

    def _paired(self, a: Contender, b: Contender) -> np.ndarray:
        """Score of ``a`` minus score of ``b`` over the rounds both ran (rounds count from the start)."""
        n = min(len(self.scores[a]), len(self.scores[b]))
        return np.asarray(self.scores[a][:n]) - np.asarray(self.scores[b][:n])

    def name(self, contender: Contender) -> str:
        """How the verdict names ``contender``."""
        if contender == BASELINE:
            return "no distillation"
        if isinstance(contender, (int, float, np.number)):
            return f"{self.param} = {float(contender):g}"
        return str(contender)

    def table(self, confidence: float = 0.95) -> pd.DataFrame:
        """One row per contender, in the order given.

        Columns: ``contender``; ``baseline`` (True for :data:`BASELINE`); ``mean``
        and ``ci_low``/``ci_high`` (a ``confidence`` t-interval over the contender's
        own seeds, not adjusted for the race's selection); ``n_seeds``;
        ``dropped_round`` (the round after which it was dropped, <NA> if it
        survived); ``status`` ("best", "survivor" or "dropped");
        ``diff_from_best`` (mean paired difference from the best survivor over
        the rounds both ran); ``p_paired`` (two-sided p-value of that contender's own paired
        t-test against the best, unadjusted: a check on a drop that the pooled variance made,
        since a contender much noisier than the others can be dropped too readily, see the
        module docstring); ``kd_gain`` with ``kd_gain_low``/``kd_gain_high``
        (mean paired difference from :data:`BASELINE` with a ``confidence``
        t-interval; NaN without a baseline contender or for the baseline).
        """
        best = self.best()
        rows = []
        for c in self.contenders:
            values = np.asarray(self.scores[c], dtype=float)
            mean, low, high = _mean_ci(values, confidence)
            gain = gain_low = gain_high = math.nan
            if BASELINE in self.scores and c != BASELINE:
                gain, gain_low, gain_high = _mean_ci(self._paired(c, BASELINE), confidence)
            diff = self._paired(c, best)
            p_paired = math.nan
            if c != best and diff.size >= 2:
                constant = bool(np.all(diff == diff[0]))  # no spread: the test is undefined
                p_paired = (1.0 if diff[0] == 0 else 0.0) if constant else float(stats.ttest_1samp(diff, 0.0).pvalue)
            rows.append({
                "contender": c, "baseline": c == BASELINE, "mean": mean, "ci_low": low, "ci_high": high,
                "n_seeds": len(values), "dropped_round": self.dropped.get(c),
                "status": "dropped" if c in self.dropped else ("best" if c == best else "survivor"),
                "diff_from_best": float(diff.mean()) if diff.size else math.nan, "p_paired": p_paired,
                "kd_gain": gain, "kd_gain_low": gain_low, "kd_gain_high": gain_high,
            })
        table = pd.DataFrame(rows)
        table["dropped_round"] = table["dropped_round"].astype("Int64")
        return table

    def outcome(self) -> str:
        """How the race ended: "one left", "equivalence", "futility", "max seeds", or "running"."""
        if len(self.survivors()) == 1:
            return "one left"
        if self.equivalent:
            return "equivalence"
        if self.futile:
            return "futility"
        return "max seeds" if self.done else "running"

    def summary(self, context: str = "") -> dict[str, Any]:
        """One row of a per-size results file (e.g. ``race/best_t.csv``): ``recommended`` (the
        best survivor), ``indistinguishable`` (all survivors, ";"-joined, best included),
        ``best_mean``, ``kd_gain``/``kd_gain_low``/``kd_gain_high`` of the recommended contender,
        ``rounds``, ``runs``, ``outcome``, ``practical``, ``seed_sd``, ``alpha`` and ``verdict``."""
        table = self.table().set_index("contender")
        best = self.best()
        return {
            "recommended": best,
            "indistinguishable": ";".join(f"{c:g}" if isinstance(c, (int, float, np.number)) else str(c)
                                          for c in self.survivors()),
            "best_mean": float(table.loc[best, "mean"]),
            "kd_gain": float(table.loc[best, "kd_gain"]),
            "kd_gain_low": float(table.loc[best, "kd_gain_low"]),
            "kd_gain_high": float(table.loc[best, "kd_gain_high"]),
            "rounds": self.rounds, "runs": self.runs, "outcome": self.outcome(),
            "practical": self.practical, "seed_sd": self.seed_sd(), "alpha": self.alpha,
            "verdict": self.verdict(context),
        }

    def _requirements(self, power: float) -> tuple[Contender, list[tuple[float, Contender, str]]] | None:
        """For each survivor other than the best: the total seeds at which, with ``power``, the
        race would drop it ("separate") or show it within the practical difference ("equivalent"),
        whichever comes first, assuming the observed mean gap and paired standard deviation.
        The critical value is the one of the last planned look. None without a variance yet."""
        survivors = self.survivors()
        if len(survivors) < 2 or self.rounds < 2:
            return None
        look = _look(self._matrix(survivors), self.critical(len(survivors), self.max_seeds), self.variance)
        best_index = int(np.argmax(look.means))
        z = float(stats.norm.ppf(power))
        practical = self.practical
        needs: list[tuple[float, Contender, str]] = []
        for i, c in enumerate(survivors):
            if i == best_index:
                continue
            gap = float(look.means[best_index] - look.means[i])
            sd = float(look.diff_sd[best_index, i])
            options = []
            if gap > 0:
                options.append(((max(look.critical + z, 0.0) * sd / gap) ** 2, "separate"))
            if math.isfinite(practical) and gap < practical:
                options.append(((max(look.critical + z, 0.0) * sd / (practical - gap)) ** 2, "equivalent"))
            total, how = min(options) if options else (math.inf, "separate")
            needs.append((max(total, float(self.rounds)), c, how))
        return survivors[best_index], needs

    def more_seeds(self) -> tuple[int, Contender, Contender, str] | None:
        """Estimated further seeds to resolve the race, and the pair that needs them.

        Returns ``(seeds, best, other, how)`` with ``how`` "separate" (drop
        ``other``) or "equivalent" (show both within the practical difference),
        for the undecided survivor needing the most seeds (80% power, see the
        module docstring); None when the race is resolved or no variance is
        known yet. ``seeds`` is at least 1 and capped at 1000.
        """
        if self.resolved:
            return None
        found = self._requirements(_POWER)
        if found is None or not found[1]:
            return None
        best, needs = found
        total, other, how = max(needs, key=lambda n: n[0])
        more = math.ceil(total) - self.rounds if math.isfinite(total) else _MAX_MORE_SEEDS
        return max(1, min(more, _MAX_MORE_SEEDS)), best, other, how

    def verdict(self, context: str = "") -> str:
        """The race's answer in words, e.g. "T from 3.6 to 8.5 within 0.9 points of each other;
        T = 1 and no distillation 3-5 points worse". ``context`` (e.g. "at α = 0.2, lr = 0.01")
        is appended in parentheses: the answer holds at those other hyperparameters."""
        suffix = f" ({context})" if context else ""
        if self.rounds == 0:
            return "no rounds yet" + suffix
        survivors, best = self.survivors(), self.best()
        dropped = self._dropped_clause(best)
        numeric = [c for c in self.contenders if c != BASELINE]
        practical = f"{self.practical * self.scale:.2g} {self.unit}"
        within = f"{self.bound * self.scale:.2g} {self.unit}"  # the equivalence bound reached
        if len(survivors) == 1:
            text = f"{self.name(best)} best after {self.rounds} seeds"
            text += f"; {dropped}" if dropped else ""
        elif self.equivalent:
            surviving_numeric = [c for c in survivors if c != BASELINE]
            if BASELINE in survivors and len(surviving_numeric) == len(numeric):
                text = (f"neither {self.param} nor distillation makes a measurable difference at this size "
                        f"(all within {within} after {self.rounds} seeds)")
            elif len(surviving_numeric) == len(numeric):
                text = (f"{self.param} makes no measurable difference at this size "
                        f"(all within {within} after {self.rounds} seeds)")
                text += f"; {dropped}" if dropped else ""
            else:
                text = f"{self._span(survivors)} within {within} of each other after {self.rounds} seeds"
                text += f"; {dropped}" if dropped else ""
        else:
            state = f"{'unresolved' if self.done else 'undecided'} after {self.rounds} seeds"
            if self.futile:
                state += f" (stopped early: {self.max_seeds} would not settle it)"
            text = f"{state}: {self._span(survivors)} still in the race"
            if math.isfinite(self.bound):  # what the simultaneous intervals already bound
                text += f", within {within} of each other"
            estimate = self.more_seeds()
            if estimate is not None:
                more, a, b, how = estimate
                count = f"more than {_MAX_MORE_SEEDS}" if more >= _MAX_MORE_SEEDS else f"about {more}"
                if how == "separate":
                    text += f"; {count} more would separate {self.name(a)} from {self.name(b)}"
                else:
                    text += f"; {count} more would show {self.name(a)} and {self.name(b)} within {practical}"
            text += f"; {dropped}" if dropped else ""
        return text + suffix

    def _span(self, members: Sequence[Contender]) -> str:
        """"T from a to b" when ``members``' numbers are consecutive contenders, else a list
        (categorical contenders, such as methods, by name: "dkd, dist")."""
        numeric = sorted(c for c in members if c != BASELINE)
        all_numeric = sorted(c for c in self.contenders if c != BASELINE)
        parts = []
        if not all(isinstance(c, (int, float, np.number)) for c in all_numeric):
            parts.append(", ".join(self.name(c) for c in self.contenders if c in numeric) if numeric else "")
            parts = [p for p in parts if p]
        elif len(numeric) >= 2:
            start = all_numeric.index(numeric[0])
            if all_numeric[start:start + len(numeric)] == numeric:
                parts.append(f"{self.param} from {float(numeric[0]):g} to {float(numeric[-1]):g}")
            else:
                parts.append(f"{self.param} = " + ", ".join(f"{float(c):g}" for c in numeric))
        elif numeric:
            parts.append(self.name(numeric[0]))
        if BASELINE in members:
            parts.append(self.name(BASELINE))
        return " and ".join(parts)

    def _dropped_clause(self, best: Contender) -> str:
        """"T = 1 and no distillation 3-5 points worse" for the dropped contenders."""
        out = [c for c in self.contenders if c in self.dropped]
        if not out:
            return ""
        gaps = [float(-self._paired(c, best).mean()) * self.scale for c in out]
        low, high = min(gaps), max(gaps)
        amount = f"{low:.2g}" if f"{low:.2g}" == f"{high:.2g}" else f"{low:.2g}-{high:.2g}"
        return f"{self._span(out)} {amount} {self.unit} worse"


def _mean_ci(values: np.ndarray, confidence: float) -> tuple[float, float, float]:
    """Mean and two-sided t-interval (NaN bounds for fewer than 2 values)."""
    if values.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(values.mean())
    if values.size < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, values.size - 1)) * float(values.std(ddof=1)) / math.sqrt(values.size)
    return mean, mean - half, mean + half


def replay(race: Race, rounds: Iterable[Mapping[Contender, float]], seeds: Iterable[Any] | None = None) -> Race:
    """Feed recorded rounds to ``race`` until it is done (each round may hold scores of
    contenders already dropped: only the survivors' are used), with their ``seeds`` when
    given (one per round, as :meth:`Race.add_round` records them). Returns ``race``.

    This is how a resumed race rebuilds its state from the runs it recorded, and how
    the offline benchmark replays a recorded matrix.
    """
    seed_list = iter(seeds) if seeds is not None else None
    for scores in rounds:
        if race.done:
            break
        seed = next(seed_list, None) if seed_list is not None else None
        race.add_round({c: scores[c] for c in race.survivors()}, seed=seed)
    return race
