"""The Ray Tune function trainable: one trial = one :func:`kdtune.core.distill.run`.

The dataset and the teacher's cached outputs travel as numpy arrays through
Ray's object store (``tune.with_parameters``): put there once, read zero-copy and
read-only by every trial on a node.

Every ``tune.report`` is a synchronous round trip through the driver (the trial
waits until the driver has processed the result), tens of milliseconds against
an epoch of a small student that can take ten. So a trial reports only the
epochs someone acts on: the scheduler's rung epochs (``report_epochs``), epochs
with a checkpoint, the last epoch, and otherwise at most every
:data:`REPORT_INTERVAL_S` seconds so long epochs still show progress. The epochs in
between travel with the next report, in ``unreported_epochs`` (JSON), and the
tables unpack them: the history keeps one row per epoch. The schedulers read the
``epoch`` field, not Ray's report counter. The last report carries a checkpoint,
so every finished student can be exported later.

On ``--resume``, a trial that had already ended before the driver was killed
(it has a record, see :mod:`kdtune.study`) but that Ray's restored state still
lists as unfinished ends at once without training: its record keeps its outcome.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import tempfile
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray import cloudpickle  # the pickler Ray ships trial parameters with

from kdtune.core.data import DatasetSplits, TensorSplit
from kdtune.core.distill import TeacherTargets, run
from kdtune.core.objectives import LOSSES, Objective
from kdtune.core.plugins import Plugin, import_plugins
from kdtune.spec import VALIDATE_RUNGS
from kdtune.study import trial_config, trial_run_config

STATE_FILE = "state.pt"

#: Report at least this often (seconds) even between the epochs that must be reported.
REPORT_INTERVAL_S = 10.0


@dataclass
class DataArrays:
    """A :class:`DatasetSplits` as numpy arrays, cheap to share through the object store."""

    name: str
    arrays: dict[str, np.ndarray]
    num_classes: int
    input_shape: tuple[int, int, int]
    fingerprint: str

    @classmethod
    def from_splits(cls, data: DatasetSplits) -> "DataArrays":
        """Train and validation arrays only: trials never see the test split, which
        only ``kdtune evaluate`` reads."""
        arrays = {}
        for split in ("train", "val"):
            part: TensorSplit = getattr(data, split)
            arrays[f"{split}_x"] = part.x.numpy()
            arrays[f"{split}_y"] = part.y.numpy()
        return cls(data.name, arrays, data.num_classes, tuple(data.input_shape), data.fingerprint)

    def to_splits(self) -> DatasetSplits:
        with warnings.catch_warnings():
            # Arrays from the object store are read-only; runs only index them.
            warnings.simplefilter("ignore", UserWarning)
            splits = {
                split: TensorSplit(torch.from_numpy(self.arrays[f"{split}_x"]), torch.from_numpy(self.arrays[f"{split}_y"]))
                for split in ("train", "val")
            }
        no_test = TensorSplit(splits["val"].x[:0], splits["val"].y[:0])
        return DatasetSplits(self.name, splits["train"], splits["val"], no_test,
                             self.num_classes, self.input_shape, self.fingerprint)


def fault_counts(fault: dict[str, Any]) -> list[int]:
    """How many times each faulty trial raises, in the order trials claim a slot."""
    times = fault.get("raise_times", 1)
    if isinstance(times, (list, tuple)):
        return [int(t) for t in times]
    return [int(times)] * int(fault.get("raise_in_trials", 1))


def _claim_fault_slot(fault: dict[str, Any], trial_id: str) -> bool:
    """Whether this trial should raise the injected fault now (tests only).

    The first trials to get here each take a slot; slot ``i`` raises
    ``fault_counts(fault)[i]`` times. Attempts are counted in files (``trial-<id>``
    holds "slot attempts") so that retries of a trial, in a new actor or after a
    driver restart, see them.
    """
    folder = Path(fault["dir"])
    folder.mkdir(parents=True, exist_ok=True)
    counts = fault_counts(fault)
    mine = folder / f"trial-{trial_id}"
    if not mine.exists():
        for slot in range(len(counts)):
            try:
                fd = os.open(folder / f"slot-{slot}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                continue
            os.write(fd, trial_id.encode())
            os.close(fd)
            mine.write_text(f"{slot} 0")
            break
        else:
            return False
    slot, attempts = (int(v) for v in mine.read_text().split())
    if attempts >= counts[slot]:
        return False
    mine.write_text(f"{slot} {attempts + 1}")
    return True


class SparseReporter:
    """Decides which epochs go to Ray now and carries the others to the next report.

    ``on_epoch`` returns the result to report, with the metrics of the epochs held
    back since the last report attached as ``unreported_epochs`` (a JSON list), or
    None when this epoch is held back too.
    """

    def __init__(self, report_epochs: list[int] | tuple[int, ...], interval_s: float, clock=time.monotonic) -> None:
        self.report_epochs = {int(e) for e in report_epochs}
        self.interval_s = float(interval_s)
        self.clock = clock
        self.last_sent = clock()
        self.held: list[dict[str, Any]] = []

    def must_send(self, epoch: int, metrics: dict[str, Any], has_checkpoint: bool) -> bool:
        """Whether this epoch's metrics must reach Ray now."""
        return (has_checkpoint or epoch in self.report_epochs or metrics.get("status") != "running"
                or self.clock() - self.last_sent >= self.interval_s)

    def on_epoch(self, epoch: int, metrics: dict[str, Any], has_checkpoint: bool) -> dict[str, Any] | None:
        """The result to send for this epoch (with the held epochs), or None to hold it."""
        if not self.must_send(epoch, metrics, has_checkpoint):
            self.held.append(dict(metrics))
            return None
        result = {**metrics, "unreported_epochs": json.dumps(self.held)}
        self.held = []
        self.last_sent = self.clock()
        return result


