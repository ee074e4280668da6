"""Bad input is refused before anything starts: one clear message, exit status 2.

Every malformed spec and every malformed command line below must make kdtune
print exactly one error (naming the file or option, the key, and what is
allowed) on stderr, exit with status 2, print no traceback, start no Ray
instance, and write nothing (no study folder for a spec rejected before the
search starts). The commands run in-process through click's CliRunner; a Ray
start would leave a ``session_*_<this pid>`` folder in Ray's temp dir, which is
what the tests look for.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml
from click.testing import CliRunner

from kdtune.cli import main
from kdtune.models import build_model
from tests.conftest import assert_one_clean_error

BASE: dict[str, Any] = {
    "study": "bad",
    "seed": 0,
    "num_samples": 2,
    "data": {"dataset": "digits", "train_subset": 150},
    "teacher": {"family": "mlp", "width": 64, "options": {"depth": 2}, "epochs": 2},
    "student": {"family": "mlp", "options": {"depth": 2}},
    "space": {"temperature": {"loguniform": [1, 10]}, "alpha": {"uniform": [0.0, 0.5]},
              "width": {"choice": [8, 16]}, "lr": 0.01, "epochs": 2},
    "resources": {"cpus": 1},
    "baselines": False,
}


def changed(path: str, value: Any) -> Callable[[Path], str]:
    """BASE with the value at dotted ``path`` replaced (or added), as YAML text."""

    def make(_: Path) -> str:
        spec = copy.deepcopy(BASE)
        node = spec
        *parents, last = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
        return yaml.safe_dump(spec, sort_keys=False)

    return make


def text(raw: str | bytes) -> Callable[[Path], str | bytes]:
    return lambda _: raw


def wrong_architecture_checkpoint(folder: Path) -> str:
    """A real state_dict of a width-32 MLP offered as the width-64 teacher."""
    path = folder / "teacher_w32.pt"
    torch.save(build_model("mlp", (1, 8, 8), 10, 32, depth=2).state_dict(), path)
    return changed("teacher.checkpoint", str(path))(folder)


def not_a_checkpoint(folder: Path) -> str:
    path = folder / "notes.pt"
    path.write_text("these are not weights")
    return changed("teacher.checkpoint", str(path))(folder)


# (id, spec text maker, substrings the one error message must contain)
BAD_SPECS = [
    ("yaml-syntax", text("study: [unclosed\nseed: 0\n"), ["spec.yaml", "not valid YAML", "line 2"]),
    ("yaml-list", text("- study\n- seed\n"), ["spec.yaml", "mapping", "list"]),
    ("yaml-scalar", text("just some words\n"), ["spec.yaml", "mapping", "str"]),
    ("not-text", text(b"\xff\xfe\x00 binary"), ["spec.yaml", "not a text file"]),
    ("unknown-top-level-key", changed("studdy", "x"), ["studdy", "unknown key", "allowed keys", "num_samples"]),
    ("unknown-space-key", changed("space.temprature", 3), ["space.temprature", "unknown key", "temperature"]),
    ("unknown-teacher-key", changed("teacher.widht", 3), ["teacher.widht", "unknown key", "width"]),
    ("unknown-resources-key", changed("resources.gpu", 1), ["resources.gpu", "unknown key", "gpus"]),
    ("unknown-distribution", changed("space.alpha", {"normal": [0, 1]}), ["space.alpha", "uniform", "choice"]),
    ("two-distributions", changed("space.alpha", {"uniform": [0, 1], "loguniform": [0.1, 1]}),
     ["space.alpha", "exactly one of"]),
    ("num-samples-text", changed("num_samples", "many"), ["num_samples", "integer"]),
    ("num-samples-zero", changed("num_samples", 0), ["num_samples", "greater than or equal to 1"]),
    ("num-samples-boolean", changed("num_samples", True), ["num_samples", "true/false"]),
    ("temperature-loguniform-from-0", changed("space.temperature", {"loguniform": [0, 5]}),
     ["temperature", "low bound > 0"]),
    ("temperature-range-reversed", changed("space.temperature", {"loguniform": [5, 1]}), ["temperature", "empty"]),
    ("alpha-above-1", changed("space.alpha", 1.5), ["alpha", "1.5", "[0, 1]"]),
    ("alpha-range-above-1", changed("space.alpha", {"uniform": [0.0, 1.5]}), ["alpha", "[0, 1]"]),
    ("empty-choice", changed("space.width", {"choice": []}), ["space.width", "at least 1"]),
    ("width-not-a-number", changed("space.width", {"choice": ["wide"]}), ["width", "'wide'", "numbers > 0"]),
    ("epochs-fractional-int-range", changed("space.epochs", {"int": [1.5, 3]}), ["space.epochs", "integer"]),
    ("epochs-continuous", changed("space.epochs", {"uniform": [1, 3]}), ["epochs", "int range or a choice"]),
    ("batch-size-zero", changed("space.batch_size", 0), ["batch_size", "integers >= 1"]),
    ("nothing-searched", changed("space", {"temperature": 4.0, "alpha": 0.5, "width": 16}),
     ["space", "nothing to search", "distribution"]),
    ("temperature-nan", changed("space.temperature", float("nan")), ["space.temperature", "finite"]),
    ("lr-infinite", changed("space.lr", float("inf")), ["space.lr", "finite"]),
    ("lr-range-to-infinity", changed("space.lr", {"loguniform": [0.001, float("inf")]}), ["space.lr", "finite"]),
    ("teacher-width-nan", changed("teacher.width", float("nan")), ["teacher.width", "finite"]),
    ("negative-cpus", changed("resources.cpus", -1), ["resources.cpus", "greater than 0"]),
    ("negative-gpus", changed("resources.gpus", -1), ["resources.gpus", "greater than or equal to 0"]),
    ("more-cpus-than-the-cluster", changed("resources.cpus", 10000), ["resources.cpus", "10000 CPUs", "at most"]),
    ("cifar10-without-root", changed("data", {"dataset": "cifar10"}), ["data.root", "cifar-10-batches-py"]),
    ("unknown-dataset", changed("data.dataset", "imagenet"), ["data.dataset", "imagenet", "digits"]),
    ("unknown-student-family", changed("student.family", "transformer"), ["student.family", "mlp"]),
    ("misspelt-model-option", changed("student.options", {"depht": 2}), ["student.options.depht", "depth"]),
    ("teacher-checkpoint-missing", changed("teacher.checkpoint", "/nonexistent/teacher.pt"),
     ["teacher.checkpoint", "/nonexistent/teacher.pt", "does not exist"]),
    ("teacher-checkpoint-wrong-architecture", wrong_architecture_checkpoint,
     ["teacher.checkpoint", "teacher_w32.pt", "does not match", "(32,)", "(64,)"]),
    ("teacher-checkpoint-not-weights", not_a_checkpoint, ["teacher.checkpoint", "notes.pt", "weights-only"]),
    ("no-teachers", changed("teacher", []), ["teacher", "at least one"]),
    ("objectives-without-accuracy", changed("sampler.objectives", ["params"]), ["sampler.objectives", "val_acc"]),
    ("unknown-early-stopping-rule", changed("early_stopping.rule", "hyperband"),
     ["early_stopping.rule", "size_aware_asha"]),
    ("study-name-escapes-results", changed("study", "../elsewhere"), ["study", "letters, digits"]),
    ("val-fraction-above-1", changed("data.val_fraction", 1.5), ["data.val_fraction", "less than"]),
    ("unlabelled-without-subset", changed("data", {"dataset": "digits", "unlabelled": "all"}),
     ["data.unlabelled", "needs train_subset"]),
    ("unlabelled-zero", changed("data.unlabelled", 0), ["data.unlabelled", "integer >= 1, 'all' or null"]),
    ("unlabelled-word", changed("data.unlabelled", "most"), ["data.unlabelled", "'all'"]),
    # digits has 1,077 training images at these fractions: 150 labelled leave 927 to draw from.
    ("unlabelled-too-many", changed("data.unlabelled", 5000), ["data.unlabelled", "from 1 to 927", "outside"]),
    ("subset-too-large", changed("data.train_subset", 5000), ["data.train_subset", "from 1 to 1077"]),
    # An empty or truncated file is an accident, not a request for the defaults.
    ("empty-file", lambda tmp: "", ["spec is empty", "study: my_study"]),
    ("only-comments", lambda tmp: "# study: digits\n# space: ...\n", ["spec is empty", "defaults on purpose"]),
    ("method-given-twice", changed("space", {"method": "dkd", "soft_loss": "kl", "temperature": {"uniform": [1, 4]}}),
     ["space.method", "once"]),
    ("unknown-method", changed("space.method", "crd"), ["space.soft_loss", "crd", "dkd", "dist"]),
]


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if the command reaches kdtune's Ray session (started, joined or
    reused): bad input must be refused before it."""
    def refuse(*args, **kwargs):
        pytest.fail("the command reached kdtune.search.pipeline.ray_session")

    monkeypatch.setattr("kdtune.search.pipeline.ray_session", refuse)


