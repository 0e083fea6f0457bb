"""Optional parts of an install (pip extras): is a module there, and the one-line error when it is not.

A command that needs an extra imports it inside `require_extra(...)`: a missing third-party module
becomes `error: <command>: no module named '<name>': install edgefleet with its '<extra>' extra ...` and exit code 2, instead of a traceback.
A missing module of edgefleet's own packages is a broken checkout, not a missing extra: re-raised.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator

from edgefleet.cli.common import fail

OWN_PACKAGES = frozenset({"edgefleet", "router", "workers", "plugins"})


def module_available(name: str) -> bool:
    """Whether `import name` can find the module (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module blocked in sys.modules
        return False


def install_hint(extra: str) -> str:
    return f"pip install 'edgefleet[{extra}]'"


@contextlib.contextmanager
def require_extra(extra: str, command: str) -> Iterator[None]:
    try:
        yield
    except ModuleNotFoundError as exc:
        root = (exc.name or "").split(".", 1)[0]
        if not root or root in OWN_PACKAGES:
            raise
        # The hint fits a missing core dependency too: installing the extra brings those as well.
        fail(command, f"no module named {root!r}: install edgefleet with its '{extra}' extra: {install_hint(extra)}")
