"""Catalogue resolution: bad or incompatible plugins are rejected with file, field and reason
while the good ones load; unmet dependencies keep a plugin out of what a box can run; the
router refuses a step that no live worker can run (and lets jobs wait when no worker is up).
"""

from __future__ import annotations

import json
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edgefleet import __version__
from edgefleet.plugin_catalog import PluginCatalog, builtin_plugin_dir
from edgefleet.plugin_manifest import ManifestError
from edgefleet.plugin_resolution import find_cycles, unmet_binary, unmet_python
from edgefleet.router.planner import capability_problems
from edgefleet.router.submission import NODES_FRESH_S
from edgefleet.schemas import NodeInfo, Plan, PlannedSubtask, ResourceClass
from edgefleet.settings import Settings
from tests.conftest import ADMIN_TOKEN, Cluster, wait_until

CODE = "def run(ctx, action, args):\n    return {'echo': args.get('word', ''), 'attempt': ctx.attempt}\n"


def manifest(
    name: str,
    *,
    version: str = '"1.0.0"',
    resource_class: str = "cpu",
    extra: str = "",
    entry_point: str = "mod:run",
    actions: str = "  go:\n    input_schema: {type: object, properties: {word: {type: string}}}\n",
) -> str:
    return (
        f"name: {name}\nversion: {version}\nentry_point: {entry_point}\n"
        f"resource_class: {resource_class}\nactions:\n{actions}{textwrap.dedent(extra)}"
    )


def write_plugin(base: Path, folder: str, text: str, code: bool = True) -> Path:
    plugin_dir = base / folder
    plugin_dir.mkdir(parents=True)
    (plugin_dir / "plugin.yaml").write_text(text, encoding="utf-8")
    if code:
        (plugin_dir / "mod.py").write_text(CODE, encoding="utf-8")
    return plugin_dir


def errors_for(catalog: PluginCatalog, folder: str) -> list[ManifestError]:
    return [e for e in catalog.errors if Path(e.file).parent.name == folder]


def only_error(catalog: PluginCatalog, folder: str) -> ManifestError:
    found = errors_for(catalog, folder)
    assert len(found) == 1, [str(e) for e in catalog.errors]
    return found[0]


BUILTINS = {"http_fetch", "sleep", "text"}


@pytest.fixture()
def broken_dir(tmp_path: Path) -> Path:
    """One good plugin, one with unmet dependencies, and many broken or incompatible ones."""
    base = tmp_path / "extra"
    # Good: requires a built-in plugin and this edgefleet; its dependencies are met everywhere.
    write_plugin(
        base,
        "echo",
        manifest(
            "echo",
            resource_class="io",
            extra=f"""\
        requires:
          edgefleet: ">={__version__},<1000"
          plugins: {{text: ">=1,<2"}}
        dependencies:
          python: ["PyYAML>=5", "pywin32>=1; sys_platform == 'win32' and sys_platform == 'linux'"]
          binaries: [sh]
        permissions: [network]
        limits: {{timeout: 30, memory_mb: 256}}
        """,
        ),
    )
    # Loads, but no box here can run it.
    write_plugin(
        base,
        "unmet",
        manifest(
            "unmet",
            extra="""\
        dependencies:
          python: ["definitely-not-installed-pkg>=1", "PyYAML>=999"]
          binaries: [no-such-binary-xyz]
        """,
        ),
    )
    # Requiring a plugin with unmet dependencies is fine: dependencies are per box.
    write_plugin(base, "uses_unmet", manifest("uses_unmet", extra="requires: {plugins: {unmet: '>=1'}}\n"))
    # 1. bad YAML
    write_plugin(base, "bad_yaml", "name: bad_yaml\nactions: [unclosed\n")
    # 2. missing entry_point
    write_plugin(base, "no_entry", "name: no_entry\nversion: '1.0'\nresource_class: cpu\nactions:\n  go: {}\n")
    # 3. bad version
    write_plugin(base, "bad_version", manifest("bad_version", version='"one point oh"'))
    # 4. unknown permission
    write_plugin(base, "bad_permission", manifest("bad_permission", extra="permissions: [network, telepathy]\n"))
    # 5. bad dependency requirement string
    write_plugin(base, "bad_dep", manifest("bad_dep", extra="dependencies: {python: ['Pillow>>=10']}\n"))
    # 6. bad version range
    write_plugin(base, "bad_range", manifest("bad_range", extra="requires: {plugins: {text: '~=banana'}}\n"))
    # 7. incompatible requires.edgefleet
    write_plugin(base, "future_core", manifest("future_core", extra="requires: {edgefleet: '>=99'}\n"))
    # 8. missing required plugin
    write_plugin(base, "needs_ghost", manifest("needs_ghost", extra="requires: {plugins: {ghost_plugin: '>=1'}}\n"))
    # 9. required plugin present, version out of range
    write_plugin(base, "conflict", manifest("conflict", extra="requires: {plugins: {text: '>=2'}}\n"))
    # 10. a requirement cycle between two plugins, and one plugin requiring itself
    write_plugin(base, "cycle_a", manifest("cycle_a", extra="requires: {plugins: {cycle_b: '>=1'}}\n"))
    write_plugin(base, "cycle_b", manifest("cycle_b", extra="requires: {plugins: {cycle_a: '>=1'}}\n"))
    write_plugin(base, "self_loop", manifest("self_loop", extra="requires: {plugins: {self_loop: '>=1'}}\n"))
    # 11. requiring a rejected plugin (rejected by resolution, or unparseable), transitively
    write_plugin(base, "on_rejected", manifest("on_rejected", extra="requires: {plugins: {future_core: '>=1'}}\n"))
    write_plugin(base, "on_on_rejected", manifest("on_on_rejected", extra="requires: {plugins: {on_rejected: '*'}}\n"))
    write_plugin(base, "on_bad_yaml", manifest("on_bad_yaml", extra="requires: {plugins: {bad_yaml: '>=1'}}\n"))
    # 12. entry module file that does not exist
    write_plugin(base, "no_module", manifest("no_module", entry_point="missing_mod:run"))
    # 13. action with an invalid input schema
    write_plugin(
        base,
        "bad_schema",
        manifest("bad_schema", actions="  go:\n    input_schema: {type: object, properties: {n: {type: 12}}}\n"),
    )
    # 14. unknown top-level field (a typo)
    write_plugin(base, "typo", manifest("typo", extra="permisions: [network]\n"))
    return base


