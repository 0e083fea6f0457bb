"""Plugin manifests and the catalog: good plugins load, bad ones are reported precisely."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from edgefleet.plugin_catalog import (
    PluginCatalog,
    PluginLoadError,
    builtin_plugin_dir,
    validate_action_args,
)
from edgefleet.plugin_context import PluginContext
from edgefleet.plugin_manifest import ManifestError, load_manifest
from edgefleet.schemas import ResourceClass

GOOD_MANIFEST = """\
name: {name}
version: "0.1.0"
description: echo its args
entry_point: echo_mod:run
resource_class: io
actions:
  echo:
    input_schema:
      type: object
      properties:
        word: {{type: string}}
      required: [word]
"""

GOOD_CODE = """\
from . import helper

def run(ctx, action, args):
    return {"echo": helper.shout(args["word"]), "attempt": ctx.attempt}
"""


def write_plugin(base: Path, folder: str, manifest: str, code: dict[str, str] | None = None) -> Path:
    plugin_dir = base / folder
    plugin_dir.mkdir(parents=True)
    (plugin_dir / "plugin.yaml").write_text(textwrap.dedent(manifest), encoding="utf-8")
    for filename, text in (code or {}).items():
        (plugin_dir / filename).write_text(text, encoding="utf-8")
    return plugin_dir


def good_plugin(base: Path, name: str = "echo") -> Path:
    return write_plugin(
        base,
        name,
        GOOD_MANIFEST.format(name=name),
        {"echo_mod.py": GOOD_CODE, "helper.py": "def shout(w):\n    return w.upper()\n"},
    )


def make_ctx(tmp_path: Path) -> PluginContext:
    import time

    return PluginContext(
        job_id="j1",
        subtask_id="s1",
        attempt=1,
        workspace=tmp_path,
        deadline=time.monotonic() + 60,
        is_cancelled=lambda: False,
        report_progress=lambda f, m: None,
    )


def error_for(catalog: PluginCatalog, folder: str) -> ManifestError:
    matches = [e for e in catalog.errors if Path(e.file).parent.name == folder]
    assert len(matches) == 1, catalog.errors
    return matches[0]


def test_builtin_plugins_load_without_errors() -> None:
    catalog = PluginCatalog.load([builtin_plugin_dir()])
    assert catalog.errors == []
    assert {"http_fetch", "sleep", "text"} <= set(catalog.names())  # other built-ins come and go
    text = catalog.get("text")
    assert text is not None
    assert text.manifest.resource_class is ResourceClass.cpu
    assert set(text.manifest.actions) == {"count", "transform"}
    assert catalog.get("http_fetch").manifest.resource_class is ResourceClass.io  # type: ignore[union-attr]
    for name in catalog.names():
        assert callable(catalog.get(name).load_callable())  # type: ignore[union-attr]


def test_describe_lists_actions_with_schemas() -> None:
    described = PluginCatalog.load([builtin_plugin_dir()]).describe()
    by_name = {d["name"]: d for d in described}
    assert [d["name"] for d in described] == sorted(by_name)
    text = by_name["text"]
    assert text["resource_class"] == "cpu"
    assert text["version"] == "1.0.0"
    assert text["actions"]["count"]["input_schema"]["type"] == "object"
    assert "op" in text["actions"]["transform"]["input_schema"]["properties"]
    fetch = by_name["http_fetch"]
    assert "network" in fetch["permissions"]
    assert any(d.lower().startswith("httpx") for d in fetch["dependencies"]["python"])
    assert isinstance(fetch["dependencies"]["binaries"], list)
    assert fetch["limits"]["timeout"] > 0 and fetch["limits"]["memory_mb"] > 0
    assert fetch["requires"] == {"edgefleet": fetch["requires"]["edgefleet"], "plugins": {}}
    assert fetch["entry_point"] == "fetch:run"


def test_malformed_manifests_are_reported_and_good_one_loads(tmp_path: Path) -> None:
    good_plugin(tmp_path, "echo")
    write_plugin(tmp_path, "bad_yaml", "name: bad_yaml\nactions: [unclosed\n")
    write_plugin(
        tmp_path,
        "no_entry",
        """\
        name: no_entry
        version: "1.0"
        resource_class: cpu
        actions:
          go: {}
        """,
    )
    write_plugin(
        tmp_path,
        "bad_version",
        """\
        name: bad_version
        version: "one point oh"
        entry_point: mod:run
        resource_class: cpu
        actions:
          go: {}
        """,
        {"mod.py": "def run(ctx, action, args):\n    return {}\n"},
    )
    (tmp_path / "not_a_plugin").mkdir()  # no plugin.yaml: silently skipped

    catalog = PluginCatalog.load([tmp_path])

    assert catalog.names() == ["echo"]
    assert len(catalog.errors) == 3

    bad_yaml = error_for(catalog, "bad_yaml")
    assert bad_yaml.field == "(yaml)"
    assert "invalid YAML" in bad_yaml.reason and "line" in bad_yaml.reason
    assert bad_yaml.file.endswith("bad_yaml/plugin.yaml")

    no_entry = error_for(catalog, "no_entry")
    assert no_entry.field == "entry_point"
    assert "required" in no_entry.reason.lower()

    bad_version = error_for(catalog, "bad_version")
    assert bad_version.field == "version"
    assert "not a valid version" in bad_version.reason
    assert str(bad_version) == f"{bad_version.file}: version: {bad_version.reason}"

    plugin = catalog.get("echo")
    assert plugin is not None
    func = plugin.load_callable()
    assert func(make_ctx(tmp_path), "echo", {"word": "hi"}) == {"echo": "HI", "attempt": 1}
    assert plugin.load_callable() is func  # cached per process


def test_manifest_error_names_nested_field_and_collects_all(tmp_path: Path) -> None:
    folder = write_plugin(
        tmp_path,
        "multi",
        """\
        name: multi
        version: 2
        entry_point: "not an entry point"
        resource_class: tpu
        surprise: true
        actions:
          count:
            input_schema: {type: object, properties: {n: {type: 12}}}
        """,
    )
    with pytest.raises(ManifestError) as info:
        load_manifest(folder / "plugin.yaml")
    err = info.value
    fields = [f for f, _ in err.details]
    assert set(fields) == {"version", "entry_point", "resource_class", "surprise", "actions.count.input_schema"}
    assert "quoted string" in dict(err.details)["version"]
    assert "JSON Schema" in dict(err.details)["actions.count.input_schema"]
    assert str(err).startswith(f"{folder / 'plugin.yaml'}: ")
    assert "actions.count.input_schema: not a valid JSON Schema" in str(err)


def test_folder_name_must_match_and_entry_module_must_exist(tmp_path: Path) -> None:
    folder = write_plugin(tmp_path, "folder_x", GOOD_MANIFEST.format(name="echo"))
    with pytest.raises(ManifestError) as info:
        load_manifest(folder / "plugin.yaml")
    fields = dict(info.value.details)
    assert info.value.field == "name"
    assert "folder_x" in fields["name"]
    assert "echo_mod.py" in fields["entry_point"]


def test_non_mapping_and_bad_action_names(tmp_path: Path) -> None:
    lst = write_plugin(tmp_path, "lst", "- just\n- a list\n")
    with pytest.raises(ManifestError) as info:
        load_manifest(lst / "plugin.yaml")
    assert info.value.field == "(root)" and "mapping" in info.value.reason

    manifest = GOOD_MANIFEST.format(name="acts").replace("  echo:", "  Bad-Name:")
    acts = write_plugin(tmp_path, "acts", manifest, {"echo_mod.py": GOOD_CODE})
    with pytest.raises(ManifestError) as info:
        load_manifest(acts / "plugin.yaml")
    assert info.value.field.startswith("actions.Bad-Name")


def test_duplicate_plugin_first_dir_wins(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    good_plugin(first, "echo")
    good_plugin(second, "echo")
    catalog = PluginCatalog.load([first, second, tmp_path / "missing"])
    assert catalog.get("echo").folder == first / "echo"  # type: ignore[union-attr]
    dup = [e for e in catalog.errors if e.field == "name"]
    assert len(dup) == 1 and dup[0].file.startswith(str(second))
    assert any(e.field == "(dir)" for e in catalog.errors)
    # Both folders can be imported in one process without clobbering each other.
    other = PluginCatalog.load([second]).get("echo")
    assert other is not None
    assert other.load_callable()(make_ctx(tmp_path), "echo", {"word": "x"})["echo"] == "X"


def test_load_callable_reports_broken_modules(tmp_path: Path) -> None:
    write_plugin(tmp_path, "boom", GOOD_MANIFEST.format(name="boom"), {"echo_mod.py": "raise ImportError('nope')\n"})
    write_plugin(tmp_path, "nofunc", GOOD_MANIFEST.format(name="nofunc"), {"echo_mod.py": "x = 1\n"})
    catalog = PluginCatalog.load([tmp_path])
    assert catalog.errors == []
    with pytest.raises(PluginLoadError, match=r"importing .* failed: ImportError: nope"):
        catalog.get("boom").load_callable()  # type: ignore[union-attr]
    with pytest.raises(PluginLoadError, match="has no attribute 'run'"):
        catalog.get("nofunc").load_callable()  # type: ignore[union-attr]


def test_validate_action_args_names_fields() -> None:
    catalog = PluginCatalog.load([builtin_plugin_dir()])
    transform = catalog.get("text").manifest.actions["transform"].input_schema  # type: ignore[union-attr]
    assert validate_action_args(transform, {"text": "hi", "op": "upper"}) == []

    errors = dict(validate_action_args(transform, {"text": "hi", "op": "shout", "colour": 1}))
    assert "args.op" in errors and "upper" in errors["args.op"]
    assert errors["args.colour"].startswith("unknown argument")

    errors = dict(validate_action_args(transform, {"op": "upper"}))
    assert errors == {"args": "give exactly one of 'text' or 'path'"}

    sleep = catalog.get("sleep").manifest.actions["sleep"].input_schema  # type: ignore[union-attr]
    assert validate_action_args(sleep, {}) == [("args.seconds", "is required")]
    errors = dict(validate_action_args(sleep, {"seconds": -1, "fail": "yes"}))
    assert "minimum" in errors["args.seconds"]
    assert "boolean" in errors["args.fail"]

    # A huge value is not echoed back whole in the reason.
    ((field, reason),) = validate_action_args(sleep, {"seconds": "x" * 100_000})
    assert field == "args.seconds" and len(reason) < 300

    assert validate_action_args(sleep, ["not", "a", "dict"]) == [("args", "must be an object")]  # type: ignore[arg-type]


def test_unresolved_refs_skip_required_and_value_checks() -> None:
    catalog = PluginCatalog.load([builtin_plugin_dir()])
    count = catalog.get("text").manifest.actions["count"].input_schema  # type: ignore[union-attr]
    sleep = catalog.get("sleep").manifest.actions["sleep"].input_schema  # type: ignore[union-attr]
    ref = {"$ref": "steps.fetch.output.path"}

    # Without the hint a $ref object is not a string; with it, it counts as given.
    assert validate_action_args(count, {"path": ref}) != []
    assert validate_action_args(count, {"path": ref}, unresolved={"path"}) == []
    assert validate_action_args(sleep, {"seconds": ref}, unresolved={"seconds"}) == []
    # The schema passed in is not modified.
    assert count["properties"]["path"] == {
        "x-path": "read",
        "type": "string",
        "minLength": 1,
        "description": "a UTF-8 text file to read",
    }
    # Resolved args are still checked, and an undeclared key is still unknown.
    errors = dict(validate_action_args(sleep, {"seconds": ref, "fail": 3, "typo": ref}, unresolved={"seconds", "typo"}))
    assert set(errors) == {"args.fail", "args.typo"}
    # "Exactly one of" still holds when one side is a reference.
    assert validate_action_args(count, {"path": ref, "text": "x"}, unresolved={"path"}) != []
