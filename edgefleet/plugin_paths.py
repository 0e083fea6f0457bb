"""Which folders a plugin may touch beyond its workspace and inputs, and the submit-time check of path arguments.

`file_system_read` / `file_system_write` in a manifest do not mean the whole file
system: they mean the folders an operator granted (`EDGEFLEET_PLUGIN_READ_PATHS`,
`EDGEFLEET_PLUGIN_WRITE_PATHS`, per plugin or `*`). Some folders are never
visible, whatever is granted: the data dir (tokens, Redis files), the workspace
dir (other jobs), `/etc/edgefleet` and any configured `protected_paths`.

An action's input schema marks arguments that name files with `x-path: read` or
`x-path: write`. At submit a literal value is checked against what the plugin may
touch, so `{"path": "/etc/shadow"}` is a 422 naming `steps.0.args.path` instead
of a failed attempt later; values that come from `$ref` or `$artifact` point into
the job's own folder and are checked by the sandbox when they run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from edgefleet.plugin_manifest import Permission
from edgefleet.settings import Settings

PathAccess = Literal["read", "write"]
PATH_KEYWORD = "x-path"


def _normalise(path: Path) -> Path:
    # Not resolve(strict): granted folders may not exist on the router's box.
    return Path(os.path.normpath(os.path.expanduser(str(path))))


def is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


@dataclass(frozen=True)
class PathGrants:
    """The folders one plugin may read and write, and those it may never see."""

    read: tuple[Path, ...]
    write: tuple[Path, ...]
    protected: tuple[Path, ...]

    @property
    def readable(self) -> tuple[Path, ...]:
        return self.read + self.write

    def allows(self, path: Path, access: PathAccess) -> bool:
        target = _normalise(path)
        if any(is_within(target, p) for p in self.protected):
            return False
        folders = self.write if access == "write" else self.readable
        return any(is_within(target, folder) for folder in folders)


def protected_paths(settings: Settings) -> tuple[Path, ...]:
    paths = [settings.data_dir, settings.effective_workspace_dir, *settings.protected_paths]
    return tuple(dict.fromkeys(_normalise(p) for p in paths))


def _named(table: Mapping[str, list[Path]], plugin: str) -> list[Path]:
    return [*table.get("*", []), *table.get(plugin, [])]


def grants_for(settings: Settings, plugin: str, permissions: set[Permission] | frozenset[Permission]) -> PathGrants:
    """What `plugin` may touch; a granted folder that holds or lies in a protected one is ignored."""
    protected = protected_paths(settings)

    def usable(paths: list[Path]) -> tuple[Path, ...]:
        # A grant inside a protected folder, or holding one, would undo the protection: it is dropped
        # (Landlock, unlike a mount namespace, cannot hide a folder inside one it allows).
        kept = [_normalise(p) for p in paths]
        return tuple(dict.fromkeys(p for p in kept if not any(is_within(p, q) or is_within(q, p) for q in protected)))

    read = usable(_named(settings.plugin_read_paths, plugin)) if Permission.file_system_read in permissions else ()
    write = usable(_named(settings.plugin_write_paths, plugin)) if Permission.file_system_write in permissions else ()
    return PathGrants(read=read, write=write, protected=protected)


def path_arguments(schema: Mapping[str, Any], args: Any, prefix: str = "args") -> Iterator[tuple[str, str, PathAccess]]:
    """(field, value, access) of every literal string argument the schema marks with `x-path`."""
    if not isinstance(args, dict):
        return
    properties = schema.get("properties") or {}
    for name, value in args.items():
        prop = properties.get(name)
        if not isinstance(prop, dict):
            continue
        access = prop.get(PATH_KEYWORD)
        field = f"{prefix}.{name}"
        if access in ("read", "write") and isinstance(value, str):
            yield field, value, access
        elif isinstance(value, dict) and prop.get("type") == "object":
            yield from path_arguments(prop, value, field)
        elif isinstance(value, list) and isinstance(prop.get("items"), dict):
            item = prop["items"]
            for i, element in enumerate(value):
                if item.get(PATH_KEYWORD) in ("read", "write") and isinstance(element, str):
                    yield f"{field}.{i}", element, item[PATH_KEYWORD]
                elif isinstance(element, dict):
                    yield from path_arguments(item, element, f"{field}.{i}")


def check_path_argument(plugin: str, value: str, access: PathAccess, grants: PathGrants) -> str | None:
    """Why this path is refused, or None. Relative paths live in the workspace and may not climb out."""
    if "\x00" in value:
        return "a path may not contain NUL"
    pure = PurePosixPath(value)
    if not pure.is_absolute() and not value.startswith("~"):
        if ".." in pure.parts:
            return "a relative path is inside the step's workspace and may not contain '..'"
        return None
    if grants.allows(Path(value), access):
        return None
    granted = grants.write if access == "write" else grants.readable
    allowed = ", ".join(str(p) for p in granted) or "none"
    setting = "EDGEFLEET_PLUGIN_WRITE_PATHS" if access == "write" else "EDGEFLEET_PLUGIN_READ_PATHS"
    return (
        f"{value!r} is outside the folders plugin {plugin!r} may {access} (allowed: {allowed}; "
        f"an operator grants folders with {setting})"
    )
