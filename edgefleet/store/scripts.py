"""The job store's Lua scripts: `.lua` files shipped with the package, read when a store is built.

Every script runs as `header + [score.lua + prelude.lua] + [its PARTS] + <name>.lua` and gets the key
prefix as ARGV[1]. The header is generated here: `P` (the prefix), the key functions `K`
from `edgefleet.keys.KEY_TEMPLATES`, and the score constants from
`edgefleet.scheduling.priority`, so key names, the epoch and the weight defaults are each
written once. The scoring function itself exists only in `scheduling/lua/score.lua`.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any, Final

import redis
from redis.commands.core import Script

from edgefleet.keys import lua_key_functions
from edgefleet.scheduling.priority import DEFAULT_WEIGHTS, EPOCH

STORE: Final = "edgefleet.store"
SCHEDULING: Final = "edgefleet.scheduling"

# name -> (package whose lua/ folder holds `<name>.lua`, whether it runs on the shared prelude)
SCRIPTS: Final[dict[str, tuple[str, bool]]] = {
    # jobs
    "create_job": (STORE, True),
    "cancel": (STORE, True),
    "gc": (STORE, True),
    # attempts
    "claim": (STORE, True),
    "renew": (STORE, True),
    "checkpoint": (STORE, True),
    "complete": (STORE, True),
    "lost": (STORE, True),
    "lose_processes": (STORE, True),
    "reap": (STORE, True),
    "promote_delayed": (STORE, True),
    # the release scheduler
    "release": (SCHEDULING, True),
    "take": (SCHEDULING, True),
    "complete_take": (SCHEDULING, True),
    "dispatched": (SCHEDULING, True),
    "backlog_counts": (SCHEDULING, True),
    "set_weights": (SCHEDULING, True),
    "seed_weights": (SCHEDULING, True),
    "set_target_depth": (SCHEDULING, True),
    "lead": (SCHEDULING, False),
    "resign": (SCHEDULING, False),
    # webhook deliveries
    "webhook_intake": (STORE, False),
    "webhook_claim": (STORE, False),
    "webhook_retry": (STORE, False),
    "webhook_finish": (STORE, False),
    "webhook_rotate": (STORE, False),
    # artifacts
    "artifacts_record": (STORE, True),
    "artifacts_locality": (STORE, False),
    # schedules (edgefleet/store/schedules.py); the prelude for NOW (Redis time)
    "schedule_create": (STORE, True),
    "schedule_claim": (STORE, True),
    "schedule_record": (STORE, True),
    "schedule_state": (STORE, True),
    "schedule_delete": (STORE, True),
}


# Functions some scripts share, put before their body (after the prelude): each defined once.
PARTS: Final[dict[str, tuple[tuple[str, str], ...]]] = {
    "claim": ((STORE, "claim_core"),),
    "release": ((SCHEDULING, "release_core"),),
    "complete": ((STORE, "complete_core"),),
    "take": ((STORE, "claim_core"), (SCHEDULING, "release_core"), (SCHEDULING, "take_core")),
    "complete_take": (
        (STORE, "complete_core"),
        (STORE, "claim_core"),
        (SCHEDULING, "release_core"),
        (SCHEDULING, "take_core"),
    ),
}


@functools.cache
def read_lua(package: str, name: str) -> str:
    return resources.files(package).joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


def header() -> str:
    """What every script starts with: the prefix, the key functions, the score constants."""
    defaults = ", ".join(f"{name} = {value!r}" for name, value in DEFAULT_WEIGHTS.items())
    return (
        "local P = ARGV[1]\n"
        + lua_key_functions()
        + f"local SCORE_EPOCH = {EPOCH!r}\n"
        + f"local WEIGHT_DEFAULTS = {{{defaults}}}\n"
    )


def compose(body: str, prelude: bool = True) -> str:
    """A script as the store runs it: the header, the score and the prelude (if asked), then `body`."""
    shared = read_lua(SCHEDULING, "score") + read_lua(STORE, "prelude") if prelude else ""
    return header() + shared + body


def source(name: str) -> str:
    package, prelude = SCRIPTS[name]
    parts = "".join(read_lua(part_package, part) for part_package, part in PARTS.get(name, ()))
    return compose(parts + read_lua(package, name), prelude)


class LuaScripts:
    """Every script of `SCRIPTS`, registered on one client (loaded into Redis on first use)."""

    def __init__(self, client: redis.Redis) -> None:
        self._scripts: dict[str, Script] = {name: client.register_script(source(name)) for name in SCRIPTS}

    def run(self, name: str, prefix: str, *args: Any) -> Any:
        return self._scripts[name](keys=[], args=[prefix, *args])
