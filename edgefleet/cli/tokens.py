"""`edgefleet token`: join tokens that admit a box (`create --worker`), `list`, `revoke` (admin).

Everything goes through the router's API (`/v1/join-tokens`), which keeps only a digest of
each token; `create` prints the token once, with the command that joins a box, which passes
it through the environment or a file, never as an argument (`ps` shows arguments to everyone).
"""

from __future__ import annotations

import json
import socket
import time
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import urlsplit, urlunsplit

import typer

from edgefleet.cli.common import TokenOption, UrlOption, api_errors, fail, make_client, out_console

if TYPE_CHECKING:
    from edgefleet.client import Client

tokens_app = typer.Typer(
    help="Join tokens: admit a box to the cluster (`edgefleet worker --join`), list them, revoke them.",
    no_args_is_help=True,
)

_DURATION = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """'90', '90s', '15m', '24h', '7d' -> seconds."""
    text = text.strip().lower()
    unit = _DURATION.get(text[-1:]) if text else None
    number = text[:-1] if unit else text
    try:
        value = float(number) * (unit or 1)
    except ValueError:
        fail("--ttl", f"{text!r}: give seconds or a number with s, m, h or d (e.g. 24h)")
    if value <= 0:
        fail("--ttl", "must be more than 0")
    return value


def _call(client: Client, method: str, path: str, **kwargs: Any) -> Any:
    # The client's own request plumbing: its errors (ApiError, RouterUnreachable) are what
    # `api_errors` turns into one line and an exit code.
    return client._request(method, path, **kwargs).json()


def _reachable_url(router_url: str) -> str:
    """The router URL as another box would use it: a loopback host becomes this box's address
    on its default route (found by a UDP connect, which sends nothing)."""
    parts = urlsplit(router_url)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        return router_url
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: never routed anywhere, only a route lookup
            address = probe.getsockname()[0]
    except OSError:
        return router_url
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit((parts.scheme, f"{address}{port}", parts.path, parts.query, parts.fragment))


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "-"


@tokens_app.command("create")
def create(
    worker: Annotated[
        bool, typer.Option("--worker", help="a token that admits one worker box (the only kind)")
    ] = False,
    name: Annotated[
        str | None, typer.Option(help="a label for list/revoke, e.g. the box's name (default: worker-<id>)")
    ] = None,
    ttl: Annotated[str, typer.Option(help="how long the token may be used to join: 90s, 15m, 24h, 7d")] = "24h",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="print only the token (for scripts)")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the API's answer")] = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Make a join token (admin) and print the command that joins a box with it.

    The token is shown once (the router keeps only its SHA-256). A box that joins with it
    gets its own Redis user; `edgefleet token revoke` shuts that box out again. A box that
    joined keeps its access after the token expires; the expiry only ends new joins.

    Examples:

        edgefleet token create --worker --name minipc
        edgefleet token create --worker --ttl 1h -q > join-token   # then --token-file join-token
    """
    if not worker:
        fail("--worker", "say what the token admits: `edgefleet token create --worker`")
    body: dict[str, Any] = {"ttl": parse_duration(ttl)}
    if name is not None:
        body["name"] = name
    with api_errors(), make_client(url, token) as client:
        created = _call(client, "POST", "/v1/join-tokens", json=body)
    if as_json:
        print(json.dumps(created, indent=2))
        return
    if quiet:
        print(created["token"])
        return
    router_url = _reachable_url(created["router_url"])
    print(f"join token {created['id']} ({created['name']}), valid until {_when(created['expires_at'])}:")
    print(f"\n    {created['token']}\n")
    print("It is shown only now. On the new box, run (the token goes through the environment, not the command line):")
    print(f"\n    EDGEFLEET_JOIN_TOKEN={created['token']} edgefleet worker --join {router_url}\n")
    print(f"or save it to a file (mode 0600) and: edgefleet worker --join {router_url} --token-file FILE")
    print(f"or as a systemd service:   sudo EDGEFLEET_JOIN_TOKEN=... deploy/join.sh {router_url}")
    print(f"Shut the box out again with: edgefleet token revoke {created['name']}")


@tokens_app.command("list")
def list_tokens(
    as_json: Annotated[bool, typer.Option("--json", help="print the raw JSON")] = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """List join tokens (admin): state (unused, joined, expired, revoked), node, ACL user, expiry."""
    with api_errors(), make_client(url, token) as client:
        tokens: list[dict[str, Any]] = _call(client, "GET", "/v1/join-tokens")["tokens"]
    if as_json:
        print(json.dumps(tokens, indent=2))
        return
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for column in ("ID", "NAME", "STATE", "NODE", "ACL USER", "JOINS", "CREATED", "EXPIRES"):
        table.add_column(column)
    for t in tokens:
        table.add_row(
            t["id"],
            t["name"],
            t["state"],
            t["node"] or "-",
            t["acl_user"] or "-",
            str(t["joins"]),
            _when(t["created_at"]),
            _when(t["expires_at"]),
        )
    out_console().print(table)


@tokens_app.command("revoke")
def revoke(
    token_id: Annotated[str, typer.Argument(metavar="ID_OR_NAME", help="the token's id or name")],
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Revoke a join token (admin): the box that joined with it loses its Redis user and its
    connections at once, and leaves `edgefleet workers`; its running subtasks run again elsewhere."""
    with api_errors(), make_client(url, token) as client:
        revoked = _call(client, "DELETE", f"/v1/join-tokens/{token_id}")
    node = f"; node {revoked['node']!r} is shut out" if revoked.get("node") else ""
    print(f"revoked join token {revoked['id']} ({revoked['name']}){node}")
