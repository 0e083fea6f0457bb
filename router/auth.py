"""Bearer-token authentication with scopes; tokens come from settings (the environment)."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status

from edgefleet.router.services import services
from edgefleet.settings import Scope, Settings


@dataclass(frozen=True)
class Principal:
    tenant: str
    scopes: frozenset[Scope]

    @property
    def is_admin(self) -> bool:
        return Scope.admin in self.scopes

    def allows(self, scope: Scope) -> bool:
        return self.is_admin or scope in self.scopes


def _unauthorized(reason: str) -> HTTPException:
    return HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED,
        detail=[{"field": "Authorization", "reason": reason}],
        headers={"WWW-Authenticate": "Bearer"},
    )


def authenticate(settings: Settings, header: str | None) -> Principal:
    if not header:
        raise _unauthorized("missing bearer token")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized("expected 'Authorization: Bearer <token>'")
    token = token.strip()
    match = None
    # Compare against every token so that timing does not reveal which prefix matched.
    for known, grant in settings.tokens.items():
        if hmac.compare_digest(known.encode(), token.encode()):
            match = grant
    if match is None:
        raise _unauthorized("unknown token")
    return Principal(tenant=match.tenant, scopes=frozenset(match.scopes))


def require(scope: Scope) -> Callable[[Request], Awaitable[Principal]]:
    """A FastAPI dependency: the request's principal, which must hold `scope`."""

    # async although it never awaits: FastAPI runs a sync dependency on its thread pool, a
    # thread hop per request for a few dictionary lookups.
    async def dependency(request: Request) -> Principal:
        principal = authenticate(services(request).settings, request.headers.get("authorization"))
        if not principal.allows(scope):
            raise HTTPException(
                status_code=status.HTTP_403_FORBIDDEN,
                detail=[{"field": "Authorization", "reason": f"token lacks the {scope.value!r} scope"}],
            )
        return principal

    return dependency


SubmitPrincipal = Annotated[Principal, Depends(require(Scope.submit))]
ReadPrincipal = Annotated[Principal, Depends(require(Scope.read))]
AdminPrincipal = Annotated[Principal, Depends(require(Scope.admin))]
