"""The import contract: which package may import which, checked on the source with `ast`.

    edgefleet/cli/, edgefleet/__main__.py   the composition root: wires router and workers together
    edgefleet/ (the rest)                   the core: imports none of router, workers, plugins, edgefleet.cli
    router/  (edgefleet.router)             the core and itself; never workers
    workers/ (edgefleet.workers)            the core and itself; never router
    plugins/ (edgefleet.plugins)            edgefleet's plugin API (pluginkit, plugin_context), stdlib, third-party

The folders router/, workers/ and plugins/ sit at the top of the checkout but are installed under
the edgefleet namespace (pyproject's package-dir; `edgefleet/router` etc. link to them in a
checkout), so the bare names `router`, `workers`, `plugins` exist nowhere once installed: an
import of one is a violation in every layer.

Nothing imports `plugins`: plugin code is loaded from its folder, which the core finds
without importing it (edgefleet.plugin_catalog.builtin_plugin_dir). Every import counts:
at the top, inside a function, under `if TYPE_CHECKING:` (a type-only dependency still
ties the layers together for a reader and for mypy), relative ones, `import_module("...")`
and `__import__("...")` with a literal name, and `"-m", "<module>"` in a command line.
Nothing is imported or run, so the check takes well under a second.
"""

from __future__ import annotations

import ast
import itertools
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("edgefleet", "router", "workers", "plugins")
# The folders installed under the edgefleet namespace (pyproject.toml's package-dir).
NAMESPACED = ("router", "workers", "plugins")
COMPOSITION_ROOT = "composition root (edgefleet/cli/)"

# layer -> the module prefixes it must not import, and why (the message a violation prints).
FORBIDDEN: dict[str, tuple[tuple[str, ...], str]] = {
    "core": (
        ("edgefleet.router", "edgefleet.workers", "edgefleet.plugins", "edgefleet.cli"),
        "the core (edgefleet/ minus edgefleet/cli/) imports none of router, workers, plugins, edgefleet.cli",
    ),
    "router": (
        ("edgefleet.workers", "edgefleet.plugins", "edgefleet.cli"),
        "router imports the core only, never workers",
    ),
    "workers": (
        ("edgefleet.router", "edgefleet.plugins", "edgefleet.cli"),
        "workers import the core only, never router",
    ),
    "plugins": (
        ("edgefleet.router", "edgefleet.workers", "edgefleet.plugins", "edgefleet.cli"),
        "a plugin is loaded from its own folder and imports only edgefleet's plugin API, the stdlib and "
        "third-party packages",
    ),
    COMPOSITION_ROOT: (("edgefleet.plugins",), "plugins are loaded from their folders, never imported"),
}
BARE_NAME = "not installed under this name: the folder is the package edgefleet.{name}"
# The part of edgefleet a plugin may import.
PLUGIN_API = ("edgefleet.pluginkit", "edgefleet.plugin_context")
DYNAMIC_IMPORTERS = {"import_module", "__import__", "run_module"}


@dataclass(frozen=True)
class Violation:
    file: str
    line: int
    imported: str
    why: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: imports {self.imported}: {self.why}"


def layer_of(relative: Path) -> str:
    parts = relative.parts
    if parts[0] == "edgefleet":
        return COMPOSITION_ROOT if parts[1] == "cli" or parts[1:] == ("__main__.py",) else "core"
    return parts[0]


def module_name(relative: Path) -> tuple[str, str]:
    """(the module's dotted name, the package relative imports start from)."""
    parts = list(relative.with_suffix("").parts)
    if parts[0] in NAMESPACED:
        parts.insert(0, "edgefleet")
    if parts[-1] == "__init__":
        parts.pop()
        return ".".join(parts), ".".join(parts)
    return ".".join(parts), ".".join(parts[:-1])


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def imported_names(tree: ast.AST, package: str) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of every import the source shows, wherever it is."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".") if package else []
                anchor = anchor[: len(anchor) - (node.level - 1)] if node.level > 1 else anchor
                base = ".".join([*anchor, *([base] if base else [])])
            # `from edgefleet import cli` imports edgefleet.cli: check the names too.
            yield node.lineno, base
            for alias in node.names:
                if alias.name != "*":
                    yield node.lineno, f"{base}.{alias.name}" if base else alias.name
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            first = node.args[0]
            if called in DYNAMIC_IMPORTERS and isinstance(first, ast.Constant) and isinstance(first.value, str):
                yield node.lineno, first.value
        elif isinstance(node, (ast.List, ast.Tuple)):
            items = node.elts
            for flag, target in itertools.pairwise(items):
                if (
                    isinstance(flag, ast.Constant)
                    and flag.value == "-m"
                    and isinstance(target, ast.Constant)
                    and isinstance(target.value, str)
                ):
                    yield target.lineno, target.value


