"""Outbound network for a bubblewrap sandbox that cannot reach the host or the cluster.

A plugin with the `network` permission gets its own network namespace (bwrap's
`--unshare-net`, part of `--unshare-all`) instead of the host's. `SandboxNetwork.attach`
gives that namespace a `tap0` served by `slirp4netns` (user-mode TCP/IP: the
plugin's connections become ordinary sockets of the slirp4netns process on the
host) and, from outside, a routing table in which the cluster's and the host's
addresses are `prohibit` routes: connecting to them fails at once with EACCES.

Why slirp4netns and not pasta: slirp4netns has a switch for exactly this
(`--disable-host-loopback`: its gateway 10.0.2.2 no longer maps to the host's
127.0.0.1) and otherwise forwards nothing; its DNS forwarder 10.0.2.3 answers
port 53 only. pasta's defaults go the other way (`-T auto`/`-U auto` forward the
namespace's loopback ports to the host's, the gateway maps to the host unless
`--no-map-gw`, and it copies the host's own address into the namespace, so
"block the host's addresses" would block the sandbox's own), so every default
would have to be turned off and kept off across versions. pasta is faster for
bulk transfers; plugins fetch small things.

What holds, and what it rests on:
- Blocked (unless noted): slirp's gateway 10.0.2.2 (the host), 169.254.0.0/16 and
  fe80::/10 (cloud metadata, link-local), 0.0.0.0/8, every address of the host's
  own interfaces at attach time, and, without `allow_lan`, 10/8 (but slirp's DNS
  10.0.2.3), 172.16/12, 192.168/16, 100.64/10 and fc00::/7.
- 127.0.0.0/8 and ::1 are the namespace's own loopback: the kernel never routes
  them to tap0, and slirp would refuse the host's anyway.
- No IPv6 leaves the namespace: tap0 gets no IPv6 address (slirp4netns runs
  without `--enable-ipv6`), so the IPv6 routes above are a second line only.
- The routes are added by this process before tap0 is up, so there is no moment
  with a default route and without them. The plugin can undo them only with
  CAP_NET_ADMIN in the user namespace that owns its network namespace: start bwrap
  as an unprivileged uid (or with `--cap-drop ALL`), never as root with capabilities.
- A socket bound to tap0 (SO_BINDTODEVICE, unprivileged since Linux 5.7) skips the
  routes: the kernel then takes any destination as on-link and asks for it by ARP.
  slirp answers ARP only for its own 10.0.2.2 and 10.0.2.3, so such a socket reaches
  10.0.2.2 alone, where `--disable-host-loopback` refuses it, and the DNS port.
- Addresses the host gains after attach (DHCP, a new VPN) are not blocked.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from typing import IO

TAP = "tap0"
MTU = 65520
GUEST_ADDRESS = "10.0.2.100/24"  # slirp4netns's recommended guest address in its default 10.0.2.0/24
GATEWAY = "10.0.2.2"  # slirp's host alias: the host's loopback unless --disable-host-loopback
DNS = "10.0.2.3"  # slirp forwards port 53 here to the host's resolver
RESOLV_CONF = f"nameserver {DNS}\n"

# Blocked whatever the manifest says: the host (through slirp's alias), link-local
# (cloud metadata at 169.254.169.254) and "this network".
ALWAYS_BLOCKED = ("0.0.0.0/8", f"{GATEWAY}/32", "169.254.0.0/16", "fe80::/10")
# Private ranges: the cluster's Redis, router and metrics, and LAN devices. `network: lan` opens them.
PRIVATE = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")

_NS_GET_USERNS = 0xB701  # ioctl: the user namespace that owns a namespace (Linux >= 4.9)
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000

# Run in a fresh single-threaded interpreter (setns into a user namespace refuses
# threaded callers) when this process lacks CAP_NET_ADMIN over the namespace: join
# the namespace's owning user namespace, where it has every capability, then keep
# CAP_NET_ADMIN across exec as an ambient capability (exec drops a non-root uid's
# capabilities otherwise) and run `ip -batch -` on the routes from stdin.
_ENTER_AND_EXEC = f"""
import ctypes, os, sys
ip, user_fd, net_fd = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
libc = ctypes.CDLL(None, use_errno=True)
def ok(result):
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
ok(libc.setns(user_fd, {_CLONE_NEWUSER}))
ok(libc.setns(net_fd, {_CLONE_NEWNET}))
header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
data = (ctypes.c_uint32 * 6)()
ok(libc.capget(header, data))
data[2] |= 1 << 12  # inheritable |= CAP_NET_ADMIN (12): ambient needs it there
ok(libc.capset(header, data))
ok(libc.prctl(47, 2, 12, 0, 0))  # PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_NET_ADMIN
os.close(user_fd)
os.close(net_fd)
os.execv(ip, [ip, "-batch", "-"])
"""


class SandboxNetworkError(RuntimeError):
    """The namespace could not be given its network; the sandbox must not run with `network`."""


def network_available() -> str | None:
    """None when `attach` can work here, else why not (for `isolation` and skip reasons)."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if shutil.which("slirp4netns") is None:
        return "slirp4netns is not installed"
    if shutil.which("ip") is None:
        return "ip (iproute2) is not installed"
    if os.geteuid() == 0 and shutil.which("nsenter") is None:
        return "nsenter (util-linux) is not installed"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun does not exist"
    if os.geteuid() != 0:
        if not os.access("/dev/net/tun", os.R_OK | os.W_OK):
            return "/dev/net/tun is not readable and writable by this user"
        try:
            with open("/proc/sys/user/max_user_namespaces") as limit:
                if int(limit.read()) == 0:
                    return "user namespaces are disabled (user.max_user_namespaces = 0)"
        except (OSError, ValueError):
            return "cannot tell whether user namespaces are allowed"
    return None


