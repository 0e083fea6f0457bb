"""Outbound HTTP to URLs a user chose (webhooks, fetches): checked after DNS resolution, then pinned.

A URL is refused unless every address its host resolves to is a public one, or one
an operator allowed. The address that passed is the one connected to: the request's
URL host is replaced by that IP while the `Host` header and the TLS server name
(SNI, and so certificate checking) keep the original name, so a second DNS answer
(DNS rebinding) can never redirect the connection. Integer, octal and hex IPv4
forms ("2130706433", "0x7f.1") need no special case: the resolver normalises them
and the address it returns is what is checked.

This module imports nothing from the router or workers; callers pass in what they
know about the cluster's own endpoints.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
AddrInfo = list[tuple[Any, Any, Any, Any, Any]]
Resolver = Callable[[str, int], AddrInfo]

DEFAULT_MAX_URL_LENGTH = 2048
_PRIVATE = tuple(
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class RefusedURL(ValueError):
    """Why an outbound URL may not be used. The message never repeats the URL (it may hold secrets)."""


@dataclass(frozen=True)
class Target:
    """A URL that passed the syntax checks: what to resolve and how to speak to it."""

    url: httpx.URL
    host: str  # as the resolver takes it: IDNA-encoded, IPv6 without brackets
    port: int

    @property
    def destination(self) -> str:
        """host:port, the unit of per-destination limits."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Pinned:
    """A target with the one address it was checked against and will be connected to."""

    target: Target
    ip: IPAddress

    @property
    def connect_url(self) -> httpx.URL:
        return self.target.url.copy_with(host=str(self.ip))


def is_loopback_host(host: str | None) -> bool:
    """Whether a host as written in a URL or option names this machine's loopback (no host: yes).
    Names other than `localhost` are not resolved: they count as beyond loopback."""
    if not host or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def address_kind(ip: IPAddress) -> str | None:
    """What kind of non-public address `ip` is, or None for a public one.

    IPv6 forms that carry an IPv4 address (mapped, 6to4, Teredo, NAT64,
    IPv4-compatible) are judged by that IPv4 address as well."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None and (kind := address_kind(embedded)) is not None:
            return kind
    if ip.is_unspecified:
        return "unspecified"  # 0.0.0.0 and :: reach the local host on Linux
    if ip.is_multicast:
        return "multicast"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"  # 169.254.169.254 is the cloud metadata service
    if any(ip in net for net in _PRIVATE):
        return "private"
    if not ip.is_global or ip.is_reserved:
        return "reserved"
    return None


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    value = int(ip)
    if ip in _NAT64 or (value >> 32 == 0 and value > 1):  # NAT64 and deprecated ::a.b.c.d
        return ipaddress.IPv4Address(value & 0xFFFFFFFF)
    return None


def _system_resolver(host: str, port: int) -> AddrInfo:
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)


def local_addresses() -> set[IPAddress]:
    """This host's interface addresses: a service bound to a wildcard is reachable on each."""
    import psutil

    found: set[IPAddress] = set()
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family in (socket.AF_INET, socket.AF_INET6):
                try:
                    found.add(ipaddress.ip_address(addr.address.split("%", 1)[0]))
                except ValueError:
                    continue
    return found


