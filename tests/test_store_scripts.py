"""The job store's Lua: shipped as files, loaded when a store is built, key names from one place."""

from __future__ import annotations

import json
import string
import subprocess
import sys
from importlib import resources

import pytest

from edgefleet.keys import KEY_TEMPLATES, Keys
from edgefleet.store import JobStore
from edgefleet.store.scripts import PARTS, SCHEDULING, SCRIPTS, STORE, compose, source
from tests.conftest import ROOT, RedisServer

pytestmark = pytest.mark.cluster  # each test starts a redis-server

SHARED = {(STORE, "prelude"), (SCHEDULING, "score")}  # parts of every script, not scripts of their own
# Functions some scripts share (`PARTS`), not scripts of their own either.
PARTS_FILES = {part for parts in PARTS.values() for part in parts}


def test_every_lua_file_is_a_script_and_every_script_a_file() -> None:
    files = {
        (package, entry.name.removesuffix(".lua"))
        for package in (STORE, SCHEDULING)
        for entry in resources.files(package).joinpath("lua").iterdir()
        if entry.name.endswith(".lua")
    }
    listed = {(package, name) for name, (package, _) in SCRIPTS.items()}
    assert files == listed | SHARED | PARTS_FILES


def test_every_script_compiles_in_redis(redis_server: RedisServer) -> None:
    client = redis_server.client()
    for name in SCRIPTS:
        assert client.script_load(source(name)), name  # a syntax error raises ResponseError naming the line


def test_lua_and_python_spell_every_key_alike(redis_server: RedisServer) -> None:
    """The `K` functions every script starts with are generated from the same templates as `Keys`."""
    client = redis_server.client()
    keys = Keys("pfx")
    calls, expected = [], []
    for kind, template in KEY_TEMPLATES.items():
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name]
        values = {name: f"<{name}>" for name in fields}
        calls.append(f"K.{kind}({', '.join(repr(values[name]) for name in fields)})")
        expected.append(keys.key(kind, **values))
    body = f"return cjson.encode({{{', '.join(calls)}}})"
    assert json.loads(client.eval(compose(body, prelude=False), 0, "pfx")) == expected
    # The named helpers agree with the templates too.
    assert keys.jobs_index("t", "running") == keys.key("tenant_jobs_in_state", tenant="t", state="running")
    assert keys.backlog("cpu") == keys.key("backlog", resource_class="cpu")


def test_scripts_are_read_when_a_store_is_built_not_on_import(redis_server: RedisServer) -> None:
    probe = (
        "import edgefleet.store, edgefleet.scheduling.state, edgefleet.router.app, edgefleet.workers.runner\n"
        "from edgefleet.store.scripts import read_lua\n"
        "print(read_lua.cache_info().currsize)\n"
        f"edgefleet.store.JobStore.from_url({redis_server.url!r})\n"
        "print(read_lua.cache_info().currsize)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    before, after = out.stdout.split()
    assert int(before) == 0 and int(after) == len(SCRIPTS) + len(SHARED) + len(PARTS_FILES)
    assert JobStore.from_url(redis_server.url).ping()
