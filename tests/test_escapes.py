"""A hostile plugin, under bubblewrap ("boxed") and without it ("plain"), against the sandbox's trust model.

Each test is one escape the hardening issue found; each asserts containment. The
worker runs as root here (as in CI and a default systemd install), which is the
case that matters: plugins must run as an unprivileged uid with no capabilities.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from edgefleet.workers.landlock import abi_version
from tests.conftest import Cluster, RedisServer, free_port

pytestmark = pytest.mark.cluster

PLUGINS = Path(__file__).parent / "sandbox_plugins"
HAVE_BWRAP = shutil.which("bwrap") is not None
AS_ROOT = os.geteuid() == 0
NODES = ["boxed", "plain"]
SECRET = "cluster-secret-do-not-leak"


def make_traversable(folder: Path) -> None:
    """pytest makes its folders 0700; a sandbox uid must be able to walk to its workspace (plain node)."""
    for path in [folder, *folder.parents]:
        if str(path).startswith("/tmp/") or path == folder:
            path.chmod(path.stat().st_mode | stat.S_IXOTH)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Path]]:
    workdir = tmp_path_factory.mktemp("escapes")
    make_traversable(workdir)
    granted = workdir / "granted"
    granted.mkdir()
    granted.chmod(0o777)  # a shared folder the operator lets the snoop plugin use
    (granted / "photo.txt").write_text("granted content")
    (granted / "photo.txt").chmod(0o644)
    data = workdir / "data"
    data.mkdir(mode=0o711)
    token = data / "token"
    token.write_text(SECRET)
    token.chmod(0o600)
    server = RedisServer(port=free_port(), data_dir=workdir / "redis")
    server.start()
    cluster = Cluster(
        redis=server,
        workdir=workdir,
        env_overrides={
            "EDGEFLEET_PLUGIN_DIRS": json.dumps([str(PLUGINS)]),
            "EDGEFLEET_SANDBOX_KILL_GRACE": "1",
            "EDGEFLEET_PLUGIN_READ_PATHS": json.dumps({"snoop": [str(granted)]}),
            "EDGEFLEET_PLUGIN_WRITE_PATHS": json.dumps({"snoop": [str(granted)]}),
            "EDGEFLEET_SANDBOX_MAX_OUTPUT_KB": "256",
            "EDGEFLEET_SECRET_PROBE": SECRET,  # in every cluster process's environment
        },
    )
    try:
        cluster.start_router()
        cluster.start_node("boxed", classes="cpu")
        cluster.start_node("plain", classes="cpu", EDGEFLEET_SANDBOX="process")
        cluster.wait_nodes_ready(*NODES)
        yield cluster, granted
    finally:
        cluster.stop()
        server.stop()


def run_step(cluster: Cluster, node: str, plugin: str, action: str, args: dict | None = None) -> dict:
    job = cluster.submit({"steps": [{"id": "x", "plugin": plugin, "action": action, "args": args or {}, "node": node}]})
    return cluster.wait_job(job["id"], timeout=90)


def contained(status: dict) -> dict:
    """The step failed, and nothing of the secret came back."""
    st = status["subtasks"][0]
    assert st["state"] == "failed", status
    assert SECRET not in json.dumps(status)
    return st


def skip_unless_applicable(node: str) -> None:
    if node == "boxed" and not HAVE_BWRAP:
        pytest.skip("no bubblewrap on this machine")
    if node == "plain" and abi_version() < 1:
        pytest.skip("no Landlock on this kernel: without bwrap the file system is not confined")


def root_without_caps(isolation: str) -> bool:
    """A root worker without bwrap whose Python or workspace another uid cannot reach keeps uid 0,
    with every capability dropped (the sandbox says so in `isolation`)."""
    return "uid=root-nocaps" in isolation


def node_pids(cluster: Cluster, node: str) -> set[int]:
    """The node and its Celery worker processes (not the sandbox launchers, which come and go)."""
    root = psutil.Process(cluster.nodes[node].pid)
    workers = [p for p in root.children(recursive=True) if "python" in p.name()]
    return {root.pid, *(p.pid for p in workers if "sandbox_launcher" not in " ".join(p.cmdline()))}


@pytest.mark.parametrize("node", NODES)
def test_plugins_run_unprivileged_without_capabilities(lab: tuple[Cluster, Path], node: str) -> None:
    cluster, _ = lab
    status = run_step(cluster, node, "escape", "whoami")
    out = status["subtasks"][0]["output"]
    isolation = status["subtasks"][0]["isolation"]
    if AS_ROOT and not root_without_caps(isolation):
        assert out["uid"] != 0 and out["euid"] != 0 and 0 not in out["groups"], out
        assert re.search(r"\+uid=\d+\+", isolation)
    assert int(out["cap_eff"], 16) == 0, out


@pytest.mark.parametrize("node", NODES)
@pytest.mark.parametrize("target", ["/etc/shadow", "token", "aof", "/etc/edgefleet/worker.env"])
def test_secrets_are_out_of_reach(lab: tuple[Cluster, Path], node: str, target: str) -> None:
    skip_unless_applicable(node)
    cluster, _ = lab
    path = {
        "token": str(cluster.workdir / "data" / "token"),
        "aof": str(next((cluster.workdir / "redis").rglob("*.aof"), cluster.workdir / "redis" / "dump.rdb")),
    }.get(target, target)
    for plugin in ("escape", "snoop"):  # snoop has file_system_read: still only its granted folder
        st = contained(run_step(cluster, node, plugin, "read_file", {"path": path}))
        assert re.search(r"Permission denied|No such file|Errno 13|Errno 2", st["error"]), st["error"]


@pytest.mark.parametrize("node", NODES)
def test_another_jobs_workspace_is_out_of_reach(lab: tuple[Cluster, Path], node: str) -> None:
    skip_unless_applicable(node)
    cluster, _ = lab
    first = run_step(cluster, node, "snoop", "write_file", {"path": "mine.txt"})
    assert first["state"] == "succeeded", first
    theirs = cluster.workdir / "data" / "workspaces" / first["id"] / "x" / "mine.txt"
    assert theirs.read_text() == "written by snoop"
    contained(run_step(cluster, node, "snoop", "read_file", {"path": str(theirs)}))


@pytest.mark.parametrize("node", NODES)
def test_granted_folders_and_only_those(lab: tuple[Cluster, Path], node: str) -> None:
    skip_unless_applicable(node)
    cluster, granted = lab
    ok = run_step(cluster, node, "snoop", "read_file", {"path": str(granted / "photo.txt")})
    assert ok["subtasks"][0]["output"] == {"read": "granted content"}
    wrote = run_step(cluster, node, "snoop", "write_file", {"path": str(granted / f"out-{node}.txt")})
    assert wrote["state"] == "succeeded", wrote
    assert (granted / f"out-{node}.txt").read_text() == "written by snoop"
    for outside in ("/root/escaped", "/escaped", str(cluster.workdir / "escaped"), str(PLUGINS / "escape" / "x.py")):
        contained(run_step(cluster, node, "snoop", "write_file", {"path": outside}))
        assert not Path(outside).exists()
    # escape has no file permissions at all: not even the granted folder.
    contained(run_step(cluster, node, "escape", "read_file", {"path": str(granted / "photo.txt")}))


def test_path_arguments_are_checked_at_submit(lab: tuple[Cluster, Path]) -> None:
    cluster, granted = lab
    for plugin, action, path in (
        ("text", "count", "/etc/shadow"),
        ("snoop", "checked_read", "/etc/shadow"),
        ("snoop", "checked_read", str(cluster.workdir / "data" / "token")),
        ("text", "count", "../../token"),
    ):
        with cluster.client() as http:
            response = http.post(
                "/v1/jobs", json={"steps": [{"id": "a", "plugin": plugin, "action": action, "args": {"path": path}}]}
            )
        assert response.status_code == 422, response.text
        fields = [d["field"] for d in response.json()["detail"]]
        assert "steps.0.args.path" in fields, response.json()
    ok = cluster.submit(
        {
            "steps": [
                {"id": "a", "plugin": "snoop", "action": "checked_read", "args": {"path": str(granted / "photo.txt")}}
            ]
        }
    )
    assert cluster.wait_job(ok["id"], timeout=60)["state"] == "succeeded"


@pytest.mark.parametrize("node", NODES)
def test_the_cluster_processes_are_not_readable_or_traceable(lab: tuple[Cluster, Path], node: str) -> None:
    cluster, _ = lab
    targets = [cluster.router_proc.pid, *node_pids(cluster, node)]
    for pid in targets:
        contained(run_step(cluster, node, "escape", "proc_environ", {"pid": pid}))
        contained(run_step(cluster, node, "escape", "ptrace", {"pid": pid}))


@pytest.mark.parametrize("node", NODES)
def test_max_processes_holds_for_a_root_worker(lab: tuple[Cluster, Path], node: str) -> None:
    cluster, _ = lab
    status = run_step(cluster, node, "forker", "fork_many", {"count": 64})
    if root_without_caps(status["subtasks"][0]["isolation"]):
        pytest.skip("RLIMIT_NPROC never binds uid 0, and this node could not switch uid (see isolation)")
    out = status["subtasks"][0]["output"]
    assert status["state"] == "succeeded", status
    assert out["started"] < 8 and out["refused"] > 0, out


@pytest.mark.parametrize("node", NODES)
def test_a_plugin_cannot_kill_its_worker(lab: tuple[Cluster, Path], node: str) -> None:
    cluster, _ = lab
    before = node_pids(cluster, node)
    status = run_step(cluster, node, "escape", "kill_parent")
    assert status["state"] in ("succeeded", "failed"), status  # ended, and ended once
    assert status["subtasks"][0]["attempt"] == 1, status
    assert node_pids(cluster, node) == before


@pytest.mark.parametrize("node", NODES)
def test_an_endless_pipe_message_is_cut_off(lab: tuple[Cluster, Path], node: str) -> None:
    cluster, _ = lab
    st = contained(run_step(cluster, node, "escape", "flood_pipe", {"mb": 600}))
    assert "sent a message over" in st["error"], st["error"]
    rss = sum(psutil.Process(p).memory_info().rss for p in node_pids(cluster, node))
    assert rss < 600 * 2**20 * 0.8, rss  # nothing near the 600 MB it tried to send is held


@pytest.mark.parametrize("node", NODES)
def test_outputs_are_capped(lab: tuple[Cluster, Path], node: str) -> None:
    cluster, _ = lab
    st = contained(run_step(cluster, node, "escape", "big_output", {"mb": 2}))
    assert "over the 256 KiB limit" in st["error"], st["error"]


@pytest.mark.parametrize("node", NODES)
def test_the_workspace_has_a_quota(lab: tuple[Cluster, Path], node: str) -> None:
    cluster, _ = lab
    st = contained(run_step(cluster, node, "escape", "fill_workspace", {"files": 8}))
    assert "workspace quota (4 MB)" in st["error"], st["error"]
