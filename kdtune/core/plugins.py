"""Plugins: the user's own Python code that registers models, datasets, losses and
early-stopping rules, imported on the driver and on every Ray worker.

A spec lists them under ``plugins:``, each either

- a Python file (``students.py``) or a package folder (``my_models/``, holding an
  ``__init__.py``), relative to the spec file; it is imported as a module named
  after the file (``students``) or folder, so that name must be a valid Python
  identifier and must not be the name of another module; or
- an importable module name (``my_company.kd_models``).

The driver imports every plugin before it validates the rest of the spec, so the
names a plugin registers are known to the validation. Workers get the plugins
through Ray's runtime environment (``runtime_env={"py_modules": [...]}``, see
:func:`plugin_runtime_env`): Ray uploads each file or folder to the cluster and
unpacks it on every node, so workers on other machines need no shared disk. A
module named in the spec is shipped too when it lives outside the Python
installation (a module next to the spec, in the working directory); an installed
package must be installed on every node, like torch. The trainable imports the
plugins (:func:`import_plugins`) before it builds the run's config.

A plugin that fails to import, a plugin file that is missing, and a plugin that
registers a name another module already took are one :class:`KdtuneError` naming
the plugin, the file and line in the user's code, and the error.
"""

from __future__ import annotations

import importlib
import importlib.util
import keyword
import sys
import sysconfig
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Sequence

from kdtune.errors import KdtuneError

#: What the spec says a plugin entry may be.
PLUGIN_FORMS = "a Python file or package folder relative to the spec (students.py, my_models/), or a module name"


@dataclass(frozen=True)
class Plugin:
    """One plugin, resolved: the module it is imported as and, for a file or a
    folder, its absolute path (``None`` for a module imported by name)."""

    entry: str
    module: str
    path: str | None = None

    @property
    def reference(self) -> str:
        """How a validated spec names the plugin: its absolute path, or its module name."""
        return self.path or self.module


def is_path_entry(entry: str) -> bool:
    """Whether a ``plugins`` entry names a file or folder (rather than a module)."""
    return entry.endswith(".py") or "/" in entry or "\\" in entry or entry.startswith(("~", "."))


def resolve_plugin(entry: str, base_dir: str | Path) -> Plugin:
    """The plugin ``entry`` names, a path taken relative to ``base_dir``; checks that
    the file exists and that its name can be a module name (imports nothing)."""
    if not isinstance(entry, str) or not entry.strip():
        raise KdtuneError(f"plugins: {entry!r} is not a plugin; expected {PLUGIN_FORMS}")
    if not is_path_entry(entry):
        if not all(part.isidentifier() for part in entry.split(".")):
            raise KdtuneError(f"plugins: {entry!r} is neither a .py file nor a module name; expected {PLUGIN_FORMS}")
        return Plugin(entry, entry)
    path = (Path(base_dir) / Path(entry).expanduser()).resolve()
    if path.is_dir():
        if not (path / "__init__.py").is_file():
            raise KdtuneError(f"plugins: {entry}: {path} is a folder without __init__.py; a folder plugin "
                              f"is a Python package (or name the .py files one by one)")
        module = path.name
    elif path.is_file():
        if path.suffix != ".py":
            raise KdtuneError(f"plugins: {entry}: {path} is not a .py file; expected {PLUGIN_FORMS}")
        module = path.stem
    else:
        raise KdtuneError(f"plugins: {entry}: no such file ({path}; paths are relative to the spec file)")
    if not module.isidentifier() or keyword.iskeyword(module):
        raise KdtuneError(f"plugins: {entry}: it is imported as the module {module!r}, which is not a valid "
                          f"Python name; rename it (letters, digits and '_', not starting with a digit)")
    return Plugin(entry, module, str(path))


def load_plugins(entries: Sequence[str], base_dir: str | Path) -> list[Plugin]:
    """Import the plugins ``entries`` (paths relative to ``base_dir``) in this process,
    in order; a plugin already imported from the same place is not imported again.

    Raises :class:`KdtuneError` naming the plugin, the user's file and line, and
    the error, for a missing file, a file that would shadow another module or a
    plugin whose import raises (a registration of a taken name included).
    """
    plugins = [resolve_plugin(entry, base_dir) for entry in entries]
    for plugin in plugins:
        _import_on_driver(plugin)
    return plugins


def _module_file(plugin: Plugin) -> Path:
    assert plugin.path is not None
    path = Path(plugin.path)
    return path / "__init__.py" if path.is_dir() else path


def _same_file(module: ModuleType, path: Path) -> bool:
    file = getattr(module, "__file__", None)
    return file is not None and Path(file).resolve() == path.resolve()


def _import_on_driver(plugin: Plugin) -> ModuleType:
    if plugin.path is None:
        return _run_import(plugin, lambda: importlib.import_module(plugin.module))
    file = _module_file(plugin)
    loaded = sys.modules.get(plugin.module)
    if loaded is not None:
        if _same_file(loaded, file):
            return loaded
        raise KdtuneError(
            f"plugins: {plugin.entry}: it is imported as the module {plugin.module!r}, but a module of that name "
            f"is already imported from {getattr(loaded, '__file__', None) or 'Python itself'}; rename the plugin")
    try:
        other = importlib.util.find_spec(plugin.module)
    except (ImportError, ValueError):
        other = None
    if other is not None and other.origin and other.origin != str(file) and Path(other.origin).exists() \
            and Path(other.origin).resolve() != file:
        # On the workers, the shipped file is found by its module name: a module of the
        # same name elsewhere on the path would be imported instead (or hidden by it).
        raise KdtuneError(f"plugins: {plugin.entry}: it is imported as the module {plugin.module!r}, and another "
                          f"module of that name exists ({other.origin}); rename the plugin")
    return _import_from_path(plugin, file)


