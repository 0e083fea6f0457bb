"""The outbound-address rule: what is refused, and that the checked address is the one connected to."""

from __future__ import annotations

import ipaddress
import shutil
import socket
import ssl
import subprocess
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import httpx
import pytest

from edgefleet.netguard import AddrInfo, OutboundGuard, RefusedURL, address_kind, client
from tests.conftest import serving

# The unspecified address, as a URL host or an endpoint a service advertises: nothing here binds it.
UNSPECIFIED = str(ipaddress.IPv4Address(0))

REFUSED_BY_DEFAULT = [
    "http://127.0.0.1/",
    "http://localhost:8080/hook",
    "http://[::1]/",
    "http://2130706433/",  # 127.0.0.1 as one integer
    "http://0x7f.1/",  # hex and short form
    "http://017700000001/",  # octal
    "http://169.254.169.254/latest/meta-data/",
    "http://10.1.2.3/",
    "http://192.168.1.10/",
    "http://172.31.0.1/",
    "http://100.64.0.1/",  # carrier-grade NAT (Tailscale)
    "http://[fd00::1]/",
    "http://[fe80::1]/",
    f"http://{UNSPECIFIED}/",
    "http://[::]/",
    "http://224.0.0.1/",
    "http://[::ffff:127.0.0.1]/",  # IPv4-mapped IPv6
    "http://[::ffff:169.254.169.254]/",
    "http://[64:ff9b::a9fe:a9fe]/",  # NAT64 form of 169.254.169.254
    "http://[2002:7f00:1::]/",  # 6to4 form of 127.0.0.1
    "http://240.0.0.1/",
]


@pytest.mark.parametrize("url", REFUSED_BY_DEFAULT)
def test_non_public_targets_are_refused(url: str) -> None:
    with pytest.raises(RefusedURL, match="resolves to a"):
        OutboundGuard().resolve(url)


@pytest.mark.parametrize("ip", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "93.184.216.34"])
def test_public_addresses_pass(ip: str) -> None:
    assert address_kind(ipaddress.ip_address(ip)) is None
    # An IP literal resolves without a network, so this is a full check.
    host = f"[{ip}]" if ":" in ip else ip
    pinned = OutboundGuard().resolve(f"https://{host}/hook")
    assert str(pinned.ip) == ip


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://example.com/", "only http and https"),
        ("file:///etc/passwd", "only http and https"),
        ("http:///nohost", "has no host"),
        ("http://example.com/" + "a" * 3000, "longer than 2048"),
    ],
)
def test_syntax_is_checked_before_any_lookup(url: str, reason: str) -> None:
    def no_lookup(host: str, port: int) -> AddrInfo:
        raise AssertionError("looked up a URL that should have been refused before")

    with pytest.raises(RefusedURL, match=reason):
        OutboundGuard(resolver=no_lookup).resolve(url)


def test_refusal_never_repeats_the_url() -> None:
    secret = "s3cr3t-token"
    with pytest.raises(RefusedURL) as info:
        OutboundGuard().resolve(f"http://user:{secret}@127.0.0.1/hook?key={secret}")
    assert secret not in str(info.value)


def test_allow_private_admits_loopback_and_lan_but_not_link_local() -> None:
    guard = OutboundGuard(allow_private=True)
    assert str(guard.resolve("http://localhost:9/").ip) == "127.0.0.1"
    assert str(guard.resolve("http://192.168.1.10/").ip) == "192.168.1.10"
    with pytest.raises(RefusedURL, match="link-local"):
        guard.resolve("http://169.254.169.254/")
    with pytest.raises(RefusedURL, match="unspecified"):
        guard.resolve(f"http://{UNSPECIFIED}/")


def test_allowed_networks_admit_only_their_addresses() -> None:
    guard = OutboundGuard.build(allowed_networks=["127.0.0.1/32", "169.254.0.0/16"])
    assert str(guard.resolve("http://2130706433:9/").ip) == "127.0.0.1"
    assert str(guard.resolve("http://169.254.169.254/").ip) == "169.254.169.254"
    with pytest.raises(RefusedURL, match="loopback"):
        guard.resolve("http://127.0.0.2/")
    with pytest.raises(RefusedURL, match="loopback"):
        guard.resolve("http://[::1]/")


def test_the_clusters_own_endpoints_are_refused_even_when_allowed() -> None:
    guard = OutboundGuard.build(
        allow_private=True, allowed_networks=["127.0.0.0/8"], own_endpoints=[("127.0.0.1", 6379), (UNSPECIFIED, 8700)]
    )
    for url in (
        "http://127.0.0.1:6379/",
        "http://localhost:6379/",
        "http://127.0.0.1:8700/v1/jobs",
        "http://2130706433:8700/",
        "http://0x7f.1:6379/",
    ):
        with pytest.raises(RefusedURL, match="cluster's own"):
            guard.resolve(url)
    # A wildcard-bound router is reachable on this host's other addresses too.
    for ip in guard.own_addresses:
        if not ip.is_loopback and ip.version == 4:
            with pytest.raises(RefusedURL, match="cluster's own"):
                guard.resolve(f"http://{ip}:8700/")
    assert str(guard.resolve("http://127.0.0.1:6380/").ip) == "127.0.0.1"


