"""Built-in `photo` plugin: classify a photo folder by EXIF and features, resize it in batches.

Both actions keep their results in a journal in the workspace and checkpoint
every `checkpoint_every` photos (see journal.py), so a rerun after a crash
continues from the checkpoint and lists every photo exactly once.
"""

from __future__ import annotations

from typing import Any

from edgefleet.plugin_context import PluginContext
from edgefleet.pluginkit.actions import dispatch

# Relative imports under the catalog's loader; plain ones where the sandbox puts the folder on sys.path.
try:
    from .classify import classify
    from .resize import resize
except ImportError:
    from classify import classify  # type: ignore[no-redef]
    from resize import resize  # type: ignore[no-redef]

ACTIONS = {"classify": classify, "resize": resize}


def run(ctx: PluginContext, action: str, args: dict[str, Any]) -> dict[str, Any]:
    """Entry point named in plugin.yaml."""
    return dispatch(ctx, action, args, plugin="photo", actions=ACTIONS)
