"""A user's own student family and dataset, in a plugin file that lives outside the
repository (neither on sys.path nor installed), reach every Ray worker through Ray's
runtime environment; a broken plugin is one clean error before anything starts.

The plugin records, each time a worker builds one of its students, which process
and node did it and which file the plugin module was imported from: that is how
the tests see that workers imported the shipped copy, not the user's file.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from conftest import REPO, assert_one_clean_error, write_spec
from kdtune.cli import main
from kdtune.core.objectives import LOSSES, Hyperparameter, hyperparameter_table, register_objective
from kdtune.registry import Registry
from test_faults import kill_group, short_tmpdir, subprocess_env

PLUGIN_SOURCE = textwrap.dedent('''
    """A user's plugin: a 1-D convolutional student family and a dataset of noisy waves."""
    import json
    import os
    import uuid
    from pathlib import Path

    import numpy as np
    import torch
    from torch import nn

    from kdtune.core.data import DATASETS, TensorSplit, make_splits
    from kdtune.core.models import MODELS, Network

    MARKS = Path({marks!r})


    class WaveNet(Network):
        feature_kind = "vector"

        def __init__(self, num_classes, channels):
            super().__init__()
            self.body = nn.Sequential(nn.Conv1d(1, channels, 5, padding=2), nn.ReLU(),
                                      nn.AdaptiveAvgPool1d(1), nn.Flatten())
            self.head = nn.Linear(channels, num_classes)
            self.feature_dim = channels

        def forward_features(self, x):
            features = self.body(x.unsqueeze(1))
            return self.head(features), features


    @MODELS.register("wavenet_test")
    def wavenet(input_shape, num_classes, width):
        """Sequences (L,) only."""
        if len(input_shape) != 1:
            raise ValueError(f"wavenet takes sequences (L,), got {{input_shape}}")
        node = None
        try:
            import ray
            if ray.is_initialized():
                node = ray.get_runtime_context().get_node_id()
        except Exception:
            pass
        MARKS.mkdir(parents=True, exist_ok=True)
        (MARKS / f"{{uuid.uuid4().hex}}.json").write_text(
            json.dumps({{"file": __file__, "pid": os.getpid(), "node": node}}))
        return WaveNet(num_classes, max(1, round(width)))


    @DATASETS.register("waves_test")
    def waves(root, *, seed, val_fraction, test_fraction, download, image_size):
        """Three classes of sine waves of different frequency, with noise."""
        rng = np.random.default_rng(0)
        n, length = 150, 24
        y = np.arange(n) % 3
        t = np.arange(length)
        x = (np.sin(2 * np.pi * (y[:, None] + 1) * t / length) + 0.5 * rng.normal(size=(n, length))).astype("float32")
        order = np.random.default_rng(seed).permutation(n)
        n_test, n_val = int(n * test_fraction), int(n * val_fraction)
        parts = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
        test, val, train = (TensorSplit(torch.from_numpy(x[p]), torch.from_numpy(y[p]), torch.from_numpy(p))
                            for p in parts)
        return make_splits("waves_test", train, val, test, num_classes=3, seed=seed, val_fraction=val_fraction,
                           test_fraction=test_fraction, image_size=image_size)
''')

PLUGIN_SPEC = {
    "study": "waves",
    "plugins": ["waves_plugin.py"],
    "num_samples": 2,
    "data": {"dataset": "waves_test"},
    "teacher": {"family": "mlp", "width": 32, "epochs": 3, "lr": 0.01},
    "student": {"family": "wavenet_test"},
    "space": {"temperature": {"loguniform": [1, 10]}, "alpha": 0.5, "width": 4, "lr": 0.01, "batch_size": 32,
              "epochs": 2},
    "early_stopping": {"rule": "none"},
    "resources": {"cpus": 1, "max_concurrent_trials": 2},
    "baselines": False,
}


def write_plugin(folder: Path, marks: Path) -> Path:
    """The plugin file, in a folder of its own (outside the repository)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "waves_plugin.py"
    path.write_text(PLUGIN_SOURCE.format(marks=str(marks)))
    return path


def read_marks(marks: Path, exclude_pid: int) -> list[dict]:
    """What the workers (not the driver ``exclude_pid``) recorded when building students."""
    found = [json.loads(p.read_text()) for p in sorted(marks.glob("*.json"))]
    return [mark for mark in found if mark["pid"] != exclude_pid]


def assert_shipped_copy(mark: dict, plugin: Path) -> None:
    """The module a worker imported came from Ray's runtime-resources folder, not the user's file."""
    imported = Path(mark["file"])
    assert "runtime_resources" in imported.parts, imported
    assert imported != plugin and plugin.parent not in imported.parents, imported
    assert imported.name == plugin.name


@pytest.mark.ray
def test_a_plugin_student_and_dataset_run_through_the_cli_in_two_worker_processes(tmp_path):
    marks = tmp_path / "marks"
    plugin = write_plugin(tmp_path / "user_code", marks)
    spec_path = write_spec(plugin.parent, PLUGIN_SPEC)
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    tmpdir = short_tmpdir()
    env = subprocess_env(home, tmpdir)
    assert str(plugin.parent) not in env.get("PYTHONPATH", "")
    proc = subprocess.Popen([sys.executable, "-m", "kdtune.cli", "search", str(spec_path), "--results",
                             str(tmp_path / "results")], cwd=work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=400)
    finally:
        kill_group(proc)
    assert proc.returncode == 0, output[-4000:]
    trials = pd.read_parquet(tmp_path / "results" / "waves" / "trials.parquet")
    assert len(trials) == 2 and (trials["status"] == "completed").all()
    workers = read_marks(marks, exclude_pid=proc.pid)
    assert len({mark["pid"] for mark in workers}) == 2, workers  # two worker processes, one trial each
    for mark in workers:
        assert_shipped_copy(mark, plugin)


CLUSTER_SCRIPT = textwrap.dedent('''
    """Two nodes on one machine; the head has no CPU, so every trial runs on the second node."""
    import json, sys
    import ray
    from ray.cluster_utils import Cluster

    results, spec_path = sys.argv[1], sys.argv[2]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    from kdtune.search import search
    result = search(spec_path, address=cluster.address, results_root=results, log=lambda m: print(m, flush=True))
    print("EVENTS " + json.dumps({"worker": worker.node_id, "head": cluster.head_node.node_id,
                                  "interrupted": result.interrupted}), flush=True)
    ray.shutdown()
    cluster.shutdown()