@pytest.mark.parametrize("maker, needles", [pytest.param(m, n, id=i) for i, m, n in BAD_SPECS])
def test_a_malformed_spec_is_refused_before_anything_starts(maker, needles, tmp_path, no_ray):
    spec_path = tmp_path / "spec.yaml"
    content = maker(tmp_path)
    if isinstance(content, bytes):
        spec_path.write_bytes(content)
    else:
        spec_path.write_text(content)
    results = tmp_path / "results"
    runner = CliRunner()
    for command in (["validate", str(spec_path)], ["search", str(spec_path), "--results", str(results)]):
        assert_one_clean_error(runner.invoke(main, command), *needles)
    assert not results.exists(), "a rejected spec must leave no results folder behind"


def test_the_table_covers_at_least_twenty_kinds_of_bad_spec():
    assert len(BAD_SPECS) >= 20 and len({i for i, _, _ in BAD_SPECS}) == len(BAD_SPECS)


def _study_folders(root: Path) -> dict[str, Path]:
    """Folders for the results commands: not a study, an empty one, partial ones."""
    not_a_study = root / "photos"
    not_a_study.mkdir()
    (not_a_study / "cat.jpg").write_bytes(b"\xff\xd8\xff")
    empty = root / "empty"
    empty.mkdir()
    # A study killed before its first trial finished: spec and study.json, no tables.
    partial = root / "partial"
    (partial / "teacher").mkdir(parents=True)
    (partial / "spec.yaml").write_text(yaml.safe_dump(BASE))
    (partial / "study.json").write_text(json.dumps({"study": "partial", "state": "starting"}))
    garbled = root / "garbled"
    garbled.mkdir()
    (garbled / "study.json").write_text("{not json")
    (garbled / "spec.yaml").write_text(yaml.safe_dump(BASE))
    return {"not_a_study": not_a_study, "empty": empty, "partial": partial, "garbled": garbled,
            "missing": root / "no-such-folder"}


