"""A network plugin's own namespace (workers/sandbox_net.py): the internet yes; the host, link-local
and (without `network: lan`) private addresses no.

No cluster: each test starts bubblewrap itself, as the worker will (unprivileged uid, `--unshare-all`),
with a probe that waits for a go line on stdin, then connects where it is told and prints the results.
There is no internet here, so a network namespace `ef-inet-*` behind a veth pair stands in for it,
with a public (11.x) and a private (10.x) address and a listener on both.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # also run as a script by the non-root test
    sys.path.insert(0, str(ROOT))

from edgefleet.workers.sandbox_net import (  # noqa: E402
    DNS,
    GATEWAY,
    RESOLV_CONF,
    SandboxNetwork,
    blocked_networks,
    network_available,
    read_child_pid,
)

NOBODY = 65534
BANNER = "ef-inet"
INET_PORT = 8080  # in its own namespace: no clash possible
pytestmark = [pytest.mark.netns, pytest.mark.bwrap]

# The probe needs only the standard library; a venv's interpreter may live where uid 65534 cannot go.
PYTHON = next(p for p in ("/usr/bin/python3", sys.executable) if os.path.exists(p))

# Runs inside the sandbox: first tries to undo the routes (it must not manage), then each target.
PROBE = r"""
import errno, json, socket, subprocess, sys
targets = json.loads(sys.stdin.readline())
undo = subprocess.run([sys.argv[1], "route", "flush", "table", "main"], capture_output=True)
results = {"undo_rc": undo.returncode}
for t in targets:
    family = socket.AF_INET6 if ":" in t["host"] else socket.AF_INET
    kind = socket.SOCK_DGRAM if t.get("udp") else socket.SOCK_STREAM
    s = socket.socket(family, kind)
    s.settimeout(t.get("timeout", 3))
    try:
        if t.get("device"):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, t["device"].encode())
        s.connect((t["host"], t["port"]))
        results[t["name"]] = "ok:" + (s.recv(64).decode().strip() if t.get("banner") else "")
    except socket.timeout:
        results[t["name"]] = "timeout"
    except OSError as e:
        results[t["name"]] = errno.errorcode.get(e.errno, str(e))
    finally:
        s.close()
print(json.dumps(results), flush=True)
"""


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (starts bwrap as another uid and creates network namespaces)"
    if shutil.which("bwrap") is None:
        return "bwrap is not installed"
    return network_available()


@pytest.fixture()
def needs_sandbox_net() -> None:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@dataclass
class FakeInternet:
    """A namespace behind a veth pair, listening on a public and a private address."""

    public: str
    private: str
    host_side: list[str]  # the host's ends of the veth (host addresses, so blocked too)


@pytest.fixture(scope="module")
def internet() -> Iterator[FakeInternet]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    tag = f"{random.randrange(16**6):06x}"
    netns, host_if, ns_if = f"ef-inet-{tag}", f"efh{tag}", f"efn{tag}"
    a, b, c = random.randrange(1, 255), random.randrange(256), random.randrange(100, 255)
    public, private = f"11.{a}.{b}", f"10.{c}.{b}"  # 10.100+: never slirp's 10.0.2.0/24
    listener: subprocess.Popen[str] | None = None
    try:
        _ip("netns", "add", netns)
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", netns)
        for prefix in (public, private):
            _ip("address", "add", f"{prefix}.1/30", "dev", host_if)
            _ip("-n", netns, "address", "add", f"{prefix}.2/30", "dev", ns_if)
        _ip("link", "set", host_if, "up")
        _ip("-n", netns, "link", "set", ns_if, "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        serve = (
            "import socket\n"
            f"s = socket.create_server(('0.0.0.0', {INET_PORT}))\n"
            "print('ready', flush=True)\n"
            "while True:\n"
            f"    c, _ = s.accept(); c.sendall(b'{BANNER}\\n'); c.close()\n"
        )
        listener = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-c", serve], stdout=subprocess.PIPE, text=True
        )
        assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
        yield FakeInternet(public=f"{public}.2", private=f"{private}.2", host_side=[f"{public}.1", f"{private}.1"])
    finally:
        if listener is not None:
            listener.kill()
            listener.wait()
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)  # gone with the netns, unless that failed
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)


@pytest.fixture()
def host_listeners() -> Iterator[dict[str, int]]:
    """Listening sockets on the host's loopback and on every address (dual-stack where possible)."""
    loopback = socket.create_server(("127.0.0.1", 0))
    try:
        wildcard = socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True)
    except OSError:
        wildcard = socket.create_server(("0.0.0.0", 0))
    try:
        yield {"loopback": loopback.getsockname()[1], "wildcard": wildcard.getsockname()[1]}
    finally:
        loopback.close()
        wildcard.close()


