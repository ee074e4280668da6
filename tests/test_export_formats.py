"""torch.export (pt2) and ONNX exports, run for real, for an MLP, a CNN and a ResNet student.

The MLP is the session's tiny study; the CNN and the ResNet come from two more
tiny searches (one trial each, two epochs, no baselines). Every export is
reloaded here with its own runtime (``torch.export.load``, onnxruntime) and
compared with the eager student rebuilt from the trial's checkpoint: logits at
batch size 1 and at a larger batch, and accuracy on the whole validation split
against the accuracy the trial recorded.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from conftest import TINY_SPEC, write_spec
from kdtune.cli import main
from kdtune.study import read_trial_config, trial_folder
from kdtune.export import export_student
from kdtune.results.export_formats import DEFAULT_FORMAT, FORMATS
from kdtune.models import build_model
from kdtune.search import load_spec_data
from kdtune.spec import load_spec
from kdtune.trial_names import folder_patterns, trial_dirname

onnxruntime = pytest.importorskip("onnxruntime", reason="the test extra installs onnxruntime: pip install -e '.[test]'")
pytest.importorskip("onnxscript", reason="the test extra installs onnxscript: pip install -e '.[test]'")

#: The ONNX graph runs other kernels than PyTorch: logits agree to rounding, not bit for bit.
LOGITS_ATOL = 1e-4
#: One trial of two epochs: enough for a trained student with a recorded accuracy.
STUDENTS = {
    "cnn": {"family": "cnn", "options": {}, "width": 4},
    "resnet": {"family": "resnet", "options": {"depth": 8}, "width": 0.5},
}


def small_study_spec(family: str) -> dict:
    student = STUDENTS[family]
    spec = copy.deepcopy(TINY_SPEC)
    spec.update(study=f"tiny_{family}", num_samples=1, baselines=False)
    spec["student"] = {"family": student["family"], "options": student["options"]}
    spec["space"].update(width=student["width"], epochs=2)
    spec["early_stopping"] = {"rule": "none"}
    return spec


@pytest.fixture(scope="module")
def studies(tiny_study, tmp_path_factory) -> dict[str, Path]:
    """A private copy of the tiny MLP study and one-trial CNN and ResNet studies."""
    from kdtune.search import search

    root = tmp_path_factory.mktemp("export_formats")
    found = {"mlp": Path(shutil.copytree(tiny_study[0], root / "mlp", ignore=shutil.ignore_patterns(".lock")))}
    for family in STUDENTS:
        spec_path = write_spec(root, small_study_spec(family), name=f"{family}.yaml")
        found[family] = search(spec_path, results_root=root / "results", log=lambda m: None).study_dir
    return found


def completed_trial(study: Path) -> pd.Series:
    trials = pd.read_parquet(study / "trials.parquet")
    done = trials[(trials["phase"] == "search") & (trials["status"] == "completed")]
    assert len(done), f"{study}: no completed search trial"
    return done.sort_values("val_acc").iloc[-1]


def eager_student(study: Path, trial_id: str, data) -> torch.nn.Module:
    """The trial's student built from its params.json and final checkpoint, independently of kdtune.export."""
    folder = trial_folder(study, trial_id)
    config = read_trial_config(folder)
    model = build_model(config["family"], data.input_shape, data.num_classes, config["width"],
                        **(config.get("model_options") or {}))
    state = torch.load(sorted(folder.glob("checkpoint_*/state.pt"))[-1], map_location="cpu", weights_only=True)
    model.load_state_dict(state["student"])
    return model.eval()


def exported(study: Path, fmt: str | None) -> tuple[pd.Series, object, Path]:
    """Export the best completed search trial of ``study`` (``fmt`` None: the default format);
    return its trials-table row, the study's data and the file, after checking the sidecar."""
    row = completed_trial(study)
    data = load_spec_data(load_spec(study / "spec.yaml"))
    path, sidecar = export_student(study, trial_id=row["trial_id"], **({"fmt": fmt} if fmt else {}))
    fmt = fmt or DEFAULT_FORMAT
    assert path == study / "exports" / f"{row['trial_id']}{FORMATS[fmt]}"
    meta = json.loads(sidecar.read_text())
    assert meta["format"] == fmt and meta["val_acc_reproduced"] == pytest.approx(row["val_acc"], abs=1e-6)
    return row, data, path


