"""What the CLI's command modules share: the --url/--token options, settings, the router client,
and the one-line `error: <field>: <reason>` exit (2 bad input, 3 router unreachable or failing)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from edgefleet.settings import Settings

if TYPE_CHECKING:
    from edgefleet.client import Client

UrlOption = Annotated[
    str | None,
    typer.Option("--url", help="router URL (env: EDGEFLEET_ROUTER_URL)", show_default=False),
]
TokenOption = Annotated[
    str | None,
    typer.Option("--token", help="bearer token (env: EDGEFLEET_TOKEN; default: <data dir>/token)", show_default=False),
]


def settings_with(**overrides: Any) -> Settings:
    """Settings from the environment, with the options the user gave (None: not given)."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def fail(field: str, reason: str, code: int = 2) -> NoReturn:
    reason = " ".join(str(reason).split())
    sys.stderr.write(f"error: {field}: {reason}\n" if field else f"error: {reason}\n")
    sys.stderr.flush()
    raise typer.Exit(code)


def load_settings(**overrides: Any) -> Settings:
    from pydantic import ValidationError

    try:
        return settings_with(**overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "settings"
        fail(f"settings.{field}", err["msg"])


def make_client(url: str | None, token: str | None, timeout: float = 30.0) -> Client:
    from edgefleet.client import Client

    return Client.from_settings(load_settings(), url=url, token=token, timeout=timeout)


@contextlib.contextmanager
def api_errors() -> Iterator[None]:
    """ApiError → one `error:` line and exit 2 (4xx) or 3 (5xx); no router → exit 3 with a hint."""
    from edgefleet.client import ApiError, RouterUnreachable, WaitTimeout

    try:
        yield
    except ApiError as exc:
        code = 2 if exc.status < 500 else 3
        items = exc.detail or [{"field": "", "reason": f"HTTP {exc.status}"}]
        field = str(items[0].get("field") or "") or exc.error
        rest = [p for p in exc.problems[1:] if p]
        reason = " ".join(str(items[0].get("reason") or "").split())
        line = "; ".join([reason, *rest])
        if exc.status == 401:
            line += " (pass --token, set EDGEFLEET_TOKEN, or run `edgefleet up` on this box)"
        fail(field, line, code)
    except RouterUnreachable as exc:
        fail(
            "router",
            f"cannot reach {exc.url} ({exc.reason}); is the router running? "
            "Start a local cluster with `edgefleet up`, or pass --url",
            3,
        )
    except WaitTimeout as exc:
        fail("--timeout", str(exc), 1)


def err_console() -> Any:
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def out_console() -> Any:
    from rich.console import Console

    # Piped output is not cut to 80 columns: tables stay one row per line.
    wide = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160
    return Console(highlight=False, width=wide)
