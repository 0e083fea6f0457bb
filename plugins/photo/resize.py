"""photo.resize: every classified photo, upright and at most `max_edge` pixels long, as a JPEG; checkpointed."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from edgefleet.plugin_context import PluginContext
from edgefleet.pluginkit.files import load_manifest

# Relative imports under the catalog's loader; plain ones where the sandbox puts the folder on sys.path.
try:
    from .journal import Journal, fingerprint, write_json_atomic
except ImportError:
    from journal import Journal, fingerprint, write_json_atomic  # type: ignore[no-redef]

OUTPUT_DIR = "resized"
MAX_ERRORS_IN_OUTPUT = 50
# Fields of the classify entry carried on, so that later steps need only this manifest.
CARRIED = ("camera", "taken", "brightness", "colour", "orientation")


def _safe_stem(name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).stem).strip("._") or "photo"
    return stem[:80]


def load_photos(manifest: Path) -> list[dict[str, Any]]:
    """The photo entries of a photo.classify manifest."""
    return load_manifest(manifest, producer="photo.classify")


def resize_one(source: Path, target: Path, max_edge: int, quality: int) -> tuple[int, int]:
    """Write `source` upright, scaled to fit max_edge x max_edge, as the JPEG `target`; return its size."""
    with Image.open(source) as img:
        if img.format == "JPEG":
            img.draft("RGB", (max_edge, max_edge))  # decode at the smallest scale still >= max_edge
        upright = ImageOps.exif_transpose(img)
    upright.thumbnail((max_edge, max_edge), Image.Resampling.LANCZOS)
    if upright.mode != "RGB":
        if upright.mode in ("RGBA", "LA") or (upright.mode == "P" and "transparency" in upright.info):
            rgba = upright.convert("RGBA")
            background = Image.new("RGB", rgba.size, (255, 255, 255))
            background.paste(rgba, mask=rgba.getchannel("A"))
            upright = background
        else:
            upright = upright.convert("RGB")
    tmp = target.with_name(f".{target.name}.tmp")
    upright.save(tmp, "JPEG", quality=quality)
    os.replace(tmp, target)
    return upright.size


def resize(ctx: PluginContext, args: dict[str, Any]) -> dict[str, Any]:
    manifest_in = ctx.input_path(str(args["manifest"]))
    max_edge = int(args.get("max_edge", 1024))
    quality = int(args.get("quality", 85))
    every = int(args.get("checkpoint_every", 20))
    inline_max = int(args.get("inline_max", 1000))
    photos = load_photos(manifest_in)

    out_dir = ctx.workspace_path(OUTPUT_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = [(p.get("index", i), p["path"]) for i, p in enumerate(photos)]
    journal = Journal(ctx, "resize.jsonl", len(photos), fingerprint([max_edge, quality, *work]), every)
    start = journal.open()
    try:
        for seq in range(start, len(photos)):
            journal.stop_if_cancelled()
            photo = photos[seq]
            index = photo.get("index", seq)
            target = out_dir / f"{index:05d}-{_safe_stem(photo.get('name') or photo['path'])}.jpg"
            entry: dict[str, Any] = {"index": index, "source": photo["path"]}
            try:
                width, height = resize_one(ctx.input_path(photo["path"]), target, max_edge, quality)
            except Exception as exc:
                entry["error"] = f"{type(exc).__name__}: {exc}"[:500]
                journal.add(entry)
            else:
                entry.update(path=str(target), width=width, height=height, attempt=ctx.attempt)
                entry.update({k: photo.get(k) for k in CARRIED})
                journal.add(entry, files=[target])
            ctx.progress((seq + 1) / max(1, len(photos)), f"resized {seq + 1}/{len(photos)}")
        journal.commit()
    finally:
        journal.close()

    done = [e for e in journal.entries if "error" not in e]
    errors = [{"path": e["source"], "error": e["error"]} for e in journal.entries if "error" in e]
    manifest = ctx.workspace_path("manifest.json")
    write_json_atomic(manifest, {"max_edge": max_edge, "count": len(done), "photos": done, "errors": errors})
    ctx.progress(1.0, f"resized {len(done)} photos")
    return {
        "manifest": str(manifest),
        "count": len(done),
        "failed": len(errors),
        "errors": errors[:MAX_ERRORS_IN_OUTPUT],
        "output_dir": str(out_dir),
        "max_edge": max_edge,
        "started_from": journal.started_from,
        "attempt": ctx.attempt,
        "photos": done[:inline_max],
        "photos_truncated": len(done) > inline_max,
    }
