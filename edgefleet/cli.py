"""The `edgefleet` command line: run the services, submit and watch jobs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from edgefleet.logs import setup_logging
from edgefleet.schemas import ResourceClass
from edgefleet.settings import Settings

app = typer.Typer(
    help="edgefleet: one task cluster from your home-lab and edge boxes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _settings(**overrides: Any) -> Settings:
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


@app.command()
def router(
    host: Annotated[Optional[str], typer.Option(help="interface to listen on")] = None,
    port: Annotated[Optional[int], typer.Option(help="port to listen on")] = None,
    redis_url: Annotated[Optional[str], typer.Option(help="job store / broker URL")] = None,
) -> None:
    """Run the router: HTTP API, planner, release loop, reaper."""
    import uvicorn

    from router.app import create_app

    settings = _settings(router_host=host, router_port=port, redis_url=redis_url)
    setup_logging("router", settings.log_level, settings.log_json)
    uvicorn.run(
        create_app(settings),
        host=settings.router_host,
        port=settings.router_port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
    )


@app.command()
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

    settings = _settings(redis_url=broker, node_name=node_name)
    setup_logging("node", settings.log_level, settings.log_json)
    if classes:
        try:
            chosen = [ResourceClass(c.strip()) for c in classes.split(",") if c.strip()]
        except ValueError as exc:
            raise typer.BadParameter(f"{exc}; choose from cpu, gpu, io", param_hint="--classes") from exc
    else:
        chosen = detect_classes(force_gpu=gpu)
    raise typer.Exit(NodeSupervisor(settings, chosen).run())


def main() -> None:
    app()


if __name__ == "__main__":
    main()
