"""Importing a plugin's entry point from its folder (standard library only: the sandbox imports it).

Each plugin becomes the synthetic package `edgefleet_plugins.<name>` whose
`__path__` is its folder, so that the entry module can import its siblings with
`from . import helpers`.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

ROOT_PACKAGE = "edgefleet_plugins"


class PluginLoadError(Exception):
    """A plugin's entry point cannot be imported or is not a function."""


def package_for(name: str, folder: Path) -> str:
    """The package name for a plugin folder; two folders with one plugin name get distinct ones."""
    if ROOT_PACKAGE not in sys.modules:
        root = types.ModuleType(ROOT_PACKAGE)
        root.__path__ = []  # a namespace for the plugin packages, nothing importable by itself
        sys.modules[ROOT_PACKAGE] = root
    folder_str = str(folder)
    pkg_name = f"{ROOT_PACKAGE}.{name}"
    existing = sys.modules.get(pkg_name)
    if existing is not None and list(getattr(existing, "__path__", [])) != [folder_str]:
        import hashlib  # rare, and ~5 ms of every sandbox start when imported up front

        digest = hashlib.sha1(folder_str.encode()).hexdigest()[:10]
        pkg_name = f"{ROOT_PACKAGE}.{name}_{digest}"
        existing = sys.modules.get(pkg_name)
    if existing is None:
        pkg = types.ModuleType(pkg_name)
        pkg.__path__ = [folder_str]
        pkg.__package__ = pkg_name
        sys.modules[pkg_name] = pkg
    return pkg_name


def load_entry_point(name: str, folder: Path, entry_point: str) -> Callable[..., Any]:
    module_name, func_name = entry_point.split(":", 1)
    where = f"plugin {name!r} ({entry_point})"
    module_file = folder / f"{module_name}.py"
    if not module_file.is_file():
        raise PluginLoadError(f"{where}: module file {module_file} not found")
    full_name = f"{package_for(name, folder)}.{module_name}"
    module = sys.modules.get(full_name)
    if module is None:
        spec = importlib.util.spec_from_file_location(full_name, module_file)
        if spec is None or spec.loader is None:
            raise PluginLoadError(f"{where}: cannot build an import spec for {module_file}")
        module = importlib.util.module_from_spec(spec)
        # Registered before exec so that dataclasses and relative imports work.
        sys.modules[full_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException as exc:
            sys.modules.pop(full_name, None)
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            raise PluginLoadError(f"{where}: importing {module_file} failed: {type(exc).__name__}: {exc}") from exc
    func = getattr(module, func_name, None)
    if func is None:
        raise PluginLoadError(f"{where}: module {module_name!r} has no attribute {func_name!r}")
    if not callable(func):
        raise PluginLoadError(f"{where}: {module_name}.{func_name} is not callable")
    return cast(Callable[..., Any], func)
