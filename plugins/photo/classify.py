"""photo.classify: EXIF and simple visual features of every photo in a folder, checkpointed."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image

from edgefleet.plugin_context import PluginContext

# Relative imports under the catalog's loader; plain ones where the sandbox puts the folder on sys.path.
try:
    from . import imaging
    from .journal import Journal, fingerprint, write_json_atomic
except ImportError:
    import imaging  # type: ignore[no-redef]
    from journal import Journal, fingerprint, write_json_atomic  # type: ignore[no-redef]

MAX_ERRORS_IN_OUTPUT = 50


def find_images(source: Path, recursive: bool = True) -> list[Path]:
    """Image files under `source`, sorted by relative path; hidden files and folders skipped."""
    found: list[Path] = []
    for root, dirs, files in os.walk(source):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
        for name in files:
            if not name.startswith(".") and Path(name).suffix.lower() in imaging.IMAGE_EXTENSIONS:
                found.append(Path(root) / name)
    return sorted(found, key=lambda p: p.relative_to(source).as_posix())


def describe(path: Path, source: Path) -> dict[str, Any]:
    """One photo's entry for the manifest; an unreadable file gets an `error` instead of features."""
    entry: dict[str, Any] = {"path": str(path), "name": path.relative_to(source).as_posix()}
    try:
        entry["bytes"] = path.stat().st_size
        with Image.open(path) as img:
            entry["format"] = img.format
            stored_w, stored_h = img.size
            entry.update(imaging.read_exif(img))
            if img.format == "JPEG":
                img.draft("RGB", (imaging.FEATURE_EDGE, imaging.FEATURE_EDGE))
            features = imaging.visual_features(img)
    except Exception as exc:
        entry["error"] = f"{type(exc).__name__}: {exc}"[:500]
        return entry
    width, height = imaging.displayed_size(stored_w, stored_h, entry["orientation"])
    entry.update(width=width, height=height, shape=imaging.shape_of(width, height), **features)
    return entry


def group_key(entry: dict[str, Any], group_by: str) -> str:
    if group_by == "camera":
        return entry.get("camera") or "unknown"
    return (entry.get("taken") or "")[:10] or "unknown"


def summarise_groups(photos: list[dict[str, Any]], group_by: str) -> list[dict[str, Any]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for entry in photos:
        groups.setdefault(group_key(entry, group_by), []).append(entry)
    out = []
    for key in sorted(groups):
        members = groups[key]
        dates = sorted(e["taken"] for e in members if e.get("taken"))
        out.append(
            {
                "key": key,
                "count": len(members),
                "first_taken": dates[0] if dates else None,
                "last_taken": dates[-1] if dates else None,
                "cameras": dict(sorted(Counter(e.get("camera") or "unknown" for e in members).items())),
            }
        )
    return out


def classify(ctx: PluginContext, args: dict[str, Any]) -> dict[str, Any]:
    source = ctx.input_path(str(args["source"])).resolve()
    if not source.is_dir():
        raise ValueError(f"source: {str(source)!r} is not a folder")
    group_by = args.get("group_by")
    if group_by not in (None, "camera", "date"):
        raise ValueError(f"group_by: must be 'camera' or 'date', got {group_by!r}")
    every = int(args.get("checkpoint_every", 20))
    delay = float(args.get("delay_per_image", 0))
    inline_max = int(args.get("inline_max", 1000))

    ctx.progress(0.0, f"listing {source}")
    files = find_images(source, bool(args.get("recursive", True)))
    if not files:
        kinds = ", ".join(sorted(imaging.IMAGE_EXTENSIONS))
        raise ValueError(f"source: no image files ({kinds}) in {str(source)!r}")
    names = [p.relative_to(source).as_posix() for p in files]
    journal = Journal(ctx, "classify.jsonl", len(files), fingerprint([str(source), *names]), every)
    start = journal.open()
    try:
        for index in range(start, len(files)):
            journal.stop_if_cancelled()
            entry = describe(files[index], source)
            entry["index"] = index
            entry["attempt"] = ctx.attempt
            journal.pause(delay)
            journal.add(entry)
            ctx.progress((index + 1) / max(1, len(files)), f"classified {index + 1}/{len(files)}")
        journal.commit()
    finally:
        journal.close()

    entries = journal.entries
    photos = [e for e in entries if "error" not in e]
    errors = [{"path": e["path"], "error": e["error"]} for e in entries if "error" in e]
    summary: dict[str, Any] = {
        "count": len(photos),
        "total": len(files),
        "failed": len(errors),
        "cameras": dict(sorted(Counter(e.get("camera") or "unknown" for e in photos).items())),
        "shapes": dict(sorted(Counter(e["shape"] for e in photos).items())),
        "colours": dict(sorted(Counter(e["colour"] for e in photos).items())),
        "group_by": group_by,
        "groups": summarise_groups(photos, group_by) if group_by else [],
    }
    manifest = ctx.workspace_path("manifest.json")
    write_json_atomic(manifest, {"source": str(source), **summary, "photos": photos, "errors": errors})
    ctx.progress(1.0, f"classified {len(photos)} photos")
    return {
        "manifest": str(manifest),
        **summary,
        "errors": errors[:MAX_ERRORS_IN_OUTPUT],
        "started_from": journal.started_from,
        "attempt": ctx.attempt,
        "photos": photos[:inline_max],
        "photos_truncated": len(photos) > inline_max,
    }
