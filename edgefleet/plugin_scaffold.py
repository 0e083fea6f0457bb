"""`edgefleet plugins new NAME`: a new plugin folder that loads, runs and tests as it is.

The scaffold is a working plugin, not a stub: its manifest documents every
field, its code does a small real thing (transform text line by line with
progress, checkpoints and cancellation), and its test calls it with a real
`PluginContext` in a temporary workspace. Edit from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from packaging.version import Version

from edgefleet import __version__
from edgefleet.plugin_manifest import MANIFEST_FILENAME, NAME_PATTERN, is_valid_name
from edgefleet.schemas import ResourceClass


class ScaffoldError(Exception):
    """The scaffold cannot be written: `field` names the argument at fault."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class Scaffold:
    folder: Path
    files: list[Path]


def edgefleet_range() -> str:
    """The `requires.edgefleet` range a new plugin gets: this version up to the next major."""
    current = Version(__version__)
    return f">={current.base_version},<{current.major + 1}"


MANIFEST_TEMPLATE = """\
# plugin.yaml of the `@NAME@` plugin: everything edgefleet needs to know to plan,
# place and sandbox it. `edgefleet plugins check DIR` validates it; unknown keys
# are refused so that a typo never goes unnoticed.

# The plugin's name: lowercase letters, digits and '_' (@PATTERN@).
# It must equal the folder name. (`plugin_name` is accepted as a synonym.)
name: @NAME@

# The plugin's own version (PEP 440, e.g. 1.0.0). Quote it: YAML reads 1.10 as 1.1.
# Other plugins' `requires.plugins` ranges are checked against it.
version: "0.1.0"

description: Transform text line by line (an edgefleet plugin scaffold; edit me).

# module:function. The module is a .py file in this folder; the function is called
# as function(ctx, action, args) -> dict (a JSON object: the step's output).
entry_point: @NAME@_plugin:run

# Which queue runs it: cpu (compute), gpu (needs an accelerator), io (network, disk).
# A job step may override it with its own `resource_class`.
resource_class: @CLASS@

# What the box must have. A worker advertises (and runs) the plugin only where all
# of these are met; elsewhere it stays in the catalogue but is not runnable.
dependencies:
  # Python packages as PEP 508 requirements, e.g. ["Pillow>=10", "numpy>=1.26,<3"].
  python: []
  # Executables that must be on PATH, e.g. [ffmpeg, git].
  binaries: []

# What the catalogue must hold. Checked when plugins load, on every box: a plugin whose
# requirements fail (or form a cycle) is rejected with the reason.
requires:
  # The edgefleet versions this plugin works with (a PEP 440 range).
  edgefleet: "@EDGEFLEET_RANGE@"
  # Other plugins it needs, with version ranges, e.g. {http_fetch: ">=1.0,<2"}.
  plugins: {}

# What the plugin may do beyond computing in its own workspace. Grant the least you can:
#   file_system_read   read files outside the workspace (paths given in args)
#   file_system_write  write outside the workspace
#   network            open network connections
#   gpu_access         use the GPU devices
#   subprocess         start other programs
permissions: []

# Enforced by the sandbox on every attempt (a step's own `timeout` may be shorter).
limits:
  timeout: 60          # wall-clock seconds
  memory_mb: 512       # address space
  cpu_seconds: 60      # CPU time
  max_file_mb: 64      # largest file it may write
  max_processes: 8     # only matters with the subprocess permission

# The actions a job step can call: `plugin: @NAME@, action: <name>, args: {...}`.
# input_schema (JSON Schema, draft 2020-12, an object) checks a step's args before the
# job is accepted; output_schema documents the returned object.
actions:
  transform:
    description: >-
      Apply `op` (upper, lower or title) to each line of `text`, reporting progress;
      optionally save the result as `save_as` in the workspace.
    input_schema:
      type: object
      properties:
        text: {type: string, description: the text to transform}
        op: {enum: [upper, lower, title], default: upper}
        save_as: {type: string, minLength: 1, maxLength: 255, description: file name in the workspace}
      required: [text]
      additionalProperties: false
    output_schema:
      type: object
      required: [text, lines, path]
      properties:
        text: {type: string}
        lines: {type: integer}
        path: {type: [string, "null"], description: the saved file, if any}
"""

CODE_TEMPLATE = '''\
"""The `@NAME@` plugin: transform text line by line (an edgefleet plugin scaffold).

The worker calls `run(ctx, action, args)` in a sandboxed child process, with
`args` already checked against the action's input_schema in plugin.yaml. Return
a JSON object; write large results as files under `ctx.workspace`.
"""

from __future__ import annotations

from typing import Any

from edgefleet.plugin_context import PluginContext

OPS = {"upper": str.upper, "lower": str.lower, "title": str.title}
# Lines between two checkpoints: a resumed attempt redoes at most this many.
CHECKPOINT_EVERY = 100


def run(ctx: PluginContext, action: str, args: dict[str, Any]) -> dict[str, Any]:
    """Entry point named in plugin.yaml (`entry_point: @NAME@_plugin:run`)."""
    if action == "transform":
        return transform(ctx, args)
    raise ValueError(f"@NAME@ has no action {action!r} (actions: transform)")


def transform(ctx: PluginContext, args: dict[str, Any]) -> dict[str, Any]:
    op = OPS[args.get("op", "upper")]
    lines = str(args["text"]).splitlines()
    # A redelivered subtask resumes from its last checkpoint instead of starting over.
    state = ctx.resume() or {"done": 0, "out": []}
    out: list[str] = list(state["out"])
    for i in range(state["done"], len(lines)):
        ctx.check_cancelled()  # stop promptly on cancel or timeout
        out.append(op(lines[i]))
        done = i + 1
        if done % CHECKPOINT_EVERY == 0 or done == len(lines):
            ctx.checkpoint({"done": done, "out": out})
            ctx.progress(done / len(lines), f"{done}/{len(lines)} lines")
    text = "\\n".join(out)
    path = None
    if args.get("save_as"):
        target = ctx.workspace_path(args["save_as"])  # refuses paths outside the workspace
        target.write_text(text, encoding="utf-8")
        path = str(target)
    return {"text": text, "lines": len(out), "path": path}
'''

