"""A seccomp filter (through libseccomp) that takes away process creation, network sockets and ptrace.

It is what enforces the `subprocess` and `network` permissions inside the
sandbox, with or without bubblewrap, and it denies every plugin ptrace and
process_vm_readv/writev, so not even a plugin running as its worker's uid can
read the worker's memory. Installed by the launcher in the child,
after Python has started and before any plugin code runs; it can never be
lifted by the plugin (seccomp filters are inherited and only ever narrowed).
"""

from __future__ import annotations

import ctypes
import errno
import os

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_EQ = 4
SCMP_CMP_MASKED_EQ = 7
CLONE_THREAD = 0x00010000
# Address families denied without `network` (numbers, to spare the child importing socket).
AF_INET, AF_INET6, AF_PACKET = 2, 10, 17
LIBRARY_NAMES = ("libseccomp.so.2", "libseccomp.so")
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
SOCK_FILTER_SIZE = 8  # struct sock_filter: u16 code, u8 jt, u8 jf, u32 k


def _errno_action(code: int) -> int:
    return 0x00050000 | (code & 0x0000FFFF)


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


class SeccompUnavailable(RuntimeError):
    pass


def _library() -> ctypes.CDLL:
    # Not ctypes.util.find_library: it imports subprocess, ~30 ms of every sandbox start.
    for name in LIBRARY_NAMES:
        try:
            lib = ctypes.CDLL(name, use_errno=True)
            break
        except OSError:
            continue
    else:
        raise SeccompUnavailable("libseccomp not found; install libseccomp2")
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.restype = ctypes.c_int
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.restype = ctypes.c_int
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    ]
    lib.seccomp_load.restype = ctypes.c_int
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_export_bpf.restype = ctypes.c_int
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    return lib


def available() -> bool:
    """Whether this box has libseccomp (macOS and minimal images may not): the worker's policy asks
    once, and its launchers then skip the filter instead of failing every plugin."""
    try:
        _library()
    except SeccompUnavailable:
        return False
    return True


def install(*, allow_subprocess: bool, allow_network: bool, allow_fork: bool = False) -> list[str]:
    """Install the filter in this process; returns what it denies (for the status report).

    `allow_fork` (a sandbox executor, which forks a process per subtask): without `subprocess`
    it may still fork, never exec; each forked subtask installs the filter without it on top."""
    lib = _library()
    ctx, denied = _build(lib, allow_subprocess=allow_subprocess, allow_network=allow_network, allow_fork=allow_fork)
    try:
        if lib.seccomp_load(ctx) != 0:
            raise SeccompUnavailable("seccomp_load failed")
    finally:
        lib.seccomp_release(ctx)
    return denied


def compile_program(*, allow_subprocess: bool, allow_network: bool) -> bytes:
    """The BPF program `install` would load (without `allow_fork`), for `load_program` later.

    A sandbox executor compiles its subtasks' filter once; each forked subtask then loads the
    finished program (microseconds) instead of building it with libseccomp (most of a
    millisecond, on every subtask)."""
    lib = _library()
    ctx, _ = _build(lib, allow_subprocess=allow_subprocess, allow_network=allow_network, allow_fork=False)
    read_end, write_end = os.pipe()
    try:
        # A filter of a few dozen 8-byte instructions: far below a pipe's buffer, so no reader is needed.
        if lib.seccomp_export_bpf(ctx, write_end) != 0:
            raise SeccompUnavailable("seccomp_export_bpf failed")
        os.close(write_end)
        write_end = -1
        chunks = []
        while chunk := os.read(read_end, 65536):
            chunks.append(chunk)
    finally:
        lib.seccomp_release(ctx)
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    program = b"".join(chunks)
    if not program or len(program) % SOCK_FILTER_SIZE:
        raise SeccompUnavailable("seccomp_export_bpf wrote no whole program")
    return program


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def load_program(program: bytes) -> None:
    """Load a program from `compile_program` into this process, as libseccomp's load would:
    no_new_privs, then the filter (it only ever narrows what is allowed)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise SeccompUnavailable(f"no_new_privs: {os.strerror(ctypes.get_errno())}")
    instructions = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // SOCK_FILTER_SIZE, ctypes.cast(instructions, ctypes.c_void_p))
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        raise SeccompUnavailable(f"loading the seccomp program: {os.strerror(ctypes.get_errno())}")


def _build(lib: ctypes.CDLL, *, allow_subprocess: bool, allow_network: bool, allow_fork: bool) -> tuple[int, list[str]]:
    """A libseccomp context with the rules (the caller releases it), and what it denies."""
    denied: list[str] = []
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        raise SeccompUnavailable("seccomp_init failed")

    def rule(name: str, action: int, *cmps: tuple[int, int, int, int]) -> None:
        number = lib.seccomp_syscall_resolve_name(name.encode())
        if number < 0:
            return  # not a syscall on this architecture
        array = (_ArgCmp * max(1, len(cmps)))(*[_ArgCmp(*c) for c in cmps])
        if lib.seccomp_rule_add_array(ctx, action, number, len(cmps), array) != 0:
            raise SeccompUnavailable(f"cannot add a seccomp rule for {name}")

    try:
        for name in ("ptrace", "process_vm_readv", "process_vm_writev", "kcmp"):
            rule(name, _errno_action(errno.EPERM))
        denied.append("ptrace")
        if not allow_subprocess:
            deny = _errno_action(errno.EPERM)
            for name in ("vfork", "execve", "execveat") if allow_fork else ("fork", "vfork", "execve", "execveat"):
                rule(name, deny)
            if not allow_fork:
                # Threads are clones with CLONE_THREAD; anything else is a new process.
                rule("clone", deny, (0, SCMP_CMP_MASKED_EQ, CLONE_THREAD, 0))
            # clone3 passes its flags in memory, out of a filter's reach: make callers fall back to clone.
            rule("clone3", _errno_action(errno.ENOSYS))
            denied.append("exec" if allow_fork else "process creation")
        if not allow_network:
            deny = _errno_action(errno.EACCES)
            for family in (AF_INET, AF_INET6, AF_PACKET):
                rule("socket", deny, (0, SCMP_CMP_EQ, family, 0))
            rule("io_uring_setup", _errno_action(errno.EPERM))
            denied.append("network sockets")
    except BaseException:
        lib.seccomp_release(ctx)
        raise
    return ctx, denied
