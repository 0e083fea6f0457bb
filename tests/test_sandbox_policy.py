"""What a worker's sandbox policy derives from settings and a manifest: grants, uid, LAN, the bwrap view."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.plugin_catalog import LoadedPlugin
from edgefleet.plugin_manifest import PluginManifest
from edgefleet.plugin_paths import check_path_argument, grants_for, path_arguments
from edgefleet.settings import Settings
from edgefleet.workers.sandbox import SandboxPolicy, bwrap_command

ACTION = {"input_schema": {"type": "object", "properties": {"path": {"type": "string", "x-path": "read"}}}}


def plugin(name: str, permissions: list[str], folder: Path) -> LoadedPlugin:
    manifest = PluginManifest.model_validate(
        {
            "name": name,
            "version": "1.0.0",
            "entry_point": "m:run",
            "resource_class": "cpu",
            "permissions": permissions,
            "actions": {"a": ACTION},
        }
    )
    return LoadedPlugin(manifest=manifest, folder=folder)


@pytest.fixture()
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        plugin_read_paths={"*": [tmp_path / "shared"], "photo": [tmp_path / "photos", tmp_path / "data" / "x"]},
        plugin_write_paths={"kb": [tmp_path / "kb"], "photo": [tmp_path]},  # tmp_path holds the data dir
        sandbox_lan_plugins=["nas"],
    )


def test_grants_need_the_permission_and_never_cover_protected_folders(settings: Settings, tmp_path: Path) -> None:
    from edgefleet.plugin_manifest import Permission

    photo = grants_for(settings, "photo", frozenset({Permission.file_system_read, Permission.file_system_write}))
    assert photo.read == (tmp_path / "shared", tmp_path / "photos")  # data/x lies in the data dir: dropped
    assert photo.write == ()  # tmp_path holds the data dir: dropped
    assert grants_for(settings, "photo", frozenset()).readable == ()  # no permission, no folders
    assert not photo.allows(tmp_path / "data" / "token", "read")
    assert photo.allows(tmp_path / "photos" / "a" / ".." / "b.jpg", "read")
    assert not photo.allows(tmp_path / "photos" / ".." / "data" / "token", "read")


def test_path_arguments_are_named_and_judged(settings: Settings, tmp_path: Path) -> None:
    from edgefleet.plugin_manifest import Permission

    grants = grants_for(settings, "photo", frozenset({Permission.file_system_read}))
    found = list(path_arguments(ACTION["input_schema"], {"path": "/etc/shadow", "other": "/x"}))
    assert found == [("args.path", "/etc/shadow", "read")]
    assert list(path_arguments(ACTION["input_schema"], {"path": {"$ref": "steps.a.output.path"}})) == []
    assert "outside the folders plugin 'photo' may read" in (
        check_path_argument("photo", "/etc/shadow", "read", grants) or ""
    )
    assert "'..'" in (check_path_argument("photo", "../../etc/passwd", "read", grants) or "")
    assert check_path_argument("photo", "in/workspace.txt", "read", grants) is None
    assert check_path_argument("photo", str(tmp_path / "photos" / "x.jpg"), "read", grants) is None


def test_uid_is_stable_per_plugin_and_lan_needs_the_operator(settings: Settings, tmp_path: Path) -> None:
    policy = SandboxPolicy(settings=settings, bwrap="/usr/bin/bwrap", switch_uid=True, landlock_abi=0)
    first = policy.image_of(plugin("nas", ["network_lan"], tmp_path))
    assert first.uid == policy.image_of(plugin("nas", ["network_lan"], tmp_path)).uid
    assert settings.sandbox_uid <= (first.uid or 0) < settings.sandbox_uid + settings.sandbox_uid_span
    assert first.lan and first.networked
    other = policy.image_of(plugin("web", ["network_lan"], tmp_path))  # asks, but the operator did not allow
    assert other.networked and not other.lan
    assert (
        SandboxPolicy(settings=settings, bwrap=None, switch_uid=False, landlock_abi=0)
        .image_of(plugin("nas", [], tmp_path))
        .uid
        is None
    )


def test_the_bwrap_view_hides_secrets_and_drops_capabilities(settings: Settings, tmp_path: Path) -> None:
    policy = SandboxPolicy(settings=settings, bwrap="/usr/bin/bwrap", switch_uid=True, landlock_abi=0)
    image = policy.image_of(plugin("photo", ["file_system_read"], tmp_path / "code"))
    workspace = tmp_path / "data" / "workspaces" / "j" / "s"
    cmd = " ".join(bwrap_command(image, "/usr/bin/bwrap", workspace, [workspace.parent], tmp_path / "etc"))
    assert "--unshare-net" in cmd and "--share-net" not in cmd
    assert "--ro-bind /etc /etc" not in cmd and "/etc/shadow" not in cmd
    assert f"--ro-bind-try {tmp_path / 'photos'} {tmp_path / 'photos'}" in cmd
    assert f"--bind {workspace} {workspace}" in cmd
    assert cmd.endswith("--cap-drop ALL --cap-add CAP_SETUID --cap-add CAP_SETGID")
    generated = (tmp_path / "etc" / f"etc-{image.uid}" / "passwd").read_text()
    assert f":{image.uid}:" in generated and "root:x:0:0" in generated and len(generated.splitlines()) == 3