def test_bad_plugins_are_rejected_with_file_field_reason_and_good_ones_load(broken_dir: Path, tmp_path: Path) -> None:
    # 15. the same plugin name in a later dir
    later = tmp_path / "later"
    write_plugin(later, "echo", manifest("echo"))
    catalog = PluginCatalog.load([builtin_plugin_dir(), broken_dir, later])

    assert set(catalog.names()) >= BUILTINS
    assert {"echo", "unmet", "uses_unmet"} <= set(catalog.names())
    assert catalog.get("echo").folder == broken_dir / "echo"  # type: ignore[union-attr]
    rejected = {
        "bad_yaml",
        "no_entry",
        "bad_version",
        "bad_permission",
        "bad_dep",
        "bad_range",
        "future_core",
        "needs_ghost",
        "conflict",
        "cycle_a",
        "cycle_b",
        "self_loop",
        "on_rejected",
        "on_on_rejected",
        "on_bad_yaml",
        "no_module",
        "bad_schema",
        "typo",
    }
    assert not rejected & set(catalog.names())
    assert rejected <= set(catalog.rejected)

    def check(folder: str, field: str, *parts: str) -> ManifestError:
        err = only_error(catalog, folder)
        assert err.file == str(broken_dir / folder / "plugin.yaml")
        assert err.field == field, str(err)
        for part in parts:
            assert part in err.reason, str(err)
        assert str(err).startswith(f"{err.file}: {field}: ")
        return err

    check("bad_yaml", "(yaml)", "invalid YAML at line 3")
    check("no_entry", "entry_point", "required")
    check("bad_version", "version", "'one point oh' is not a valid version")
    check("bad_permission", "permissions.1", "'telepathy' is not allowed", "network", "subprocess")
    check("bad_dep", "dependencies.python.0", "'Pillow>>=10' is not a package requirement")
    check("bad_range", "requires.plugins.text", "'~=banana' is not a version range")
    check("future_core", "requires.edgefleet", "needs edgefleet >=99", f"this is edgefleet {__version__}")
    check("needs_ghost", "requires.plugins.ghost_plugin", "requires plugin 'ghost_plugin'", "not installed")
    check("conflict", "requires.plugins.text", "version conflict", ">=2", "version 1.0.0 is installed")
    check("cycle_a", "requires.plugins", "requirement cycle: cycle_a -> cycle_b -> cycle_a")
    check("cycle_b", "requires.plugins", "requirement cycle: cycle_a -> cycle_b -> cycle_a")
    check("self_loop", "requires.plugins", "requirement cycle: self_loop -> self_loop")
    check("on_rejected", "requires.plugins.future_core", "'future_core', which was rejected", "requires.edgefleet")
    check("on_on_rejected", "requires.plugins.on_rejected", "'on_rejected', which was rejected")
    check("on_bad_yaml", "requires.plugins.bad_yaml", "'bad_yaml', which was rejected", "invalid YAML")
    check("no_module", "entry_point", "module file 'missing_mod.py' not found")
    check("bad_schema", "actions.go.input_schema", "not a valid JSON Schema")
    check("typo", "permisions", "Extra inputs are not permitted")

    dup = only_error(catalog, "echo")
    assert dup.file == str(later / "echo" / "plugin.yaml")
    assert dup.field == "name" and "already provided by" in dup.reason

    # The good plugins still work; the errors are listed for GET /v1/plugins.
    func = catalog.get("echo").load_callable()  # type: ignore[union-attr]
    assert callable(func)
    listed = {e["file"]: e for e in catalog.describe_errors()}
    entry = listed[str(broken_dir / "future_core" / "plugin.yaml")]
    assert entry["plugin"] == "future_core" and entry["field"] == "requires.edgefleet" and entry["reason"]
    # A rejected plugin explains itself when a worker asks whether it can run it.
    assert "was rejected" in catalog.unmet_dependencies("future_core")[0]
    assert "no plugin 'nope'" in catalog.unmet_dependencies("nope")[0]


