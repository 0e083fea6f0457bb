"""The address a node advertises to the fleet: where other boxes (Prometheus, the router) reach it.

Order: a configured URL (`EDGEFLEET_WORKER_METRICS_URL`); a configured host
(`EDGEFLEET_WORKER_ADVERTISE_HOST`); the address the metrics server is bound to, when it is
bound to one (127.0.0.1 on a one-box cluster is right); else this box's address on the
route to the broker, which is the interface the rest of the cluster shares with it. A
wildcard bind address (0.0.0.0, ::) is never advertised.
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

from edgefleet.netguard import is_loopback_host

WILDCARDS = frozenset({"", "0.0.0.0", "::", "[::]", "*"})
# TEST-NET-1 (RFC 5737): connecting a UDP socket to it picks the default route's interface
# without sending a packet.
_DEFAULT_ROUTE_PROBE = "192.0.2.1"


def _local_address_towards(host: str, port: int) -> str | None:
    """The source address the kernel would use to reach host:port (a UDP "connect" sends nothing)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except (socket.gaierror, UnicodeError):
        return None
    for family, kind, proto, _, address in infos:
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.connect(address)
                local = sock.getsockname()[0]
        except OSError:
            continue
        if isinstance(local, str) and local not in WILDCARDS:
            return local.split("%", 1)[0]  # drop an IPv6 zone id
    return None


def route_address(broker_url: str) -> str:
    """This box's address on the route to the broker.

    A broker on this box (loopback or a unix socket) says nothing about the LAN: then the
    default route's address, so that Prometheus on another box still reaches a node that
    listens on every interface; 127.0.0.1 when there is no route at all."""
    parts = urlsplit(broker_url)
    host = parts.hostname
    if parts.scheme != "unix" and host:
        try:
            port = parts.port or 6379
        except ValueError:
            port = 6379
        local = _local_address_towards(host, port)
        if local is not None and not is_loopback_host(local):
            return local
    return _local_address_towards(_DEFAULT_ROUTE_PROBE, 9) or "127.0.0.1"


def url_host(address: str) -> str:
    """An address as the host part of a URL (IPv6 in brackets)."""
    return f"[{address}]" if ":" in address and not address.startswith("[") else address


def advertised_host(bind_host: str, advertise_host: str | None, broker_url: str) -> str:
    """The host other boxes reach a server of this node at that is bound to `bind_host`."""
    if advertise_host:
        return advertise_host  # the operator knows best (NAT, a proxy, a DNS name)
    if bind_host not in WILDCARDS:
        return bind_host  # bound to one address (127.0.0.1 included): that is the only one that answers
    return route_address(broker_url)


def advertised_metrics_url(
    configured_url: str | None, bind_host: str, advertise_host: str | None, broker_url: str, port: int
) -> str:
    if configured_url:
        return configured_url
    return f"http://{url_host(advertised_host(bind_host, advertise_host, broker_url))}:{port}/metrics"