def test_every_answer_must_pass() -> None:
    def two_answers(host: str, port: int) -> AddrInfo:
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
        ]

    with pytest.raises(RefusedURL, match="loopback"):
        OutboundGuard(resolver=two_answers).resolve("http://mixed.invalid/")


def test_submit_time_check_skips_names_that_do_not_resolve_yet() -> None:
    guard = OutboundGuard()
    guard.check_if_resolvable("https://hooks.example.invalid/x")  # checked again at delivery
    with pytest.raises(RefusedURL, match="does not resolve"):
        guard.resolve("https://hooks.example.invalid/x")
    with pytest.raises(RefusedURL, match="loopback"):
        guard.check_if_resolvable("http://localhost/x")


class _Echo(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"{self.headers['Host']}|{self.server.server_address[0]}".encode()  # type: ignore[index]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


class _Rebinding:
    """A name server for one invented name whose answer changes after the first lookup."""

    def __init__(self, answers: list[str]) -> None:
        self.answers = answers
        self.lookups = 0

    def __call__(self, host: str, port: int) -> AddrInfo:
        if host != "rebind.invalid":
            return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        ip = self.answers[min(self.lookups, len(self.answers) - 1)]
        self.lookups += 1
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))]


def test_the_connection_goes_to_the_checked_address_with_the_original_host_header() -> None:
    with serving(_Echo) as base:
        port = httpx.URL(base).port
        assert port is not None
        resolver = _Rebinding(["127.0.0.1", "10.0.0.1"])
        guard = OutboundGuard.build(allowed_networks=["127.0.0.1/32"], resolver=resolver)
        with client(guard, timeout=10) as http:
            response = http.get(f"http://rebind.invalid:{port}/hook")
        # One lookup: the name is never resolved again between the check and the connect.
        assert resolver.lookups == 1
        assert response.status_code == 200
        assert response.text == f"rebind.invalid:{port}|127.0.0.1"
        # The next request resolves again and is refused, without connecting anywhere.
        with client(guard, timeout=10) as http, pytest.raises(RefusedURL, match="private"):
            http.get(f"http://rebind.invalid:{port}/hook")


def test_redirects_and_environment_proxies_are_not_followed(monkeypatch: pytest.MonkeyPatch) -> None:
    class Redirect(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    # A proxy from the environment would make the connection instead of us; it must be ignored.
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    with (
        serving(Redirect) as base,
        client(OutboundGuard.build(allowed_networks=["127.0.0.1/32"]), timeout=10) as http,
    ):
        response = http.get(f"{base}/start")
    assert response.status_code == 302


@pytest.fixture()
def tls_site(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real HTTPS server on 127.0.0.1 whose certificate names only hook.test."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=hook.test",
            "-addext",
            "subjectAltName=DNS:hook.test",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    names: list[str | None] = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.sni_callback = lambda _sock, name, _ctx: names.append(name)

    import threading
    from http.server import ThreadingHTTPServer

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"https://hook.test:{server.server_address[1]}", cert
        assert names[:1] == ["hook.test"]  # the pinned connection's TLS server name
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_https_to_a_pinned_address_checks_the_certificate_against_the_name(tls_site: tuple[str, Path]) -> None:
    from edgefleet.netguard import PinnedTransport

    url, cert = tls_site

    def hook_test(host: str, port: int) -> AddrInfo:
        assert host == "hook.test"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    guard = OutboundGuard.build(allowed_networks=["127.0.0.1/32"], resolver=hook_test)
    verify = ssl.create_default_context(cafile=str(cert))
    transport = PinnedTransport(guard, httpx.HTTPTransport(verify=verify))
    with httpx.Client(transport=transport, trust_env=False) as http:
        response = http.get(f"{url}/hook")
    assert response.status_code == 200
    assert response.text.startswith(f"hook.test:{httpx.URL(url).port}|")
    # The same server by its address fails the certificate check: the name is what is verified.
    with httpx.Client(verify=verify, trust_env=False) as http, pytest.raises(httpx.ConnectError):
        http.get(f"https://127.0.0.1:{httpx.URL(url).port}/hook")


def test_a_slow_name_server_does_not_hold_up_the_submit_time_check() -> None:
    import asyncio
    import threading

    answered = threading.Event()

    def slow(host: str, port: int) -> AddrInfo:
        answered.wait(5)  # the name server takes its time (released below)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    guard = OutboundGuard(resolver=slow)
    threading.Timer(1.0, answered.set).start()
    # Not refused, though the late answer is loopback: the check did not wait for it. The URL is
    # checked again (and resolved, however slowly) at delivery.
    asyncio.run(guard.acheck_if_resolvable("http://slow.invalid/", timeout=0.1))
    # An answer within the time is checked like any other.
    with pytest.raises(RefusedURL, match="loopback"):
        asyncio.run(guard.acheck_if_resolvable("http://slow.invalid/", timeout=5))