TEST_TEMPLATE = '''\
"""Tests of the `@NAME@` plugin: its manifest loads, and run() works with a real PluginContext.

Run them with: python -m pytest @FOLDER_HINT@
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from edgefleet.plugin_catalog import LoadedPlugin, validate_action_args
from edgefleet.plugin_context import PluginContext, SubtaskCancelled
from edgefleet.plugin_manifest import load_manifest

HERE = Path(__file__).resolve().parent


def plugin() -> LoadedPlugin:
    # The same loading path a worker uses: manifest checks, then import from this folder.
    return LoadedPlugin(manifest=load_manifest(HERE / "plugin.yaml"), folder=HERE)


def make_ctx(workspace: Path, progress: list[tuple[float, str]], cancelled: bool = False) -> PluginContext:
    return PluginContext(
        job_id="job-1",
        subtask_id="step-1",
        attempt=1,
        workspace=workspace,
        deadline=time.monotonic() + 60,
        is_cancelled=lambda: cancelled,
        report_progress=lambda fraction, message: progress.append((fraction, message)),
    )


def call(workspace: Path, action: str, args: dict[str, Any], progress: list[tuple[float, str]]) -> dict[str, Any]:
    loaded = plugin()
    spec = loaded.manifest.actions[action]
    assert validate_action_args(spec.input_schema, args) == []
    result = loaded.load_callable()(make_ctx(workspace, progress), action, args)
    if spec.output_schema is not None:
        Draft202012Validator(spec.output_schema).validate(result)
    return result


def test_manifest_is_valid() -> None:
    manifest = load_manifest(HERE / "plugin.yaml")
    assert manifest.name == "@NAME@"
    assert "transform" in manifest.actions


def test_transform_upper_with_progress_and_file(tmp_path: Path) -> None:
    progress: list[tuple[float, str]] = []
    result = call(tmp_path, "transform", {"text": "hello edge\\nsecond line", "save_as": "out.txt"}, progress)
    assert result["text"] == "HELLO EDGE\\nSECOND LINE"
    assert result["lines"] == 2
    assert (tmp_path / "out.txt").read_text(encoding="utf-8") == result["text"]
    assert progress and progress[-1][0] == 1.0


def test_transform_title(tmp_path: Path) -> None:
    result = call(tmp_path, "transform", {"text": "a small plugin", "op": "title"}, [])
    assert result == {"text": "A Small Plugin", "lines": 1, "path": None}


def test_bad_args_are_refused_before_running() -> None:
    spec = plugin().manifest.actions["transform"]
    problems = dict(validate_action_args(spec.input_schema, {"op": "shout"}))
    assert "args.text" in problems and "args.op" in problems


def test_cancelled_subtask_stops(tmp_path: Path) -> None:
    func = plugin().load_callable()
    with pytest.raises(SubtaskCancelled):
        func(make_ctx(tmp_path, [], cancelled=True), "transform", {"text": "x"})
'''


def scaffold(name: str, base_dir: Path, resource_class: str = "cpu") -> Scaffold:
    """Write `base_dir/name/` with plugin.yaml, `<name>_plugin.py` and `test_<name>.py`.

    Raises ScaffoldError for an invalid name or class, or when the folder exists;
    nothing is left half-written.
    """
    if not is_valid_name(name):
        raise ScaffoldError(
            "NAME", f"{name!r} is not a valid plugin name: lowercase letters, digits and '_', starting with a letter"
        )
    try:
        rc = ResourceClass(resource_class)
    except ValueError:
        choices = ", ".join(c.value for c in ResourceClass)
        raise ScaffoldError("--resource-class", f"{resource_class!r}: choose from {choices}") from None
    base_dir = Path(base_dir)
    folder = base_dir / name
    if folder.exists() or folder.is_symlink():
        raise ScaffoldError("NAME", f"{folder} already exists; choose another name or remove it")
    if base_dir.exists() and not base_dir.is_dir():
        raise ScaffoldError("--dir", f"{base_dir} is not a directory")

    def fill(template: str) -> str:
        return (
            template.replace("@NAME@", name)
            .replace("@CLASS@", rc.value)
            .replace("@PATTERN@", NAME_PATTERN)
            .replace("@EDGEFLEET_RANGE@", edgefleet_range())
            .replace("@FOLDER_HINT@", f"{base_dir.name or '.'}/{name}")
        )

    contents = {
        MANIFEST_FILENAME: fill(MANIFEST_TEMPLATE),
        f"{name}_plugin.py": fill(CODE_TEMPLATE),
        f"test_{name}.py": fill(TEST_TEMPLATE),
    }
    # Written into a hidden sibling first, then renamed: the folder appears complete or not at all.
    base_dir.mkdir(parents=True, exist_ok=True)
    staging = base_dir / f".{name}.new"
    try:
        staging.mkdir()
    except FileExistsError:
        raise ScaffoldError("NAME", f"{staging} exists (an interrupted scaffold?); remove it and retry") from None
    try:
        for filename, text in contents.items():
            (staging / filename).write_text(text, encoding="utf-8")
        staging.rename(folder)
    except BaseException:
        for leftover in staging.glob("*"):
            leftover.unlink(missing_ok=True)
        staging.rmdir()
        raise
    return Scaffold(folder=folder, files=[folder / filename for filename in contents])
