"""`edgefleet submit FILE` with hostile files: refused with exit 2 and one line `error: <file>: ...`,
before anything is sent (the router URL here is closed: reaching it would be exit 3).

The CLI runs in a subprocess, as a user runs it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port

# Each level is a list of nine aliases of the one before: 9^9 (387 million) strings once expanded.
BILLION_LAUGHS = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{cur}: &{cur} [{','.join(['*' + prev] * 9)}]\n" for prev, cur in zip("abcdefgh", "bcdefghi", strict=True)
)


def _submit(path: Path | str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "edgefleet",
            "submit",
            str(path),
            "--url",
            f"http://127.0.0.1:{free_port()}",
            "--token",
            "x",
        ],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(ROOT),
    )


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        pytest.param(BILLION_LAUGHS, "YAML aliases (*a) are not allowed (line 2)", id="billion-laughs"),
        pytest.param("steps: &s []\nagain: *s\n", "YAML aliases (*s) are not allowed", id="one-alias"),
        pytest.param("x: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper than 64 levels", id="deep-yaml"),
        pytest.param("[" * 100_000 + "]" * 100_000, "nested too deeply", id="deep-json"),
        pytest.param("x: " + "a" * 1_100_000 + "\n", "larger than 1000000 bytes", id="too-large"),
        pytest.param("steps: [1, 2\n", "neither JSON nor YAML", id="malformed"),
        pytest.param("- 1\n- 2\n", "must hold a JSON/YAML object", id="not-an-object"),
    ],
)
def test_hostile_job_file_is_refused_in_one_line(tmp_path: Path, text: str, reason: str) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    result = _submit(path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {path}: ") and reason in lines[0], lines[0]


def test_bomb_on_stdin_is_refused_too() -> None:
    result = _submit("-", stdin=BILLION_LAUGHS)
    assert result.returncode == 2 and result.stderr.startswith("error: -: YAML aliases"), result.stderr


def test_plain_yaml_still_loads(tmp_path: Path) -> None:
    """A normal job file gets past loading: the CLI then fails to reach the (closed) router: exit 3."""
    path = tmp_path / "job.yaml"
    path.write_text("steps:\n  - id: a\n    plugin: text\n    action: count\n    args: {text: 'a b'}\n")
    result = _submit(path)
    assert result.returncode == 3 and "error: router: cannot reach" in result.stderr, result.stderr
