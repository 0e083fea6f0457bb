"""The webhook signing secret over HTTP: a tenant reads its own and may rotate it; an admin may name any tenant."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from edgefleet.router.auth import Principal, SubmitPrincipal
from edgefleet.router.services import RouterServices, Services
from edgefleet.schemas import ErrorBody
from edgefleet.store.webhooks import WebhookStore

TenantParam = Annotated[
    str | None, Query(min_length=1, max_length=200, description="another tenant's secret (admin only)")
]
DEFAULT_GRACE = 24 * 3600.0

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


class WebhookSecret(BaseModel):
    tenant: str
    secret: str = Field(description="`whsec_...`: verify deliveries with `standardwebhooks.Webhook(secret)`")
    created_at: float | None = None
    previous_valid_until: float | None = Field(
        default=None,
        description="after a rotation, deliveries carry a signature by the previous secret too, until then",
    )


def _tenant(principal: Principal, tenant: str | None) -> str:
    if tenant is None or tenant == principal.tenant:
        return principal.tenant
    if not principal.is_admin:
        raise HTTPException(403, detail=[{"field": "tenant", "reason": "only an admin may name another tenant"}])
    return tenant


def _answer(store: WebhookStore, tenant: str) -> JSONResponse:
    body = WebhookSecret.model_validate(store.secret_info(tenant))
    # A secret: no cache on the way may keep it.
    return JSONResponse(body.model_dump(mode="json"), headers={"Cache-Control": "no-store"})


def _store(services: RouterServices) -> WebhookStore:
    return services.store.webhooks


@router.get("/secret", response_model=WebhookSecret, responses={403: {"model": ErrorBody}})
def read_secret(principal: SubmitPrincipal, services: Services, tenant: TenantParam = None) -> JSONResponse:
    """The secret that signs this tenant's webhooks (made on first use)."""
    return _answer(_store(services), _tenant(principal, tenant))


@router.post("/secret/rotate", response_model=WebhookSecret, responses={403: {"model": ErrorBody}})
def rotate_secret(
    principal: SubmitPrincipal,
    services: Services,
    tenant: TenantParam = None,
    grace: Annotated[
        float, Query(ge=0, le=7 * 86400, description="seconds the old secret still signs too; 0 if it leaked")
    ] = DEFAULT_GRACE,
) -> JSONResponse:
    """A new secret from now on. For `grace` seconds each delivery carries a second signature made
    with the old one, so receivers can switch without losing a webhook."""
    store = _store(services)
    name = _tenant(principal, tenant)
    store.rotate(name, grace)
    return _answer(store, name)