# (id, arguments with {spec}/{results}/{folder name} placeholders, substrings of the message)
BAD_COMMANDS = [
    ("unknown-option", ["search", "{spec}", "--bogus"], ["--bogus"]),
    ("unknown-command", ["frobnicate"], ["frobnicate"]),
    ("num-samples-zero", ["search", "{spec}", "--num-samples", "0"], ["--num-samples", "x>=1"]),
    ("num-samples-text", ["search", "{spec}", "--num-samples", "abc"], ["--num-samples", "'abc'"]),
    ("spec-file-missing", ["search", "{root}/missing.yaml", "--results", "{results}"], ["missing.yaml", "not found"]),
    ("validate-file-missing", ["validate", "{root}/missing.yaml"], ["missing.yaml", "not found"]),
    ("spec-is-a-folder", ["search", "{root}", "--results", "{results}"], ["is a directory"]),
    ("name-escapes-results", ["search", "{spec}", "--name", "../x", "--results", "{results}"],
     ["--name", "letters, digits"]),
    ("resume-of-nothing", ["search", "{spec}", "--resume", "--results", "{results}"],
     ["--resume", "no study", "run without --resume"]),
    ("export-without-trial-or-index", ["export", "{partial}"], ["--trial", "--pareto-index"]),
    ("export-with-both", ["export", "{partial}", "--trial", "x", "--pareto-index", "0"],
     ["--trial", "--pareto-index"]),
    ("export-negative-index", ["export", "{partial}", "--pareto-index", "-1"], ["--pareto-index"]),
    ("export-bad-format", ["export", "{partial}", "--trial", "x", "--format", "pickle"], ["--format", "onnx"]),
    ("evaluate-zero-seeds", ["evaluate", "{partial}", "--seeds", "0"], ["--seeds"]),
    ("evaluate-a-file", ["evaluate", "{spec}"], ["is a file"]),
]
for command in ("report", "best-t", "evaluate"):
    BAD_COMMANDS += [
        (f"{command}-not-a-study", [command, "{not_a_study}"], ["photos", "study"]),
        (f"{command}-empty-folder", [command, "{empty}"], ["empty", "study"]),
        (f"{command}-partial-study", [command, "{partial}"], ["partial", "trial", "esume"]),
        (f"{command}-garbled-study", [command, "{garbled}"], ["garbled"]),
        (f"{command}-missing-folder", [command, "{missing}"], ["no-such-folder"]),
    ]


