"""The subtasks' seccomp filter compiled once by an executor and loaded by each forked subtask
denies exactly what `install` denies."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgefleet.workers.seccomp_filter import available, compile_program

pytestmark = pytest.mark.skipif(not available(), reason="libseccomp is not installed")

# Run in a fresh process: a filter can never be lifted from the process that loads it.
PROBE = """
import json, os, socket, sys
from edgefleet.workers.seccomp_filter import compile_program, install, load_program
how, subprocess_ok, network_ok = sys.argv[1], sys.argv[2] == "1", sys.argv[3] == "1"
if how == "program":
    load_program(compile_program(allow_subprocess=subprocess_ok, allow_network=network_ok))
else:
    install(allow_subprocess=subprocess_ok, allow_network=network_ok)
seen = {}
try:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    seen["fork"] = "allowed"
except PermissionError:
    seen["fork"] = "denied"
try:
    socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
    seen["inet socket"] = "allowed"
except PermissionError:
    seen["inet socket"] = "denied"
socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close()  # never denied
print(json.dumps(seen))
"""


def _probe(how: str, subprocess_ok: bool, network_ok: bool) -> dict[str, str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, how, str(int(subprocess_ok)), str(int(network_ok))],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return dict(json.loads(done.stdout))


@pytest.mark.parametrize(("subprocess_ok", "network_ok"), [(False, False), (True, False), (False, True)])
def test_a_compiled_program_denies_what_install_denies(subprocess_ok: bool, network_ok: bool) -> None:
    installed = _probe("install", subprocess_ok, network_ok)
    loaded = _probe("program", subprocess_ok, network_ok)
    assert loaded == installed
    assert installed == {
        "fork": "allowed" if subprocess_ok else "denied",
        "inet socket": "allowed" if network_ok else "denied",
    }


def test_the_program_is_whole_bpf_instructions() -> None:
    program = compile_program(allow_subprocess=False, allow_network=False)
    assert program and len(program) % 8 == 0
