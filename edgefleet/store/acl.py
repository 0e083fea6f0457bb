"""Node access: join tokens and the Redis ACL user each joined node gets.

`<prefix>:join:<id>` (hash) is one join token: its name, times, and SHA-256 digests of its
secret, of the node's ACL password and of the node's router token (Redis never holds a
secret in the clear: `ACL SETUSER ... #<digest>` takes the digest). `<prefix>:joins`
(sorted set) lists the ids by creation time.

ACL users live in Redis's memory, not in its data: a restarted Redis has none. The router
therefore calls `reconcile()` now and then, which recreates the user of every live token from
the digests kept here (and deletes node users whose token is gone), so nodes reconnect by
themselves. A revoke marks the token first and deletes the user second, and a reconcile
re-reads the mark after it recreated a user, so the two cannot race a revoked node back in.

What a node may do (`worker_acl_rules`): the job store's keys (but the join tokens' and the
webhook signing secrets': `ROUTER_ONLY_KEYS`), Celery/kombu's keys and
pub/sub channels, and only the commands a worker sends — found by running a node under a
user with nothing allowed and reading `ACL LOG` until a job ran. No CONFIG, ACL, KEYS,
FLUSH*, DEBUG, SHUTDOWN, MODULE, SCRIPT FLUSH, CLIENT KILL, MONITOR, ...
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import redis

from edgefleet.keys import KEY_TEMPLATES
from edgefleet.node_join import (
    JOIN_KIND,
    NODE_KIND,
    digest,
    format_token,
    matches,
    new_secret,
    new_token_id,
    parse_token,
)
from edgefleet.schemas import ResourceClass
from edgefleet.store.connection import StoreConnection

if TYPE_CHECKING:
    from edgefleet.store.jobs import JobStore

# Celery/kombu's keys (sep ":" and priority steps, edgefleet.celery_app): the class queues with
# their priority lists (`cpu`, `cpu:3`) and express queues (`cpu.express`), each node's direct
# queues (`node.<name>.cpu`), the exchange bindings and their deadlines (`_kombu.*`), and the
# unacked hash/index/mutex of acks_late. No remote control (`*.celery.pidbox` queues, the
# `/<db>.celery.pidbox` channel): edgefleet does not use it, and with it any box could tell every
# worker to shut down; joined boxes run with `worker_remote_control` off.
_KOMBU_KEYS = (
    *(pattern for rc in ResourceClass for pattern in (rc.value, f"{rc.value}:*", f"{rc.value}.*")),
    "node.*",
    "_kombu.*",
    "unacked",
    "unacked_index",
    "unacked_mutex",
)
# Everything a node's processes send, by name (`command|subcommand` for one subcommand only);
# each seen in MONITOR while a node ran jobs, or sent by the store's code on a path a short run
# may not take (its Lua scripts run with the caller's permissions).
_COMMANDS = (
    # connection
    "auth", "hello", "ping", "select", "quit", "reset", "client|setname", "client|getname", "client|id",
    "client|setinfo", "client|maint_notifications",  # redis-py's own, on connect (errors ignored)
    # job store and kombu: strings, hashes, sets, sorted sets, lists, streams
    "get", "set", "setnx", "mget", "incr", "incrby", "decr", "exists", "del", "unlink", "expire", "pexpire",
    "ttl", "pttl",
    "hget", "hset", "hsetnx", "hmget", "hgetall", "hdel", "hexists", "hincrby", "hlen",
    "sadd", "srem", "smembers", "sismember", "scard",
    "zadd", "zrem", "zremrangebyscore", "zscore", "zcard", "zcount", "zrange", "zrevrange", "zrangebyscore", "zrevrangebyscore",
    "zpopmin", "zscan",
    "lpush", "rpush", "lpop", "rpop", "llen", "lrange", "ltrim", "brpop", "blpop",
    "xadd", "xread", "xrange",
    # the store's Lua scripts (redis-py loads one Redis does not have), transactions, the clock
    "evalsha", "eval", "script|load", "script|exists",
    "multi", "exec", "discard", "watch", "unwatch",
    "time",
    # kombu's fanout exchange of task events (celeryev, for Flower)
    "publish",
)  # fmt: skip


def node_acl_user(prefix: str, token_id: str) -> str:
    return f"{prefix}-node-{token_id}"


# Job-store keys no node touches: the admission records (a node that could write them could mint
# itself a join token before it is revoked, and keep coming back) and tenants' webhook signing secrets.
ROUTER_ONLY_KEYS = frozenset({"join_token", "join_tokens", "webhook_secret"})


def store_key_patterns(prefix: str) -> list[str]:
    """ACL key patterns for every key of `KEY_TEMPLATES` but the router's own, placeholders as `*`."""
    patterns = {
        f"{prefix}:{re.sub(r'[{][^}]*[}]', '*', template)}"
        for name, template in KEY_TEMPLATES.items()
        if name not in ROUTER_ONLY_KEYS
    }
    return sorted(patterns)


