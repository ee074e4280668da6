"""Export a trained student of a study, checked against the accuracy it was recorded with.

Every trial that ran its full epoch budget left its student in a checkpoint
(``checkpoint_*/state.pt`` in its Ray trial folder). :func:`export_student`
rebuilds that student from the trial's exact config, writes it as a
``torch.export`` archive (``.pt2``, the default), a ``state_dict``, a TorchScript
module (deprecated upstream) or an ONNX graph, reloads the written file, and
refuses to keep it unless it reproduces the trial's recorded validation
accuracy and the eager student's logits at batch size 1. A JSON sidecar next to
the file says what it is: the trial's config and metrics, the teacher it learned
from, the input shape, the accuracy the exported file reproduced.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from kdtune import __version__
from kdtune.errors import ConfigError, KdtuneError, ResultsError
from kdtune.core.teacher import sha256_file
from kdtune.results.export_formats import DEFAULT_FORMAT, FORMATS
from kdtune.study import EXPORTS_DIR, SPEC_FILE, latest_checkpoint, recorded_trial_config, require_study, trial_folder

#: The exported file must reproduce the recorded validation accuracy this closely.
ACCURACY_TOLERANCE = 1e-6
#: ... and the eager student's logits on one image this closely (ONNX kernels differ in rounding).
LOGITS_TOLERANCE = 1e-4
#: Packages the ONNX export needs: the graph format and the dynamo-based exporter.
ONNX_PACKAGES = ("onnx", "onnxscript")
_MAX_LISTED = 20
READABLE = 0o644


def _json_safe(value: Any) -> Any:
    """``value`` with numpy scalars as Python numbers and NaN/missing as None."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


def _describe(row: pd.Series) -> str:
    return (f"trial {row['trial_id']} (width {row['width']:g}, params {int(row['params']):,}, "
            f"val_acc {row['val_acc']:.4f})")


def _listing(ids: list[str]) -> str:
    shown = ", ".join(ids[:_MAX_LISTED])
    return shown + (f", … ({len(ids) - _MAX_LISTED} more)" if len(ids) > _MAX_LISTED else "")


def _exportable_ids(trials: pd.DataFrame) -> list[str]:
    return [str(t) for t in trials.loc[trials["status"] == "completed", "trial_id"]]


def _select_trial(trials: pd.DataFrame, trial_id: str | None, pareto_index: int | None) -> pd.Series:
    """The trials-table row chosen by id or by position on the validation Pareto front."""
    from kdtune.results.analysis import pareto_front

    if pareto_index is not None:
        front = pareto_front(trials)
        if not 0 <= int(pareto_index) < len(front):
            points = "; ".join(f"{i} = {_describe(row)}" for i, (_, row) in enumerate(front.iterrows()))
            raise ResultsError(
                f"pareto index {pareto_index} is out of range: the validation Pareto front has {len(front)} "
                f"point(s), sorted by size: {points}"
            )
        return front.iloc[int(pareto_index)]
    matches = trials[trials["trial_id"].astype(str) == str(trial_id)]
    if matches.empty:
        exportable = _exportable_ids(trials)
        others = [f"{r.trial_id} ({r.status})" for r in trials.itertuples() if r.status != "completed"]
        raise ResultsError(
            f"unknown trial id {trial_id!r}; exportable (completed) trials: {_listing(exportable) or 'none'}"
            + (f"; trials without a saved student: {_listing(others)}" if others else "")
        )
    return matches.iloc[0]


def _require_onnx() -> None:
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise KdtuneError(f"export --format onnx needs the optional package(s) {', '.join(missing)}: "
                          f"pip install 'kdtune[onnx]'")


def _batch_dim() -> Any:
    """A dynamic batch dimension that admits batch size 1.

    torch.export specialises every dimension whose example size is 0 or 1, so
    the example batch given with this dimension must hold at least 2 inputs
    (see :func:`_example_batch`); min=1 then keeps size 1 valid at run time.
    """
    return torch.export.Dim("batch", min=1)


