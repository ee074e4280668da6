"""The Ray Tune function trainable: one trial = one :func:`kdtune.distill.run`.

The dataset and the teacher's cached outputs travel as numpy arrays through
Ray's object store (``tune.with_parameters``): put there once, read zero-copy and
read-only by every trial on a node. The trainable reports once per epoch (Ray's
``training_iteration`` is the schedulers' epoch axis) and attaches a checkpoint
to the last report, so every finished student can be exported later.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdtune.data import DatasetSplits, TensorSplit
from kdtune.distill import RunConfig, TeacherTargets, run

STATE_FILE = "state.pt"


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


def distill_trainable(config: dict[str, Any], data: DataArrays | None = None, teacher: TeacherTargets | None = None) -> None:
    """Ray Tune function trainable: train one student and report every epoch.

    ``config`` holds the fields of :class:`~kdtune.distill.RunConfig` plus
    ``phase`` ("search" or "baseline") and, in kdtune's own tests, ``fault``.
    """
    from ray import tune
    import ray

    from kdtune.tables import trial_config

    assert data is not None
    config = trial_config(config)
    run_config = RunConfig.from_dict(config)
    context = tune.get_context()
    trial_id = context.get_trial_id() or "local"
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
        folder = pending.pop(epoch, None)
        ckpt = tune.Checkpoint.from_directory(folder) if folder else None
        tune.report({**metrics, **extras}, checkpoint=ckpt)
        if folder:
            shutil.rmtree(folder, ignore_errors=True)

    run(
        run_config,
        data.to_splits(),
        teacher if (run_config.alpha < 1 or run_config.beta > 0) else None,
        report,
        on_checkpoint=on_checkpoint,
        checkpoint_every=int(config.get("checkpoint_every", 0) or 0),
        resume_state=resume_state,
    )
