"""The plugin catalog: every plugin folder found in the configured plugin dirs.

The router uses it to check steps (plugin, action, args) before anything is
queued and to serve GET /v1/plugins; a worker uses it to find and import the
function that runs a subtask. Bad manifests are collected in `errors`, never
raised, so one broken plugin does not take the others down.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, ValidationError

from edgefleet.plugin_loader import PluginLoadError, load_entry_point  # noqa: F401 - re-exported
from edgefleet.plugin_manifest import MANIFEST_FILENAME, ManifestError, PluginManifest, load_manifest
from edgefleet.plugin_resolution import resolve, unmet_dependencies

if TYPE_CHECKING:
    from edgefleet.plugin_context import PluginContext

PluginFunction = Callable[["PluginContext", str, dict[str, Any]], dict[str, Any]]

# Plugin modules live under this synthetic package so they never clash with real modules.

# Per-process cache: a prefork child imports each plugin module once.
_import_lock = threading.Lock()
_callables: dict[tuple[str, str], PluginFunction] = {}


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
        return load_entry_point(self.name, folder, self.manifest.entry_point)


class PluginCatalog:
    """Plugins by name, plus the manifest errors met while loading and resolving them."""

    # How long a dependency verdict is reused: a package installed meanwhile is noticed this late.
    DEPENDENCY_CACHE_S = 30.0

    def __init__(
        self, plugins: dict[str, LoadedPlugin] | None = None, errors: list[ManifestError] | None = None
    ) -> None:
        self._plugins: dict[str, LoadedPlugin] = dict(plugins or {})
        self.errors: list[ManifestError] = list(errors or [])
        # Rejected plugins by name (when the name is known): parse errors and resolution errors.
        self.rejected: dict[str, ManifestError] = {}
        self._unmet: dict[str, tuple[float, list[str]]] = {}
        self._unmet_lock = threading.Lock()

    @classmethod
    def load(cls, dirs: Iterable[Path], *, edgefleet_version: str | None = None) -> PluginCatalog:
        """Load every direct subfolder holding a plugin.yaml, in each dir in turn, then resolve the set.

        When two dirs provide the same plugin name, the first dir wins and the
        later one is recorded as an error. After parsing, the whole set is
        resolved (see `edgefleet.plugin_resolution.resolve`): a plugin whose
        `requires` cannot be met here is moved to `errors`, and so is every
        plugin that requires it. Unmet dependencies are not load errors: see
        `unmet_dependencies` and `runnable_here`.
        """
        if edgefleet_version is None:
            from edgefleet import __version__ as edgefleet_version
        catalog = cls()
        parsed: dict[str, LoadedPlugin] = {}
        unparsed: dict[str, ManifestError] = {}
        seen_dirs: set[Path] = set()
        for base in dirs:
            base = Path(base)
            resolved_base = base.resolve()
            if resolved_base in seen_dirs:
                continue  # the same folder named twice (built-in and in settings): load it once
            seen_dirs.add(resolved_base)
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
                    # The folder is named after the plugin: remember why that name is unavailable.
                    if folder.name not in parsed:
                        unparsed.setdefault(folder.name, exc)
                    continue
                first = parsed.get(manifest.name)
                if first is not None:
                    catalog.errors.append(
                        ManifestError(
                            str(manifest_file),
                            "name",
                            f"plugin {manifest.name!r} is already provided by {first.folder}; this one is ignored",
                        )
                    )
                    continue
                parsed[manifest.name] = LoadedPlugin(manifest=manifest, folder=folder)
                unparsed.pop(manifest.name, None)

        good, rejected = resolve(parsed, edgefleet_version=str(edgefleet_version), unparsed=unparsed)
        catalog._plugins = good
        catalog.rejected = {**unparsed, **rejected}
        catalog.errors.extend(rejected[name] for name in sorted(rejected))
        return catalog

    def __contains__(self, name: object) -> bool:
        return name in self._plugins

    def __len__(self) -> int:
        return len(self._plugins)

    def get(self, name: str) -> LoadedPlugin | None:
        return self._plugins.get(name)

    def names(self) -> list[str]:
        return sorted(self._plugins)

    # --- what this box can run ------------------------------------------------------------

    def unmet_dependencies(self, name: str) -> list[str]:
        """What this box lacks to run plugin `name` (python packages, binaries); [] when it can.

        An unknown or rejected plugin gives one line saying so. Verdicts are
        cached for DEPENDENCY_CACHE_S seconds; `refresh_dependencies()` drops them.
        """
        plugin = self._plugins.get(name)
        if plugin is None:
            bad = self.rejected.get(name)
            if bad is not None:
                return [f"plugin {name!r} was rejected: {bad.field}: {bad.reason}"]
            return [f"no plugin {name!r} in the catalogue"]
        now = time.monotonic()
        with self._unmet_lock:
            cached = self._unmet.get(name)
            if cached is not None and now - cached[0] < self.DEPENDENCY_CACHE_S:
                return list(cached[1])
        unmet = unmet_dependencies(plugin.manifest)
        with self._unmet_lock:
            self._unmet[name] = (now, unmet)
        return list(unmet)

    def runnable_here(self) -> list[str]:
        """Names of the plugins whose dependencies this box meets, sorted: what a worker advertises."""
        return [name for name in self.names() if not self.unmet_dependencies(name)]

    def refresh_dependencies(self) -> None:
        """Forget the cached dependency verdicts (e.g. after installing a package)."""
        with self._unmet_lock:
            self._unmet.clear()

    # --- listings -------------------------------------------------------------------------

    def describe(self) -> list[dict[str, Any]]:
        """JSON-ready list for GET /v1/plugins, sorted by name: the manifest, without the folder."""
        out = []
        for name in self.names():
            m = self._plugins[name].manifest
            out.append(
                {
                    "name": m.name,
                    "version": m.version,
                    "description": m.description,
                    "entry_point": m.entry_point,
                    "resource_class": m.resource_class.value,
                    "permissions": [p.value for p in m.permissions],
                    "limits": m.limits.model_dump(mode="json"),
                    "dependencies": m.dependencies.model_dump(mode="json"),
                    "requires": m.requires.model_dump(mode="json"),
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

    def describe_errors(self) -> list[dict[str, Any]]:
        """Every problem met while loading: file, field, reason, message and (when known) the plugin name."""
        by_file = {str(Path(err.file)): name for name, err in self.rejected.items()}
        out = []
        for err in self.errors:
            entry: dict[str, Any] = err.as_dict()
            entry["plugin"] = by_file.get(str(Path(err.file)))
            entry["details"] = [{"field": f, "reason": r} for f, r in err.details]
            out.append(entry)
        return out


def builtin_plugin_dir() -> Path:
    """The folder of the `edgefleet.plugins` package, where the built-in plugins live.

    Found by path, not imported: the core must not depend on the plugins (tests/test_layering.py).
    In a checkout `edgefleet/plugins` links to the top-level `plugins/` folder; resolved, so that
    a sandbox binds the real folder.
    """
    return (Path(__file__).parent / "plugins").resolve()


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
    return str(message)


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
        missing = [r for r in cast(list[str], error.validator_value) if r not in instance]
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


# Validators of manifest schemas by schema object (kept beside its validator, so that an id is never
# reused while cached): building one costs as much as the check itself, and a worker checks each
# subtask's arguments against the same few schemas.
_VALIDATOR_CACHE_SIZE = 256
_validators: OrderedDict[int, tuple[dict[str, Any], Draft202012Validator]] = OrderedDict()
_validators_lock = threading.Lock()


def _new_validator(schema: dict[str, Any]) -> Draft202012Validator:
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def _validator_for(schema: dict[str, Any]) -> Draft202012Validator:
    with _validators_lock:
        cached = _validators.get(id(schema))
        if cached is not None and cached[0] is schema:
            return cached[1]
        validator = _new_validator(schema)
        _validators[id(schema)] = (schema, validator)
        while len(_validators) > _VALIDATOR_CACHE_SIZE:
            _validators.popitem(last=False)
        return validator


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
        validator = _validator_for(schema) if not names else _new_validator(schema)
        errors = list(validator.iter_errors(args))
    except SchemaError as exc:
        return [("args", f"the action's input schema is invalid: {exc.message}")]
    out: list[tuple[str, str]] = []
    for error in errors:
        for item in _describe_error(error):
            if item not in out:
                out.append(item)
    return sorted(out)
