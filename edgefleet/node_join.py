"""Joining a box: the wire contract between `edgefleet token`, the router and `edgefleet worker --join`,
and the two secrets it hands out.

A **join token** (`efj_<id>_<secret>`) admits one box: an admin makes it (shown once), the box
presents it to `POST /v1/join`. The router answers with that box's own credentials: a Redis ACL
user and password inside the broker URL, and a **node token** (`efn_<id>_<secret>`) with which the
node calls the router. Redis keeps only SHA-256 digests of all three secrets; the id before the
secret finds the record without comparing against every token.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from pydantic import BaseModel, ConfigDict, Field

JOIN_KIND = "efj"
NODE_KIND = "efn"
_ID = re.compile(r"^[0-9a-f]{12}$")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # a node name (it names the node's Celery queues)
DEFAULT_TTL = 24 * 3600.0


def new_token_id() -> str:
    return secrets.token_hex(6)


def new_secret() -> str:
    # Hex: no '_' inside, so `<kind>_<id>_<secret>` splits unambiguously; 256 bits.
    return secrets.token_hex(32)


def format_token(kind: str, token_id: str, secret: str) -> str:
    return f"{kind}_{token_id}_{secret}"


def parse_token(kind: str, text: str) -> tuple[str, str] | None:
    """(id, secret) of a token of this kind, or None for anything else."""
    parts = text.strip().split("_")
    if len(parts) != 3 or parts[0] != kind or not _ID.match(parts[1]) or len(parts[2]) < 32:
        return None
    return parts[1], parts[2]


def digest(secret: str) -> str:
    """SHA-256 hex: what Redis keeps of a secret (and the form `ACL SETUSER ... #<hash>` takes)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def matches(secret: str, expected_digest: str | None) -> bool:
    return expected_digest is not None and hmac.compare_digest(digest(secret), expected_digest)


# --- the HTTP bodies ---------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JoinTokenCreate(_Strict):
    """`POST /v1/join-tokens` (admin)."""

    name: str | None = Field(
        default=None, pattern=NAME_PATTERN, description="a label for list/revoke (default: worker-<id>)"
    )
    ttl: float = Field(
        default=DEFAULT_TTL, gt=0, le=365 * 86400, strict=True, description="seconds the token may be used to join"
    )


class JoinTokenInfo(BaseModel):
    """A join token as listed: never its secret."""

    id: str
    name: str
    created_at: float
    expires_at: float = Field(description="joins after this are refused; a node that joined keeps its access")
    revoked_at: float | None = None
    state: str = Field(description="unused, joined, expired or revoked")
    node: str | None = Field(default=None, description="the node that joined with it (the last one)")
    acl_user: str | None = Field(default=None, description="that node's Redis ACL user")
    joined_at: float | None = None
    joins: int = Field(default=0, description="how many times it was used (a rejoin rotates the node's password)")


class JoinTokenCreated(JoinTokenInfo):
    token: str = Field(description="the join token itself: shown once, only its SHA-256 is kept")
    router_url: str = Field(description="the router as this request reached it: what `worker --join` takes")


class JoinTokenList(BaseModel):
    tokens: list[JoinTokenInfo]


class JoinRequest(_Strict):
    """`POST /v1/join`, with the join token as the bearer."""

    node_name: str = Field(pattern=NAME_PATTERN, description="the name the box runs under")


class JoinGrant(BaseModel):
    """What a box gets for a valid join token: its own credentials (secrets: keep them in a 0600 file)."""

    node_name: str
    token_id: str
    acl_user: str
    broker_url: str = Field(description="the cluster's Redis with this node's ACL user and password")
    broker_ca_pem: str | None = Field(default=None, description="CA certificate(s) to verify a rediss:// broker")
    router_url: str
    node_token: str = Field(description="bearer token of this node for the router (GET /v1/join/node)")


class NodeAccessInfo(BaseModel):
    """`GET /v1/join/node` with a node token: the router knows this node and its access is live."""

    node_name: str
    token_id: str
    acl_user: str
