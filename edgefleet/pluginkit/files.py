"""Reading the JSON manifests that one step writes and the next one reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def load_manifest(
    manifest: Path, *, producer: str, key: str = "photos", required: str = "path"
) -> list[dict[str, Any]]:
    """The `key` list of the JSON file `manifest`, each entry a dict with a `required` field.

    Every failure is a ValueError that names the file, and, for a file of the
    wrong kind, which step's output was expected (`producer`, e.g.
    "photo.classify"): the usual cause is a workflow wired to the wrong step.
    """
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"manifest: cannot read {str(manifest)!r}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ValueError(f"manifest: {str(manifest)!r} is not JSON: {exc}") from None
    entries = data.get(key) if isinstance(data, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and required in e for e in entries):
        raise ValueError(f"manifest: {str(manifest)!r} has no '{key}' list (is it a {producer} manifest?)")
    return entries
