"""The plugin catalog: every plugin folder found in the configured plugin dirs.

The router uses it to check steps (plugin, action, args) before anything is
queued and to serve GET /v1/plugins; a worker uses it to find and import the
function that runs a subtask. Bad manifests are collected in `errors`, never
raised, so one broken plugin does not take the others down.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import sys
import threading
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, ValidationError

from edgefleet.plugin_manifest import MANIFEST_FILENAME, ManifestError, PluginManifest, load_manifest

if TYPE_CHECKING:
    from edgefleet.plugin_context import PluginContext

PluginFunction = Callable[["PluginContext", str, dict[str, Any]], dict[str, Any]]

# Plugin modules live under this synthetic package so they never clash with real modules.
_ROOT_PACKAGE = "edgefleet_plugins"

# Per-process cache: a prefork child imports each plugin module once.
_import_lock = threading.Lock()
_callables: dict[tuple[str, str], PluginFunction] = {}


class PluginLoadError(Exception):
    """A plugin's entry point cannot be imported or is not a function."""


def _package_for(name: str, folder: Path) -> str:
    """The synthetic package `edgefleet_plugins.<name>` whose __path__ is the plugin folder.

    A package (rather than a bare module) lets the entry module import its
    siblings with `from . import helpers`. Two folders providing the same plugin
    name in one process (tests, overrides) get distinct package names.
    """
    if _ROOT_PACKAGE not in sys.modules:
        root = types.ModuleType(_ROOT_PACKAGE)
        root.__path__ = []  # a namespace for the plugin packages, nothing importable by itself
        sys.modules[_ROOT_PACKAGE] = root
    folder_str = str(folder)
    pkg_name = f"{_ROOT_PACKAGE}.{name}"
    existing = sys.modules.get(pkg_name)
    if existing is not None and list(getattr(existing, "__path__", [])) != [folder_str]:
        digest = hashlib.sha1(folder_str.encode()).hexdigest()[:10]
        pkg_name = f"{_ROOT_PACKAGE}.{name}_{digest}"
        existing = sys.modules.get(pkg_name)
    if existing is None:
        pkg = types.ModuleType(pkg_name)
        pkg.__path__ = [folder_str]
        pkg.__package__ = pkg_name
        sys.modules[pkg_name] = pkg
    return pkg_name


@dataclass(frozen=True)
class LoadedPlugin:
    """A valid manifest and the folder it was found in."""

    manifest: PluginManifest
    folder: Path

    @property
    def name(self) -> str:
        return self.manifest.name

    def load_callable(self) -> PluginFunction:
        """Import the entry module from the plugin folder and return its function.

        Cached per process; raises PluginLoadError with the reason if the module
        is missing, fails to import, or lacks the function.
        """
        folder = self.folder.resolve()
        key = (str(folder), self.manifest.entry_point)
        with _import_lock:
            cached = _callables.get(key)
            if cached is not None:
                return cached
            func = self._import(folder)
            _callables[key] = func
            return func

    def _import(self, folder: Path) -> PluginFunction:
        module_name, func_name = self.manifest.entry_module, self.manifest.entry_function
        where = f"plugin {self.name!r} ({self.manifest.entry_point})"
        module_file = folder / f"{module_name}.py"
        if not module_file.is_file():
            raise PluginLoadError(f"{where}: module file {module_file} not found")
        full_name = f"{_package_for(self.name, folder)}.{module_name}"
        module = sys.modules.get(full_name)
        if module is None:
            spec = importlib.util.spec_from_file_location(full_name, module_file)
            if spec is None or spec.loader is None:
                raise PluginLoadError(f"{where}: cannot build an import spec for {module_file}")
            module = importlib.util.module_from_spec(spec)
            # Registered before exec so that dataclasses, pickling and relative imports work.
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
        return func


class PluginCatalog:
    """Plugins by name, plus the manifest errors met while loading them."""

    def __init__(self, plugins: dict[str, LoadedPlugin] | None = None, errors: list[ManifestError] | None = None) -> None:
        self._plugins: dict[str, LoadedPlugin] = dict(plugins or {})
        self.errors: list[ManifestError] = list(errors or [])

    @classmethod
    def load(cls, dirs: Iterable[Path]) -> PluginCatalog:
        """Load every direct subfolder holding a plugin.yaml, in each dir in turn.

        When two dirs provide the same plugin name, the first dir wins and the
        later one is recorded as an error.
        """
        catalog = cls()
        for base in dirs:
            base = Path(base)
            if not base.is_dir():
                catalog.errors.append(ManifestError(str(base), "(dir)", "plugin directory does not exist"))
                continue
            for folder in sorted(p for p in base.iterdir() if p.is_dir()):
                manifest_file = folder / MANIFEST_FILENAME
                if not manifest_file.is_file():
                    continue
                try:
                    manifest = load_manifest(manifest_file)
                except ManifestError as exc:
                    catalog.errors.append(exc)
                    continue
                first = catalog._plugins.get(manifest.name)
                if first is not None:
                    catalog.errors.append(
                        ManifestError(
                            str(manifest_file),
                            "name",
                            f"plugin {manifest.name!r} is already provided by {first.folder}; this one is ignored",
                        )
                    )
                    continue
                catalog._plugins[manifest.name] = LoadedPlugin(manifest=manifest, folder=folder)
        return catalog

    def __contains__(self, name: object) -> bool:
        return name in self._plugins

    def __len__(self) -> int:
        return len(self._plugins)

    def get(self, name: str) -> LoadedPlugin | None:
        return self._plugins.get(name)

    def names(self) -> list[str]:
        return sorted(self._plugins)

    def describe(self) -> list[dict[str, Any]]:
        """JSON-ready list for GET /v1/plugins, sorted by name."""
        out = []
        for name in self.names():
            m = self._plugins[name].manifest
            out.append(
                {
                    "name": m.name,
                    "version": m.version,
                    "description": m.description,
                    "resource_class": m.resource_class.value,
                    "actions": {
                        action_name: {
                            "description": spec.description,
                            "input_schema": spec.input_schema,
                            "output_schema": spec.output_schema,
                        }
                        for action_name, spec in sorted(m.actions.items())
                    },
                }
            )
        return out