def batches(data) -> list[torch.Tensor]:
    """A batch of one, an odd batch, and the whole validation split."""
    return [data.val.x[:1], data.val.x[3:20], data.val.x]


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("family", ["mlp", "cnn", "resnet"])
def test_onnx_export_runs_in_onnxruntime(studies, family):
    study = studies[family]
    row, data, path = exported(study, "onnx")
    assert path.suffix == ".onnx" and not list(path.parent.glob("*.data"))  # weights inside the one file
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (given,) = session.get_inputs()
    assert given.name == "input" and isinstance(given.shape[0], str), given.shape  # a symbolic batch size
    assert [o.name for o in session.get_outputs()] == ["logits"]
    eager = eager_student(study, row["trial_id"], data)
    for batch in batches(data):
        (logits,) = session.run(["logits"], {"input": batch.numpy()})
        assert logits.shape == (len(batch), data.num_classes)
        with torch.no_grad():
            np.testing.assert_allclose(logits, eager(batch).numpy(), rtol=0.0, atol=LOGITS_ATOL)
    accuracy = float((logits.argmax(axis=1) == data.val.y.numpy()).mean())
    assert accuracy == pytest.approx(row["val_acc"], abs=1e-6)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("family", ["mlp", "cnn", "resnet"])
def test_pt2_export_is_the_default_and_takes_any_batch_size(studies, family):
    study = studies[family]
    assert DEFAULT_FORMAT == "pt2"
    row, data, path = exported(study, None)
    assert path.suffix == ".pt2"

    program = torch.export.load(str(path))
    (batch_range,) = program.range_constraints.values()
    assert batch_range.lower == 1  # not specialised to the example batch, batch size 1 allowed
    loaded = program.module()
    eager = eager_student(study, row["trial_id"], data)
    with torch.no_grad():
        for batch in batches(data):
            torch.testing.assert_close(loaded(batch), eager(batch), rtol=0.0, atol=1e-5)
        accuracy = (loaded(data.val.x).argmax(dim=1) == data.val.y).float().mean().item()
    assert accuracy == pytest.approx(row["val_acc"], abs=1e-6)


@pytest.mark.ray
def test_cli_export_defaults_to_pt2_and_notes_torchscript_deprecation(studies):
    study = studies["mlp"]
    row = completed_trial(study)
    result = CliRunner().invoke(main, ["export", str(study), "--trial", row["trial_id"]])
    assert result.exit_code == 0, result.output
    assert (study / "exports" / f"{row['trial_id']}.pt2").is_file()
    out = study / "ts" / "student.ts"
    result = CliRunner().invoke(main, ["export", str(study), "--trial", row["trial_id"], "--format", "torchscript",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "torchscript is deprecated upstream" in result.stderr and out.is_file()
    help_text = CliRunner().invoke(main, ["export", "--help"]).output
    for fmt in FORMATS:
        assert fmt in help_text
    assert "deprecated" in help_text


@pytest.mark.ray
def test_trial_folders_are_short_and_ray_long_names_still_load(studies, tmp_path):
    """The search names trial folders short (search and baseline); a study whose folders
    carry Ray's long names (as studies written before did) exports the same way."""
    study = Path(shutil.copytree(studies["mlp"], tmp_path / "long", ignore=shutil.ignore_patterns(".lock")))
    shutil.rmtree(study / "exports", ignore_errors=True)
    trials = pd.read_parquet(study / "trials.parquet")
    renamed = {}
    for phase in ("search", "baseline"):
        row = trials[(trials["phase"] == phase) & (trials["status"] == "completed")].iloc[0]
        short = trial_folder(study, row["trial_id"])
        config = json.loads((short / "params.json").read_text())
        assert short.name == trial_dirname(SimpleNamespace(config=config, trial_id=row["trial_id"]))
        assert short.name.endswith(f"-{row['trial_id']}") and len(short.name) < 40
        if phase == "baseline":
            assert short.name.startswith("baseline-w")
        # Ray's own naming, as before kdtune named trial folders.
        long = short.with_name(f"distill_trainable_{row['trial_id']}_0_alpha={config.get('alpha')},"
                               f"amp=False_2026-11-30_08-19-53")
        short.rename(long)
        renamed[row["trial_id"]] = long
    for trial_id, folder in renamed.items():
        assert trial_folder(study, trial_id) == folder
        path, _ = export_student(study, trial_id=trial_id, fmt="state_dict")
        assert path.is_file()
    # Each pattern matches exactly the one trial's folder, not a neighbour whose id shares a prefix.
    for trial_id, folder in renamed.items():
        matches = {p for pattern in folder_patterns(trial_id) for p in (study / folder.parent.name).glob(pattern)}
        assert matches == {folder}