def user_objectives(skip: set[str] | frozenset[str] = frozenset()) -> tuple[Objective, ...]:
    """The registered losses defined outside kdtune and outside the spec's plugins
    (modules ``skip``, which every worker imports itself): a loss registered from a
    test module or a notebook. Ray workers do not import the module that registered
    it, so the trials get it with their parameters (pickled by value) and register
    it on arrival. Only losses travel this way; a model, dataset or rule defined
    outside kdtune needs a plugin."""
    found = []
    for name in LOSSES.registration_order():
        objective = LOSSES.get(name)
        module = getattr(objective.soft_term, "__module__", "") or ""
        if not module.startswith("kdtune.") and module.split(".")[0] not in {m.split(".")[0] for m in skip}:
            found.append(objective)
            if module in sys.modules and module != "__main__":
                cloudpickle.register_pickle_by_value(sys.modules[module])
    return tuple(found)


def install_objectives(objectives: tuple[Objective, ...]) -> None:
    """Register the shipped objectives this worker does not know yet."""
    for objective in objectives:
        if objective.name not in LOSSES:
            LOSSES.register(objective.name)(objective)


def distill_trainable(config: dict[str, Any], data: DataArrays | None = None, teacher: TeacherTargets | None = None,
                      replays: frozenset[str] | set[str] | None = None,
                      objectives: tuple[Objective, ...] = (), plugins: tuple[Plugin, ...] = ()) -> None:
    """Ray Tune function trainable: train one student, reporting the epochs that matter.

    ``config`` holds the fields of :class:`~kdtune.distill.RunConfig` plus
    ``phase`` ("search" or "baseline"), ``report_epochs`` (epochs the scheduler
    decides at) and, in kdtune's own tests, ``fault``.
    ``replays`` holds the Ray ids of trials that had ended before a restart: run
    again, they end at once without training (their record holds their outcome).
    ``objectives`` are losses registered outside kdtune (:func:`user_objectives`);
    ``plugins`` are the spec's plugins, imported before the run config is built so
    that the names they register exist in this worker.
    """
    from ray import tune
    import ray

    assert data is not None
    import_plugins(plugins)
    install_objectives(objectives)
    config = trial_config(config)
    run_config = trial_run_config(config)
    context = tune.get_context()
    trial_id = context.get_trial_id() or "local"
    if replays and trial_id in replays:
        return
    node_id = ray.get_runtime_context().get_node_id()
    resume_state = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            resume_state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
    fault = config.get("fault")
    extras = {
        "node_id": node_id,
        "seed": run_config.seed,
        "epochs": run_config.epochs,
        "phase": config.get("phase", "search"),
    }
    pending: dict[int, Any] = {}
    reporter = SparseReporter(config.get("report_epochs") or (), REPORT_INTERVAL_S)
    checkpoint_every = int(config.get("checkpoint_every", 0) or 0)

    def on_checkpoint(epoch: int, state: dict[str, Any]) -> None:
        # Staged in the trial's working directory (inside Ray's temp dir), not in
        # /tmp: when the scheduler stops a trial at its last report, tune.report
        # never returns and the rmtree below never runs.
        folder = tempfile.mkdtemp(prefix="kdtune-ckpt-", dir=os.getcwd())
        torch.save(state, Path(folder) / STATE_FILE)
        pending[epoch] = folder

    def report(epoch: int, metrics: dict[str, Any]) -> None:
        if fault and fault.get("raise_at_epoch") == epoch and _claim_fault_slot(fault, trial_id):
            raise RuntimeError(f"injected fault at epoch {epoch}: simulated CUDA out of memory")
        result = reporter.on_epoch(epoch, metrics, has_checkpoint=epoch in pending)
        if result is None:
            return
        result.update(extras)  # the held epochs share them: the tables copy node_id and seed
        folder = pending.pop(epoch, None)
        ckpt = tune.Checkpoint.from_directory(folder) if folder else None
        tune.report(result, checkpoint=ckpt)
        if folder:
            shutil.rmtree(folder, ignore_errors=True)

    run(
        run_config,
        data.to_splits(),
        teacher if run_config.needs_teacher else None,
        report,
        on_checkpoint=on_checkpoint,
        checkpoint_every=checkpoint_every,
        resume_state=resume_state,
        validate_epochs=validated_epochs(config, checkpoint_every, run_config.epochs),
    )


def validated_epochs(config: dict[str, Any], checkpoint_every: int, epochs: int) -> frozenset[int] | None:
    """The epochs a trial scores the validation split at (None: every epoch). With
    ``validate_at: rungs``: its rungs and checkpoint epochs (the run adds the last), so
    every result a scheduler or a resumed trial reads is scored."""
    if config.get("validate_at") != VALIDATE_RUNGS:
        return None
    checkpoints = range(checkpoint_every, int(epochs) + 1, checkpoint_every) if checkpoint_every else ()
    return frozenset(int(e) for e in config.get("report_epochs") or ()) | frozenset(checkpoints)
