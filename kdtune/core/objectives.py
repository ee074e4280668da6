"""Distillation objectives and the hyperparameters they declare: the one table.

Every hyperparameter a search can vary is declared here once, as a
:class:`Hyperparameter`: its type, allowed range, default, the value it takes in
the no-distillation baseline, and what it needs. That declaration drives spec
validation (:mod:`kdtune.spec`), the run config (:class:`kdtune.core.distill.RunConfig`),
the columns of the study's tables (:mod:`kdtune.tables`) and the baseline twin
of a configuration (:func:`baseline_values`).

A distillation objective (the soft, teacher-matching term of the loss) is one
:class:`Objective` in the :data:`LOSSES` registry, with the hyperparameters of
its own. The loss a run minimises is always::

    ce_weight·CE(student, labels) + kd_weight·objective(student, teacher) + beta·feature_loss

with ``ce_weight = alpha`` and ``kd_weight = 1 − alpha`` unless they are set: the
split is kdtune's convention, the explicit weights express published recipes
(logit standardization: CE 0.1 + KD 9; DKD: CE 1 + 1·TCKD + 8·NCKD).

Adding an objective is one decorated function, in the package or in a user's file::

    from kdtune.core.objectives import Hyperparameter, register_objective

    @register_objective("cosine", hyperparameters=(Hyperparameter("cos_margin", "float", 0.0, minimum=0.0),))
    def cosine(student_logits, teacher_logits, labels, params):
        ...  # a scalar tensor; params holds the run's hyperparameters by name

Its name becomes an allowed value of ``soft_loss``, and ``cos_margin`` a
searchable key of the spec's ``space`` and a column of ``trials.parquet``.
Optuna draws hyperparameters in the order they are declared here (the core ones
first, then each objective's, in registration order), so the order is part of
what makes a seeded search reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kdtune.errors import ConfigError
from kdtune.registry import Registry, definition_origin

#: ``Hyperparameter.baseline``: the baseline copies the value of its width's best
#: completed trial (or the middle of the searched range when it has none), so it is
#: tuned as well as the students it is compared with.
TUNED = "tuned"
#: ``Hyperparameter.baseline``: the baseline leaves the value as the spec fixes it (it
#: does not matter without a teacher).
UNCHANGED = "unchanged"
#: ``Hyperparameter.baseline`` of the student-size hyperparameter: one baseline per size.
PER_SIZE = "per size"

KINDS = ("float", "int", "choice", "bool")


@dataclass(frozen=True)
class Hyperparameter:
    """One searchable hyperparameter, declared once.

    ``kind`` is "float", "int" or "choice". Numbers are bounded by ``minimum`` and
    ``maximum`` (``exclusive_minimum`` makes the lower bound strict); a choice takes
    one of ``choices()`` (a function, so that the allowed values are derived from a
    registry when they are checked, plugins included). ``default`` is a run's value
    when nothing sets it; ``search_default`` is what a spec searches (or fixes) when
    its ``space`` leaves the key out: a fixed value or one distribution such as
    ``{"loguniform": [1, 20]}``. ``baseline`` is the value in the no-distillation
    baseline, or :data:`TUNED`, :data:`UNCHANGED` or :data:`PER_SIZE`.
    ``needs_features``: a value > 0 needs the teacher's penultimate features.
    ``size_exponent``: how the best value moves with the student's width, as an exponent
    ``e`` in ``value ∝ width**e``. With ``sampler.first_trials: size_scaled`` the first trial
    of the widest width starts at the middle of the range and a narrower one at the middle
    times ``(width / widest) ** e`` (:func:`kdtune.search.sampler.first_trials`).
    """

    name: str
    kind: str
    default: Any
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    choices: Callable[[], Sequence[str]] | None = None
    search_default: Any = None
    baseline: Any = UNCHANGED
    needs_features: bool = False
    description: str = ""
    #: None is allowed too: "not set", e.g. ``ce_weight`` left to follow ``alpha``.
    optional: bool = False
    size_exponent: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"hyperparameter {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "choice" and self.choices is None:
            raise ValueError(f"hyperparameter {self.name!r}: a choice needs choices")

    @property
    def spec_default(self) -> Any:
        """What a spec uses when its ``space`` leaves this key out."""
        return self.default if self.search_default is None else self.search_default

    def allows(self, value: Any) -> bool:
        """Whether ``value`` is one this hyperparameter may take."""
        if value is None:
            return self.optional
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "choice":
            return isinstance(value, str) and value in self.choices()  # type: ignore[misc]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.kind == "int" and not float(value).is_integer():
            return False
        if self.minimum is not None and (value <= self.minimum if self.exclusive_minimum else value < self.minimum):
            return False
        return self.maximum is None or value <= self.maximum

    def allowed(self) -> str:
        """The allowed values in words, e.g. "numbers in [0, 1]" or "one of: kl, logit_mse"."""
        unset = " (or null: not set)" if self.optional else ""
        if self.kind == "bool":
            return "true or false" + unset
        if self.kind == "choice":
            return "one of: " + ", ".join(self.choices()) + unset  # type: ignore[misc]
        things = "integers" if self.kind == "int" else "numbers"
        if self.minimum is not None and self.maximum is not None:
            return f"{things} in [{self.minimum:g}, {self.maximum:g}]" + unset
        if self.minimum is not None:
            return f"{things} {'>' if self.exclusive_minimum else '>='} {self.minimum:g}" + unset
        if self.maximum is not None:
            return f"{things} <= {self.maximum:g}" + unset
        return things + unset

    def check(self, value: Any) -> Any:
        """``value`` if allowed, else a :class:`ConfigError` naming this key and what is allowed."""
        if not self.allows(value):
            raise ConfigError(self.name, f"{value!r} is not allowed; allowed: {self.allowed()}")
        return int(value) if self.kind == "int" and value is not None else value


#: A soft term: (student_logits, teacher_logits, labels, params) → scalar tensor, where
#: ``params`` maps the run's hyperparameters by name (and ``epoch``, from 1, for
#: terms with a warm-up).
SoftTerm = Callable[[Any, Any, Any, Mapping[str, Any]], Any]


@dataclass(frozen=True)
class Objective:
    """A distillation objective: the soft term of the loss and the hyperparameters it declares."""

    name: str
    soft_term: SoftTerm
    hyperparameters: tuple[Hyperparameter, ...] = ()
    description: str = ""
    #: Extra fields a loss may use (e.g. whether a fused fast path exists).
    options: dict[str, Any] = field(default_factory=dict)


#: An objective is identified by its soft term's definition, so a module that
#: registers a loss and is imported again (a plugin in a reused Ray actor) registers
#: the same loss, not a second one.
LOSSES: Registry[Objective] = Registry("loss", origin=lambda objective: definition_origin(objective.soft_term))


def register_objective(name: str, hyperparameters: Sequence[Hyperparameter] = (), description: str = "",
                       recipes: Mapping[str, Mapping[str, Any]] | None = None,
                       **options: Any) -> Callable[[SoftTerm], SoftTerm]:
    """Decorator registering a soft term as the objective ``name`` with its own hyperparameters.

    A hyperparameter's name must not be taken by another objective or by the core
    table (an objective's weights get their own names, e.g. ``dkd_beta``, never ``beta``).
    A name already registered is an error unless ``fn`` is the same function or the
    same definition imported again (:meth:`~kdtune.registry.Registry.is_reregistration`),
    which then replaces the objective with its hyperparameters.

    ``recipes`` maps a label to the hyperparameter values a paper's code trains this
    objective with (its T, weights and own hyperparameters): what
    ``kdtune best-t --race --param recipe`` races (:func:`recipes`). Each value is
    checked against its declaration here.
    """

    def decorator(fn: SoftTerm) -> SoftTerm:
        objective = Objective(name, fn, tuple(hyperparameters), description or (fn.__doc__ or "").strip(),
                              {**options, "recipes": {k: dict(v) for k, v in (recipes or {}).items()}})
        table = hyperparameter_table()
        taken = set(table)
        if LOSSES.is_reregistration(name, objective):
            # Its own earlier declarations are replaced, not clashed with.
            taken -= {hp.name for hp in LOSSES.get(name).hyperparameters}
        clash = [hp.name for hp in hyperparameters if hp.name in taken]
        if clash:
            raise ValueError(f"loss {name!r}: hyperparameter name(s) {clash} already declared; choose new names")
        table.update({hp.name: hp for hp in hyperparameters})
        for label, values in objective.options["recipes"].items():
            for key, value in values.items():
                if key == "soft_loss" or key not in table or not table[key].allows(value):
                    raise ValueError(f"loss {name!r}: recipe {label!r} sets {key}={value!r}; a recipe sets "
                                     f"this loss's or the core hyperparameters to allowed values (not soft_loss)")
        LOSSES.register(name)(objective)
        return fn

    return decorator


#: The ``--param`` of a race whose contenders are the registered objectives' published recipes.
RECIPE = "recipe"


def recipes() -> dict[str, dict[str, Any]]:
    """Every registered objective's published recipes, by label, in registration order:
    ``soft_loss`` and the values the paper's code trains with (see :func:`register_objective`)."""
    found: dict[str, dict[str, Any]] = {}
    for name in LOSSES.registration_order():
        for label, values in LOSSES.get(name).options.get("recipes", {}).items():
            found[label] = {"soft_loss": name, **values}
    return found


def _loss_names() -> list[str]:
    return LOSSES.names()


#: The hyperparameters of every run, in the order Optuna draws them.
CORE_HYPERPARAMETERS: tuple[Hyperparameter, ...] = (
    Hyperparameter("temperature", "float", 4.0, minimum=0.0, exclusive_minimum=True,
                   search_default={"loguniform": [1.0, 20.0]}, baseline=1.0,
                   description="T of the soft targets softmax(teacher/T)"),
    Hyperparameter("alpha", "float", 0.5, minimum=0.0, maximum=1.0, search_default={"uniform": [0.0, 0.5]},
                   baseline=1.0, description="weight of the hard-label cross-entropy"),
    Hyperparameter("beta", "float", 0.0, minimum=0.0, baseline=0.0, needs_features=True,
                   description="weight of the feature-matching term"),
    Hyperparameter("noise", "float", 0.0, minimum=0.0, baseline=0.0,
                   description="std of Gaussian noise on the teacher's logits"),
    Hyperparameter("width", "float", 32, minimum=0.0, exclusive_minimum=True,
                   search_default={"choice": [4, 8, 16, 32, 64]}, baseline=PER_SIZE,
                   description="the student's width (its size)"),
    # Narrower students train best at larger learning rates under Adam in the standard
    # parametrisation (Yang et al. 2022, "Tensor Programs V", fig. 1; muP removes the shift by
    # scaling the hidden layers' lr as 1/width). -0.2 is the slope of log(best lr) against
    # log(width) over kdtune's references: -0.17 (digits MLP) and -0.18 (digits CNN), 20 seeds
    # each (bench/RESULTS.md, "First trials scaled by size").
    Hyperparameter("lr", "float", 1e-2, minimum=0.0, exclusive_minimum=True, baseline=TUNED,
                   size_exponent=-0.2, description="learning rate"),
    Hyperparameter("weight_decay", "float", 0.0, minimum=0.0, baseline=TUNED, description="weight decay"),
    Hyperparameter("batch_size", "int", 64, minimum=1, search_default=32, baseline=TUNED, description="batch size"),
    Hyperparameter("epochs", "int", 20, minimum=1, search_default=27, baseline=TUNED,
                   description="the epoch budget of a trial that is never stopped early"),
    Hyperparameter("soft_loss", "choice", "kl", choices=_loss_names,
                   description="the distillation objective (the method: kl or kd, logit_mse, dkd, dist, ...)"),
    Hyperparameter("ce_weight", "float", None, minimum=0.0, optional=True, baseline=1.0,
                   description="weight of the hard-label cross-entropy; null: alpha"),
    Hyperparameter("kd_weight", "float", None, minimum=0.0, optional=True, baseline=0.0,
                   description="weight of the distillation objective; null: 1 - alpha"),
    Hyperparameter("standardize", "bool", False,
                   description="z-score each sample's student and teacher logits before the objective "
                               "(logit standardization)"),
)

#: The hyperparameter that measures a student's size (one baseline per value).
SIZE_HYPERPARAMETER = "width"


def hyperparameter_table() -> dict[str, Hyperparameter]:
    """Every hyperparameter by name: the core ones, then each registered objective's."""
    table = {hp.name: hp for hp in CORE_HYPERPARAMETERS}
    for name in LOSSES.registration_order():
        for hp in LOSSES.get(name).hyperparameters:
            table[hp.name] = hp
    return table


def hyperparameter(name: str) -> Hyperparameter:
    """One hyperparameter's declaration; a :class:`ConfigError` listing the known names otherwise."""
    table = hyperparameter_table()
    if name not in table:
        raise ConfigError(name, f"unknown hyperparameter; allowed: {', '.join(table)}")
    return table[name]


def check_values(**values: Any) -> None:
    """Check named hyperparameter values against their declarations (the first bad one raises)."""
    for name, value in values.items():
        hyperparameter(name).check(value)


def owner_of(name: str) -> str | None:
    """The objective that declares hyperparameter ``name`` (None for the core ones)."""
    for loss in LOSSES.registration_order():
        if any(hp.name == name for hp in LOSSES.get(loss).hyperparameters):
            return loss
    return None


def loss_weights(params: Mapping[str, Any]) -> tuple[float, float]:
    """(weight of the cross-entropy, weight of the objective) of a run's hyperparameters:
    ``ce_weight`` and ``kd_weight`` when set, else ``alpha`` and ``1 − alpha``."""
    alpha = float(params.get("alpha", 1.0))
    ce, kd = params.get("ce_weight"), params.get("kd_weight")
    return (alpha if ce is None else float(ce)), (1.0 - alpha if kd is None else float(kd))


def baseline_values() -> dict[str, Any]:
    """The values every no-distillation baseline fixes (alpha = 1, beta = 0, no noise, ...)."""
    return {name: hp.baseline for name, hp in hyperparameter_table().items()
            if hp.baseline not in (TUNED, UNCHANGED, PER_SIZE)}


def tuned_in_baseline() -> list[str]:
    """The hyperparameters a baseline copies from its width's best trial."""
    return [name for name, hp in hyperparameter_table().items() if hp.baseline == TUNED]
