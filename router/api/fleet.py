"""The fleet: live workers, the plugin catalogue, and the release scheduler's state and weights."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter

from edgefleet.router.auth import AdminPrincipal, ReadPrincipal
from edgefleet.router.errors import ApiError, error_responses
from edgefleet.router.request_body import JsonBody
from edgefleet.router.services import Services
from edgefleet.scheduling.priority import validate_weights
from edgefleet.schemas import NodeInfo, ResourceClass, SchedulerWeightsChange

log = logging.getLogger(__name__)

router = APIRouter(tags=["fleet"])


@router.get("/v1/scheduler")
def scheduler(_: ReadPrincipal, services: Services) -> dict[str, Any]:
    """The release scheduler as Redis holds it: weights (see `edgefleet.scheduling.priority`),
    target depth, backlog and released-but-unclaimed depth per resource class, the
    router holding the release lease, and the last changes with their reasons."""
    scheduler = services.scheduler
    depths = scheduler.target_depths(services.settings.target_depth)
    return {
        "router_id": services.router_id,
        "leader": scheduler.leader(),
        "weights": scheduler.weights(),
        "target_depth": {rc.value: n for rc, n in depths.items()},
        "backlog": {rc.value: scheduler.backlog_size(rc) for rc in ResourceClass},
        "queued": {rc.value: scheduler.queued_size(rc) for rc in ResourceClass},
        "loop_released": scheduler.loop_released(),
        "last_changes": scheduler.changes(),
    }


@router.put("/v1/scheduler/weights", response_model=None, responses=error_responses(400, 415))
def set_scheduler_weights(
    change: SchedulerWeightsChange, _: AdminPrincipal, _json: JsonBody, services: Services
) -> dict[str, Any]:
    """Change weights (admin); every waiting subtask is rescored at once. The feedback loop
    may move `interactive` again later; the other weights stay as set."""
    problems = []
    for name, value in change.weights.items():
        try:
            validate_weights({name: value})
        except ValueError as exc:
            problems.append((f"weights.{name}", str(exc)))
    if problems:
        raise ApiError(422, "invalid_request", problems)
    scheduler = services.scheduler
    rescored = scheduler.set_weights(change.weights, reason=change.reason)
    log.info("scheduler weights changed", extra={"changes": change.weights, "reason": change.reason})
    return {"weights": scheduler.weights(), "rescored": rescored}


@router.get("/v1/workers", response_model=list[NodeInfo])
def workers(_: ReadPrincipal, services: Services) -> list[NodeInfo]:
    return services.store.nodes.live_nodes()


@router.post("/v1/workers/bench", status_code=202)
def bench_workers(_: AdminPrincipal, services: Services) -> dict[str, Any]:
    """Ask every node to run its benchmark again (admin); each starts within one heartbeat and
    reports `bench.request` >= `request` in `GET /v1/workers` once done (workers/bench.py)."""
    request = services.store.nodes.request_bench()
    return {"request": request, "nodes": [n.name for n in services.store.nodes.live_nodes()]}


@router.get("/v1/plugins")
def plugins(_: ReadPrincipal, services: Services) -> dict[str, Any]:
    """The plugin catalogue: each plugin's manifest and the live nodes that can run it.

    `nodes`: live nodes that serve the plugin's resource class and advertise it
    (its dependencies are met there); `advertised_by`: every live node that
    advertises it, whatever its classes (a step may override its class).
    `errors`: the rejected manifests, each with file, field and reason.
    """
    catalog = services.plugins
    nodes = services.store.nodes.live_nodes()
    described = catalog.describe()
    for entry in described:
        advertising = [n for n in nodes if entry["name"] in n.plugins]
        entry["advertised_by"] = [n.name for n in advertising]
        entry["nodes"] = [n.name for n in advertising if entry["resource_class"] in {c.value for c in n.classes}]
    return {"plugins": described, "errors": catalog.describe_errors(), "templates": services.templates.describe()}