def check_file(root: Path, path: Path) -> list[Violation]:
    relative = path.relative_to(root)
    layer = layer_of(relative)
    forbidden, why = FORBIDDEN[layer]
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(relative))
    except (SyntaxError, UnicodeDecodeError, ValueError) as exc:
        return [Violation(str(relative), getattr(exc, "lineno", None) or 0, "?", f"cannot parse it: {exc}")]
    _, package = module_name(relative)
    # A plugin's own folder is its package: `from .journal import x` in plugins/photo is fine.
    own = "edgefleet." + ".".join(relative.parts[:2]) if layer == "plugins" and len(relative.parts) > 2 else None
    found: list[Violation] = []
    for line, name in imported_names(tree, package):
        if own is not None and _under(name, (own,)):
            continue
        bare = name.split(".")[0]
        if bare in NAMESPACED:
            found.append(Violation(str(relative), line, name, BARE_NAME.format(name=bare)))
        elif _under(name, forbidden):
            found.append(Violation(str(relative), line, name, why))
        elif layer == "plugins" and name.startswith("edgefleet.") and not _under(name, PLUGIN_API):
            found.append(Violation(str(relative), line, name, f"of edgefleet a plugin imports only {PLUGIN_API}"))
    # `from edgefleet.router.app import a, b` is one violation, not three.
    flagged = {(v.line, v.imported) for v in found}
    return [v for v in found if not any((v.line, p) in flagged for p in _parents(v.imported))]


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def source_files(root: Path) -> list[Path]:
    return sorted(p for package in PACKAGES for p in (root / package).rglob("*.py") if "__pycache__" not in p.parts)


def check_tree(root: Path) -> list[Violation]:
    return [v for path in source_files(root) for v in check_file(root, path)]


def test_the_import_contract_holds() -> None:
    files = source_files(ROOT)
    layers = {layer_of(p.relative_to(ROOT)) for p in files}
    assert layers == set(FORBIDDEN), f"a layer has no source files: {set(FORBIDDEN) - layers}"
    violations = check_tree(ROOT)
    assert not violations, "the import contract is broken:\n" + "\n".join(map(str, violations))


