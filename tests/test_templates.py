"""Workflow templates: loading, input checks and substitution."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from edgefleet.plugin_catalog import PluginCatalog, builtin_plugin_dir, validate_action_args
from edgefleet.schemas import StepSpec
from edgefleet.templates import TemplateCatalog, TemplateError

PARAMS_TEMPLATE = """\
name: params
description: every input type
inputs:
  s: {type: string}
  n: {type: number, required: false, default: 1.5}
  i: {type: integer, required: false}
  b: {type: boolean, required: false, default: false}
  o: {type: object, required: false, default: {k: v}}
  a: {type: array, required: false}
steps:
  - id: first
    plugin: sleep
    action: sleep
    args:
      seconds: "${inputs.n}"
      fail: "${inputs.b}"
      nested: {list: ["${inputs.s}", "pre-${inputs.s}-${inputs.i}-post", 3], obj: "${inputs.o}"}
      items: "${inputs.a}"
    timeout: "${inputs.i}"
"""


def write(folder: Path, filename: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / filename
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.fixture()
def builtin() -> TemplateCatalog:
    catalog = TemplateCatalog.load([builtin_plugin_dir()])
    assert catalog.errors == []
    return catalog


def test_builtin_templates_expand_to_valid_plans(builtin: TemplateCatalog) -> None:
    assert {"fetch-and-count", "text-report"} <= set(builtin.names())
    plugins = PluginCatalog.load([builtin_plugin_dir()])

    report = builtin.expand("text-report", {"text": "Hello edge"})
    assert [s["id"] for s in report] == ["count", "shout"]
    assert report[0]["args"] == {"text": "Hello edge"}
    assert report[1]["args"] == {"text": "Hello edge", "op": "upper"}
    assert report[1]["needs"] == ["count"]
    assert builtin.expand("text-report", {"text": "x", "op": "title"})[1]["args"]["op"] == "title"

    fetch = builtin.expand("fetch-and-count", {"url": "https://example.org/a.txt"})
    assert [s["id"] for s in fetch] == ["fetch", "count", "upper"]
    assert fetch[0]["args"]["url"] == "https://example.org/a.txt"
    assert fetch[1]["args"] == {"path": {"$ref": "steps.fetch.output.path"}}
    assert fetch[2]["args"]["op"] == "upper"

    # Every expanded step is a valid StepSpec whose args fit its action's schema.
    for steps in (report, fetch):
        for raw in steps:
            step = StepSpec.model_validate(raw)
            plugin = plugins.get(step.plugin)
            assert plugin is not None
            schema = plugin.manifest.actions[step.action].input_schema
            refs = {k for k, v in step.args.items() if isinstance(v, dict) and "$ref" in v}
            assert validate_action_args(schema, step.args, unresolved=refs) == []


def test_expand_errors_name_the_field(builtin: TemplateCatalog) -> None:
    cases = [
        (("nope", {}), "template", "unknown template 'nope'"),
        (("text-report", {}), "inputs.text", "is required"),
        (("text-report", {"text": 5}), "inputs.text", "must be of type string"),
        (("text-report", {"text": "x", "colour": "red"}), "inputs.colour", "unknown input"),
    ]
    for (name, inputs), field, reason in cases:
        with pytest.raises(TemplateError) as info:
            builtin.expand(name, inputs)
        assert info.value.field == field
        assert reason in info.value.reason
        assert str(info.value).startswith(f"{field}: ")


def test_substitution_keeps_types_and_is_deep(tmp_path: Path) -> None:
    write(tmp_path / "workflows", "params.yaml", PARAMS_TEMPLATE)
    catalog = TemplateCatalog.load([tmp_path])
    assert catalog.errors == []

    (step,) = catalog.expand("params", {"s": "abc", "i": 7, "a": [1, 2]})
    assert step["args"]["seconds"] == 1.5
    assert step["args"]["fail"] is False
    assert step["args"]["nested"] == {"list": ["abc", "pre-abc-7-post", 3], "obj": {"k": "v"}}
    assert step["args"]["items"] == [1, 2]
    assert step["timeout"] == 7

    (step,) = catalog.expand("params", {"s": "x", "n": 2, "b": True})
    assert step["args"]["seconds"] == 2 and step["args"]["fail"] is True
    assert step["args"]["nested"]["list"][1] == "pre-x--post"  # an absent optional input reads as ""
    assert "timeout" not in step and "items" not in step["args"]  # absent optional inputs drop their keys

    # Expanding never alters the template itself.
    step["args"]["nested"]["obj"]["k"] = "changed"
    assert catalog.expand("params", {"s": "x"})[0]["args"]["nested"]["obj"] == {"k": "v"}

    for inputs, field in [
        ({"s": "x", "i": 1.5}, "inputs.i"),
        ({"s": "x", "b": 1}, "inputs.b"),
        ({"s": "x", "n": True}, "inputs.n"),
    ]:
        with pytest.raises(TemplateError) as info:
            catalog.expand("params", inputs)
        assert info.value.field == field


def test_bad_template_files_are_recorded(tmp_path: Path) -> None:
    wf = tmp_path / "workflows"
    write(wf, "good.yaml", "name: good\nsteps:\n  - {id: a, plugin: sleep, action: sleep, args: {seconds: 0}}\n")
    write(wf, "broken.yaml", "name: broken\nsteps: [\n")
    write(wf, "undeclared.yaml", "name: undeclared\nsteps:\n  - {id: a, args: {x: '${inputs.who}'}}\n")
    write(wf, "badtype.yaml", "name: badtype\ninputs: {x: {type: str}}\nsteps:\n  - {id: a}\n")
    write(wf, "dupid.yaml", "name: dupid\nsteps:\n  - {id: a}\n  - {id: a}\n")
    write(wf, "other.yaml", "name: misnamed\nsteps:\n  - {id: a}\n")
    write(
        wf, "baddefault.yaml", "name: baddefault\ninputs: {x: {type: integer, default: 'one'}}\nsteps:\n  - {id: a}\n"
    )
    write(tmp_path / "second" / "workflows", "good.yaml", "name: good\nsteps:\n  - {id: b}\n")

    catalog = TemplateCatalog.load([tmp_path, tmp_path / "second", tmp_path / "no-such-dir"])
    assert catalog.names() == ["good"]
    assert catalog.expand("good", {})[0]["id"] == "a"  # the first dir wins
    by_file = {Path(e.file).name: e for e in catalog.errors if Path(e.file).parent == wf}
    assert set(by_file) == {
        "broken.yaml",
        "undeclared.yaml",
        "badtype.yaml",
        "dupid.yaml",
        "other.yaml",
        "baddefault.yaml",
    }
    assert by_file["broken.yaml"].field == "(yaml)"
    assert "who" in by_file["undeclared.yaml"].reason
    assert by_file["badtype.yaml"].field == "inputs.x.type"
    assert "duplicate step id" in by_file["dupid.yaml"].reason
    assert by_file["other.yaml"].field == "name"
    assert "not of type integer" in by_file["baddefault.yaml"].reason
    dup = [e for e in catalog.errors if Path(e.file).parent != wf]
    assert len(dup) == 1 and "already defined" in dup[0].reason


def test_describe(builtin: TemplateCatalog) -> None:
    described = {d["name"]: d for d in builtin.describe()}
    report = described["text-report"]
    assert report["inputs"]["text"]["required"] is True
    assert report["inputs"]["op"] == {
        "type": "string",
        "required": False,
        "default": "upper",
        "description": report["inputs"]["op"]["description"],
    }
    assert [s["id"] for s in report["steps"]] == ["count", "shout"]