def worker_acl_rules(prefix: str, db: int = 0) -> list[str]:
    """`ACL SETUSER` rules (after `reset on #<digest>`) for a worker node of the store with `prefix`.

    kombu's fanout exchanges are channels `/<db>.<exchange>`: a node publishes task events to
    `celeryev` (for Flower), nothing else."""
    return [
        *(f"~{pattern}" for pattern in store_key_patterns(prefix)),
        *(f"~{pattern}" for pattern in _KOMBU_KEYS),
        "resetchannels",
        f"&/{db}.celeryev/*",
        "-@all",
        *(f"+{command}" for command in _COMMANDS),
    ]


_UNKNOWN_RULE = re.compile(r"modifier '([^']+)'")


class JoinRefused(Exception):
    """A join token that admits nobody; `reason` says why (unknown, expired, revoked)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class JoinToken:
    id: str
    name: str
    created_at: float
    expires_at: float
    revoked_at: float | None
    node: str | None
    acl_user: str | None
    joined_at: float | None
    joins: int

    @property
    def state(self) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.joined_at is not None:
            return "joined"
        return "expired" if self.expires_at <= time.time() else "unused"


@dataclass(frozen=True)
class NodeCredentials:
    """What a join hands out, in the clear this once."""

    token: JoinToken
    acl_user: str
    password: str
    node_token: str


def _opt(value: str | None) -> float | None:
    return float(value) if value not in (None, "") else None


class NodeAccessStore:
    """Join tokens, node tokens and node ACL users, on the store's connection."""

    def __init__(self, connection: StoreConnection) -> None:
        self._conn = connection
        self._keys = connection.keys
        self._redis = connection.client
        # ACL and CLIENT are not in the store's typed protocol: the same client, untyped answers.
        self._raw = cast(redis.Redis, connection.client)
        # Rules this Redis does not know (e.g. `client|setinfo` before 7.2), dropped once seen.
        self._unknown_rules: set[str] = set()

    @classmethod
    def of(cls, store: JobStore) -> NodeAccessStore:
        return cls(store.connection)

    # --- tokens ---------------------------------------------------------------------------

    def create_token(self, name: str | None, ttl: float) -> tuple[JoinToken, str]:
        """A new join token; returns its record and the token itself (never stored)."""
        token_id = new_token_id()
        secret = new_secret()
        now = time.time()
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(
            self._keys.key("join_token", token_id=token_id),
            mapping={
                "name": name or f"worker-{token_id}",
                "secret": digest(secret),
                "created_at": now,
                "expires_at": now + ttl,
            },
        )
        pipe.zadd(self._keys.key("join_tokens"), {token_id: now})
        pipe.execute()
        found = self.token(token_id)
        assert found is not None
        return found, format_token(JOIN_KIND, token_id, secret)

    def _raw_token(self, token_id: str) -> dict[str, str]:
        return self._redis.hgetall(self._keys.key("join_token", token_id=token_id))

    def token(self, token_id: str) -> JoinToken | None:
        raw = self._raw_token(token_id)
        return self._record(token_id, raw) if raw else None

    @staticmethod
    def _record(token_id: str, raw: dict[str, str]) -> JoinToken:
        return JoinToken(
            id=token_id,
            name=raw.get("name", ""),
            created_at=float(raw.get("created_at") or 0),
            expires_at=float(raw.get("expires_at") or 0),
            revoked_at=_opt(raw.get("revoked_at")),
            node=raw.get("node") or None,
            acl_user=raw.get("acl_user") or None,
            joined_at=_opt(raw.get("joined_at")),
            joins=int(raw.get("joins") or 0),
        )

    def tokens(self) -> list[JoinToken]:
        """Every token, oldest first."""
        ids: list[str] = self._redis.zrange(self._keys.key("join_tokens"), 0, -1)
        found = (self.token(token_id) for token_id in ids)
        return [t for t in found if t is not None]

    def find(self, id_or_name: str) -> list[JoinToken]:
        """Tokens with this id, else those with this name."""
        by_id = self.token(id_or_name) if re.fullmatch(r"[0-9a-f]{12}", id_or_name) else None
        if by_id is not None:
            return [by_id]
        return [t for t in self.tokens() if t.name == id_or_name]

    def check_join_token(self, text: str) -> JoinToken:
        """The token `text` admits a box now, else JoinRefused."""
        parsed = parse_token(JOIN_KIND, text)
        if parsed is None:
            raise JoinRefused("not a join token (efj_...)")
        token_id, secret = parsed
        raw = self._raw_token(token_id)
        if not raw or not matches(secret, raw.get("secret")):
            raise JoinRefused("unknown join token")
        record = self._record(token_id, raw)
        if record.revoked_at is not None:
            raise JoinRefused("join token revoked")
        if record.expires_at <= time.time():
            raise JoinRefused("join token expired; make a new one with `edgefleet token create --worker`")
        return record

    def check_node_token(self, text: str) -> JoinToken | None:
        """The live (joined, not revoked) token whose node token `text` is, else None."""
        parsed = parse_token(NODE_KIND, text)
        if parsed is None:
            return None
        token_id, secret = parsed
        raw = self._raw_token(token_id)
        if not raw or not matches(secret, raw.get("node_secret")) or raw.get("revoked_at"):
            return None
        return self._record(token_id, raw)

    # --- joining and revoking ---------------------------------------------------------------

    def grant(self, token: JoinToken, node_name: str) -> NodeCredentials:
        """Make (or, on a rejoin, re-make with new secrets) the node's ACL user and node token."""
        user = node_acl_user(self._keys.prefix, token.id)
        password = secrets.token_hex(32)
        node_secret = new_secret()
        key = self._keys.key("join_token", token_id=token.id)
        self._set_user(user, digest(password))
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(
            key,
            mapping={
                "node": node_name,
                "acl_user": user,
                "password": digest(password),
                "node_secret": digest(node_secret),
                "joined_at": time.time(),
            },
        )
        pipe.hincrby(key, "joins", 1)
        pipe.execute()
        self._undo_if_revoked(token.id, user)
        record = self.token(token.id)
        if record is None or record.revoked_at is not None:
            raise JoinRefused("join token revoked")
        return NodeCredentials(
            token=record,
            acl_user=user,
            password=password,
            node_token=format_token(NODE_KIND, token.id, node_secret),
        )

    def revoke(self, token_id: str) -> JoinToken | None:
        """Refuse the token and its node from now on: its ACL user is deleted, the user's
        connections are closed, and the node's heartbeat is removed. None: no such token."""
        key = self._keys.key("join_token", token_id=token_id)
        raw = self._raw_token(token_id)
        if not raw:
            return None
        if not raw.get("revoked_at"):
            self._redis.hset(key, "revoked_at", time.time())
        self._delete_user(node_acl_user(self._keys.prefix, token_id))
        node = raw.get("node")
        if node:
            pipe = self._redis.pipeline(transaction=True)
            pipe.delete(self._keys.node(node))
            pipe.srem(self._keys.nodes, node)
            pipe.execute()
        return self.token(token_id)

    def reconcile(self) -> tuple[int, int]:
        """Recreate missing node users of live tokens, delete node users of none; (made, deleted)."""
        prefix = node_acl_user(self._keys.prefix, "")
        existing = {u for u in self._acl("USERS") if isinstance(u, str) and u.startswith(prefix)}
        wanted: dict[str, tuple[str, str]] = {}
        for token in self.tokens():
            raw = self._raw_token(token.id)
            if token.acl_user and raw.get("password") and not token.revoked_at:
                wanted[token.acl_user] = (token.id, raw["password"])
        made = deleted = 0
        for user, (token_id, password_digest) in wanted.items():
            if user not in existing:
                self._set_user(user, password_digest)
                self._undo_if_revoked(token_id, user)
                made += 1
        for user in existing - set(wanted):
            self._delete_user(user)
            deleted += 1
        return made, deleted

    # --- Redis ACL ------------------------------------------------------------------------

    def _command(self, *args: str) -> Any:
        # ACL and CLIENT KILL by raw command: redis-py's typed helpers reorder rules.
        return self._raw.execute_command(*args)  # type: ignore[no-untyped-call]

    def _acl(self, *args: str) -> Any:
        return self._command("ACL", *args)

    def _set_user(self, user: str, password_digest: str) -> None:
        db = int(self._raw.connection_pool.connection_kwargs.get("db") or 0)
        rules = [r for r in worker_acl_rules(self._keys.prefix, db) if r not in self._unknown_rules]
        for _ in range(len(rules) + 1):
            try:
                self._acl("SETUSER", user, "reset", "on", f"#{password_digest}", *rules)
                return
            except redis.ResponseError as exc:
                # An older Redis lacks a command we list: drop that rule, keep the rest.
                found = _UNKNOWN_RULE.search(str(exc))
                if found is None or found.group(1) not in rules or "nknown" not in str(exc):
                    raise
                self._unknown_rules.add(found.group(1))
                rules.remove(found.group(1))
        raise RuntimeError("ACL SETUSER kept refusing the node's rules")

    def _delete_user(self, user: str) -> None:
        # DELUSER also closes the user's connections; CLIENT KILL first so that none slips
        # a command in between (and for servers that keep them).
        try:
            self._command("CLIENT", "KILL", "USER", user)
        except redis.ResponseError:
            pass  # no such user (already deleted)
        self._acl("DELUSER", user)

    def _undo_if_revoked(self, token_id: str, user: str) -> None:
        if self._redis.hget(self._keys.key("join_token", token_id=token_id), "revoked_at"):
            self._delete_user(user)