def _host_targets(port: int) -> list[dict[str, Any]]:
    targets = []
    for entries in psutil.net_if_addrs().values():
        for entry in entries:
            try:
                address = ipaddress.ip_address(entry.address.split("%", 1)[0])
            except ValueError:
                continue
            if not address.is_loopback and not address.is_link_local:
                targets.append({"name": f"host {address}", "host": str(address), "port": port})
    return targets


def probe_sandbox(targets: list[dict[str, Any]], *, allow_lan: bool, user: int | None) -> dict[str, Any]:
    """Start bwrap (as `user`, or as this uid), attach its network, run PROBE on `targets`."""
    info_r, info_w = os.pipe()
    cmd = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--info-fd", str(info_w)]
    cmd += ["--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", "--chdir", "/", "--", PYTHON, "-c", PROBE]
    cmd.append(shutil.which("ip") or "ip")
    extra: dict[str, Any] = {"user": user, "group": user, "extra_groups": []} if user is not None else {}
    sandbox = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        pass_fds=[info_w],
        start_new_session=True,
        text=True,
        **extra,
    )
    os.close(info_w)
    network: SandboxNetwork | None = None
    try:
        network = SandboxNetwork.attach(read_child_pid(info_r, timeout=30), allow_lan=allow_lan, timeout=30)
        out, err = sandbox.communicate(json.dumps(targets) + "\n", timeout=60)
        assert sandbox.returncode == 0, err
        results: dict[str, Any] = json.loads(out)
        results["slirp_pid"] = network.pid
        return results
    finally:
        os.close(info_r)
        if sandbox.poll() is None:
            os.killpg(sandbox.pid, signal.SIGKILL)
        sandbox.wait()
        if network is not None:
            network.close()


def _standard_targets(internet: FakeInternet, ports: dict[str, int]) -> list[dict[str, Any]]:
    return [
        {"name": "internet", "host": internet.public, "port": INET_PORT, "banner": True},
        {"name": "lan", "host": internet.private, "port": INET_PORT, "banner": True},
        {"name": "own loopback", "host": "127.0.0.1", "port": ports["loopback"]},
        {"name": "slirp gateway", "host": GATEWAY, "port": ports["loopback"]},
        {"name": "slirp gateway on tap0", "host": GATEWAY, "port": ports["loopback"], "device": "tap0"},
        {"name": "slirp dns, other port", "host": DNS, "port": ports["loopback"]},
        {"name": "metadata", "host": "169.254.169.254", "port": 80},
        {"name": "dns route", "host": DNS, "port": 53, "udp": True},
        {"name": "gateway dns route", "host": GATEWAY, "port": 53, "udp": True},
        *_host_targets(ports["wildcard"]),
    ]