def _import_from_path(plugin: Plugin, file: Path) -> ModuleType:
    locations = [str(file.parent)] if file.name == "__init__.py" else None
    spec = importlib.util.spec_from_file_location(plugin.module, file, submodule_search_locations=locations)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)

    def run() -> ModuleType:
        sys.modules[plugin.module] = module
        try:
            spec.loader.exec_module(module)  # type: ignore[union-attr]
        except BaseException:
            sys.modules.pop(plugin.module, None)
            raise
        return module

    return _run_import(plugin, run)


def _run_import(plugin: Plugin, do_import) -> ModuleType:  # noqa: ANN001 - a zero-argument callable
    try:
        return do_import()
    except KeyboardInterrupt:
        raise
    except (Exception, SystemExit) as exc:  # any error in the user's module is the user's to fix
        raise KdtuneError(f"plugins: {plugin.entry}: {describe_import_error(plugin, exc)}") from None


def describe_import_error(plugin: Plugin, exc: BaseException) -> str:
    """Where in the user's code a plugin's import failed and how: ``file, line N
    (source): Type: message``. The place is the innermost frame in the plugin's own
    file or folder (for a module plugin: outside Python's import machinery and kdtune)."""
    error = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{exc.filename}, line {exc.lineno}: SyntaxError: {exc.msg}"
    if isinstance(exc, ModuleNotFoundError) and exc.name == plugin.module:
        return f"no module named {plugin.module!r} is importable here ({error}); write a .py path to use a file"
    frames = traceback.extract_tb(exc.__traceback__)
    own = Path(plugin.path) if plugin.path else None
    kdtune_dir = str(Path(__file__).resolve().parents[1])

    def in_plugin(filename: str) -> bool:
        if own is None:
            return not filename.startswith(("<", kdtune_dir)) and "importlib" not in filename
        path = Path(filename)
        return path == own or own in path.parents

    mine = [frame for frame in frames if in_plugin(frame.filename)]
    if not mine:
        return error
    frame = mine[-1]
    code = f" ({frame.line.strip()})" if frame.line else ""
    return f"{frame.filename}, line {frame.lineno}{code}: {error}"


def _installed(path: Path) -> bool:
    """Whether ``path`` lies in the Python installation (standard library or site-packages)."""
    roots = {sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    roots |= {p for p in sys.path if p.endswith(("site-packages", "dist-packages"))}
    return any(Path(root) in path.parents for root in roots if root)


def shipped_path(plugin: Plugin) -> str | None:
    """The file or folder Ray's runtime environment uploads for ``plugin`` (None when
    it is an installed module, which every node must have installed)."""
    if plugin.path is not None:
        return plugin.path
    top = sys.modules.get(plugin.module.split(".")[0])
    if top is None:
        return None
    paths = list(getattr(top, "__path__", []) or [])
    location = Path(paths[0]) if len(paths) == 1 else Path(top.__file__) if getattr(top, "__file__", None) else None
    if location is None or _installed(location) or top.__name__ == "kdtune":
        return None
    return str(location)


def plugin_runtime_env(plugins: Sequence[Plugin]) -> dict[str, list[str]] | None:
    """The ``runtime_env`` for ``ray.init`` that puts ``plugins`` on every worker's
    path (``{"py_modules": [...]}``), or None when nothing needs shipping.

    Ray uploads each file or folder to the cluster once (content-hashed) and every
    node unpacks it into its runtime-resources folder. Pass it yourself when you
    start Ray before calling :func:`kdtune.search.search`:
    ``ray.init(runtime_env=plugin_runtime_env(spec_plugins(spec)))``.
    """
    shipped = [path for path in map(shipped_path, plugins) if path is not None]
    return {"py_modules": shipped} if shipped else None


def import_plugins(plugins: Sequence[Plugin]) -> None:
    """Import ``plugins`` in a worker (by module name, from Ray's runtime environment
    or the installation), before anything looks up a registered name.

    A plugin already imported (a reused actor) is not imported again. When the
    module cannot be found by name but its file exists at the driver's path, the
    worker shares the driver's disk (a Ray started before kdtune, which kdtune
    cannot give a runtime environment) and imports it from there.
    """
    for plugin in plugins:
        if plugin.module in sys.modules:
            continue
        try:
            importlib.import_module(plugin.module)
            continue
        except ModuleNotFoundError as exc:
            if exc.name != plugin.module.split(".")[0]:
                raise
        if plugin.path is not None and _module_file(plugin).is_file():
            _import_from_path(plugin, _module_file(plugin))
            continue
        raise KdtuneError(
            f"plugin {plugin.entry} (module {plugin.module!r}) cannot be imported on this Ray node: kdtune ships "
            f"plugins through Ray's runtime environment when it starts or joins Ray itself; a Ray started "
            f"beforehand needs ray.init(runtime_env=kdtune.core.plugins.plugin_runtime_env(...))"
            + ("" if plugin.path else "; or install the module on every node"))
