"""Scenario 2, the DevOps `ci-pipeline`: a git repository made here, a real cluster, a real webhook.

The end-to-end test runs the template through a router and a worker node on a
repository with passing and failing tests and lint errors, and checks what a
webhook server on 127.0.0.1 receives. The unit tests call each plugin's `run()`
directly with a real PluginContext for the edge cases (not a repository, an
unknown `since`, a suite that hangs, a webhook that refuses).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import psutil
import pytest

from edgefleet.plugin_catalog import PluginCatalog, builtin_plugin_dir
from edgefleet.plugin_context import PluginContext, SubtaskCancelled
from edgefleet.plugin_manifest import Permission
from edgefleet.templates import TemplateCatalog
from tests.conftest import Cluster, FakeInternet, server_in

CI_PLUGINS = ("repo_watch", "ci_tests", "ci_lint", "ci_report", "ci_alert")

# --- a generated repository ------------------------------------------------------------------

CALC_V1 = """\
def add(a, b):
    return a + b


def sub(a, b):
    return a - b
"""

TESTS_V1 = """\
from calc import add, sub


def test_add():
    assert add(2, 3) == 5


def test_sub():
    assert sub(5, 3) == 2
"""

# Commit 2 brings a lint error (unused import) and a function whose test fails.
CALC_V2 = """\
import os


def add(a, b):
    return a + b


def sub(a, b):
    return a - b


def mul(a, b):
    return a * b + 1  # the bug the failing test finds
"""

TESTS_V2 = (
    TESTS_V1.replace("from calc import add, sub", "from calc import add, mul, sub")
    + """

def test_mul():
    assert mul(3, 4) == 12
"""
)

# Commit 3 adds a passing test and a second lint error (an undefined name).
UTIL_V3 = """\
def describe(value):
    return f"{value} ({kind})"
"""

TESTS_UTIL_V3 = """\
from calc import add


def test_add_negative():
    assert add(-1, -1) == -2
