"""Resolving a catalogue of plugin manifests: versions, plugin requirements, cycles, dependencies.

Two kinds of check, on purpose kept apart:

* `resolve()` decides which parsed manifests the catalogue keeps. It rejects a
  plugin whose `requires.edgefleet` range excludes this edgefleet, whose
  required plugins are missing, out of range or rejected themselves, or which
  sits on a requirement cycle. These hold on every box, so the router and every
  worker reach the same verdict.
* `unmet_dependencies()` says what this box lacks to *run* a plugin: Python
  packages (PEP 508 requirements, checked with importlib.metadata) and binaries
  on PATH. That differs per box, so it never rejects a plugin: a worker simply
  does not advertise (nor run) a plugin it cannot run.
"""

from __future__ import annotations

import importlib.metadata
import shutil
from collections.abc import Mapping
from typing import TYPE_CHECKING

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from edgefleet.plugin_manifest import ANY_VERSION, ManifestError, PluginManifest

if TYPE_CHECKING:
    from edgefleet.plugin_catalog import LoadedPlugin


def _in_range(version: str, spec: str) -> bool:
    """Whether `version` satisfies the range `spec`; pre-releases count (a dev build is still that version)."""
    if spec.strip() in ANY_VERSION:
        return True
    try:
        return SpecifierSet(spec).contains(Version(version), prereleases=True)
    except (InvalidSpecifier, InvalidVersion):
        return False


def _shown(spec: str) -> str:
    return "any version" if spec.strip() in ANY_VERSION else spec


def find_cycles(graph: Mapping[str, list[str]]) -> list[list[str]]:
    """Every strongly connected component that is a cycle, as a closed path `a -> b -> a`.

    Tarjan's algorithm, iterative. A self-loop is a cycle of one. Each cycle is
    reported once, starting from its alphabetically first member.
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, int]] = [(root, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            children = sorted(c for c in graph.get(node, []) if c in graph)
            if i < len(children):
                work.append((node, i + 1))
                child = children[i]
                if child not in index:
                    work.append((child, 0))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph.get(node, []):
                    components.append(component)
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return [_cycle_path(sorted(c), graph) for c in components]


def _cycle_path(members: list[str], graph: Mapping[str, list[str]]) -> list[str]:
    """One closed path through a strongly connected component, from its first member back to it."""
    inside = set(members)
    start = members[0]
    if start in graph.get(start, []) and len(members) == 1:
        return [start, start]
    # Breadth-first from `start` to a node that requires `start`, staying inside the component.
    parents: dict[str, str | None] = {start: None}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for child in sorted(graph.get(node, [])):
            if child == start and node != start:
                path = [node]
                while parents[path[-1]] is not None:
                    path.append(parents[path[-1]])  # type: ignore[arg-type]
                return [*reversed(path), start]
            if child in inside and child not in parents:
                parents[child] = node
                queue.append(child)
    return [*members, start]  # not reached for a real component


def resolve(
    plugins: Mapping[str, LoadedPlugin],
    *,
    edgefleet_version: str,
    unparsed: Mapping[str, ManifestError] | None = None,
) -> tuple[dict[str, LoadedPlugin], dict[str, ManifestError]]:
    """Split parsed plugins into the ones that resolve and the rejected ones (name -> error).

    `unparsed` maps the names of plugins whose manifests did not even parse
    (known from their folder names) to their errors, so that requiring one of
    them says why it is unavailable rather than just "missing".
    """
    unparsed = unparsed or {}
    problems: dict[str, list[tuple[str, str]]] = {name: [] for name in plugins}

    for name, plugin in plugins.items():
        requires = plugin.manifest.requires
        if requires.edgefleet is not None and not _in_range(edgefleet_version, requires.edgefleet):
            problems[name].append(
                (
                    "requires.edgefleet",
                    f"needs edgefleet {_shown(requires.edgefleet)}, but this is edgefleet {edgefleet_version}",
                )
            )
        for other, spec in sorted(requires.plugins.items()):
            if other == name:
                continue  # reported as a cycle below
            field = f"requires.plugins.{other}"
            target = plugins.get(other)
            if target is None:
                if other in unparsed:
                    bad = unparsed[other]
                    problems[name].append(
                        (field, f"requires plugin {other!r}, which was rejected ({bad.field}: {bad.reason})")
                    )
                else:
                    problems[name].append(
                        (field, f"requires plugin {other!r} ({_shown(spec)}), which is not installed")
                    )
            elif not _in_range(target.manifest.version, spec):
                problems[name].append(
                    (
                        field,
                        f"version conflict: requires plugin {other!r} {_shown(spec)}, "
                        f"but version {target.manifest.version} is installed ({target.folder})",
                    )
                )

    graph = {name: sorted(p.manifest.requires.plugins) for name, p in plugins.items()}
    for cycle in find_cycles(graph):
        text = " -> ".join(cycle)
        for member in dict.fromkeys(cycle):
            problems[member].append(("requires.plugins", f"requirement cycle: {text}"))

    rejected = {name for name, found in problems.items() if found}
    # A plugin that needs a rejected plugin cannot work either; repeat until nothing changes.
    changed = True
    while changed:
        changed = False
        for name in sorted(plugins):
            if name in rejected:
                continue
            for other in sorted(plugins[name].manifest.requires.plugins):
                if other in rejected and other in plugins:
                    first_field, first_reason = problems[other][0]
                    problems[name].append(
                        (
                            f"requires.plugins.{other}",
                            f"requires plugin {other!r}, which was rejected ({first_field}: {first_reason})",
                        )
                    )
                    rejected.add(name)
                    changed = True
                    break

    good = {name: p for name, p in plugins.items() if name not in rejected}
    errors = {
        name: ManifestError(str(plugins[name].folder / "plugin.yaml"), found[0][0], found[0][1], found)
        for name, found in problems.items()
        if found
    }
    return good, errors


# --- what this box lacks to run a plugin ----------------------------------------------------


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        # Distribution names are compared after normalisation ("Pillow" vs "pillow", "a_b" vs "a-b").
        wanted = canonicalize_name(distribution)
        for dist in importlib.metadata.distributions():
            name = dist.metadata["Name"]  # None when missing (email.message semantics)
            if name and canonicalize_name(name) == wanted:
                return dist.version
        return None


def unmet_python(requirement: str) -> str | None:
    """Why `requirement` (PEP 508) is not met in this interpreter's environment, or None when it is."""
    try:
        req = Requirement(requirement)
    except InvalidRequirement as exc:  # the manifest model refuses these; be safe anyway
        return f"python package {requirement!r}: not a valid requirement ({exc})"
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        return None  # does not apply to this platform or Python
    installed = _installed_version(req.name)
    if installed is None:
        return f"python package {requirement!r}: not installed"
    if req.specifier and not req.specifier.contains(installed, prereleases=True):
        return f"python package {requirement!r}: version {installed} is installed"
    return None


def unmet_binary(name: str) -> str | None:
    """Why the binary `name` is unusable here (not on PATH), or None when it is found."""
    if shutil.which(name) is None:
        return f"binary {name!r}: not found on PATH"
    return None


def unmet_dependencies(manifest: PluginManifest) -> list[str]:
    """Every dependency of `manifest` that this box does not meet, one readable line each."""
    out: list[str] = []
    for requirement in manifest.dependencies.python:
        why = unmet_python(requirement)
        if why:
            out.append(why)
    for binary in manifest.dependencies.binaries:
        why = unmet_binary(binary)
        if why:
            out.append(why)
    return out