def _example_batch(x: torch.Tensor) -> torch.Tensor:
    """Two validation inputs (the first one twice if the split holds only one): never a
    batch of one, which torch.export and the ONNX exporter would bake in as a constant."""
    return x[:2] if len(x) >= 2 else x[:1].repeat(2, *([1] * (x.dim() - 1)))


def _load_student_state(folder: Path, row: pd.Series, config: dict[str, Any], trials: pd.DataFrame) -> dict[str, Any]:
    """The student weights of a trial that ran its full budget, or a ResultsError saying why not."""
    trial_id = row["trial_id"]
    exportable = _listing(_exportable_ids(trials)) or "none"
    if row["status"] != "completed":
        ran = ""
        if pd.notna(row.get("epochs_run")):
            ran = f", ran {int(row['epochs_run'])} of {int(config.get('epochs', 0))} epochs"
        raise ResultsError(
            f"trial {trial_id} is {row['status']}{ran}: it has no student to export, because only trials that "
            f"ran their full epoch budget (status completed) keep their student. Exportable trials: {exportable}"
        )
    checkpoint = latest_checkpoint(folder)
    if checkpoint is None:
        raise ResultsError(
            f"trial {trial_id} completed but {folder} holds no checkpoint_*/state.pt (removed, or never copied "
            f"from the search's storage); only trials that ran their full budget keep their student, in that "
            f"checkpoint. Exportable trials: {exportable}"
        )
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "student" not in state:
        raise ResultsError(f"{checkpoint}: not a kdtune trial checkpoint (no 'student' weights)")
    if int(state.get("epoch", -1)) != int(config["epochs"]):
        raise ResultsError(
            f"{checkpoint}: saved after epoch {state.get('epoch')} of {config['epochs']}; only the final-epoch "
            f"student matches the recorded val_acc"
        )
    return state["student"]


def _write_artefact(model: torch.nn.Module, fmt: str, path: Path, example: torch.Tensor) -> None:
    if fmt == "state_dict":
        torch.save(model.state_dict(), path)
    elif fmt == "pt2":
        program = torch.export.export(model, (example,), dynamic_shapes=({0: _batch_dim()},))
        torch.export.save(program, path)
    elif fmt == "torchscript":
        with warnings.catch_warnings():
            # torch.jit is deprecated in favour of torch.export, but a traced
            # module is still the one format any libtorch runtime can load.
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.simplefilter("ignore", category=FutureWarning)
            traced = torch.jit.trace(model, example)
            torch.jit.save(traced, str(path))
    else:
        # The dynamo-based exporter (torch.export, then onnxscript): the TorchScript-based one is on its way out.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.simplefilter("ignore", category=FutureWarning)
            program = torch.onnx.export(
                model, (example,), dynamo=True, input_names=["input"], output_names=["logits"],
                dynamic_shapes=({0: _batch_dim()},), verbose=False,
            )
        # Weights inline (a kdtune student is far below protobuf's 2 GB limit): one self-contained file.
        program.save(str(path), external_data=False)


def _onnx_runner(path: str | Path) -> Any:
    """A function from a float32 batch (numpy) to the logits of the ONNX file at ``path``:
    onnxruntime on the CPU when installed, else onnx's reference evaluator. The file is
    checked with ``onnx.checker`` first."""
    import onnx

    onnx.checker.check_model(onnx.load(str(path)))
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda batch: session.run(["logits"], {"input": np.ascontiguousarray(batch)})[0]
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(str(path))
    return lambda batch: evaluator.run(["logits"], {"input": batch})[0]


