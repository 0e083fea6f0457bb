"""Joining boxes: join tokens (admin), the join itself, and a node's check of its own access.

- `POST /v1/join-tokens`, `GET /v1/join-tokens`, `DELETE /v1/join-tokens/{id or name}` (admin):
  make, list and revoke join tokens. Revoking deletes the node's Redis ACL user, which closes
  its connections, and removes its heartbeat, so it leaves `GET /v1/workers` at once.
- `POST /v1/join` with a join token as the bearer: the box's own Redis ACL user (a new
  password on every join) inside a broker URL, and its node token for the router.
- `GET /v1/join/node` with a node token: what `edgefleet worker --join` checks before it
  says "joined" (and `NodePrincipal`, for routes that nodes call).

This router's lifespan also runs the reconciler that recreates node ACL users a restarted
Redis forgot (edgefleet/store/acl.py).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import redis
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

from edgefleet.netguard import is_loopback_host
from edgefleet.node_join import (
    JoinGrant,
    JoinRequest,
    JoinTokenCreate,
    JoinTokenCreated,
    JoinTokenInfo,
    JoinTokenList,
    NodeAccessInfo,
)
from edgefleet.router.auth import AdminPrincipal
from edgefleet.router.errors import ApiError, error_responses
from edgefleet.router.request_body import JsonBody
from edgefleet.router.services import RouterServices, Services, services
from edgefleet.settings import Settings
from edgefleet.store.acl import JoinRefused, JoinToken, NodeAccessStore

log = logging.getLogger(__name__)

# Query parameters of the router's own Redis URL that name files on the router's box.
_LOCAL_FILE_PARAMS = {"ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_ca_path"}
_NO_STORE = {"Cache-Control": "no-store"}


class AclReconciler:
    """Recreates the ACL users of joined nodes that Redis lost (a restart), every `interval` s."""

    def __init__(self, access: NodeAccessStore, interval: float) -> None:
        self.access = access
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="acl-reconcile", daemon=True)
        self._failing = False

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while True:
            try:
                made, deleted = self.access.reconcile()
                if made or deleted:
                    log.info("node ACL users reconciled", extra={"recreated": made, "deleted": deleted})
                self._failing = False
            except redis.RedisError as exc:
                if not self._failing:  # once per outage, not every round
                    log.warning("node ACL users not reconciled", extra={"error": f"{type(exc).__name__}: {exc}"})
                self._failing = True
            if self._stop.wait(self.interval):
                return


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    # Runs inside the app's own lifespan (FastAPI nests an included router's), so services exist.
    found: RouterServices = app.state.services
    reconciler = AclReconciler(NodeAccessStore.of(found.store), found.settings.node_acl_reconcile_interval)
    reconciler.start()
    try:
        yield
    finally:
        reconciler.stop()


router = APIRouter(tags=["join"], lifespan=_lifespan)


def _access(request: Request) -> NodeAccessStore:
    return NodeAccessStore.of(services(request).store)


Access = Annotated[NodeAccessStore, Depends(_access)]


def _unauthorized(reason: str) -> HTTPException:
    return HTTPException(
        status_code=401,
        detail=[{"field": "Authorization", "reason": reason}],
        headers={"WWW-Authenticate": "Bearer"},
    )


def _bearer(request: Request) -> str:
    scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized("expected 'Authorization: Bearer <join token>'")
    return token.strip()


def _join_token(request: Request, access: Access) -> JoinToken:
    try:
        return access.check_join_token(_bearer(request))
    except JoinRefused as exc:
        raise _unauthorized(exc.reason) from None


def _node(request: Request, access: Access) -> JoinToken:
    found = access.check_node_token(_bearer(request))
    if found is None:
        raise _unauthorized("unknown or revoked node token")
    return found


# A route that nodes call declares this: the node's join record (its name, token id, ACL user).
NodePrincipal = Annotated[JoinToken, Depends(_node)]
ValidJoinToken = Annotated[JoinToken, Depends(_join_token)]


def _info(token: JoinToken) -> JoinTokenInfo:
    return JoinTokenInfo(
        id=token.id,
        name=token.name,
        created_at=token.created_at,
        expires_at=token.expires_at,
        revoked_at=token.revoked_at,
        state=token.state,
        node=token.node,
        acl_user=token.acl_user,
        joined_at=token.joined_at,
        joins=token.joins,
    )


def broker_url_for(settings: Settings, reached_host: str | None, user: str, password: str) -> str:
    """The cluster's Redis as a joining box should reach it, with that box's own user and password.

    Scheme, port, database and TLS options are the router's own (or `join_broker_url`'s); a
    loopback host, never right for another box, becomes the host the box reached the router at
    (Redis on the router's box, as with `edgefleet up --listen` or the compose stack)."""
    base = urlsplit(settings.join_broker_url or settings.redis_url)
    host = base.hostname or "127.0.0.1"
    if is_loopback_host(host) and not is_loopback_host(reached_host):
        host = reached_host or host
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}:{base.port or 6379}"
    query = urlencode([(k, v) for k, v in parse_qsl(base.query) if k not in _LOCAL_FILE_PARAMS])
    return urlunsplit((base.scheme, netloc, base.path or "/0", query, ""))