''')


@pytest.mark.slow
@pytest.mark.ray
def test_a_trial_on_a_second_node_imports_the_plugin_from_rays_runtime_resources(tmp_path):
    marks = tmp_path / "marks"
    plugin = write_plugin(tmp_path / "user_code", marks)
    spec_path = write_spec(plugin.parent, {**PLUGIN_SPEC, "study": "waves2", "resources": {"cpus": 1}})
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(os.urandom(32).hex())
    script = tmp_path / "cluster_run.py"
    script.write_text(CLUSTER_SCRIPT)
    tmpdir = short_tmpdir()
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "results"), str(spec_path)],
                            cwd=tmp_path, env=subprocess_env(home, tmpdir, RAY_AUTH_MODE="token"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=500)
    finally:
        kill_group(proc)
    assert proc.returncode == 0, output[-4000:]
    events = json.loads(next(line for line in output.splitlines() if line.startswith("EVENTS "))[len("EVENTS "):])
    trials = pd.read_parquet(tmp_path / "results" / "waves2" / "trials.parquet")
    assert len(trials) == 2 and (trials["status"] == "completed").all()
    assert set(trials["node_id"]) == {events["worker"]}
    workers = read_marks(marks, exclude_pid=proc.pid)
    assert workers and {mark["node"] for mark in workers} == {events["worker"]}
    for mark in workers:
        assert_shipped_copy(mark, plugin)


# --------------------------------------------------------------------------- bad plugins: one clean error


BAD_SPEC = {**PLUGIN_SPEC, "data": {"dataset": "digits"}, "student": {"family": "mlp"}}


def run_search(tmp_path: Path, plugin_source: str | None, entry: str = "plugin.py"):
    """``kdtune search`` on a spec whose plugin is ``plugin_source`` (None: no such file)."""
    folder = tmp_path / "user_code"
    folder.mkdir()
    if plugin_source is not None:
        (folder / entry).write_text(textwrap.dedent(plugin_source))
    spec = write_spec(folder, {**BAD_SPEC, "plugins": [entry]})
    outcome = CliRunner().invoke(main, ["search", str(spec), "--results", str(tmp_path / "results")])
    assert not (tmp_path / "results").exists()  # nothing started
    return outcome, folder / entry


def test_a_missing_plugin_file_is_one_clean_error(tmp_path):
    outcome, path = run_search(tmp_path, None, "missing_plugin.py")
    assert_one_clean_error(outcome, "plugins: missing_plugin.py", "no such file", str(path))


def test_a_plugin_that_raises_on_import_is_one_error_naming_its_file_and_line(tmp_path):
    source = """\
        import math

        RATIO = 1 / 0
    """
    outcome, path = run_search(tmp_path, source, "broken_plugin.py")
    assert "broken_plugin" not in sys.modules
    assert_one_clean_error(outcome, "plugins: broken_plugin.py", f"{path}, line 3", "RATIO = 1 / 0",
                           "ZeroDivisionError: division by zero")


def test_a_plugin_registering_a_taken_name_is_one_error_naming_its_line_and_the_owner(tmp_path):
    source = """\
        from kdtune.core.models import MODELS


        @MODELS.register("mlp")
        def my_mlp(input_shape, num_classes, width):
            raise AssertionError("never built")
    """
    outcome, path = run_search(tmp_path, source, "taken_plugin.py")
    assert_one_clean_error(outcome, "plugins: taken_plugin.py", str(path), "line 4",
                           "model 'mlp' is already registered by kdtune.core.models.mlp")


def test_a_plugin_named_like_an_installed_module_is_refused(tmp_path):
    # On the workers the shipped file is imported by its name: another module of that name would win.
    # tabnanny: a standard-library module that nothing in the suite imports (colorsys, say,
    # comes with matplotlib), so the refusal is about the name, not about an imported module.
    assert "tabnanny" not in sys.modules
    outcome, _ = run_search(tmp_path, "X = 1\n", "tabnanny.py")
    assert_one_clean_error(outcome, "plugins: tabnanny.py", "another module of that name exists", "rename the plugin")


# --------------------------------------------------------------------------- the same definitions imported again


def first():
    return "first"


def test_registering_the_same_definition_again_replaces_it_and_another_definition_is_refused():
    registry: Registry = Registry("widget")

    def make():
        def widget():
            return 1
        return widget

    copy = types.FunctionType(first.__code__, first.__globals__, "first")  # what executing a module again makes
    registry.register("w")(first)
    registry.register("w")(copy)
    assert registry.get("w") is copy and registry.names() == ["w"]
    with pytest.raises(ValueError, match=r"widget 'w' is already registered by .*first; choose another name"):
        registry.register("w")(make())  # a function defined inside another: no stable origin
    with pytest.raises(ValueError, match="already registered"):
        registry.register("w")(lambda: 2)


LOSS_MODULE = '''
from kdtune.core.objectives import Hyperparameter, register_objective


