"""`edgefleet plugins list | check | new`, run as real subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from edgefleet.plugin_catalog import PluginCatalog, builtin_plugin_dir
from tests.conftest import ROOT
from tests.test_cli import cli_env


def run_cli(*args: str, cwd: Path, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgefleet", *args],
        env=cli_env(**(env_extra or {})),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(cwd),
    )


def problem_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stdout.splitlines() if not line.startswith(("ok:", "warning:"))]


def test_new_scaffold_is_accepted_by_check_and_its_test_passes(tmp_path: Path) -> None:
    baseline = run_cli("plugins", "check", cwd=tmp_path)  # built-ins only

    made = run_cli("plugins", "new", "shout", "--dir", "my-plugins", "--resource-class", "io", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    folder = tmp_path / "my-plugins" / "shout"
    assert sorted(p.name for p in folder.iterdir()) == ["plugin.yaml", "shout_plugin.py", "test_shout.py"]
    assert str(Path("my-plugins") / "shout") in made.stdout
    assert not [p for p in (tmp_path / "my-plugins").iterdir() if p.name.startswith(".")]  # no staging left

    raw = (folder / "plugin.yaml").read_text()
    data = yaml.safe_load(raw)
    # Every manifest field is present and documented by a comment.
    for field in (
        "name",
        "version",
        "description",
        "entry_point",
        "resource_class",
        "dependencies",
        "requires",
        "permissions",
        "limits",
        "actions",
    ):
        assert field in data, field
    assert data["resource_class"] == "io" and data["entry_point"] == "shout_plugin:run"
    for word in ("file_system_read", "file_system_write", "network", "gpu_access", "subprocess", "PEP 508"):
        assert word in raw
    assert sum(1 for line in raw.splitlines() if line.lstrip().startswith("#")) >= 20

    checked = run_cli("plugins", "check", "my-plugins", cwd=tmp_path)
    # The scaffold adds no problem to whatever the built-in catalogue has (normally none).
    assert checked.returncode == baseline.returncode, checked.stdout + checked.stderr
    assert problem_lines(checked) == problem_lines(baseline)
    assert str(folder) not in checked.stdout
    if baseline.returncode == 0:
        assert checked.stdout.strip().splitlines()[-1].startswith("ok:") and "shout" in checked.stdout

    catalog = PluginCatalog.load([builtin_plugin_dir(), tmp_path / "my-plugins"])
    assert "shout" in catalog and catalog.unmet_dependencies("shout") == []

    listed = run_cli("plugins", "list", "my-plugins", "--json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    shout = next(p for p in json.loads(listed.stdout)["plugins"] if p["name"] == "shout")
    assert shout["status"] == "ok" and shout["resource_class"] == "io"
    table = run_cli("plugins", "list", "my-plugins", cwd=tmp_path, env_extra={"COLUMNS": "200"})
    assert table.returncode == 0, table.stderr
    row = next(line for line in table.stdout.splitlines() if " shout " in line)
    assert "0.1.0" in row and "io" in row and "ok" in row

    # The generated test, run by pytest on its own, passes.
    tested = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(folder)],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(tmp_path),
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "5 passed" in tested.stdout

    # Refusals: exit 2 and one `error:` line.
    again = run_cli("plugins", "new", "shout", "--dir", "my-plugins", cwd=tmp_path)
    bad_name = run_cli("plugins", "new", "Shout-It", "--dir", "my-plugins", cwd=tmp_path)
    builtin = run_cli("plugins", "new", "text", "--dir", "my-plugins", cwd=tmp_path)
    bad_class = run_cli("plugins", "new", "ok_name", "--dir", "my-plugins", "--resource-class", "tpu", cwd=tmp_path)
    for result, start in (
        (again, "error: NAME: "),
        (bad_name, "error: NAME: 'Shout-It' is not a valid plugin name"),
        (builtin, "error: NAME: 'text' is the name of a built-in plugin"),
        (bad_class, "error: --resource-class: 'tpu'"),
    ):
        assert result.returncode == 2, result.stdout + result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(start), lines
    assert "already exists" in again.stderr
    assert not (tmp_path / "my-plugins" / "ok_name").exists()

    # Default --dir is ./plugins.
    default = run_cli("plugins", "new", "other_one", cwd=tmp_path)
    assert default.returncode == 0, default.stderr
    assert (tmp_path / "plugins" / "other_one" / "plugin.yaml").is_file()


def test_check_reports_broken_manifests_with_file_field_reason(tmp_path: Path) -> None:
    base = tmp_path / "broken"
    (base / "bad_perm").mkdir(parents=True)
    (base / "bad_perm" / "plugin.yaml").write_text(
        "name: bad_perm\nversion: '1.0'\nentry_point: m:run\nresource_class: cpu\n"
        "permissions: [telepathy]\nactions:\n  go: {}\n"
    )
    (base / "bad_perm" / "m.py").write_text("def run(ctx, action, args):\n    return {}\n")
    (base / "too_new").mkdir()
    (base / "too_new" / "plugin.yaml").write_text(
        "name: too_new\nversion: '1.0'\nentry_point: m:run\nresource_class: cpu\n"
        "requires: {edgefleet: '>=99'}\nactions:\n  go: {}\n"
    )
    (base / "too_new" / "m.py").write_text("def run(ctx, action, args):\n    return {}\n")
    (base / "needs_deps").mkdir()
    (base / "needs_deps" / "plugin.yaml").write_text(
        "name: needs_deps\nversion: '1.0'\nentry_point: m:run\nresource_class: cpu\n"
        "dependencies: {binaries: [no-such-binary-xyz]}\nactions:\n  go: {}\n"
    )
    (base / "needs_deps" / "m.py").write_text("def run(ctx, action, args):\n    return {}\n")

    (base / "workflows").mkdir()
    (base / "workflows" / "flow.yaml").write_text(
        "name: flow\nsteps:\n  - {id: a, plugin: too_new, action: go}\n  - {id: b, plugin: text, action: nope}\n"
    )

    result = run_cli("plugins", "check", str(base), cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    perm = f"{base / 'bad_perm' / 'plugin.yaml'}: permissions.0: 'telepathy' is not allowed"
    assert any(line.startswith(perm) for line in lines), lines
    assert f"{base / 'too_new' / 'plugin.yaml'}: requires.edgefleet: needs edgefleet >=99, but this is edgefleet" in (
        result.stdout
    )
    flow = base / "workflows" / "flow.yaml"
    assert f"{flow}: steps.0.plugin: plugin 'too_new' was rejected (requires.edgefleet: needs edgefleet >=99" in (
        result.stdout
    )
    assert f"{flow}: steps.1.action: plugin 'text' has no action 'nope'" in result.stdout
    # Unmet dependencies are a warning, not a catalogue problem.
    assert (
        f"warning: {base / 'needs_deps' / 'plugin.yaml'}: dependencies: binary 'no-such-binary-xyz': not found on PATH"
    ) in lines
    assert "problem" in result.stderr

    missing = run_cli("plugins", "check", str(tmp_path / "nope"), cwd=tmp_path)
    assert missing.returncode == 1
    assert f"{tmp_path / 'nope'}: (dir): plugin directory does not exist" in missing.stdout

    # Folders from settings (EDGEFLEET_PLUGIN_DIRS) are checked too.
    from_env = run_cli("plugins", "check", cwd=tmp_path, env_extra={"EDGEFLEET_PLUGIN_DIRS": json.dumps([str(base)])})
    assert from_env.returncode == 1 and perm in from_env.stdout


def test_plugins_group_help_and_remote_list_without_router(tmp_path: Path) -> None:
    for args in (
        ["plugins", "--help"],
        ["plugins", "list", "--help"],
        ["plugins", "check", "--help"],
        ["plugins", "new", "--help"],
    ):
        result = run_cli(*args, cwd=ROOT)
        assert result.returncode == 0 and "Usage" in result.stdout, (args, result.stderr)
    # Without a subcommand (as before) and with `list --remote`, the router is asked.
    for args in (["plugins"], ["plugins", "list", "--remote"]):
        result = run_cli(*args, "--url", "http://127.0.0.1:9", "--token", "x", cwd=tmp_path)
        assert result.returncode == 3, (args, result.stdout, result.stderr)
        assert "is the router running?" in result.stderr
