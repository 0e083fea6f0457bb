"""Process hardening every cluster process applies to itself at start."""

from __future__ import annotations

import ctypes
import sys

PR_SET_DUMPABLE = 4


def make_undumpable() -> bool:
    """Refuse ptrace and `/proc/<pid>/environ`/`mem` to other processes of our uid (a plugin running as
    the worker's uid where it could not switch): our environment holds the cluster's secrets.
    Kept across fork (Celery's pool children), reset by exec, so each program calls it itself."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False