def test_unmet_dependencies_keep_plugin_in_catalogue_but_not_runnable_here(broken_dir: Path) -> None:
    catalog = PluginCatalog.load([builtin_plugin_dir(), broken_dir])
    assert "unmet" in catalog and "uses_unmet" in catalog
    assert not errors_for(catalog, "unmet") and not errors_for(catalog, "uses_unmet")

    unmet = catalog.unmet_dependencies("unmet")
    assert len(unmet) == 3, unmet
    assert "python package 'definitely-not-installed-pkg>=1': not installed" in unmet
    assert any(u.startswith("python package 'PyYAML>=999': version ") and u.endswith(" is installed") for u in unmet)
    assert "binary 'no-such-binary-xyz': not found on PATH" in unmet

    assert catalog.unmet_dependencies("echo") == []  # PyYAML present, the win32-only marker skipped, sh on PATH
    runnable = catalog.runnable_here()
    assert "unmet" not in runnable
    assert {"echo", "uses_unmet"} | BUILTINS <= set(runnable)
    assert runnable == sorted(runnable)


def test_dependency_checks_directly() -> None:
    assert unmet_python("pyyaml>=5") is None  # distribution names are normalised
    assert unmet_python("PyYAML[extra]>=5") is None
    assert unmet_python("definitely-not-installed-pkg>=1") is not None
    assert unmet_python("packaging<1") == f"python package 'packaging<1': version {_version('packaging')} is installed"
    assert unmet_python("definitely-not-installed-pkg; python_version < '3'") is None
    assert unmet_binary("sh") is None
    assert unmet_binary("no-such-binary-xyz") == "binary 'no-such-binary-xyz': not found on PATH"


def _version(dist: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(dist)


def test_find_cycles() -> None:
    graph = {"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"], "e": ["e"], "f": []}
    assert sorted(find_cycles(graph)) == [["a", "b", "c", "a"], ["e", "e"]]
    assert find_cycles({"a": ["b"], "b": [], "c": ["a", "b"]}) == []
    assert find_cycles({"a": ["zzz_missing"]}) == []


def test_plugin_name_synonym_and_same_dir_twice(tmp_path: Path) -> None:
    text = manifest("syn").replace("name: syn", "plugin_name: syn")
    write_plugin(tmp_path, "syn", text)
    catalog = PluginCatalog.load([tmp_path, tmp_path, builtin_plugin_dir(), builtin_plugin_dir()])
    assert "syn" in catalog
    assert not [e for e in catalog.errors if e.field == "name"]  # a dir named twice is loaded once