def test_the_design_folders_are_installed_under_edgefleet_only() -> None:
    """The wheel has one top-level package; the checkout's links give the same names without an install."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["packages"]["find"]["include"] == ["edgefleet*"]
    assert setuptools["package-dir"] == {f"edgefleet.{name}": name for name in NAMESPACED}
    for name in NAMESPACED:
        link = ROOT / "edgefleet" / name
        assert link.is_symlink() and link.resolve() == (ROOT / name).resolve(), f"edgefleet/{name} -> ../{name}"


def test_the_check_catches_each_way_of_importing(tmp_path: Path) -> None:
    def write(relative: str, text: str) -> None:
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    write("edgefleet/__init__.py", "")
    write("edgefleet/__main__.py", "from edgefleet.cli import main\n")
    write(
        "edgefleet/bad.py",
        "from __future__ import annotations\n"  # 1
        "import importlib\n"  # 2
        "from typing import TYPE_CHECKING\n"  # 3
        "import edgefleet.router.app\n"  # 4
        "if TYPE_CHECKING:\n"  # 5
        "    from edgefleet.plugins import text\n"  # 6
        "def later() -> None:\n"  # 7
        "    from edgefleet.workers import node\n"  # 8
        "    importlib.import_module('edgefleet.workers.probe')\n"  # 9
        "    __import__('router')\n"  # 10: a bare name, in any layer
        "from edgefleet import cli\n"  # 11
        "CMD = ['python', '-m', 'edgefleet.workers.class_worker']\n"  # 12
        "from edgefleet import schemas\n",  # 13: allowed
    )
    write("edgefleet/models/__init__.py", "from .. import cli\nfrom . import registry\n")
    write("edgefleet/models/deep.py", "from ..cli.up import run_up\nfrom ..settings import Settings\n")
    write("edgefleet/broken.py", "def (:\n")
    write(
        "edgefleet/cli/__init__.py", "import edgefleet.router.app\nfrom edgefleet.workers.node import NodeSupervisor\n"
    )
    write("edgefleet/cli/plugin_commands.py", "import edgefleet.plugins\nfrom workers.node import NodeSupervisor\n")
    write("router/__init__.py", "")
    write("router/app.py", "import edgefleet.store\nfrom edgefleet.router import planner\nimport edgefleet.workers\n")
    write("workers/__init__.py", "")
    write("workers/node.py", "from . import runner\nfrom edgefleet.router.app import create_app\n")
    write(
        "plugins/text/main.py",
        "import json\nimport PIL\nimport journal\nfrom edgefleet.pluginkit.actions import action\n"
        "from edgefleet.plugin_context import PluginContext\nfrom edgefleet.store import JobStore\n"
        "from edgefleet.plugins.photo import main\nimport router\nfrom .helpers import tidy\nfrom . import helpers\n",
    )

    found = {(v.file, v.line, v.imported) for v in check_tree(tmp_path)}
    assert found == {
        ("edgefleet/bad.py", 4, "edgefleet.router.app"),
        ("edgefleet/bad.py", 6, "edgefleet.plugins"),
        ("edgefleet/bad.py", 8, "edgefleet.workers"),
        ("edgefleet/bad.py", 9, "edgefleet.workers.probe"),
        ("edgefleet/bad.py", 10, "router"),
        ("edgefleet/bad.py", 11, "edgefleet.cli"),
        ("edgefleet/bad.py", 12, "edgefleet.workers.class_worker"),
        ("edgefleet/models/__init__.py", 1, "edgefleet.cli"),
        ("edgefleet/models/deep.py", 1, "edgefleet.cli.up"),
        ("edgefleet/broken.py", 1, "?"),
        ("edgefleet/cli/plugin_commands.py", 1, "edgefleet.plugins"),
        ("edgefleet/cli/plugin_commands.py", 2, "workers.node"),
        ("router/app.py", 3, "edgefleet.workers"),
        ("workers/node.py", 2, "edgefleet.router.app"),
        ("plugins/text/main.py", 6, "edgefleet.store"),
        ("plugins/text/main.py", 7, "edgefleet.plugins.photo"),
        ("plugins/text/main.py", 8, "router"),
    }
    message = "\n".join(map(str, check_tree(tmp_path)))
    assert "edgefleet/bad.py:4: imports edgefleet.router.app: the core (edgefleet/ minus edgefleet/cli/)" in message
    assert "workers/node.py:2: imports edgefleet.router.app: workers import the core only, never router" in message
    assert (
        "plugins/text/main.py:8: imports router: not installed under this name: the folder is the package " in message
    )


# --- the sealed store -----------------------------------------------------------------------
# Only the store reads Redis and spells key names: edgefleet/store/ (JobStore and its parts,
# the Lua scripts) and the release scheduler's own store class, edgefleet/scheduling/state.py.
# Elsewhere (the rest of edgefleet/, router/, workers/, plugins/, loadtests/) a module may not
#   - import the store's internals: edgefleet.keys (key names), edgefleet.store.connection and
#     edgefleet.store.scripts (the client and the scripts);
#   - reach into a store: `.redis`, `._redis`, `.connection`, `._conn` or `.keys` of something
#     named `store` / `*_store` (a JobStore is called that everywhere in this code);
#   - spell a key: a string that starts with the default prefix `ef:`, or a `:<kind>` part of a
#     key template (`f"{prefix}:job:{id}"`, `prefix + ":scheduler:feedback"`).
# Tests are not checked: they read Redis behind the store's back on purpose, as a witness.

SEALED_SCAN = ("edgefleet", "router", "workers", "plugins", "loadtests")
STORE_MODULES = ("edgefleet/store/", "edgefleet/scheduling/state.py", "edgefleet/keys.py")
STORE_INTERNALS = ("edgefleet.keys", "edgefleet.store.connection", "edgefleet.store.scripts")
STORE_INSIDES = {"redis", "_redis", "connection", "_conn", "keys", "_keys"}
DEFAULT_PREFIX = "ef:"


def _key_heads() -> tuple[str, ...]:
    """`:job`, `:st`, `:scheduler`, ...: the first part of every key name after the prefix."""
    from edgefleet.keys import KEY_TEMPLATES

    return tuple(sorted({":" + t.split(":")[0].split("{")[0] for t in KEY_TEMPLATES.values()}))


def _spells_a_key(text: str, heads: tuple[str, ...]) -> bool:
    if text.startswith(DEFAULT_PREFIX):
        return True
    return any(text == head or text.startswith(head + ":") for head in heads)


def _last_name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Call):
        return _last_name(node.func)
    return ""


@dataclass(frozen=True)
class Leak:
    file: str
    line: int
    imported: str  # what leaks: the import, the attribute or the string
    why: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.imported}: {self.why}"


def seal_violations(root: Path, path: Path, heads: tuple[str, ...]) -> list[Leak]:
    relative = path.relative_to(root)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(relative))
    _, package = module_name(relative)
    found: list[Leak] = []

    def flag(node: ast.AST, what: str, why: str) -> None:
        found.append(Leak(str(relative), getattr(node, "lineno", 0), what, why))

    for line, name in imported_names(tree, package):
        if _under(name, STORE_INTERNALS):
            found.append(Leak(str(relative), line, name, "only the store imports its key names, client, scripts"))
    called = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in STORE_INSIDES and id(node) not in called:
            owner = _last_name(node.value).lower()
            if owner.endswith("store"):
                flag(node, f"{owner}.{node.attr}", "reaches into the job store; add a store method instead")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _spells_a_key(node.value, heads):
            flag(node, repr(node.value), "spells a Redis key of the store; key names live in edgefleet/keys.py")
    # `from edgefleet.keys import Keys` is one violation, not two.
    flagged = {(v.line, v.imported) for v in found}
    return [v for v in found if not any((v.line, p) in flagged for p in _parents(v.imported))]


def sealed_files(root: Path) -> list[Path]:
    files = (p for top in SEALED_SCAN for p in (root / top).rglob("*.py") if "__pycache__" not in p.parts)
    return sorted(p for p in files if not p.relative_to(root).as_posix().startswith(STORE_MODULES))


def test_nothing_outside_the_store_reads_redis_or_spells_a_key() -> None:
    heads = _key_heads()
    files = sealed_files(ROOT)
    assert any(p.relative_to(ROOT).parts[0] == "loadtests" for p in files)
    violations = [v for path in files for v in seal_violations(ROOT, path, heads)]
    assert not violations, "the store's seal is broken:\n" + "\n".join(map(str, violations))


def test_the_seal_check_catches_each_way_in(tmp_path: Path) -> None:
    def write(relative: str, text: str) -> None:
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    write(
        "router/metrics.py",
        "from edgefleet.keys import Keys\n"  # 1
        "from edgefleet.store.connection import StoreConnection\n"  # 2
        "def scan(store, self_store):\n"  # 3
        "    store.redis.zcard(store.keys.running)\n"  # 4: both
        "    self_store.connection.client.get('x')\n"  # 5
        "    return store.keys\n"  # 6
        "def fine(settings, cluster, d):\n"  # 7
        "    d.keys(); cluster.redis; settings.redis_url; store.nodes.live_nodes()\n"  # 8: allowed
        "    return 'prefix: job done'\n",  # 9: allowed
    )
    write(
        "workers/runner.py",
        "class R:\n"
        "    def m(self, env, p):\n"
        "        self.store.redis.hmget(f'{p}:st:{env.job_id}:{env.subtask_id}', ['x'])\n"  # 3: both
        "        key = f'{self._prefix}:tenant_active:{env.tenant}'\n"  # 4
        "        return p + ':scheduler:feedback', 'ef:node:n1'\n",  # 5: both
    )
    write("loadtests/bench.py", "import edgefleet.store.scripts\nlive = 'ef:nodes'\n")
    write("edgefleet/store/jobs.py", "def f(store):\n    return store.redis, 'ef:job:1'\n")  # the store itself
    write("edgefleet/scheduling/state.py", "def f(store):\n    return store.connection\n")

    heads = _key_heads()
    found = {
        (v.file, v.line, v.imported) for path in sealed_files(tmp_path) for v in seal_violations(tmp_path, path, heads)
    }
    assert found == {
        ("router/metrics.py", 1, "edgefleet.keys"),
        ("router/metrics.py", 2, "edgefleet.store.connection"),
        ("router/metrics.py", 4, "store.redis"),
        ("router/metrics.py", 4, "store.keys"),
        ("router/metrics.py", 5, "self_store.connection"),
        ("router/metrics.py", 6, "store.keys"),
        ("workers/runner.py", 3, "store.redis"),
        ("workers/runner.py", 3, "':st:'"),
        ("workers/runner.py", 4, "':tenant_active:'"),
        ("workers/runner.py", 5, "':scheduler:feedback'"),
        ("workers/runner.py", 5, "'ef:node:n1'"),
        ("loadtests/bench.py", 1, "edgefleet.store.scripts"),
        ("loadtests/bench.py", 2, "'ef:nodes'"),
    }
    message = "\n".join(str(v) for path in sealed_files(tmp_path) for v in seal_violations(tmp_path, path, heads))
    assert "router/metrics.py:4: store.redis: reaches into the job store; add a store method instead" in message