"""


def git(repo: Path, *args: str) -> str:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(repo.parent),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "LC_ALL": "C",
    }
    out = subprocess.run(
        [
            "git",
            "-c",
            "user.name=Ada Dev",
            "-c",
            "user.email=ada@example.org",
            "-c",
            "commit.gpgsign=false",
            "-C",
            str(repo),
            *args,
        ],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def commit(repo: Path, files: dict[str, str], subject: str) -> str:
    for name, text in files.items():
        path = repo / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", subject)
    return git(repo, "rev-parse", "HEAD")


@dataclass
class GitRepo:
    path: Path
    shas: list[str]
    subjects: list[str]


@pytest.fixture()
def git_repo(tmp_path: Path) -> GitRepo:
    repo = tmp_path / "project"
    repo.mkdir()
    git(repo, "init", "-q", "--initial-branch=main")
    subjects = ["Add calc with add and sub", "Add mul", "Add describe helper"]
    shas = [
        commit(repo, {"calc/__init__.py": CALC_V1, "tests/test_calc.py": TESTS_V1}, subjects[0]),
        commit(repo, {"calc/__init__.py": CALC_V2, "tests/test_calc.py": TESTS_V2}, subjects[1]),
        commit(repo, {"calc/util.py": UTIL_V3, "tests/test_util.py": TESTS_UTIL_V3}, subjects[2]),
    ]
    return GitRepo(path=repo, shas=shas, subjects=subjects)


# --- a webhook receiver ----------------------------------------------------------------------


@dataclass
class Webhook:
    url: str
    received: list[dict[str, Any]] = field(default_factory=list)
    status: int = 200


@pytest.fixture()
def webhook(fake_internet: FakeInternet | None) -> Iterator[Webhook]:
    """The alert receiver, on the fake internet: the ci_alert plugin's sandbox never reaches 127.0.0.1."""
    hook = Webhook(url="")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: object) -> None:
            pass

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            hook.received.append(
                {"path": self.path, "content_type": self.headers.get("Content-Type"), "body": json.loads(body)}
            )
            self.send_response(hook.status)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = server_in(fake_internet, Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    hook.url = f"http://{server.server_address[0]}:{server.server_address[1]}/hooks/ci"
    yield hook
    server.shutdown()
    server.server_close()
    thread.join(5)


# --- end to end through a real cluster -------------------------------------------------------


def test_ci_pipeline_end_to_end(cluster_factory: Callable[..., Cluster], git_repo: GitRepo, webhook: Webhook) -> None:
    cluster = cluster_factory(EDGEFLEET_PLUGIN_READ_PATHS=json.dumps({"repo_watch": [str(git_repo.path)]}))
    cluster.start_router()
    cluster.start_node("n1", classes="cpu,io")
    cluster.wait_nodes_ready("n1")

    inputs = {"repo": str(git_repo.path), "since": git_repo.shas[0], "alert_url": webhook.url, "threshold": 0.2}
    done = cluster.wait_job(cluster.submit({"template": "ci-pipeline", "inputs": inputs})["id"], timeout=90)
    assert done["state"] == "succeeded", json.dumps(done, indent=1)
    out = {st["id"]: st["output"] for st in done["subtasks"]}

    detect = out["detect"]
    assert detect["changed"] is True
    assert detect["head"] == git_repo.shas[2]
    assert detect["since"] == git_repo.shas[0]
    assert detect["count"] == 2
    assert [c["sha"] for c in detect["commits"]] == [git_repo.shas[2], git_repo.shas[1]]
    assert [c["subject"] for c in detect["commits"]] == [git_repo.subjects[2], git_repo.subjects[1]]
    assert {c["author"] for c in detect["commits"]} == {"Ada Dev"}

    tests = out["tests"]
    assert (tests["passed"], tests["failed"], tests["errors"], tests["total"]) == (3, 1, 0, 4)
    assert tests["completed"] is True and tests["ok"] is False and tests["timed_out"] is False
    assert [f["test"] for f in tests["failures"]] == ["tests.test_calc::test_mul"]
    assert "1 failed" in Path(tests["log"]).read_text()

    lint = out["lint"]
    assert lint["issue_count"] == 2
    found = {(i["path"], i["code"]) for i in lint["issues"]}
    assert found == {("calc/__init__.py", "UnusedImport"), ("calc/util.py", "UndefinedName")}

    report = out["report"]
    assert report["failure_rate"] == 0.25
    text = Path(report["path"]).read_text()
    for expected in (
        git_repo.shas[2][:12],
        git_repo.subjects[1],
        git_repo.subjects[2],
        "tests.test_calc::test_mul",
        "'os' imported but unused",
        "undefined name 'kind'",
        "25.0%",
        "above the alert threshold",
    ):
        assert expected in text, f"{expected!r} missing from the report:\n{text}"

    assert out["alert"]["alerted"] is True
    assert len(webhook.received) == 1
    alert = webhook.received[0]
    assert alert["path"] == "/hooks/ci" and alert["content_type"] == "application/json"
    body = alert["body"]
    assert body["event"] == "edgefleet.ci.failure_rate" and body["job_id"] == done["id"]
    assert body["failure_rate"] == 0.25 > body["threshold"] == 0.2
    assert body["summary"]["head"] == git_repo.shas[2]
    assert body["summary"]["tests"]["failed"] == 1 and body["summary"]["lint_issues"] == 2
    assert "25.0%" in body["text"]

    # The next run passes the head it saw as `since`: nothing new, nothing run, no alert.
    again = cluster.wait_job(
        cluster.submit({"template": "ci-pipeline", "inputs": {**inputs, "since": detect["head"]}})["id"], timeout=60
    )
    assert again["state"] == "succeeded", json.dumps(again, indent=1)
    out2 = {st["id"]: st["output"] for st in again["subtasks"]}
    assert out2["detect"]["changed"] is False and out2["detect"]["commits"] == []
    assert out2["detect"]["archive"] is None
    assert out2["tests"]["skipped"] is True and out2["lint"]["skipped"] is True
    assert out2["report"]["changed"] is False and out2["report"]["failure_rate"] == 0.0
    assert "No new commits" in Path(out2["report"]["path"]).read_text()
    assert out2["alert"] == {"alerted": False, "reason": "no new commits", "status": None, "url": webhook.url}
    assert len(webhook.received) == 1


# --- manifests and template ------------------------------------------------------------------


@pytest.fixture(scope="module")
def catalog() -> PluginCatalog:
    loaded = PluginCatalog.load([builtin_plugin_dir()])
    for name in CI_PLUGINS:
        assert loaded.get(name) is not None, [str(e) for e in loaded.errors]
    return loaded


def test_each_ci_plugin_is_granted_only_what_it_needs(catalog: PluginCatalog) -> None:
    granted = {name: set(catalog.get(name).manifest.permissions) for name in CI_PLUGINS}  # type: ignore[union-attr]
    assert granted == {
        "repo_watch": {Permission.file_system_read, Permission.subprocess},
        "ci_tests": {Permission.subprocess},
        "ci_lint": set(),
        "ci_report": set(),
        "ci_alert": {Permission.network},
    }


def test_template_wires_the_steps() -> None:
    templates = TemplateCatalog.load([builtin_plugin_dir()])
    steps = templates.expand("ci-pipeline", {"repo": "/srv/repo"})
    by_id = {s["id"]: s for s in steps}
    assert list(by_id) == ["detect", "tests", "lint", "report", "alert"]
    assert by_id["detect"]["args"] == {"repo": "/srv/repo", "branch": "HEAD"}  # no since: a first run
    assert "url" not in by_id["alert"]["args"]  # no alert_url: the alert step never posts
    assert by_id["alert"]["args"]["threshold"] == 0.2
    assert by_id["report"]["needs"] == ["detect", "tests", "lint"]


# --- each plugin on its own ------------------------------------------------------------------


def plugin(catalog: PluginCatalog, name: str) -> Callable[[PluginContext, str, dict[str, Any]], dict[str, Any]]:
    loaded = catalog.get(name)
    assert loaded is not None
    return loaded.load_callable()


def make_ctx(workspace: Path, *, timeout: float = 60.0, cancel: threading.Event | None = None) -> PluginContext:
    workspace.mkdir(parents=True, exist_ok=True)
    return PluginContext(
        job_id="job-ci",
        subtask_id=workspace.name,
        attempt=1,
        workspace=workspace,
        deadline=time.monotonic() + timeout,
        is_cancelled=(cancel or threading.Event()).is_set,
    )


def processes_in(folder: Path) -> list[psutil.Process]:
    """Processes still running with their working directory inside `folder`."""
    found = []
    for proc in psutil.process_iter():
        try:
            if Path(proc.cwd()).is_relative_to(folder):
                found.append(proc)
        except (psutil.Error, OSError):
            pass
    return found


def make_tar(path: Path, files: dict[str, str]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_detect_first_run_lists_history_and_exports_the_head(
    catalog: PluginCatalog, git_repo: GitRepo, tmp_path: Path
) -> None:
    out = plugin(catalog, "repo_watch")(make_ctx(tmp_path / "detect"), "detect", {"repo": str(git_repo.path)})
    assert out["changed"] is True and out["since"] is None and out["count"] == 3
    assert [c["sha"] for c in out["commits"]] == git_repo.shas[::-1]
    with tarfile.open(out["archive"]) as tar:
        assert {"calc/__init__.py", "calc/util.py", "tests/test_calc.py", "tests/test_util.py"} <= set(tar.getnames())

    # A branch other than HEAD, and a commit list cut at max_commits.
    git(git_repo.path, "branch", "old", git_repo.shas[1])
    older = plugin(catalog, "repo_watch")(
        make_ctx(tmp_path / "detect-old"),
        "detect",
        {"repo": str(git_repo.path), "branch": "old", "max_commits": 1, "archive": False},
    )
    assert older["head"] == git_repo.shas[1] and older["count"] == 2
    assert len(older["commits"]) == 1 and older["truncated"] is True and older["archive"] is None


def test_detect_reports_bad_input_clearly(catalog: PluginCatalog, git_repo: GitRepo, tmp_path: Path) -> None:
    detect = plugin(catalog, "repo_watch")
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(ValueError, match=r"repo: .*plain is not a git repository"):
        detect(make_ctx(tmp_path / "a"), "detect", {"repo": str(plain)})
    with pytest.raises(ValueError, match=r"repo: .* is not a directory"):
        detect(make_ctx(tmp_path / "b"), "detect", {"repo": str(tmp_path / "missing")})
    with pytest.raises(ValueError, match=r"since: 'deadbeef' is not a commit"):
        detect(make_ctx(tmp_path / "c"), "detect", {"repo": str(git_repo.path), "since": "deadbeef"})
    with pytest.raises(ValueError, match=r"branch: 'nope' is not a commit"):
        detect(make_ctx(tmp_path / "d"), "detect", {"repo": str(git_repo.path), "branch": "nope"})
    with pytest.raises(ValueError, match=r"branch: '--output=x' is not a revision name"):
        detect(make_ctx(tmp_path / "e"), "detect", {"repo": str(git_repo.path), "branch": "--output=x"})
    empty = tmp_path / "empty"
    empty.mkdir()
    git(empty, "init", "-q")
    with pytest.raises(ValueError, match=r"has no commits yet"):
        detect(make_ctx(tmp_path / "f"), "detect", {"repo": str(empty)})


def test_pytest_step_stops_a_hanging_suite_at_its_timeout(catalog: PluginCatalog, tmp_path: Path) -> None:
    archive = make_tar(
        tmp_path / "src.tar",
        {
            "tests/test_fast.py": "def test_ok():\n    assert True\n",
            "tests/test_slow.py": "import time\n\n\ndef test_hangs():\n    time.sleep(600)\n",
        },
    )
    # 10 s: time for the inner pytest to start and pass test_fast even on a loaded box (3 s was not,
    # with the suite on 3 processes). The hang outlasts the test timeout (180 s): returning at all
    # rules out waiting for it.
    out = plugin(catalog, "ci_tests")(make_ctx(tmp_path / "tests"), "pytest", {"archive": str(archive), "timeout": 10})
    assert out["timed_out"] is True and out["completed"] is False and out["ok"] is False
    assert "timed out after 10 s" in out["message"]
    # Interrupted, pytest still wrote what it had: the test that ran before the hang passed.
    assert out["passed"] == 1 and out["junit"] is not None
    assert processes_in(tmp_path / "tests") == []


def test_pytest_step_is_cancellable(catalog: PluginCatalog, tmp_path: Path) -> None:
    archive = make_tar(
        tmp_path / "src.tar", {"test_slow.py": "import time\n\n\ndef test_hangs():\n    time.sleep(600)\n"}
    )
    cancel = threading.Event()
    threading.Timer(1.5, cancel.set).start()
    # The hang outlasts the test timeout (180 s): returning at all means the cancel stopped it.
    with pytest.raises(SubtaskCancelled):
        plugin(catalog, "ci_tests")(make_ctx(tmp_path / "tests", cancel=cancel), "pytest", {"archive": str(archive)})
    assert processes_in(tmp_path / "tests") == []


def test_pytest_step_counts_collection_errors_and_skips(catalog: PluginCatalog, tmp_path: Path) -> None:
    archive = make_tar(
        tmp_path / "src.tar",
        {
            "test_a.py": "import pytest\n\n\ndef test_ok():\n    pass\n\n\n@pytest.mark.skip\ndef test_skip():\n    pass\n",
            "test_broken.py": "import not_a_module_anywhere\n",
        },
    )
    out = plugin(catalog, "ci_tests")(make_ctx(tmp_path / "tests"), "pytest", {"archive": str(archive)})
    assert (out["passed"], out["failed"], out["errors"], out["skipped_tests"]) == (1, 0, 1, 1)
    assert out["completed"] is True and out["ok"] is False
    assert out["failures"][0]["kind"] == "error"

    none = plugin(catalog, "ci_tests")(make_ctx(tmp_path / "none"), "pytest", {"archive": None})
    assert none["skipped"] is True and none["total"] == 0
    with pytest.raises(ValueError, match=r"archive: .* does not exist"):
        plugin(catalog, "ci_tests")(make_ctx(tmp_path / "bad"), "pytest", {"archive": str(tmp_path / "nope.tar")})


def test_lint_counts_syntax_errors_and_honours_excludes(catalog: PluginCatalog, tmp_path: Path) -> None:
    archive = make_tar(
        tmp_path / "src.tar",
        {
            "ok.py": "x = 1\n",
            "broken.py": "def f(:\n",
            "build/gen.py": "import sys\n",
            "notes.txt": "import nothing\n",
        },
    )
    lint = plugin(catalog, "ci_lint")
    out = lint(make_ctx(tmp_path / "lint"), "pyflakes", {"archive": str(archive), "exclude": ["build/*"]})
    assert out["files"] == 2 and out["issue_count"] == 1
    assert out["issues"][0]["path"] == "broken.py" and out["issues"][0]["code"] == "SyntaxError"
    everything = lint(make_ctx(tmp_path / "lint2"), "pyflakes", {"archive": str(archive), "max_issues": 1})
    assert everything["issue_count"] == 2 and len(everything["issues"]) == 1 and everything["truncated"] is True


def test_report_failure_rates(catalog: PluginCatalog, tmp_path: Path) -> None:
    report = plugin(catalog, "ci_report")
    detect = {
        "repo": "/r",
        "head": "a" * 40,
        "changed": True,
        "count": 1,
        "commits": [
            {"sha": "a" * 40, "author": "Ada | Dev", "subject": "fix | things\nmore", "date": "2024-01-01"},
        ],
    }
    lint = {"linter": "pyflakes", "issue_count": 0, "issues": [], "files": 3}
    timed_out = {"completed": False, "timed_out": True, "passed": 5, "failed": 0, "errors": 0, "message": "slow"}
    out = report(make_ctx(tmp_path / "r1"), "markdown", {"detect": detect, "tests": timed_out, "lint": lint})
    assert out["failure_rate"] == 1.0 and out["above_threshold"] is None
    text = Path(out["path"]).read_text()
    assert "Timed out" in text and "Ada \\| Dev" in text and "fix \\| things more" in text

    no_tests = {"completed": True, "passed": 0, "failed": 0, "errors": 0}
    out = report(
        make_ctx(tmp_path / "r2"), "markdown", {"detect": detect, "tests": no_tests, "lint": lint, "threshold": 0.0}
    )
    assert out["failure_rate"] == 0.0 and out["above_threshold"] is False


def test_alert_skips_or_fails_clearly(catalog: PluginCatalog, webhook: Webhook, tmp_path: Path) -> None:
    alert = plugin(catalog, "ci_alert")
    ctx = make_ctx(tmp_path / "alert")
    summary = {"changed": True, "repo": "/r", "head": "b" * 40, "tests": {"failed": 1, "passed": 1}}
    assert alert(ctx, "webhook", {"failure_rate": 0.9})["reason"] == "no alert url given"
    below = alert(ctx, "webhook", {"url": webhook.url, "failure_rate": 0.2, "threshold": 0.2, "summary": summary})
    assert below["alerted"] is False and "not above" in below["reason"]
    assert webhook.received == []

    webhook.status = 500
    with pytest.raises(RuntimeError, match=r"answered HTTP 500"):
        alert(ctx, "webhook", {"url": webhook.url, "failure_rate": 0.5, "summary": summary})
    assert len(webhook.received) == 1 and webhook.received[0]["body"]["failure_rate"] == 0.5