@register_objective("reimported_test", hyperparameters=(Hyperparameter("reimported_weight", "float", 1.0, minimum=0.0),))
def reimported(student_logits, teacher_logits, params):
    return params["reimported_weight"] * (student_logits - teacher_logits).abs().mean()
'''


def test_a_module_registering_a_loss_imported_again_registers_it_once(tmp_path):
    (tmp_path / "reimported_loss.py").write_text(LOSS_MODULE)
    sys.path.insert(0, str(tmp_path))
    try:
        module = importlib.import_module("reimported_loss")
        first = LOSSES.get("reimported_test")
        importlib.reload(module)  # executes the module again: new function, same definition
        assert LOSSES.get("reimported_test") is not first
        assert LOSSES.get("reimported_test").soft_term is module.reimported
        assert list(hyperparameter_table()).count("reimported_weight") == 1
        with pytest.raises(ValueError, match="loss 'reimported_test' is already registered"):
            register_objective("reimported_test")(lambda s, t, p: s.sum())
        with pytest.raises(ValueError, match="already declared"):
            register_objective("other_test", hyperparameters=(Hyperparameter("reimported_weight", "float", 1.0),))(
                _other_soft_term)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("reimported_loss", None)
        LOSSES.unregister("reimported_test")
        LOSSES.unregister("other_test")


def _other_soft_term(student_logits, teacher_logits, params):
    return student_logits.sum()


# --------------------------------------------------------------------------- the documented example


def documented_files(markdown: str) -> dict[str, str]:
    """The code blocks of a markdown text that start with a ``# file: NAME`` line, by NAME."""
    import re

    files = {}
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", markdown, flags=re.M | re.S):
        first, _, rest = block.partition("\n")
        if first.startswith("# file: "):
            files[first[len("# file: "):].strip()] = rest
    return files


def test_the_documented_example_makes_its_teacher_and_validates(tmp_path):
    files = documented_files((REPO / "docs" / "own_data.md").read_text())
    assert set(files) == {"signals.py", "make_data_and_teacher.py", "signals.yaml"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    made = subprocess.run([sys.executable, "make_data_and_teacher.py"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    checked = subprocess.run([sys.executable, "-m", "kdtune.cli", "validate", "signals.yaml"], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=300)
    assert checked.returncode == 0, checked.stderr[-3000:]
    assert "signals.yaml: ok: study 'signals'" in checked.stdout


def test_a_package_folder_plugin_is_imported_by_its_name_and_shipped_whole(tmp_path):
    from kdtune.core.plugins import Plugin, import_plugins, load_plugins, plugin_runtime_env

    package = tmp_path / "code" / "kd_pkg_test"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("from kd_pkg_test.helpers import VALUE\n")
    (package / "helpers.py").write_text("VALUE = 42\n")
    try:
        (plugin,) = load_plugins(["code/kd_pkg_test/"], tmp_path)
        assert plugin.module == "kd_pkg_test" and sys.modules["kd_pkg_test"].VALUE == 42
        assert plugin_runtime_env([plugin]) == {"py_modules": [str(package)]}
        assert load_plugins([plugin.reference], "/") == [Plugin(plugin.reference, "kd_pkg_test", str(package))]
    finally:
        for name in ("kd_pkg_test", "kd_pkg_test.helpers"):
            sys.modules.pop(name, None)
    # A worker that can neither import it by name nor read the driver's path says why.
    from kdtune.errors import KdtuneError

    with pytest.raises(KdtuneError, match="cannot be imported on this Ray node.*runtime_env"):
        import_plugins([Plugin("gone.py", "kd_gone_test", str(tmp_path / "gone.py"))])
