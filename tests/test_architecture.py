"""The package keeps its shape: layers import only downward, nothing imports in a
cycle, and the distillation core needs neither Ray, Optuna nor pydantic.

The layers (docs/architecture.md), bottom up:

0. base: ``kdtune`` (the package), ``errors``, ``atomic``, ``registry``, ``pareto``;
1. core: ``kdtune.core.*`` (plain PyTorch);
2. spec: ``kdtune.spec`` (beside the core, validated against its registries);
3. study: ``kdtune.study``, ``kdtune.tables``;
4. search (``kdtune.search.*``) and results (``kdtune.results.*``), which never import each other;
5. ``kdtune.cli``.

Every import counts, at module level or inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "kdtune"
BASE = {"kdtune", "kdtune.errors", "kdtune.atomic", "kdtune.registry", "kdtune.pareto", "kdtune.racing"}
FORBIDDEN_IN_CORE = ("ray", "optuna", "pydantic")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> tuple[int, str]:
    """(height, name) of the layer a kdtune module belongs to."""
    if module in BASE:
        return 0, "base"
    if module == "kdtune.core" or module.startswith("kdtune.core."):
        return 1, "core"
    if module == "kdtune.spec":
        return 2, "spec"
    if module in ("kdtune.study", "kdtune.tables", "kdtune.trial_names"):
        return 3, "study"
    if module == "kdtune.search" or module.startswith("kdtune.search."):
        return 4, "search"
    if module == "kdtune.results" or module.startswith("kdtune.results."):
        return 4, "results"
    if module == "kdtune.cli":
        return 5, "cli"
    raise AssertionError(f"{module} belongs to no layer: add it to docs/architecture.md and this test")


def imports_of(path: Path) -> list[tuple[str, int]]:
    """Every module ``path`` imports (absolute names) with its line number."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative imports are not used in kdtune; resolve them anyway
                base = module_name(path).split(".")[: -node.level + (1 if path.name == "__init__.py" else 0) or None]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, node.lineno))
            # `from kdtune.core import losses` imports the submodule kdtune.core.losses.
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                if (PACKAGE.parent / (candidate.replace(".", "/") + ".py")).is_file():
                    found.append((candidate, node.lineno))
    return found


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def internal_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        graph[name] = {target for target, _ in imports_of(path) if target in MODULES and target != name}
    return graph


def test_every_module_has_a_layer():
    for name in MODULES:
        layer(name)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_flow_downward(name: str):
    height, own = layer(name)
    for target, line in imports_of(MODULES[name]):
        if not target.startswith("kdtune"):
            continue
        assert target in MODULES, f"{name}:{line} imports {target}, an old module path: import its owner instead"
        target_height, target_layer = layer(target)
        assert target_height <= height, f"{name}:{line} ({own}) imports {target} ({target_layer}), a layer above"
        assert {own, target_layer} != {"search", "results"}, f"{name}:{line} crosses between search and results"


def test_the_core_imports_no_ray_optuna_or_pydantic():
    for name, path in MODULES.items():
        if layer(name)[1] != "core":
            continue
        for target, line in imports_of(path):
            assert target.split(".")[0] not in FORBIDDEN_IN_CORE, f"{name}:{line} imports {target}"


def test_no_import_cycles():
    graph = internal_graph()
    visiting, done, stack = set(), set(), []

    def visit(node: str) -> None:
        visiting.add(node)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt in visiting:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in done:
                visit(nxt)
        stack.pop()
        visiting.discard(node)
        done.add(node)

    for node in sorted(graph):
        if node not in done:
            visit(node)


def test_the_checker_sees_a_violation(tmp_path: Path):
    """The test above could pass by parsing nothing: show it flags a planted upward import."""
    planted = tmp_path / "planted.py"
    planted.write_text("def f():\n    from kdtune.search.pipeline import search\n")
    assert ("kdtune.search.pipeline", 2) in imports_of(planted)
    assert layer("kdtune.search.pipeline")[0] > layer("kdtune.core.losses")[0]