def builtin_plugin_dir() -> Path:
    """The folder of the top-level `plugins` package, where the built-in plugins live."""
    import plugins  # imported here: the catalog module itself must not depend on it at import time

    return Path(plugins.__file__).resolve().parent


# --- args validation ---------------------------------------------------------------------------

_IN_PLACE_APPLICATORS = ("allOf", "anyOf", "oneOf")  # `not` is left alone: negating "accept anything" would reject
_CONDITIONALS = ("if", "then", "else")
_MAX_REPR = 80


def _accept_unresolved(schema: Any, names: set[str]) -> None:
    """Make the subschemas that apply to the args object accept any value for `names`.

    A `{"$ref": ...}` argument is resolved only at run time, so its value cannot
    be checked now. Rather than dropping the key (which would break `oneOf`
    branches such as "exactly one of text/path"), its value is accepted as is:
    the key still counts for `required` and `oneOf`, and an undeclared key is
    still reported under `additionalProperties: false`.
    """
    if not isinstance(schema, dict):
        return
    props = schema.get("properties")
    extra = schema.get("additionalProperties")
    for name in names:
        if isinstance(props, dict) and name in props:
            props[name] = True
        elif isinstance(extra, dict):
            # An undeclared key would be checked against additionalProperties' schema.
            schema.setdefault("properties", {})[name] = True
            props = schema["properties"]
    for key in _IN_PLACE_APPLICATORS:
        for sub in schema.get(key) or []:
            _accept_unresolved(sub, names)
    for key in _CONDITIONALS:
        _accept_unresolved(schema.get(key), names)
    for sub in (schema.get("dependentSchemas") or {}).values():
        _accept_unresolved(sub, names)


def _field(path: Iterable[Any], prefix: str = "args") -> str:
    out = prefix
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _short_message(error: ValidationError) -> str:
    """jsonschema's message, with a huge instance (a whole text) cut down to size."""
    message = error.message
    instance_repr = repr(error.instance)
    if len(instance_repr) > _MAX_REPR and message.startswith(instance_repr):
        message = instance_repr[: _MAX_REPR - 5] + "...'" + message[len(instance_repr) :]
    return message


def _branch_text(branch: Any) -> str:
    if isinstance(branch, dict):
        if branch.get("description"):
            return str(branch["description"])
        if branch.get("required"):
            return "with " + " and ".join(repr(r) for r in branch["required"])
    return "a matching shape"


def _describe_error(error: ValidationError) -> list[tuple[str, str]]:
    where = _field(error.absolute_path)
    instance = error.instance
    if error.validator == "required" and isinstance(instance, dict):
        missing = [r for r in error.validator_value if r not in instance]
        return [(_field([*error.absolute_path, name]), "is required") for name in missing] or [(where, error.message)]
    if error.validator == "additionalProperties" and isinstance(instance, dict) and error.validator_value is False:
        props = error.schema.get("properties", {}) if isinstance(error.schema, dict) else {}
        extras = [k for k in instance if k not in props]
        if extras and not (isinstance(error.schema, dict) and error.schema.get("patternProperties")):
            allowed = ", ".join(sorted(props)) or "none"
            return [(_field([*error.absolute_path, k]), f"unknown argument (allowed: {allowed})") for k in extras]
    if error.validator in ("oneOf", "anyOf") and isinstance(error.validator_value, list):
        how = "exactly one" if error.validator == "oneOf" else "at least one"
        branches = error.validator_value
        # The common "one of these keys" idiom reads best as a plain sentence.
        if branches and all(isinstance(b, dict) and set(b) <= {"required", "description"} for b in branches):
            keys = [", ".join(repr(r) for r in b.get("required") or []) for b in branches]
            return [(where, f"give {how} of {' or '.join(k for k in keys if k)}")]
        options = "; ".join(_branch_text(b) for b in branches)
        return [(where, f"must match {how} of: {options}")]
    if error.validator == "pattern" and isinstance(error.schema, dict) and error.schema.get("description"):
        # A regex means little to a client; the property's description says what is expected.
        shown = _short_message(error).split(" does not match ", 1)[0]
        return [(where, f"{shown} does not match the expected form: {error.schema['description']}")]
    return [(where, _short_message(error))]


def validate_action_args(
    schema: dict[str, Any],
    args: dict[str, Any],
    *,
    unresolved: set[str] | frozenset[str] = frozenset(),
) -> list[tuple[str, str]]:
    """Check a step's `args` against its action's input schema.

    Returns (field, reason) pairs such as ("args.text", "is required"); an empty
    list means valid. The values of top-level keys in `unresolved` (values that
    are `{"$ref": ...}` to another step's output) are not checked, since they
    exist only at run time; the keys still satisfy `required`.
    """
    if not isinstance(args, dict):
        return [("args", "must be an object")]
    names = {k for k in unresolved if k in args}
    if names:
        schema = copy.deepcopy(schema)
        _accept_unresolved(schema, names)
    try:
        validator = Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
        errors = list(validator.iter_errors(args))
    except SchemaError as exc:
        return [("args", f"the action's input schema is invalid: {exc.message}")]
    out: list[tuple[str, str]] = []
    for error in errors:
        for item in _describe_error(error):
            if item not in out:
                out.append(item)
    return sorted(out)
