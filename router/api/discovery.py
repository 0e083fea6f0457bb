"""Prometheus HTTP service discovery: the metrics endpoints of the live nodes.

Prometheus polls this (`http_sd_configs`, with a `read` token in its `authorization`), so a
box that joins is scraped after one refresh and one whose heartbeat expired is dropped.
The router itself stays a static target in its own scrape job: its /metrics needs the
bearer token, which Prometheus must not send to the nodes.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from fastapi import APIRouter
from pydantic import BaseModel, Field

from edgefleet.router.auth import ReadPrincipal
from edgefleet.router.services import Services
from edgefleet.schemas import NodeInfo

router = APIRouter(tags=["fleet"])


class TargetGroup(BaseModel):
    """One entry of Prometheus's HTTP SD format."""

    targets: list[str] = Field(description="host:port to scrape")
    labels: dict[str, str] = Field(description="labels of every series scraped from these targets")


def target_group(node: NodeInfo) -> TargetGroup | None:
    """The node's scrape target, or None when it serves no metrics (or its URL has no host)."""
    if not node.metrics_url:
        return None
    url = urlsplit(node.metrics_url)
    if not url.netloc or url.scheme not in ("http", "https"):
        return None
    labels = {
        "__metrics_path__": url.path or "/metrics",
        "__scheme__": url.scheme,
        "node": node.name,
        "classes": ",".join(rc.value for rc in node.classes),
        "edgefleet_version": node.version,
    }
    return TargetGroup(targets=[url.netloc], labels=labels)


@router.get("/v1/prometheus/targets", response_model=list[TargetGroup])
def prometheus_targets(_: ReadPrincipal, services: Services) -> list[TargetGroup]:
    """Every live node's metrics endpoint in the `http_sd_configs` format (needs `read`).

    In prometheus.yml: `http_sd_configs: [{url: http://<router>/v1/prometheus/targets,
    refresh_interval: 5s, authorization: {credentials_file: <read token file>}}]`."""
    groups = (target_group(node) for node in services.store.nodes.live_nodes())
    return [group for group in groups if group is not None]
