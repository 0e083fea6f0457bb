"""Prometheus and Flower next to an `edgefleet up` cluster: ports, the scrape config, the commands."""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Any

from edgefleet.cli.processes import write_secret_file


def free_local_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


SD_PATH = "/v1/prometheus/targets"
SD_REFRESH = "5s"


def prometheus_config(
    router_target: str,
    token_file: Path | None,
    worker_targets: list[str],
    flower_target: str | None = None,
    scrape_interval: str = "5s",
    *,
    discovery_url: str | None = None,
    discovery_refresh: str = SD_REFRESH,
    rule_files: list[str] | None = None,
) -> str:
    """A prometheus.yml scraping one edgefleet cluster (router with a bearer token file, nodes, Flower).

    Nodes come from the router's HTTP service discovery when `discovery_url` is given (a box
    that joins later is scraped after one `discovery_refresh`), plus any static `worker_targets`.
    `rule_files`: alert rule files Prometheus evaluates (edgefleet.cli.alert_rules)."""
    import yaml

    router_job: dict[str, Any] = {
        "job_name": "edgefleet-router",
        "metrics_path": "/metrics",
        "static_configs": [{"targets": [router_target]}],
    }
    if token_file is not None:
        router_job["authorization"] = {"type": "Bearer", "credentials_file": str(token_file)}
    jobs = [router_job]
    workers_job: dict[str, Any] = {"job_name": "edgefleet-workers", "metrics_path": "/metrics"}
    if discovery_url:
        # The token authenticates the discovery request only; nodes' /metrics get no token.
        sd: dict[str, Any] = {"url": discovery_url, "refresh_interval": discovery_refresh}
        if token_file is not None:
            sd["authorization"] = {"type": "Bearer", "credentials_file": str(token_file)}
        workers_job["http_sd_configs"] = [sd]
    if worker_targets:
        workers_job["static_configs"] = [{"targets": list(worker_targets)}]
    if discovery_url or worker_targets:
        jobs.append(workers_job)
    if flower_target:
        jobs.append(
            {"job_name": "flower", "metrics_path": "/metrics", "static_configs": [{"targets": [flower_target]}]}
        )
    config: dict[str, Any] = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
    }
    if rule_files:
        config["rule_files"] = list(rule_files)
    config["scrape_configs"] = jobs
    return yaml.safe_dump(config, sort_keys=False)


def host_port(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).netloc


def write_prometheus_files(
    prom_dir: Path,
    router_url: str,
    token: str | None,
    worker_targets: list[str],
    flower_url: str | None,
    *,
    interactive_p95_objective: float | None = None,
) -> Path:
    """prometheus.yml (and the router's token in a 0600 file it names) in `prom_dir`; returns the config path.

    Nodes are found through the router's service discovery, so boxes that join later are scraped too.
    With `interactive_p95_objective`, also alerts.yml (edgefleet.cli.alert_rules, with that objective),
    the same rules docker compose's Prometheus loads."""
    from edgefleet.cli.alert_rules import render

    prom_dir.mkdir(exist_ok=True)
    token_file: Path | None = None
    if token:
        token_file = prom_dir / "router.token"
        write_secret_file(token_file, token)
    rule_files: list[str] = []
    if interactive_p95_objective is not None:
        rules = prom_dir / "alerts.yml"
        rules.write_text(render(interactive_p95_objective))
        rule_files.append(str(rules))
    config = prom_dir / "prometheus.yml"
    config.write_text(
        prometheus_config(
            host_port(router_url),
            token_file,
            worker_targets,
            host_port(flower_url) if flower_url else None,
            discovery_url=router_url.rstrip("/") + SD_PATH,
            rule_files=rule_files,
        )
    )
    return config


def prometheus_command(config: Path, prom_dir: Path, prometheus_url: str) -> list[str]:
    return [
        "prometheus",
        f"--config.file={config}",
        f"--storage.tsdb.path={prom_dir / 'data'}",
        f"--web.listen-address={host_port(prometheus_url)}",
    ]


def flower_command(flower_url: str) -> list[str]:
    """Flower with edgefleet's own broker options (edgefleet/flower_app.py says why), on 127.0.0.1 only.

    No --broker: the app reads EDGEFLEET_REDIS_URL from its environment (the URL may hold a password)."""
    port = flower_url.rsplit(":", 1)[1]
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "edgefleet.flower_app",
        "flower",
        f"--port={port}",
        "--address=127.0.0.1",
    ]