def broker_ca_for(settings: Settings) -> str | None:
    """The PEM a box needs to verify a rediss:// broker, if the router knows one."""
    path: Path | None = settings.join_broker_ca_file
    if path is None:
        local = dict(parse_qsl(urlsplit(settings.redis_url).query)).get("ssl_ca_certs")
        path = Path(local) if local else None
    if path is None:
        return None
    try:
        return path.read_text()
    except OSError as exc:
        raise ApiError(
            503, "join_unavailable", [("join_broker_ca_file", f"cannot read {path}: {exc.strerror}")]
        ) from exc


@router.post(
    "/v1/join-tokens",
    status_code=201,
    response_model=JoinTokenCreated,
    responses=error_responses(400, 409, 415),
)
def create_join_token(
    _: AdminPrincipal, _json: JsonBody, request: Request, access: Access, body: JoinTokenCreate | None = None
) -> JSONResponse:
    """A join token for one box (admin): shown once in this answer, kept only as a SHA-256 digest."""
    body = body or JoinTokenCreate()
    if body.name is not None and any(t.name == body.name and t.revoked_at is None for t in access.tokens()):
        raise ApiError(
            409, "conflict", [("name", f"a live join token is named {body.name!r}; revoke it or pick another")]
        )
    token, secret = access.create_token(body.name, body.ttl)
    log.info(
        "join token created", extra={"token_id": token.id, "token_name": token.name, "expires_at": token.expires_at}
    )
    created = JoinTokenCreated(**_info(token).model_dump(), token=secret, router_url=str(request.base_url).rstrip("/"))
    return JSONResponse(created.model_dump(mode="json"), status_code=201, headers=_NO_STORE)


@router.get("/v1/join-tokens", response_model=JoinTokenList)
def list_join_tokens(_: AdminPrincipal, access: Access) -> JoinTokenList:
    """Every join token (admin), oldest first: state, the node that joined with it, its ACL user."""
    return JoinTokenList(tokens=[_info(t) for t in access.tokens()])


@router.delete("/v1/join-tokens/{token}", response_model=JoinTokenInfo, responses=error_responses(404, 409))
def revoke_join_token(token: str, _: AdminPrincipal, access: Access, services: Services) -> JoinTokenInfo:
    """Revoke a join token by id or name (admin): its node's Redis user and connections go at once,
    its heartbeat too; what it was running is re-queued when the leases run out."""
    found = access.find(token)
    live = [t for t in found if t.revoked_at is None]
    candidates = live or found
    if not candidates:
        raise ApiError(404, "not_found", [("token", f"no join token with id or name {token!r}")])
    if len(candidates) > 1:
        ids = ", ".join(t.id for t in candidates)
        raise ApiError(
            409, "conflict", [("token", f"{len(candidates)} tokens are named {token!r} ({ids}); give an id")]
        )
    revoked = access.revoke(candidates[0].id)
    if revoked is None:
        raise ApiError(404, "not_found", [("token", f"no join token with id or name {token!r}")])
    # The revoked box knew the artifact signing secret (its Redis user could read it): a new one
    # voids every credential it could still make; live nodes, which can read the new one, remake theirs.
    services.store.artifacts.rotate_node_secret()
    log.info("join token revoked", extra={"token_id": revoked.id, "token_name": revoked.name, "node": revoked.node})
    return _info(revoked)


@router.post("/v1/join", response_model=JoinGrant, responses=error_responses(400, 415, 503))
def join(
    token: ValidJoinToken, _json: JsonBody, body: JoinRequest, request: Request, services: Services, access: Access
) -> JSONResponse:
    """Admit a box (bearer: a join token): its own Redis ACL user and password, and a node token.
    A rejoin with the same token gives the same user a new password (and a new node token)."""
    settings = services.settings
    ca = broker_ca_for(settings)
    try:
        credentials = access.grant(token, body.node_name)
    except JoinRefused as exc:
        raise _unauthorized(exc.reason) from None
    except redis.ResponseError as exc:
        # e.g. NOPERM: the router's own Redis user may not run ACL SETUSER.
        log.error("node ACL user not made", extra={"token_id": token.id, "error": str(exc)})
        raise ApiError(503, "join_unavailable", [("redis", f"the router cannot make ACL users: {exc}")]) from exc
    grant = JoinGrant(
        node_name=body.node_name,
        token_id=token.id,
        acl_user=credentials.acl_user,
        broker_url=broker_url_for(settings, request.url.hostname, credentials.acl_user, credentials.password),
        broker_ca_pem=ca,
        router_url=str(request.base_url).rstrip("/"),
        node_token=credentials.node_token,
    )
    log.info(
        "node joined",
        extra={
            "node": body.node_name,
            "token_id": token.id,
            "acl_user": credentials.acl_user,
            "joins": token.joins + 1,
        },
    )
    return JSONResponse(grant.model_dump(mode="json"), headers=_NO_STORE)


@router.get("/v1/join/node", response_model=NodeAccessInfo, responses=error_responses(401))
def node_access(node: NodePrincipal) -> NodeAccessInfo:
    """Who this node token belongs to (bearer: a node token): a node's check that the router knows it."""
    return NodeAccessInfo(node_name=node.node or "", token_id=node.id, acl_user=node.acl_user or "")
