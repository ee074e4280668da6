"""Search specs: the YAML file a user writes, validated before anything starts.

A spec names the data, the teacher(s), the student family, the search space, the
sampler, the early-stopping rule, the budget and the resources. Every hyperparameter
in ``space`` is either a fixed value or one distribution::

    temperature: {loguniform: [1, 20]}
    alpha: {uniform: [0.0, 0.5]}
    width: {choice: [4, 8, 16, 32, 64]}
    epochs: {int: [5, 30]}
    beta: 0.0

:func:`load_spec` reads a file with ``yaml.safe_load`` and returns a validated
:class:`SearchSpec`; anything wrong raises one :class:`~kdtune.errors.KdtuneError`
naming the file, the key and what is allowed.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable, Literal, Union, get_args

import yaml
from pydantic_core import PydanticUndefined
from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError, ValidationInfo, field_validator, model_validator

from kdtune.core.augment import resolve_augment
from kdtune.core.data import DatasetSplits, load_dataset, transfer_set_problem
from kdtune.core.distill import OBJECTIVE_MODES, OPTIMIZERS, TARGET_MODES, VIEW_PICKS, TeacherTargets
from kdtune.core.objectives import hyperparameter_table
from kdtune.core.plugins import Plugin, load_plugins
from kdtune.core.schedules import parse_schedule
from kdtune.core.teacher import PreparedTeachers, TeacherConfig, online_targets, prepare_views
from kdtune.core.teacher_files import check_logits_without_augmentation
from kdtune.errors import ConfigError, KdtuneError

STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class _Strict(BaseModel):
    # NaN and infinity are never meaningful settings (an infinite lr, a NaN width).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_stray_booleans(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic reads `num_samples: true` as 1; a boolean is only meant for a switch.
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and annotation is not bool and bool not in get_args(annotation):
            raise ValueError("true/false is not allowed here; expected a number or a setting")
        return value


class Uniform(_Strict):
    uniform: tuple[float, float]


class LogUniform(_Strict):
    loguniform: tuple[float, float]


class IntRange(_Strict):
    int: tuple[int, int]
    log: bool = False


class Choice(_Strict):
    choice: list[Any] = Field(min_length=1)


Distribution = Union[Uniform, LogUniform, IntRange, Choice]
Value = Union[Uniform, LogUniform, IntRange, Choice, float, int, str]
DISTRIBUTIONS: dict[str, type[_Strict]] = {"uniform": Uniform, "loguniform": LogUniform, "int": IntRange, "choice": Choice}
DISTRIBUTION_FORMS = "{uniform: [lo, hi]}, {loguniform: [lo, hi]}, {int: [lo, hi]} or {choice: [v1, v2, ...]}"


def _one_of(value: Any, allowed: tuple[str, ...] | list[str]) -> Any:
    if value not in allowed:
        raise ValueError(f"must be one of {', '.join(allowed)}")
    return value


def parse_value(raw: Any) -> Any:
    """One ``space`` entry: a fixed number or string, or exactly one distribution.

    Raises ``ValueError`` with one message saying what is wrong and which forms are
    allowed (instead of pydantic's one error per union branch).
    """
    if isinstance(raw, bool):
        raise ValueError(f"must be a number, a string or a distribution ({DISTRIBUTION_FORMS})")
    if isinstance(raw, float) and not math.isfinite(raw):
        raise ValueError("must be a finite number")
    if isinstance(raw, (list, tuple)):
        raise ValueError(f"a list is not a value; to search over values write {{choice: {list(raw)!r}}}")
    if not isinstance(raw, dict):
        return raw
    kinds = [key for key in raw if key in DISTRIBUTIONS]
    extra = [key for key in raw if key not in DISTRIBUTIONS and not (key == "log" and "int" in raw)]
    if len(kinds) != 1 or extra:
        raise ValueError(f"a distribution is exactly one of {DISTRIBUTION_FORMS}; got keys {sorted(map(str, raw))}")
    kind = kinds[0]
    try:
        return DISTRIBUTIONS[kind].model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise ValueError(f"{where}: {error['msg']} (got {raw[kind]!r})") from None


def bounds(value: Any) -> tuple[Any, Any] | list[Any] | None:
    """The range (lo, hi) of a uniform/loguniform/int distribution, the list of a
    choice, or None for a fixed value."""
    if isinstance(value, Uniform):
        return value.uniform
    if isinstance(value, LogUniform):
        return value.loguniform
    if isinstance(value, IntRange):
        return value.int
    if isinstance(value, Choice):
        return value.choice
    return None


def possible_values(value: Any) -> list[Any]:
    """Extreme values a hyperparameter can take (both ends of a range, every choice, or the value)."""
    b = bounds(value)
    if b is None:
        return [value]
    return list(b)


class DataSpec(_Strict):
    dataset: str = "digits"
    root: str | None = None
    download: bool = False
    val_fraction: float = Field(0.2, gt=0, lt=0.9)
    test_fraction: float = Field(0.2, gt=0, lt=0.9)
    image_size: int | None = Field(None, ge=4, le=1024)
    train_subset: int | None = Field(None, ge=1)
    #: A transfer set: this many more training images, or "all" the rest, that distilled students
    #: learn from through the teacher alone (their labels never read); needs train_subset.
    unlabelled: int | Literal["all"] | None = None
    split_seed: int = 0
    #: A policy (none, standard) or explicit settings {policy, crop, padding, flip}
    #: (see kdtune.core.augment); standard flips only where a mirror keeps the class.
    augment: Any = None

    @field_validator("unlabelled")
    @classmethod
    def _transfer_set(cls, value: Any, info: ValidationInfo) -> Any:
        problem = transfer_set_problem(value, info.data.get("train_subset"))
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("augment")
    @classmethod
    def _known_augment(cls, value: Any, info: ValidationInfo) -> Any:
        _core_check(resolve_augment, value, info.data.get("dataset", ""), "augment")
        return value

    def augmentation(self) -> dict[str, Any] | None:
        """The resolved augmentation settings of the training images (None: none)."""
        return resolve_augment(self.augment, self.dataset)


def _core_check(check: Any, *args: Any) -> Any:
    """A core check's ConfigError as the ValueError pydantic reports at the field."""
    try:
        return check(*args)
    except ConfigError as exc:
        message = str(exc)
        field = args[-1]
        for prefix in (f"{field}: ", f"{field}."):
            message = message.removeprefix(prefix)
        raise ValueError(message) from None


class _OptimizerSettings(_Strict):
    """The optimizer settings the field's protocols set (student and teacher alike)."""

    momentum: float = Field(0.9, ge=0, le=1)
    nesterov: bool = True
    #: constant (default), cosine ({kind: cosine, warmup: 5}) or multistep
    #: ({kind: multistep, milestones: [150, 180, 210], gamma: 0.1}); see kdtune.core.schedules.
    lr_schedule: Any = None

    @field_validator("lr_schedule")
    @classmethod
    def _known_schedule(cls, value: Any) -> Any:
        return _core_check(parse_schedule, value, "lr_schedule")


class TeacherSpec(_OptimizerSettings):
    family: str = "mlp"
    width: float = Field(1024, gt=0)
    options: dict[str, Any] = Field(default_factory=dict)
    checkpoint: str | None = None
    #: A TorchScript or torch.export file (no family needed); see kdtune.core.teacher_files.
    file: str | None = None
    #: A .npz of precomputed logits keyed by sample index; see kdtune.core.teacher_files.
    logits: str | None = None
    epochs: int = Field(30, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(64, ge=1)
    optimizer: str = "adam"
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 0
    #: The teacher's own augmentation (a policy or settings as data.augment); null: data.augment's.
    augment: Any = None

    @field_validator("augment")
    @classmethod
    def _known_augment(cls, value: Any) -> Any:
        _core_check(resolve_augment, value, "", "augment")
        return value

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, value: str) -> str:
        return _one_of(value, OPTIMIZERS)

    def to_config(self) -> TeacherConfig:
        """The core's :class:`~kdtune.core.teacher.TeacherConfig` of this teacher, field by
        name (``options`` is the config's ``model_options``; file paths made absolute)."""
        values = self.model_dump()
        values["model_options"] = dict(values.pop("options"))
        values["augment"] = None  # resolved with the dataset by teacher_configs
        for name in ("checkpoint", "file", "logits"):
            if values[name]:
                values[name] = str(Path(values[name]).expanduser().resolve())
        return TeacherConfig(**values)


class StudentSpec(_OptimizerSettings):
    family: str = "mlp"
    options: dict[str, Any] = Field(default_factory=dict)
    optimizer: str = "adam"
    amp: bool = False
    #: constant (default), or a curriculum from the trial's temperature T0 to T0·end_factor
    #: over its budget: {kind: ramp, end_factor: 0.25, shape: linear | cosine}.
    temperature_schedule: Any = None

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, value: str) -> str:
        return _one_of(value, OPTIMIZERS)

    @field_validator("temperature_schedule")
    @classmethod
    def _known_temperature_schedule(cls, value: Any) -> Any:
        return _core_check(parse_schedule, value, "temperature_schedule")