def read_child_pid(info_fd: int, timeout: float = 5.0) -> int:
    """The sandbox's pid from the read end of bwrap's `--info-fd` pipe (a JSON object with "child-pid")."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        try:
            return int(json.loads(data)["child-pid"])
        except (ValueError, KeyError):
            pass
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([info_fd], [], [], left)[0]:
            raise SandboxNetworkError(f"bwrap reported no child pid within {timeout}s")
        chunk = os.read(info_fd, 4096)
        if not chunk:
            raise SandboxNetworkError(f"bwrap closed --info-fd without a child pid: {data[:200]!r}")
        data += chunk


def host_addresses() -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Every address of this host's interfaces (psutil), loopback included."""
    import psutil

    found: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for entries in psutil.net_if_addrs().values():
        for entry in entries:
            try:
                found.add(ipaddress.ip_address(entry.address.split("%", 1)[0]))
            except ValueError:
                continue  # link-layer (MAC) entries
    return found


def blocked_networks(
    *, allow_lan: bool, host: Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address]
) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """What gets a `prohibit` route in the sandbox's namespace."""
    names = ALWAYS_BLOCKED if allow_lan else ALWAYS_BLOCKED + PRIVATE
    nets = {ipaddress.ip_network(net) for net in names}
    for address in host:
        # Loopback is the namespace's own, never routed out (module doc).
        if not address.is_loopback and not any(address in net for net in nets):
            nets.add(ipaddress.ip_network(address))
    nets.discard(ipaddress.ip_network(DNS))
    return sorted(nets, key=lambda net: (net.version, net))


def _route_batch(blocked: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network], ipv6: bool) -> str:
    """`ip -batch` lines: the prohibit routes first, then tap0 up with its address and default route."""
    lines = [f"link set {TAP} mtu {MTU}"]
    if ipv6:
        lines.append(f"link set {TAP} addrgenmode none")  # no link-local address, so no fe80::/64 route
    for net in blocked:
        if net.version == 6 and not ipv6:
            continue
        lines.append(f"route replace prohibit {net}")
    lines += [
        # noprefixroute: no 10.0.2.0/24 link route, so the rest of slirp's subnet falls
        # under the routes above (slirp passes unknown 10.0.2.x addresses to the real network).
        f"address add {GUEST_ADDRESS} dev {TAP} noprefixroute",
        f"link set {TAP} up",
        f"route replace {DNS}/32 dev {TAP}",
        f"route replace default via {GATEWAY} dev {TAP} onlink",
    ]
    return "\n".join(lines) + "\n"


def _same_namespace(fd: int, path: str) -> bool:
    mine, theirs = os.stat(path), os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)