def _assert_host_contained(results: dict[str, Any], internet: FakeInternet) -> None:
    assert results["undo_rc"] != 0, "the plugin flushed its routes"
    assert results["internet"] == f"ok:{BANNER}"
    # Its own loopback: nothing listens there; the host's listener is not it.
    assert results["own loopback"] == "ECONNREFUSED"
    # Blocked by the routes: refused at once, before slirp sees a packet.
    assert results["slirp gateway"] == "EACCES"
    assert results["metadata"] == "EACCES"
    assert results["gateway dns route"] == "EACCES"
    assert results["dns route"] == "ok:"
    # Bound to tap0 the routes are skipped and the packet reaches slirp: its --disable-host-loopback holds.
    assert not results["slirp gateway on tap0"].startswith("ok")
    # slirp forwards only port 53 of its DNS address (to the host's resolver).
    assert not results["slirp dns, other port"].startswith("ok")
    hosts = {name: value for name, value in results.items() if name.startswith("host ")}
    assert {f"host {address}" for address in internet.host_side} <= hosts.keys()
    assert all(value in ("EACCES", "ENETUNREACH") for value in hosts.values()), hosts


def test_blocked_networks_cover_host_and_keep_dns() -> None:
    host = [ipaddress.ip_address(a) for a in ("127.0.0.1", "192.0.2.2", "10.1.2.3", "fd00::2", "::1")]
    closed = {str(net) for net in blocked_networks(allow_lan=False, host=host)}
    lan = {str(net) for net in blocked_networks(allow_lan=True, host=host)}
    for net in ("169.254.0.0/16", "fe80::/10", f"{GATEWAY}/32", "192.0.2.2/32", "10.1.2.3/32", "fd00::2/128"):
        assert net in lan
    for net in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7"):
        assert net in closed and net not in lan
    assert "10.1.2.3/32" not in closed  # inside 10/8 already
    assert not any(ipaddress.ip_address(DNS) in ipaddress.ip_network(net) and net != "10.0.0.0/8" for net in closed)
    assert not any(ipaddress.ip_network(net).is_loopback for net in closed | lan)
    assert f"nameserver {DNS}\n" == RESOLV_CONF


def test_network_reaches_internet_not_host_nor_lan(
    needs_sandbox_net: None, internet: FakeInternet, host_listeners: dict[str, int]
) -> None:
    # A socket bound to tap0 skips the routes (the kernel takes the destination as on-link),
    # but slirp answers ARP for its own 10.0.2.2 and 10.0.2.3 only: nothing else answers.
    bound = [
        {"name": "lan on tap0", "host": internet.private, "port": INET_PORT, "device": "tap0", "timeout": 1},
        {"name": "metadata on tap0", "host": "169.254.169.254", "port": 80, "device": "tap0", "timeout": 1},
    ]
    results = probe_sandbox(_standard_targets(internet, host_listeners) + bound, allow_lan=False, user=NOBODY)
    _assert_host_contained(results, internet)
    assert results["lan"] == "EACCES"
    assert not results["lan on tap0"].startswith("ok")
    assert not results["metadata on tap0"].startswith("ok")
    assert not psutil.pid_exists(results["slirp_pid"])


def test_lan_opens_private_ranges_but_not_host(
    needs_sandbox_net: None, internet: FakeInternet, host_listeners: dict[str, int]
) -> None:
    results = probe_sandbox(_standard_targets(internet, host_listeners), allow_lan=True, user=NOBODY)
    _assert_host_contained(results, internet)
    assert results["lan"] == f"ok:{BANNER}"


def test_non_root_worker_same_uid(
    needs_sandbox_net: None, internet: FakeInternet, host_listeners: dict[str, int], tmp_path: Path
) -> None:
    """A worker running as an unprivileged uid starts bwrap and attaches as that same uid."""
    setup = "exec "
    if not _uid_can_use_tun(NOBODY):
        # Debian hosts make /dev/net/tun 0666; this box may not: give the child a private
        # mount view with such a node, leaving the machine's own as it is.
        node = tmp_path / "tun"
        os.mknod(node, 0o666 | 0o020000, os.makedev(10, 200))
        os.chmod(node, 0o666)
        setup = f"mount --bind {node} /dev/net/tun && exec "
    targets = _standard_targets(internet, host_listeners)
    child = subprocess.run(
        ["unshare", "--mount", "--", "sh", "-c",
         setup + f'setpriv --reuid {NOBODY} --regid {NOBODY} --clear-groups "$0" "$1" "$2"',
         sys.executable, __file__, json.dumps(targets)],
        capture_output=True, text=True, timeout=120, cwd="/",
    )  # fmt: skip
    assert child.returncode == 0, child.stderr[-3000:]
    results = json.loads(child.stdout)
    assert results["uid"] == NOBODY
    _assert_host_contained(results, internet)
    assert results["lan"] == "EACCES"


