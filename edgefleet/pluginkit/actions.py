"""A plugin's entry point, argument checks and cancellation, done the same way in every plugin."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn

from edgefleet.plugin_context import PluginContext, SubtaskCancelled

Action = Callable[[PluginContext, dict[str, Any]], dict[str, Any]]


def dispatch(
    ctx: PluginContext, action: str, args: dict[str, Any], *, plugin: str, actions: Mapping[str, Action]
) -> dict[str, Any]:
    """Call the function for `action`, or refuse an action the plugin does not have.

    Every plugin's `run` (the entry point in plugin.yaml) does this; doing it
    here keeps the error message one shape, which names the plugin and lists
    its actions in the order given, so a typo in a workflow says what exists.
    """
    function = actions.get(action)
    if function is None:
        raise ValueError(f"{plugin} plugin has no action {action!r} (actions: {', '.join(actions)})")
    return function(ctx, args)


def stop_cancelled(ctx: PluginContext) -> NoReturn:
    """Raise the cancellation the subtask is under (timeout or cancel), whichever it is.

    `ctx.check_cancelled()` raises the precise SubtaskCancelled (with
    `timed_out` set for a deadline); the fallback raise makes sure that a
    caller that saw `ctx.cancelled` and has already stopped its work never
    carries on as if nothing happened.
    """
    ctx.check_cancelled()
    raise SubtaskCancelled("subtask was cancelled")


def absolute_dir_arg(args: dict[str, Any], key: str) -> Path:
    """`args[key]` as an absolute directory path, or a ValueError naming the argument.

    Plugins that keep data across jobs (an index, a cache) take such a
    directory; a relative path would land in this subtask's workspace and
    vanish with it, so it is refused rather than resolved.
    """
    raw = args.get(key)
    if not isinstance(raw, str) or not raw.strip():
        raise ValueError(f"'{key}' must be a non-empty path")
    path = Path(raw)
    if not path.is_absolute():
        raise ValueError(f"'{key}' must be an absolute path, got {raw!r}")
    return path