class SandboxNetwork:
    """The slirp4netns process serving one sandbox's network namespace. `close` it when the sandbox ends."""

    def __init__(self, proc: subprocess.Popen[bytes], exit_fd: int, stderr: IO[bytes], allow_lan: bool) -> None:
        self.proc = proc
        self.allow_lan = allow_lan
        self._exit_fd: int | None = exit_fd
        self._stderr = stderr

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    def attach(cls, child_pid: int, *, allow_lan: bool = False, timeout: float = 5.0) -> SandboxNetwork:
        """Give the network namespace of `child_pid` (bwrap's "child-pid") outbound access
        without the host, link-local and (unless `allow_lan`) private addresses.

        Call it before the plugin's run starts. Raises SandboxNetworkError (with
        slirp4netns's or ip's message) if anything fails; nothing is left running then.
        """
        reason = network_available()
        if reason:
            raise SandboxNetworkError(reason)
        slirp, ip = shutil.which("slirp4netns"), shutil.which("ip")
        assert slirp and ip
        try:
            net_fd = os.open(f"/proc/{child_pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise SandboxNetworkError(f"no network namespace for pid {child_pid}: {exc}") from exc
        user_fd: int | None = None
        try:
            if _same_namespace(net_fd, "/proc/self/ns/net"):
                raise SandboxNetworkError(f"pid {child_pid} shares this process's network namespace (--share-net?)")
            # The owner of the network namespace, not /proc/<pid>/ns/user: bwrap may nest
            # another user namespace (for --uid) after it reports the pid.
            owner_fd = fcntl.ioctl(net_fd, _NS_GET_USERNS)
            if os.geteuid() == 0 or _same_namespace(owner_fd, "/proc/self/ns/user"):
                os.close(owner_fd)  # root (or its owner) already holds CAP_NET_ADMIN over it
            else:
                user_fd = owner_fd
            network = cls._start_slirp(slirp, net_fd, user_fd, allow_lan, timeout)
            try:
                batch = _route_batch(
                    blocked_networks(allow_lan=allow_lan, host=host_addresses()),
                    ipv6=os.path.exists("/proc/sys/net/ipv6"),
                )
                _run_ip_batch(ip, net_fd, user_fd, batch, timeout)
            except BaseException:
                network.close()
                raise
            return network
        finally:
            os.close(net_fd)
            if user_fd is not None:
                os.close(user_fd)

    @classmethod
    def _start_slirp(
        cls, slirp: str, net_fd: int, user_fd: int | None, allow_lan: bool, timeout: float
    ) -> SandboxNetwork:
        ready_r, ready_w = os.pipe()
        # slirp4netns exits when this pipe's write end closes: with close(), or when this process dies.
        exit_r, exit_w = os.pipe()
        stderr = tempfile.TemporaryFile(prefix="slirp4netns-")  # noqa: SIM115 - kept for slirp's lifetime
        cmd = [slirp, "--disable-host-loopback", "--mtu", str(MTU), "--ready-fd", str(ready_w)]
        cmd += ["--exit-fd", str(exit_r), "--enable-seccomp"]
        fds = [ready_w, exit_r, net_fd]
        if user_fd is None:
            # Its own mount namespace and no capabilities but CAP_NET_BIND_SERVICE. Only without
            # --userns-path: there it would setegid(0) in a namespace that maps only the sandbox's uid.
            cmd.append("--enable-sandbox")
        else:
            cmd.append(f"--userns-path=/proc/self/fd/{user_fd}")
            fds.append(user_fd)
        # Not --configure: the routes below must exist before tap0 has an address and a default route.
        cmd += ["--netns-type=path", f"/proc/self/fd/{net_fd}", TAP]
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                pass_fds=fds,
                start_new_session=True,  # a terminal's Ctrl-C goes to the worker, which closes us in order
            )
        except OSError:
            for fd in (ready_r, ready_w, exit_r, exit_w):
                os.close(fd)
            stderr.close()
            raise
        os.close(ready_w)
        os.close(exit_r)
        network = cls(proc, exit_w, stderr, allow_lan)
        try:
            ready = select.select([ready_r], [], [], timeout)[0] and os.read(ready_r, 1) == b"1"
        finally:
            os.close(ready_r)
        if not ready:
            why = network.stderr_tail() or f"no ready signal within {timeout}s"
            network.close()
            raise SandboxNetworkError(f"slirp4netns did not come up: {why}")
        return network

    def stderr_tail(self, chars: int = 2000) -> str:
        try:
            self._stderr.seek(0)
            return self._stderr.read().decode(errors="replace")[-chars:].strip()
        except (OSError, ValueError):
            return ""

    def close(self) -> None:
        """Stop slirp4netns (its pid only) and release what it held. Safe to call twice."""
        if self._exit_fd is not None:
            os.close(self._exit_fd)
            self._exit_fd = None
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        if not self._stderr.closed:
            self._stderr.close()

    def __enter__(self) -> SandboxNetwork:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _run_ip_batch(ip: str, net_fd: int, user_fd: int | None, batch: str, timeout: float) -> None:
    if user_fd is None:
        cmd = ["nsenter", f"--net=/proc/self/fd/{net_fd}", ip, "-batch", "-"]
        fds = [net_fd]
    else:
        cmd = [_any_python(), "-S", "-I", "-c", _ENTER_AND_EXEC, ip, str(user_fd), str(net_fd)]
        fds = [net_fd, user_fd]
    try:
        done = subprocess.run(cmd, input=batch.encode(), capture_output=True, pass_fds=fds, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise SandboxNetworkError(f"configuring the sandbox's routes took over {timeout}s") from exc
    if done.returncode != 0:
        raise SandboxNetworkError(
            f"configuring the sandbox's routes failed: {done.stderr.decode(errors='replace')[-2000:].strip()}"
        )


def _any_python() -> str:
    """An interpreter this uid may run: the helper needs only the standard library
    (a venv's interpreter can be a link into a folder other users cannot enter)."""
    for candidate in (sys.executable, shutil.which("python3")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise SandboxNetworkError("no Python interpreter this user may run, for entering the namespace")
