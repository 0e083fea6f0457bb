"""A box without libseccomp (macOS, a minimal ARM image): plugins still run, with what the box can enforce.

The worker node runs in a private mount namespace (`unshare -m`) where libseccomp's file is
covered by /dev/null, so nothing in that node can load it; the rest of the machine is untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Cluster, RedisServer, free_port

pytestmark = pytest.mark.cluster

PLUGINS = Path(__file__).parent / "sandbox_plugins"


def libseccomp_file() -> str | None:
    """The real file behind `libseccomp.so.2`, as the dynamic loader finds it."""
    try:
        listing = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    for line in listing.splitlines():
        if line.strip().startswith("libseccomp.so.2 ") and "=>" in line:
            return os.path.realpath(line.split("=>")[1].strip())
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    library = libseccomp_file()
    if os.geteuid() != 0 or shutil.which("unshare") is None or library is None:
        pytest.skip("needs root, unshare and an installed libseccomp to take away")
    workdir = tmp_path_factory.mktemp("noseccomp")
    server = RedisServer(port=free_port(), data_dir=workdir / "redis")
    server.start()
    cluster = Cluster(
        redis=server, workdir=workdir, env_overrides={"EDGEFLEET_PLUGIN_DIRS": json.dumps([str(PLUGINS)])}
    )
    try:
        cluster.start_router()
        hide = f'mount --bind /dev/null "{library}" && exec "$@"'
        cluster.nodes["bare"] = subprocess.Popen(
            [
                "unshare",
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
                hide,
                "sh",
                sys.executable,
                "-m",
                "edgefleet",
                "worker",
                "--node-name",
                "bare",
                "--classes",
                "cpu",
            ],
            env=cluster.env(EDGEFLEET_SANDBOX="process"),
            stdout=open(workdir / "node-bare.log", "ab"),  # noqa: SIM115 - the process holds it
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        cluster.wait_nodes_ready("bare")
        yield cluster
    finally:
        cluster.stop()
        server.stop()


def run(cluster: Cluster, plugin: str, action: str, args: dict) -> dict:
    job = cluster.submit({"steps": [{"id": "x", "plugin": plugin, "action": action, "args": args, "node": "bare"}]})
    return cluster.wait_job(job["id"], timeout=90)


def test_plugins_run_and_isolation_says_seccomp_is_missing(cluster: Cluster) -> None:
    done = run(cluster, "text", "count", {"text": "a b a"})
    assert done["state"] == "succeeded", done
    assert "+no-seccomp+" in done["subtasks"][0]["isolation"]
    assert "libseccomp is missing" in cluster.log_tail("node-bare", 200_000)


def test_the_limits_that_need_no_seccomp_still_hold(cluster: Cluster) -> None:
    spun = run(cluster, "escape", "cpu_spin", {})
    assert spun["state"] == "failed" and "CPU time limit" in spun["subtasks"][0]["error"], spun
    env = run(cluster, "escape", "read_secret_env", {})["subtasks"][0]["output"]["env"]
    assert not [n for n in env if n.startswith("EDGEFLEET_") and n != "EDGEFLEET_SANDBOX"]
