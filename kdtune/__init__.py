"""kdtune: search knowledge-distillation hyperparameters with Ray Tune and Optuna.

The package is layered (see docs/architecture.md); each layer imports only from
itself and the layers below it:

* :mod:`kdtune.core` — one distillation run in plain PyTorch: losses, models,
  data, the training loop, teachers, the hyperparameter table;
* :mod:`kdtune.spec` — the validated spec, beside the core;
* :mod:`kdtune.study` and :mod:`kdtune.tables` — the study folder and its tables;
* :mod:`kdtune.search` — Ray Tune and Optuna: plan, cluster, trainable,
  early-stopping rules, sampler, pipeline;
* :mod:`kdtune.results` — analysis, report, evaluation and export of finished studies;
* :mod:`kdtune.cli` on top.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType

__version__ = "0.1.0"

#: Module paths of the first layout, still importable. Users' code imports them
#: (``kdtune.losses.distillation_loss``, ``kdtune.analysis.load_results``), and
#: Ray's pickles of studies written before the redesign name them (the searcher
#: ``kdtune.searcher.KdOptunaSearch``, the rules ``kdtune.scheduler.ParetoASHA``,
#: the trial-record callback's ``kdtune.records`` helpers), so ``--resume`` of an
#: old study depends on them. Each name loads the module that now owns the concept.
LEGACY_MODULES: dict[str, str] = {
    "kdtune.losses": "kdtune.core.losses",
    "kdtune.models": "kdtune.core.models",
    "kdtune.data": "kdtune.core.data",
    "kdtune.distill": "kdtune.core.distill",
    "kdtune.teacher": "kdtune.core.teacher",
    "kdtune.records": "kdtune.study",
    "kdtune.scheduler": "kdtune.search.rules",
    "kdtune.searcher": "kdtune.search.sampler",
    "kdtune.trainable": "kdtune.search.trainable",
    "kdtune.analysis": "kdtune.results.analysis",
    "kdtune.report": "kdtune.results.report",
    "kdtune.evaluate": "kdtune.results.evaluate",
    "kdtune.export": "kdtune.results.export",
}


class _LegacyModuleAliases(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module path as the module that now owns it (the same module
    object, so registries are never loaded twice). Lazy: ``import kdtune`` loads
    nothing heavy, and the core stays importable without Ray."""

    def find_spec(self, fullname: str, path=None, target=None):  # noqa: ANN001 - importlib's signature
        if fullname not in LEGACY_MODULES:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(LEGACY_MODULES[spec.name])
        self._own_spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # importlib stamped the alias's spec on the module: give it back its own.
        module.__spec__ = self._own_spec


if not any(isinstance(finder, _LegacyModuleAliases) for finder in sys.meta_path):
    sys.meta_path.append(_LegacyModuleAliases())