@dataclass
class OutboundGuard:
    """The outbound-address rule.

    `allow_private` admits loopback and private (RFC 1918, ULA, CGNAT) addresses;
    `allowed_networks` admits any address inside them (link-local only this way).
    Unspecified and multicast addresses and the cluster's own endpoints (`own_ports`
    on `own_addresses`, loopback or any local interface) are refused whatever is allowed.
    """

    allow_private: bool = False
    allowed_networks: Sequence[IPNetwork] = ()
    own_ports: frozenset[int] = frozenset()
    own_addresses: frozenset[IPAddress] = frozenset()
    max_url_length: int = DEFAULT_MAX_URL_LENGTH
    resolver: Resolver = field(default=_system_resolver, repr=False)

    @classmethod
    def build(
        cls,
        *,
        allow_private: bool = False,
        allowed_networks: Iterable[IPNetwork | str] = (),
        own_endpoints: Iterable[tuple[str, int]] = (),
        max_url_length: int = DEFAULT_MAX_URL_LENGTH,
        resolver: Resolver = _system_resolver,
    ) -> OutboundGuard:
        """Resolve the cluster's own endpoints (host, port) once; a wildcard host means every local address."""
        ports: set[int] = set()
        addresses: set[IPAddress] = set()
        for host, port in own_endpoints:
            ports.add(port)
            try:
                infos = resolver(host, port) if host else []
            except OSError:
                infos = []
            for info in infos:
                ip = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
                addresses.add(ip)
        if ports:
            addresses |= local_addresses()
        return cls(
            allow_private=allow_private,
            allowed_networks=tuple(ipaddress.ip_network(n, strict=False) for n in allowed_networks),
            own_ports=frozenset(ports),
            own_addresses=frozenset(addresses),
            max_url_length=max_url_length,
            resolver=resolver,
        )

    # --- syntax --------------------------------------------------------------------------

    def parse(self, url: str) -> Target:
        """Length, scheme and host; no network."""
        if len(url) > self.max_url_length:
            raise RefusedURL(f"longer than {self.max_url_length} characters")
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, ValueError, TypeError) as exc:
            raise RefusedURL(f"not a valid URL ({type(exc).__name__})") from None
        if parsed.scheme not in ("http", "https"):
            raise RefusedURL("only http and https URLs are allowed")
        host = parsed.host.strip("[]").rstrip(".")
        if not host:
            raise RefusedURL("has no host")
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        return Target(url=parsed, host=host, port=port)

    # --- addresses -----------------------------------------------------------------------

    def refusal(self, ip: IPAddress, port: int) -> str | None:
        """Why a connection to ip:port is refused, or None."""
        if port in self.own_ports and (ip.is_loopback or ip in self.own_addresses or ip.is_unspecified):
            return "is one of the cluster's own services"
        kind = address_kind(ip)
        if kind is None:
            return None
        if kind in ("unspecified", "multicast"):
            return f"resolves to a {kind} address ({ip})"
        if any(ip in net for net in self.allowed_networks):
            return None
        if self.allow_private and kind in ("loopback", "private"):
            return None
        return f"resolves to a {kind} address ({ip})"

    def _pin(self, target: Target, infos: AddrInfo) -> Pinned:
        addresses: list[IPAddress] = []
        for info in infos:
            ip = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
            if ip not in addresses:
                addresses.append(ip)
        if not addresses:
            raise RefusedURL("host does not resolve")
        # Every answer must pass, not only the first: a name with one public and one
        # private address would otherwise reach the private one on a later lookup.
        for ip in addresses:
            if (why := self.refusal(ip, target.port)) is not None:
                raise RefusedURL(why)
        return Pinned(target=target, ip=addresses[0])

    def resolve(self, url: str | Target) -> Pinned:
        """Parse, resolve once, check every address; the first one is the one to connect to."""
        target = url if isinstance(url, Target) else self.parse(url)
        try:
            infos = self.resolver(target.host, target.port)
        except (OSError, UnicodeError) as exc:
            raise RefusedURL(f"host does not resolve ({type(exc).__name__})") from None
        return self._pin(target, infos)

    async def aresolve(self, url: str | Target) -> Pinned:
        """`resolve` without blocking the event loop (the lookup runs in the loop's executor)."""
        target = url if isinstance(url, Target) else self.parse(url)
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.run_in_executor(None, self.resolver, target.host, target.port)
        except (OSError, UnicodeError) as exc:
            raise RefusedURL(f"host does not resolve ({type(exc).__name__})") from None
        return self._pin(target, infos)

    def check_if_resolvable(self, url: str) -> None:
        """For submit time: syntax always, addresses when the name resolves now (it is checked again at use)."""
        target = self.parse(url)
        try:
            infos = self.resolver(target.host, target.port)
        except (OSError, UnicodeError):
            return
        self._pin(target, infos)

    async def acheck_if_resolvable(self, url: str, timeout: float) -> None:
        """`check_if_resolvable` that waits at most `timeout` for the lookup: a slow name server
        must not hold a request up; such a name is checked at use like one that does not resolve."""
        target = self.parse(url)
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(loop.run_in_executor(None, self.resolver, target.host, target.port), timeout)
        except (OSError, UnicodeError, TimeoutError):
            return
        self._pin(target, infos)


def _pin_request(request: httpx.Request, pinned: Pinned) -> None:
    # The Host header was set from the original URL when the request was built; only
    # the connection's address changes. For https the certificate is checked against
    # the original name through the SNI extension.
    request.url = pinned.connect_url
    if pinned.target.url.scheme == "https":
        request.extensions = {**request.extensions, "sni_hostname": pinned.target.host}


class PinnedTransport(httpx.BaseTransport):
    """Resolves and checks each request's host, then connects to exactly that address."""

    def __init__(self, guard: OutboundGuard, inner: httpx.BaseTransport | None = None) -> None:
        self.guard = guard
        self.inner = inner or httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        _pin_request(request, self.guard.resolve(str(request.url)))
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


class AsyncPinnedTransport(httpx.AsyncBaseTransport):
    """The asyncio twin of `PinnedTransport`."""

    def __init__(self, guard: OutboundGuard, inner: httpx.AsyncBaseTransport | None = None) -> None:
        self.guard = guard
        self.inner = inner or httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        _pin_request(request, await self.guard.aresolve(str(request.url)))
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def client(guard: OutboundGuard, timeout: float) -> httpx.Client:
    """A client that only reaches what the guard allows: no proxies from the environment
    (a proxy would make the connection, not us) and no redirects (each would need a check)."""
    return httpx.Client(transport=PinnedTransport(guard), trust_env=False, follow_redirects=False, timeout=timeout)


def async_client(guard: OutboundGuard, timeout: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=AsyncPinnedTransport(guard), trust_env=False, follow_redirects=False, timeout=timeout
    )