def _reloaded(path: Path, fmt: str, config: dict[str, Any], data: Any) -> Any:
    """The file at ``path`` reloaded from disk, as a function from a CPU batch to CPU logits."""
    from kdtune.core.models import build_model

    if fmt == "state_dict":
        fresh = build_model(config["family"], data.input_shape, data.num_classes, config["width"],
                            **(config.get("model_options") or {}))
        fresh.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return fresh.eval()
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.simplefilter("ignore", category=FutureWarning)
            return torch.jit.load(str(path), map_location="cpu").eval()
    if fmt == "pt2":
        # An exported program keeps the eval-mode graph it was traced in (its module refuses .eval()).
        # torch.export.load unpickles: only the file this function has just written is loaded here.
        return torch.export.load(str(path)).module()
    run = _onnx_runner(path)
    return lambda batch: torch.from_numpy(run(batch.numpy()))


def _logits(infer: Any, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    # 512: the batch size the trials' own evaluation used (kdtune.distill.evaluate), so
    # that a student scored on the same batches rounds alike.
    with torch.no_grad():
        return torch.cat([infer(x[i : i + batch_size]).float() for i in range(0, len(x), batch_size)])


def _check_reloaded(path: Path, fmt: str, config: dict[str, Any], data: Any, model: torch.nn.Module) -> float:
    """Validation accuracy of the file at ``path``, reloaded from disk, on the CPU, after
    checking that it gives the eager ``model``'s logits on a batch of one image (the
    batch size an export traced with a larger batch is most likely to get wrong)."""
    infer = _reloaded(path, fmt, config, data)
    single = data.val.x[:1]
    with torch.no_grad():
        expected = model(single)
    got = _logits(infer, single)
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=0.0, atol=LOGITS_TOLERANCE):
        gap = (got - expected).abs().max().item() if got.shape == expected.shape else f"shape {tuple(got.shape)}"
        raise ResultsError(
            f"the exported {fmt} gives other logits than the trained student on a batch of one image "
            f"(max difference {gap}, allowed {LOGITS_TOLERANCE}); nothing was written"
        )
    logits = _logits(infer, data.val.x)
    return float((logits.argmax(dim=1) == data.val.y).float().mean().item())