@pytest.mark.parametrize("arguments, needles", [pytest.param(a, n, id=i) for i, a, n in BAD_COMMANDS])
def test_a_malformed_command_line_is_refused_with_one_message(arguments, needles, tmp_path, no_ray):
    folders = _study_folders(tmp_path)
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(BASE))
    results = tmp_path / "results"
    names = {"spec": str(spec_path), "results": str(results), "root": str(tmp_path),
             **{k: str(v) for k, v in folders.items()}}
    arguments = [a.format(**names) for a in arguments]
    before = {p: sorted(p.rglob("*")) for p in folders.values() if p.exists()}
    assert_one_clean_error(CliRunner().invoke(main, arguments), *needles)
    assert not results.exists()
    # The results commands only read: a bad study folder is left as it was.
    assert {p: sorted(p.rglob("*")) for p in folders.values() if p.exists()} == before


def test_a_finished_study_is_not_overwritten_without_resume(tmp_path):
    """A study folder that exists (here one whose search completed) refuses a new
    search of the same name: --resume continues it, --name starts another."""
    results = tmp_path / "results"
    study = results / "bad"
    study.mkdir(parents=True)
    (study / "spec.yaml").write_text(yaml.safe_dump(BASE))
    (study / "study.json").write_text(json.dumps({"study": "bad", "state": "complete"}))
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(BASE))
    before = sorted(study.rglob("*"))
    outcome = CliRunner().invoke(main, ["search", str(spec_path), "--results", str(results)])
    assert_one_clean_error(outcome, "already exists", "--resume", "--name")
    changed_spec = tmp_path / "changed.yaml"
    changed_spec.write_text(changed("space.lr", 0.1)(tmp_path))
    outcome = CliRunner().invoke(main, ["search", str(changed_spec), "--results", str(results), "--resume"])
    assert_one_clean_error(outcome, "--resume", "differs", "space")
    assert sorted(study.rglob("*")) == before
