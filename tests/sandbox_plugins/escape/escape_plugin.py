"""Each action tries one way out of the sandbox."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from typing import Any


def run(ctx: Any, action: str, args: dict[str, Any]) -> dict[str, Any]:
    if action == "write_outside":
        with open(args["path"], "w") as f:
            f.write("escaped")
        return {"wrote": args["path"]}
    if action == "big_file":
        with open(ctx.workspace / "big.bin", "wb") as f:
            f.write(b"x" * (4 * 1024 * 1024))
        return {"wrote": "4 MB"}
    if action == "open_socket":
        with socket.create_connection(("127.0.0.1", args["port"]), timeout=5) as conn:
            conn.sendall(b"escaped")
        return {"connected": True}
    if action == "spawn":
        return {"code": subprocess.run(["true"]).returncode}
    if action == "fork_bomb":
        children = 0
        while children < 10_000:
            if os.fork() == 0:
                time.sleep(60)
                os._exit(0)
            children += 1
        return {"children": children}
    if action == "memory_bomb":
        hog = []
        while True:
            hog.append(bytearray(32 * 1024 * 1024))
    if action == "cpu_spin":
        while True:
            pass
    if action == "ignore_cancel":
        if args.get("marker"):
            with open(ctx.workspace / "started", "w") as f:
                f.write(str(os.getpid()))
        while True:  # never looks at ctx.cancelled
            time.sleep(0.05)
    if action == "read_secret_env":
        return {"env": sorted(os.environ)}
    return _more(ctx, action, args)


def _more(ctx: Any, action: str, args: dict[str, Any]) -> dict[str, Any]:
    """The trust model's escapes: each tries to reach what only the cluster may touch."""
    if action == "read_file":
        with open(args["path"], "rb") as f:
            return {"read": f.read(200).decode("latin-1")}
    if action == "whoami":
        with open("/proc/self/status") as f:
            status = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
        return {"uid": os.getuid(), "euid": os.geteuid(), "groups": os.getgroups(), "cap_eff": status["CapEff"].strip()}
    if action == "proc_environ":
        with open(f"/proc/{args['pid']}/environ", "rb") as f:
            return {"environ": f.read(200).decode("latin-1")}
    if action == "ptrace":
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.ptrace(16, args["pid"], None, None) != 0:  # PTRACE_ATTACH
            raise PermissionError(f"ptrace: {os.strerror(ctypes.get_errno())}")
        return {"attached": args["pid"]}
    if action == "kill_parent":
        os.kill(os.getppid(), 9)
        time.sleep(2)
        return {"killed": os.getppid()}
    if action == "flood_pipe":
        # Writes one endless line to every pipe it holds: the protocol stream is among them.
        chunk = b"x" * (1024 * 1024)
        for _ in range(args["mb"]):
            for fd in range(3, 12):
                try:
                    os.write(fd, chunk)
                except OSError:
                    pass
        return {"flooded": args["mb"]}
    if action == "big_output":
        return {"blob": "y" * (args["mb"] * 1024 * 1024)}
    if action == "fill_workspace":
        for i in range(args["files"]):
            with open(ctx.workspace / f"fill-{i}.bin", "wb") as f:
                f.write(b"z" * (900 * 1024))
        time.sleep(10)
        return {"filled": args["files"]}
    raise ValueError(action)