def test_plugin_dirs_from_env_json_list(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EDGEFLEET_PLUGIN_DIRS", json.dumps([str(tmp_path / "a"), str(tmp_path / "b")]))
    settings = Settings()
    assert settings.plugin_dirs == [tmp_path / "a", tmp_path / "b"]
    assert settings.require_capable_worker is True
    monkeypatch.setenv("EDGEFLEET_REQUIRE_CAPABLE_WORKER", "false")
    assert Settings().require_capable_worker is False
    write_plugin(tmp_path / "b", "from_b", manifest("from_b"))
    assert settings.plugin_folders == [builtin_plugin_dir(), tmp_path / "a", tmp_path / "b"]
    catalog = PluginCatalog.load(settings.plugin_folders)
    assert "from_b" in catalog
    assert [e.field for e in catalog.errors if e.file == str(tmp_path / "a")] == ["(dir)"]


# --- the router's capability check ----------------------------------------------------------


def _node(name: str, classes: list[str], plugins: list[str]) -> NodeInfo:
    now = time.time()
    return NodeInfo(
        name=name,
        classes=[ResourceClass(c) for c in classes],
        cores=2,
        memory_total=1,
        memory_available=1,
        cpu_percent=0.0,
        plugins=plugins,
        started_at=now,
        heartbeat_at=now,
        version=__version__,
    )


def _plan(*steps: tuple[str, str, str | None]) -> Plan:
    return Plan(
        subtasks=[
            PlannedSubtask(
                id=f"s{i}",
                plugin=plugin,
                action="go",
                args={},
                needs=[],
                dependents=[],
                resource_class=ResourceClass(rc),
                node=node,
                timeout=10,
                retries=0,
                retry_backoff=1,
            )
            for i, (plugin, rc, node) in enumerate(steps)
        ]
    )


def test_capability_problems() -> None:
    a = _node("a", ["cpu", "io"], ["text", "http_fetch"])
    b = _node("b", ["cpu"], ["text"])
    plan = _plan(
        ("text", "cpu", None),
        ("http_fetch", "io", None),
        ("text", "gpu", None),
        ("photo", "cpu", None),
        ("text", "cpu", "b"),
        ("http_fetch", "io", "b"),
        ("text", "cpu", "ghost"),
        ("http_fetch", "cpu", "b"),
    )
    assert capability_problems(plan, []) == []  # nobody up yet: everything waits
    problems = capability_problems(plan, [a, b], explicit_class={2})
    assert problems == [
        ("steps.2.resource_class", "no live worker serves class gpu with plugin 'text' (nodes: a[cpu,io], b[cpu])"),
        (
            "steps.3.plugin",
            "no live worker serves class cpu with plugin 'photo' "
            "(nodes: a[cpu,io] without 'photo', b[cpu] without 'photo')",
        ),
        ("steps.5.plugin", "node 'b' does not serve class io (it serves cpu)"),
        ("steps.6.node", "node 'ghost' is not live (live nodes: a, b)"),
        ("steps.7.plugin", "node 'b' does not advertise plugin 'http_fetch' (its dependencies are not met there)"),
    ]


def test_router_refuses_steps_no_live_worker_can_run(cluster_factory: Callable[..., Cluster], broken_dir: Path) -> None:
    cluster = cluster_factory(EDGEFLEET_PLUGIN_DIRS=json.dumps([str(broken_dir)]))
    cluster.start_router()
    fetch = {"steps": [{"id": "f", "plugin": "http_fetch", "action": "get", "args": {"url": "http://127.0.0.1:9/x"}}]}

    # No live node at all: the job is accepted and waits.
    with cluster.client() as http:
        waiting = http.post("/v1/jobs", json=fetch)
    assert waiting.status_code == 201, waiting.text
    job = cluster.job(waiting.json()["id"])
    assert job["state"] == "running"
    assert job["subtasks"][0]["state"] in ("ready", "queued")

    cluster.start_node("n1", classes="cpu")
    cluster.wait_nodes_ready("n1")

    with cluster.client() as http:
        refused = http.post("/v1/jobs", json=fetch)
        assert refused.status_code == 422, refused.text
        body = refused.json()
        assert body["error"] == "invalid_plan"
        assert body["detail"] == [
            {
                "field": "steps.0.plugin",
                "reason": "no live worker serves class io with plugin 'http_fetch' (nodes: n1[cpu])",
            }
        ]

        # The step chose its class: that field is named.
        explicit = http.post(
            "/v1/jobs",
            json={
                "steps": [
                    {"id": "s", "plugin": "sleep", "action": "sleep", "args": {"seconds": 0}, "resource_class": "gpu"}
                ]
            },
        )
        assert explicit.status_code == 422
        assert explicit.json()["detail"][0]["field"] == "steps.0.resource_class"

        # Loaded from the extra plugin dir, but its dependencies are unmet on every node.
        unmet = http.post("/v1/jobs", json={"steps": [{"id": "u", "plugin": "unmet", "action": "go"}]})
        assert unmet.status_code == 422
        assert unmet.json()["detail"] == [
            {
                "field": "steps.0.plugin",
                "reason": "no live worker serves class cpu with plugin 'unmet' (nodes: n1[cpu] without 'unmet')",
            }
        ]

        pinned = http.post(
            "/v1/jobs",
            json={"steps": [{"id": "t", "plugin": "text", "action": "count", "args": {"text": "a"}, "node": "ghost"}]},
        )
        assert pinned.status_code == 422
        assert pinned.json()["detail"][0] == {
            "field": "steps.0.node",
            "reason": "node 'ghost' is not live (live nodes: n1)",
        }

        # What the node can run is accepted and runs, a plugin from the extra dir included.
        ok = http.post(
            "/v1/jobs",
            json={
                "steps": [
                    {"id": "t", "plugin": "text", "action": "count", "args": {"text": "a b"}},
                    {"id": "u", "plugin": "uses_unmet", "action": "go", "args": {"word": "hi"}},
                ]
            },
        )
        assert ok.status_code == 201, ok.text

        listing = http.get("/v1/plugins").json()
    done = cluster.wait_job(ok.json()["id"])
    assert done["state"] == "succeeded", done
    assert done["subtasks"][1]["output"]["echo"] == "hi"

    plugins = {p["name"]: p for p in listing["plugins"]}
    assert plugins["text"]["nodes"] == ["n1"]
    assert plugins["http_fetch"]["nodes"] == [] and plugins["http_fetch"]["advertised_by"] == ["n1"]
    assert plugins["unmet"]["nodes"] == [] and plugins["unmet"]["advertised_by"] == []
    echo = plugins["echo"]
    assert echo["permissions"] == ["network"]
    assert echo["limits"]["timeout"] == 30 and echo["limits"]["memory_mb"] == 256
    assert echo["dependencies"]["binaries"] == ["sh"]
    assert echo["requires"]["plugins"] == {"text": ">=1,<2"}
    assert echo["entry_point"] == "mod:run"
    errors = {e["file"]: e for e in listing["errors"]}
    cyc = errors[str(broken_dir / "cycle_a" / "plugin.yaml")]
    assert cyc["field"] == "requires.plugins" and "cycle_a -> cycle_b -> cycle_a" in cyc["reason"]
    assert cyc["plugin"] == "cycle_a"

    # The check can be turned off: a second router on the same fleet accepts what the first refused.
    relaxed = cluster_factory(EDGEFLEET_REQUIRE_CAPABLE_WORKER="false")
    relaxed.start_router()
    with relaxed.client(ADMIN_TOKEN) as http:
        accepted = http.post("/v1/jobs", json=fetch)
        assert accepted.status_code == 201, accepted.text
        assert "n1" in {n["name"] for n in http.get("/v1/workers").json()}


def test_resubmission_with_idempotency_key_returns_the_job_even_if_fleet_changed(
    cluster_factory: Callable[..., Cluster],
) -> None:
    cluster = cluster_factory()
    cluster.start_router()
    fetch = {"steps": [{"id": "f", "plugin": "http_fetch", "action": "get", "args": {"url": "http://127.0.0.1:9/x"}}]}
    first = cluster.submit(fetch, **{"Idempotency-Key": "k1"})
    cluster.start_node("n1", classes="cpu")
    wait_until(lambda: cluster.redis.client().exists("ef:node:n1"), 30, what="n1 heartbeat")
    again = cluster.submit(fetch, **{"Idempotency-Key": "k1"})
    assert again["id"] == first["id"]
    # The router's view of the fleet, read for the first submission, serves NODES_FRESH_S: past
    # that, a new job is planned against a fresh one that has n1 (cpu only).
    time.sleep(NODES_FRESH_S)
    with cluster.client() as http:
        assert http.post("/v1/jobs", json=fetch, headers={"Idempotency-Key": "k2"}).status_code == 422
