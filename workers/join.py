"""`edgefleet worker --join`: a box asks the router for its own credentials and checks them.

1. `POST <router>/v1/join` with the join token as the bearer: the router makes this node's
   Redis ACL user and answers with a broker URL carrying it, the router URL and a node token.
2. With a rediss:// broker the router's CA certificate comes along: written next to the
   credentials and named in the broker URL (`ssl_ca_certs`), so that the node verifies Redis.
3. The node connects to the broker as its new user (AUTH + PING) and calls the router with
   its node token (`GET /v1/join/node`); only when both answer is it joined. Otherwise a
   `JoinError` names what failed (the router, the join token, the broker) and why.
4. The credentials go to `<data dir>/node.env` (mode 0600; `KEY=value` lines, what a systemd
   `EnvironmentFile` reads), never to a command line or a log: the class workers get them
   through the environment.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
import redis

from edgefleet.node_join import JoinGrant
from edgefleet.private_files import write_private

NODE_ENV_FILE = "node.env"
BROKER_CA_FILE = "broker-ca.pem"
CHECK_TIMEOUT = 10.0


class JoinError(Exception):
    """The join failed: `what` is the part that failed (router, join token, broker), `reason` why."""

    def __init__(self, what: str, reason: str) -> None:
        super().__init__(f"{what}: {reason}")
        self.what = what
        self.reason = reason


@dataclass(frozen=True)
class Joined:
    node_name: str
    router_url: str
    broker_url: str  # carries the node's password: never print or log it
    node_token: str
    acl_user: str
    env_file: Path

    def environment(self) -> dict[str, str]:
        """The settings a joined node runs with (what node.env holds)."""
        return {
            "EDGEFLEET_REDIS_URL": self.broker_url,
            "EDGEFLEET_ROUTER_URL": self.router_url,
            "EDGEFLEET_NODE_NAME": self.node_name,
            "EDGEFLEET_NODE_TOKEN": self.node_token,
            # The node's Redis user has no remote-control channel (edgefleet/store/acl.py).
            "EDGEFLEET_WORKER_REMOTE_CONTROL": "false",
        }


def redacted(url: str) -> str:
    """A Redis URL fit for a message: user kept, password replaced."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, f"{user}:***@{host}", parts.path, parts.query, parts.fragment))


def read_token_file(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise JoinError("--token-file", f"cannot read {path}: {exc.strerror}") from exc
    if not token:
        raise JoinError("--token-file", f"{path} is empty")
    return token


def read_env_file(path: Path) -> dict[str, str]:
    """`KEY=value` lines (comments and blank lines skipped), as `write_env_file` writes them."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def write_env_file(path: Path, values: dict[str, str]) -> None:
    # Values are URLs and hex tokens: no quoting needed for systemd or a shell's `set -a; .`.
    lines = ["# edgefleet node credentials, written by `edgefleet worker --join`; keep private (0600)"]
    lines += [f"{key}={value}" for key, value in values.items()]
    write_private(path, "\n".join(lines) + "\n")


def _with_ca(broker_url: str, ca_file: Path) -> str:
    parts = urlsplit(broker_url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("ssl_ca_certs", "ssl_cert_reqs")]
    query += [("ssl_cert_reqs", "required"), ("ssl_ca_certs", str(ca_file))]
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), parts.fragment))


def request_join(router_url: str, join_token: str, node_name: str, timeout: float = CHECK_TIMEOUT) -> JoinGrant:
    """Step 1: the router's answer to this join token, or JoinError naming the router or the token."""
    try:
        response = httpx.post(
            f"{router_url.rstrip('/')}/v1/join",
            json={"node_name": node_name},
            headers={"Authorization": f"Bearer {join_token}", "User-Agent": "edgefleet-worker"},
            timeout=timeout,
        )
    except httpx.HTTPError as exc:
        raise JoinError("router", f"cannot reach {router_url}: {exc or type(exc).__name__}") from None
    if response.status_code != 200:
        reason = _reason(response)
        if response.status_code == 401:
            raise JoinError("join token", f"refused by {router_url}: {reason}")
        raise JoinError("router", f"{router_url} answered HTTP {response.status_code}: {reason}")
    try:
        return JoinGrant.model_validate(response.json())
    except ValueError as exc:
        raise JoinError("router", f"{router_url} answered something that is not a join grant: {exc}") from None


def _reason(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail") or []
        return "; ".join(
            f"{d.get('field')}: {d.get('reason')}" if d.get("field") else str(d.get("reason")) for d in detail
        )
    except (ValueError, AttributeError):
        return response.text[:200] or response.reason_phrase


def check_broker(broker_url: str, timeout: float = CHECK_TIMEOUT) -> None:
    """Step 3a: connect as the node's own user (AUTH) and PING, else JoinError naming the broker."""
    client = redis.Redis.from_url(broker_url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        client.ping()
    except redis.AuthenticationError as exc:
        raise JoinError("broker", f"{redacted(broker_url)} refused this node's credentials: {exc}") from None
    except redis.ResponseError as exc:
        raise JoinError("broker", f"{redacted(broker_url)} refused PING: {exc}") from None
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        raise JoinError("broker", f"cannot reach {redacted(broker_url)}: {exc}") from None
    finally:
        client.close()


def check_router(router_url: str, node_token: str, timeout: float = CHECK_TIMEOUT) -> None:
    """Step 3b: an authenticated GET with the node token, else JoinError naming the router."""
    try:
        response = httpx.get(
            f"{router_url.rstrip('/')}/v1/join/node",
            headers={"Authorization": f"Bearer {node_token}", "User-Agent": "edgefleet-worker"},
            timeout=timeout,
        )
    except httpx.HTTPError as exc:
        raise JoinError("router", f"cannot reach {router_url} with the node token: {exc}") from None
    if response.status_code != 200:
        raise JoinError(
            "router", f"{router_url} refused the node token: HTTP {response.status_code} {_reason(response)}"
        )


def join_cluster(router_url: str, join_token: str, node_name: str, data_dir: Path) -> Joined:
    """Steps 1-4: ask, check both ends, then keep the credentials in <data_dir>/node.env."""
    grant = request_join(router_url, join_token, node_name)
    broker_url = grant.broker_url
    if grant.broker_ca_pem:
        ca_file = data_dir / BROKER_CA_FILE
        write_private(ca_file, grant.broker_ca_pem)
        broker_url = _with_ca(broker_url, ca_file)
    check_broker(broker_url)
    check_router(grant.router_url, grant.node_token)
    joined = Joined(
        node_name=grant.node_name,
        router_url=grant.router_url,
        broker_url=broker_url,
        node_token=grant.node_token,
        acl_user=grant.acl_user,
        env_file=data_dir / NODE_ENV_FILE,
    )
    write_env_file(joined.env_file, joined.environment())
    return joined