class SpaceSpec(RootModel[dict[str, Any]]):
    """The ``space`` of a spec: every hyperparameter of the table in
    :mod:`kdtune.core.objectives` (registered losses' included), each a fixed value
    or one distribution, in the table's order (the order Optuna draws them in).
    Keys left out take the table's ``spec_default``; unknown keys are an error."""

    model_config = ConfigDict(frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _validate(cls, raw: Any) -> Any:
        if raw is None or raw is PydanticUndefined:  # `space:` left empty, or not given at all
            raw = {}
        if not isinstance(raw, dict):
            raise ValueError(f"must be a mapping of hyperparameter names to values, got {type(raw).__name__}")
        table = hyperparameter_table()
        if "method" in raw:  # the field's name for the objective
            if "soft_loss" in raw:
                raise ValueError("method: give the objective once, as method or as soft_loss, not both")
            raw = {("soft_loss" if key == "method" else key): value for key, value in raw.items()}
        unknown = [str(key) for key in raw if key not in table]
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown key; allowed keys: {', '.join(table)}")
        values = {}
        for name, declared in table.items():
            value = raw.get(name, declared.spec_default)
            try:
                # A switch is a plain true/false (parse_value refuses booleans elsewhere).
                fixed_switch = declared.kind == "bool" and isinstance(value, bool)
                values[name] = _checked(declared, value if fixed_switch else parse_value(value))
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        return values

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self.root[name]
        except KeyError:
            raise AttributeError(f"space has no hyperparameter {name!r}") from None

    def fixed(self) -> dict[str, Any]:
        """The hyperparameters that are not searched, with their values."""
        return {name: value for name, value in self.root.items() if bounds(value) is None}

    def searched(self) -> dict[str, Any]:
        """The hyperparameters that are searched, with their distributions (in the table's order)."""
        return {name: value for name, value in self.root.items() if bounds(value) is not None}


def _checked(declared: Any, value: Any) -> Any:
    """``value`` (fixed or a distribution) after checking it against its declaration."""
    b = bounds(value)
    if isinstance(b, tuple):
        lo, hi = b
        if lo > hi:
            raise ValueError(f"range [{lo}, {hi}] is empty (low > high)")
        if isinstance(value, LogUniform) and lo <= 0:
            raise ValueError(f"loguniform needs a low bound > 0, got {lo}")
    if declared.kind != "float" and isinstance(value, (Uniform, LogUniform)):
        raise ValueError("must be a fixed value, an int range or a choice")
    for candidate in possible_values(value):
        if not declared.allows(candidate):
            raise ValueError(f"value {candidate!r} is not allowed; allowed: {declared.allowed()}")
    return value


class TargetsSpec(_Strict):
    """Where the students' teacher targets come from (see kdtune.core.distill.TARGET_MODES).

    ``views``: the teacher's logits for ``k`` seeded augmented views of every training
    image, cached once (float16) and replayed by every trial; ``online``: the teacher
    runs on every batch on the trial's device; ``logits``: cached logits of the
    un-augmented images (only without augmentation). Default: views with
    augmentation, logits without; ``k`` defaults to 1 (measured adequate). ``pick``:
    a trial replays view (epoch − 1) mod k (cycle) or a seeded view per sample and
    epoch (random); ``seed`` draws the views.
    """

    mode: str | None = None
    #: One view was as good as the online teacher on Fashion-MNIST over 20 epochs (bench/views_k.py,
    #: 90% interval of the paired difference within ±0.5 points); long schedules may want more.
    k: int = Field(1, ge=1)
    pick: str = "cycle"
    seed: int = Field(0, ge=0)

    @field_validator("mode")
    @classmethod
    def _known_mode(cls, value: str | None) -> str | None:
        return value if value is None else _one_of(value, TARGET_MODES)

    @field_validator("pick")
    @classmethod
    def _known_pick(cls, value: str) -> str:
        return _one_of(value, VIEW_PICKS)


#: How the first trial of each student size draws its other hyperparameters
#: (``sampler.first_trials``): from the sampler, at the middle of every range, or at the
#: middle with the learning rate scaled by the student's width (kdtune.search.sampler.first_trials).
FIRST_TRIALS = ("random", "midpoint", "size_scaled")


class SamplerSpec(_Strict):
    #: A name in the SAMPLERS registry (kdtune.search.sampler), checked before the search starts.
    name: str = "tpe"
    objectives: list[str] = Field(default_factory=lambda: ["val_acc", "params"])
    n_startup_trials: int = Field(10, ge=0)
    multivariate: bool = True
    constant_liar: bool = True
    #: With discrete widths and a size among the objectives: give every width as many
    #: trials as any other (kdtune.search.sampler.BalancedSizes); False leaves the width to the sampler.
    balance_sizes: bool = True
    #: The first trial of each discrete width: ``size_scaled`` (every other searched hyperparameter
    #: at the middle of its range, the learning rate raised for narrower students), ``midpoint``
    #: (all at the middle; kdtune.search.sampler.midpoint) or ``random`` (from the sampler).
    first_trials: Literal[FIRST_TRIALS] = "size_scaled"  # type: ignore[valid-type]

    @field_validator("objectives")
    @classmethod
    def _accuracy_first(cls, value: list[str]) -> list[str]:
        sizes = [name for name in OBJECTIVE_MODES if name != "val_acc"]
        if (not value or value[0] != "val_acc" or len(set(value)) != len(value)
                or any(v not in OBJECTIVE_MODES for v in value)):
            raise ValueError(f"must start with val_acc, optionally followed by {' or '.join(sizes)}, without repeats")
        return value


#: Which epochs of a trial score the validation split (``early_stopping.validate_at``, and
#: a trial config's ``validate_at``): every epoch, for the per-epoch history; or only the
#: epochs someone acts on: the rungs (``report_epochs``), the checkpoint epochs and the last.
VALIDATE_EVERY_EPOCH, VALIDATE_RUNGS = "every_epoch", "rungs"


class EarlyStoppingSpec(_Strict):
    """How trials are stopped early (see :mod:`kdtune.scheduler`).

    ``pareto_asha`` (default): at each rung a trial continues only if no trial
    with fewer parameters has a lower validation loss after the same epochs and
    it is in the top 1/η of its own size there; with ``hv_epsilon`` > 0 (off by
    default: on recorded curves it raised the worst accuracy regret per size above
    the seed-to-seed spread and saved about one point of epochs, ``bench/anytime.py``),
    also only if even a perfect accuracy at its size could add ``hv_epsilon`` of
    the front's hypervolume. ``size_aware_asha``: ASHA within each size bucket
    (``size_key``); it spends about 2.5 times the epochs for the same front, but
    runs more trials to the end, so there is more evidence for choosing T.
    ``asha``: Ray's stock ASHA on accuracy. ``none``: every trial runs its full
    budget. Rungs are at grace·η^k epochs below the budget: 1, 3, 9, 27 with the
    defaults and an 81-epoch budget. Over one student size ``pareto_asha`` is
    successive halving within that size (rule 1 ranks same-size trials by quantile).
    """

    #: A name in the EARLY_STOPPING registry (kdtune.search.rules); checked with the
    #: other registered names before the search starts (kdtune.search.plan.preflight).
    rule: str = "pareto_asha"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(3.0, gt=1)
    size_key: Literal["width", "params"] = "width"
    hv_epsilon: float = Field(0.0, ge=0, lt=1)
    #: pareto_asha: the hv_epsilon bound never stops a trial more than this far ahead, in
    #: accuracy, of every smaller trial at its rung (about the seed-to-seed spread).
    min_gain: float = Field(0.01, ge=0, le=1)
    #: Which epochs of a search trial score the validation split: ``every_epoch`` (the
    #: per-epoch history is complete), or ``rungs``: only the epochs the rule decides at,
    #: checkpoint epochs and the last, which every decision and table reads. The other
    #: epochs' val_acc/val_loss are NaN in the history. Where scoring costs as much as
    #: training (a large validation split, a small train_subset) ``rungs`` cuts a trial's
    #: time with the same decisions and the same final scores.
    validate_at: Literal[VALIDATE_EVERY_EPOCH, VALIDATE_RUNGS] = VALIDATE_EVERY_EPOCH  # type: ignore[valid-type]


class ResourcesSpec(_Strict):
    cpus: float = Field(1.0, gt=0)
    gpus: float = Field(0.0, ge=0)
    max_concurrent_trials: int | None = Field(None, ge=1)


class FaultSpec(_Strict):
    """Fault injection for kdtune's own tests: raise inside a trial at an epoch."""

    raise_at_epoch: int | None = Field(None, ge=1)
    #: Times each faulty trial raises; a list gives one count per faulty trial
    #: (then the number of faulty trials is its length).
    raise_times: int | list[int] = Field(1)
    raise_in_trials: int = Field(1, ge=1)

    @field_validator("raise_times")
    @classmethod
    def _positive_counts(cls, value: int | list[int]) -> int | list[int]:
        counts = value if isinstance(value, list) else [value]
        if not counts or any(c < 1 for c in counts):
            raise ValueError("must be an integer >= 1 or a non-empty list of them")
        return value


class TrackingSpec(_Strict):
    """Where ``kdtune search`` logs the study when it ends (and after each resume):
    ``tracker`` is a name in kdtune.results.tracking.TRACKER_PACKAGES (checked, with
    its package, before the search starts); ``uri`` is MLflow's tracking URI
    (default ``sqlite:///<study folder>/mlflow.db``)."""

    tracker: str = "mlflow"
    uri: str | None = None


class SearchSpec(_Strict):
    """A validated search spec (see the module docstring and the README)."""

    study: str = "digits"
    #: The user's modules that register models, datasets, losses or rules
    #: (:mod:`kdtune.core.plugins`): file paths (absolute once validated) or module names.
    plugins: list[str] = Field(default_factory=list)
    seed: int = 0
    num_samples: int = Field(40, ge=1)
    data: DataSpec = Field(default_factory=DataSpec)
    teacher: TeacherSpec | list[TeacherSpec] = Field(default_factory=TeacherSpec)
    student: StudentSpec = Field(default_factory=StudentSpec)
    space: SpaceSpec = Field(default_factory=SpaceSpec)
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    early_stopping: EarlyStoppingSpec = Field(default_factory=EarlyStoppingSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    max_failures: int = Field(2, ge=0)
    #: No-distillation baselines after the search: true trains one per width that has a
    #: completed trial (a width none reached the end of has nothing to compare with),
    #: "all" one per width of the space, false none.
    baselines: Union[bool, Literal["all"]] = True
    checkpoint_every: int = Field(0, ge=0)
    tracking: TrackingSpec | None = None
    faults: FaultSpec | None = None
    teacher_targets: TargetsSpec = Field(default_factory=TargetsSpec)

    def targets_mode(self) -> str:
        """The teacher-target mode trials use: the spec's, or views with augmentation, logits without."""
        mode = self.teacher_targets.mode
        return mode if mode is not None else ("views" if self.data.augmentation() else "logits")

    @model_validator(mode="after")
    def _targets_serve_the_augmentation(self) -> "SearchSpec":
        augment, mode = self.data.augmentation(), self.targets_mode()
        try:
            check_logits_without_augmentation(self.teachers(), augment)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        if augment and mode == "logits":
            raise ValueError("teacher_targets.mode: logits are cached for the un-augmented images and would be wrong "
                             "for augmented ones; allowed with data.augment: views (cached augmented views, "
                             "the default) or online (the teacher on every batch)")
        if not augment and mode == "views":
            raise ValueError("teacher_targets.mode: views replay augmented images, and data.augment is none; "
                             "set data.augment (e.g. standard) or use mode logits")
        if mode == "views" and self.uses_features():
            raise ValueError("teacher_targets.mode: views cache logits only, and space.beta > 0 needs the "
                             "teacher's features of every view; use mode online, or beta: 0.0")
        return self

    @field_validator("study")
    @classmethod
    def _study_name(cls, value: str) -> str:
        if not STUDY_NAME.match(value):
            raise ValueError("must be 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit")
        return value

    @field_validator("teacher")
    @classmethod
    def _teachers_not_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("needs at least one teacher")
        for teacher in value if isinstance(value, list) else [value]:
            given = [name for name in ("checkpoint", "file", "logits") if getattr(teacher, name)]
            if len(given) > 1:
                raise ValueError(f"give at most one of checkpoint, file and logits per teacher, got "
                                 f"{' and '.join(given)}")
        return value

    def teachers(self) -> list[TeacherSpec]:
        """The teachers as a list (one or several)."""
        return list(self.teacher) if isinstance(self.teacher, list) else [self.teacher]

    def uses_features(self) -> bool:
        """Whether any trial can have beta > 0 (then teacher features are cached)."""
        return any(float(v) > 0 for v in possible_values(self.space.beta))


#: Names pydantic puts into an error's location for the branch of a union that failed.
UNION_TAGS = ("Uniform", "LogUniform", "IntRange", "Choice", "float", "int", "str", "list[TeacherSpec]", "TeacherSpec")


def _format_location(loc: tuple[Any, ...]) -> str:
    parts = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in UNION_TAGS:
            continue
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(top level)"


def _format_error(error: dict[str, Any]) -> str:
    kind, msg, loc = error["type"], error["msg"], error["loc"]
    key = _format_location(loc)
    if kind == "extra_forbidden":
        return f"{key}: unknown key"
    if kind == "literal_error":
        return f"{key}: {msg.replace('Input should be', 'must be')}, got {error.get('input')!r}"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    head, _, rest = msg.partition(": ")
    if loc and loc[-1] == "space" and rest and head.isidentifier():
        # SpaceSpec names the hyperparameter at the start of its message.
        return f"{key}.{head}: {rest}"
    return f"{key}: {msg} (got {error.get('input')!r})" if "input" in error and not isinstance(error.get("input"), dict) else f"{key}: {msg}"


def _allowed_keys(model: type[BaseModel]) -> str:
    return ", ".join(model.model_fields)


def parse_spec(raw: Any, source: str = "<spec>", base_dir: str | Path = ".") -> SearchSpec:
    """Validate an already-parsed spec (a dict); errors name ``source`` and the key.

    An empty spec (an empty or truncated file) is an error: it is almost always an
    accident. The defaults are asked for on purpose with a spec that sets any one
    key, e.g. ``study: my_study``. The spec's ``plugins`` (paths relative to
    ``base_dir``) are imported first, so that the names they register validate;
    the validated spec names them by absolute path.
    """
    if raw is None or raw == {}:
        raise KdtuneError(f"{source}: the spec is empty; write at least one key (e.g. `study: my_study`) "
                          f"to run the defaults on purpose, or start from search_spaces/digits.yaml")
    if not isinstance(raw, dict):
        raise KdtuneError(f"{source}: the spec must be a YAML mapping of keys to values, got {type(raw).__name__}")
    if raw.get("plugins"):
        raw = {**raw, "plugins": [plugin.reference for plugin in _load_spec_plugins(raw["plugins"], source, base_dir)]}
    try:
        return SearchSpec.model_validate(raw)
    except ValidationError as exc:
        formatted = [(error, _format_error(error)) for error in exc.errors()]
        keys = [line.split(":", 1)[0] for _, line in formatted]
        seen, lines = set(), []
        for (error, line), key in zip(formatted, keys):
            # A union (one teacher or a list of them) fails in every branch; when a
            # branch got as far as a key inside, the other branches' "wrong type"
            # complaints about the whole value are noise.
            if error["type"].endswith("_type") and any(k.startswith((key + ".", key + "[")) for k in keys):
                continue
            if key in seen:
                continue
            seen.add(key)
            if line.endswith("unknown key"):
                model = _model_at(error["loc"][:-1])
                if model is not None:
                    line += f"; allowed keys: {_allowed_keys(model)}"
            lines.append(line)
        raise KdtuneError(f"{source}: " + "\n  ".join(lines)) from None


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] = SearchSpec
    for item in loc:
        if isinstance(item, int) or item in UNION_TAGS:
            continue
        field = model.model_fields.get(str(item))
        if field is None:
            return None
        annotation = field.annotation
        candidates = getattr(annotation, "__args__", (annotation,))
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return None
        model = nested[0]
    return model


def _load_spec_plugins(entries: Any, source: str, base_dir: str | Path) -> list[Plugin]:
    if not isinstance(entries, list) or not all(isinstance(entry, str) for entry in entries):
        raise KdtuneError(f"{source}: plugins: must be a list of Python files (relative to the spec) or module "
                          f"names, got {entries!r}")
    try:
        return load_plugins(entries, base_dir)
    except KdtuneError as exc:
        raise KdtuneError(f"{source}: {exc}") from None


def load_spec(path: str | Path) -> SearchSpec:
    """Read and validate a spec file; raise :class:`KdtuneError` with one clear message."""
    path = Path(path)
    if not path.is_file():
        raise KdtuneError(f"{path}: spec file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise KdtuneError(f"{path}: not valid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise KdtuneError(f"{path}: not a text file (UTF-8 YAML expected)") from None
    return parse_spec(raw, str(path), base_dir=path.parent)


# --------------------------------------------------------------------------- spec → core


def teacher_configs(spec: SearchSpec) -> list[TeacherConfig]:
    """The spec's teachers as the core's :class:`~kdtune.core.teacher.TeacherConfig` objects
    (each trained with its own augmentation, or the data's when it names none)."""
    configs = []
    for teacher in spec.teachers():
        config = teacher.to_config()
        raw = teacher.augment if teacher.augment is not None else spec.data.augment
        config.augment = resolve_augment(raw, spec.data.dataset, "teacher.augment")
        configs.append(config)
    return configs


def spec_plugins(spec: SearchSpec) -> list[Plugin]:
    """The spec's plugins (imported when the spec was validated; importing again is free)."""
    return load_plugins(spec.plugins, ".")


def load_spec_data(spec: SearchSpec) -> DatasetSplits:
    """The dataset a spec names, split with its split seed (a data root made absolute)."""
    root = str(Path(spec.data.root).expanduser().resolve()) if spec.data.root else None
    return load_dataset(
        spec.data.dataset, root, seed=spec.data.split_seed, val_fraction=spec.data.val_fraction,
        test_fraction=spec.data.test_fraction, download=spec.data.download, image_size=spec.data.image_size,
    )


def spec_teacher_targets(spec: SearchSpec, prepared: PreparedTeachers, data: DatasetSplits,
                         log: Callable[[str], None] = print) -> TeacherTargets:
    """The teacher targets the spec's trials learn from (its ``teacher_targets`` mode),
    from the prepared teachers: their cached logits, their cached augmented views
    (built on first use), or the networks themselves for online targets."""
    mode = spec.targets_mode()
    if mode == "views":
        return prepare_views(prepared, teacher_configs(spec), data, spec.data.augmentation() or {},
                             spec.teacher_targets.k, spec.teacher_targets.seed, log=log)
    if mode == "online":
        return online_targets(prepared, teacher_configs(spec), data)
    return prepared.targets