def _uid_can_use_tun(uid: int) -> bool:
    done = subprocess.run(
        ["setpriv", "--reuid", str(uid), "--regid", str(uid), "--clear-groups", "sh", "-c", "test -r /dev/net/tun -a -w /dev/net/tun"],
        cwd="/",
    )  # fmt: skip
    return done.returncode == 0


def test_close_and_owner_death_leave_no_slirp(needs_sandbox_net: None) -> None:
    """Ten attach/close rounds (timed, for the record) and an owner killed with -9: no slirp4netns stays."""
    timings = []
    for _ in range(10):
        info_r, info_w = os.pipe()
        sandbox = subprocess.Popen(
            ["bwrap", "--unshare-all", "--die-with-parent", "--info-fd", str(info_w), "--ro-bind", "/", "/",
             "--proc", "/proc", "--dev", "/dev", "--", "sleep", "60"],
            pass_fds=[info_w], user=NOBODY, group=NOBODY, extra_groups=[], cwd="/", start_new_session=True,
        )  # fmt: skip
        os.close(info_w)
        try:
            pid = read_child_pid(info_r, timeout=30)
            started = time.perf_counter()
            network = SandboxNetwork.attach(pid, timeout=30)
            timings.append(time.perf_counter() - started)
            assert psutil.Process(network.pid).name() == "slirp4netns"
            network.close()
            network.close()
            assert network.proc.returncode is not None
            assert not psutil.pid_exists(network.pid)
        finally:
            os.close(info_r)
            os.killpg(sandbox.pid, signal.SIGKILL)
            sandbox.wait()
    print(f"attach median {statistics.median(timings) * 1000:.1f} ms over {len(timings)}")

    # A worker killed with -9 never calls close(): slirp4netns goes with it (--exit-fd).
    owner = subprocess.Popen(
        [sys.executable, "-c", _OWNER, __file__], stdout=subprocess.PIPE, text=True, cwd="/", start_new_session=True
    )
    try:
        assert owner.stdout is not None
        slirp_pid = int(owner.stdout.readline())
        assert psutil.Process(slirp_pid).name() == "slirp4netns"
        os.killpg(owner.pid, signal.SIGKILL)
        owner.wait()
        deadline = time.monotonic() + 30
        while not _exited(slirp_pid):
            assert time.monotonic() < deadline, "slirp4netns outlived its owner"
            time.sleep(0.05)
    finally:
        if owner.poll() is None:
            os.killpg(owner.pid, signal.SIGKILL)
            owner.wait()


def _exited(pid: int) -> bool:
    """Gone, or a zombie nobody reaps (its parent, the owner, is dead)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


_OWNER = """
import os, subprocess, sys, time
sys.path.insert(0, os.path.dirname(os.path.dirname(sys.argv[1])))
from edgefleet.workers.sandbox_net import SandboxNetwork, read_child_pid
r, w = os.pipe()
subprocess.Popen(["bwrap", "--unshare-all", "--die-with-parent", "--info-fd", str(w), "--ro-bind", "/", "/",
                  "--proc", "/proc", "--dev", "/dev", "--", "sleep", "60"], pass_fds=[w], user=65534, group=65534,
                 extra_groups=[])
os.close(w)
network = SandboxNetwork.attach(read_child_pid(r, timeout=30), timeout=30)
print(network.pid, flush=True)
time.sleep(60)
"""


if __name__ == "__main__":
    # The non-root test's child: this uid starts the sandbox and attaches its network.
    found = probe_sandbox(json.loads(sys.argv[1]), allow_lan=False, user=None)
    found["uid"] = os.getuid()
    print(json.dumps(found))