def export_student(
    study_dir: str | Path,
    trial_id: str | None = None,
    pareto_index: int | None = None,
    fmt: str = DEFAULT_FORMAT,
    out: str | Path | None = None,
) -> tuple[Path, Path]:
    """Export one trained student of a study and return ``(file, sidecar)``.

    Choose the student by ``trial_id`` (search or baseline trial) or by
    ``pareto_index`` K on the validation Pareto front sorted by size (0 = the
    smallest). ``fmt`` is one of :data:`FORMATS`:

    * ``"pt2"`` (default): a ``torch.export`` archive with a dynamic batch
      dimension (any batch size from 1); ``torch.export.load(path).module()``
      gives the model (the archive holds pickled data: load only files you trust);
    * ``"state_dict"``: ``torch.save`` of the weights; load into
      ``kdtune.models.build_model(family, input_shape, num_classes, width,
      **model_options)`` with the sidecar's values;
    * ``"torchscript"``: a traced module for ``torch.jit.load``, which torch
      deprecates in favour of torch.export;
    * ``"onnx"``: through the dynamo-based exporter (needs ``pip install
      'kdtune[onnx]'``); input ``"input"``, output ``"logits"``, dynamic batch.

    The file goes to ``out`` or ``<study_dir>/exports/<trial_id>.<pt2|pt|ts|onnx>``;
    the sidecar is ``<file>.json`` (trial config and metrics row, teacher cache
    key and info, kdtune and torch versions, format, input shape, number of
    classes, the file's sha256, recorded and reproduced val_acc). Inputs are
    expected normalised as the study's data splits are (see :mod:`kdtune.data`).

    The written file is reloaded from disk and run on the CPU: unless it gives
    the eager student's logits on a batch of one image (within 1e-4) and
    reproduces the trial's recorded final ``val_acc`` on the whole validation
    split (within 1e-6), nothing is kept and :class:`ResultsError` is raised.
    Both files are written atomically (temporary file, then rename).

    Raises :class:`ResultsError` for a folder that is not a study, an unknown
    trial id or out-of-range index (listing the valid ones), and a trial that
    has no saved student (stopped early, diverged, error, or checkpoint
    missing); :class:`ConfigError` for an unknown format or not exactly one of
    ``trial_id`` / ``pareto_index``; :class:`KdtuneError` for ONNX without the
    onnx or onnxscript package.
    """
    from kdtune.core.models import build_model
    from kdtune.results.analysis import load_results
    from kdtune.spec import load_spec, load_spec_data

    if fmt not in FORMATS:
        raise ConfigError("fmt", f"unknown export format {fmt!r}; allowed: {', '.join(FORMATS)}")
    if (trial_id is None) == (pareto_index is None):
        raise ConfigError("trial_id", "give exactly one of trial_id or pareto_index")
    if fmt == "onnx":
        _require_onnx()
    study_dir = Path(study_dir)
    meta = require_study(study_dir)
    trials = load_results(study_dir)
    row = _select_trial(trials, trial_id, pareto_index)
    chosen = str(row["trial_id"])
    folder = trial_folder(study_dir, chosen, meta)
    config = recorded_trial_config(study_dir, chosen, meta, folder)
    weights = _load_student_state(folder, row, config, trials)

    data = load_spec_data(load_spec(study_dir / SPEC_FILE))
    model = build_model(config["family"], data.input_shape, data.num_classes, config["width"],
                        **(config.get("model_options") or {}))
    model.load_state_dict(weights)
    model.eval()

    path = Path(out) if out is not None else study_dir / EXPORTS_DIR / f"{chosen}{FORMATS[fmt]}"
    sidecar = path.with_name(path.name + ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporaries = []
    try:
        # The temporary keeps the suffix: torch.export.save warns about an archive not named *.pt2.
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        temporaries.append(tmp)
        _write_artefact(model, fmt, tmp, _example_batch(data.val.x))
        recorded = float(row["val_acc"])
        reproduced = _check_reloaded(tmp, fmt, config, data, model)
        if not abs(reproduced - recorded) <= ACCURACY_TOLERANCE:
            trained_on = str(config.get("device") or "cpu")
            device_note = (
                "" if trained_on == "cpu" else f", or the trial ran on {trained_on} (exports are checked on the CPU)"
            )
            raise ResultsError(
                f"the exported {fmt} of trial {chosen} scores val_acc {reproduced:.6f} on the validation split, "
                f"but the trial recorded {recorded:.6f}: the data, the code or the checkpoint changed since the "
                f"search{device_note}; nothing was written"
            )
        payload = {
            "trial_id": chosen,
            "study": meta["study"],
            "format": fmt,
            "file": path.name,
            "sha256": sha256_file(tmp),
            "input_shape": [int(v) for v in data.input_shape],  # one sample, e.g. (C, H, W); the batch axis comes first
            "num_classes": int(data.num_classes),
            "dataset": data.name,
            "data_fingerprint": data.fingerprint,
            "val_acc_recorded": recorded,
            "val_acc_reproduced": reproduced,
            "config": _json_safe(config),
            "metrics": _json_safe(row.to_dict()),
            "teacher_key": meta.get("teacher_key"),
            "teacher": _json_safe(meta.get("teacher")),
            "kdtune_version": __version__,
            "torch_version": torch.__version__,
            "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        fd, side_name = tempfile.mkstemp(prefix=f".{sidecar.name}.", dir=path.parent)
        os.close(fd)
        tmp_sidecar = Path(side_name)
        temporaries.append(tmp_sidecar)
        tmp_sidecar.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
        for written in temporaries:
            os.chmod(written, READABLE)  # mkstemp makes owner-only files
        os.replace(tmp, path)
        os.replace(tmp_sidecar, sidecar)
    finally:
        for leftover in temporaries:
            leftover.unlink(missing_ok=True)
    return path, sidecar
