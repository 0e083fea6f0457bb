"""Built-in `photo_rank` plugin: score photos by sharpness and exposure, pick the best shots."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from edgefleet.plugin_context import PluginContext
from edgefleet.pluginkit.actions import dispatch, stop_cancelled
from edgefleet.pluginkit.files import load_manifest

# Relative imports under the catalog's loader; plain ones where the sandbox puts the folder on sys.path.
try:
    from .scoring import combined_score, score_image
except ImportError:
    from scoring import combined_score, score_image  # type: ignore[no-redef]

MAX_ERRORS_IN_OUTPUT = 50


def run(ctx: PluginContext, action: str, args: dict[str, Any]) -> dict[str, Any]:
    """Entry point named in plugin.yaml."""
    return dispatch(ctx, action, args, plugin="photo_rank", actions={"best_shots": best_shots})


def _load(ctx: PluginContext, args: dict[str, Any]) -> list[dict[str, Any]]:
    if args.get("images") is not None:
        return [{"index": i, "path": str(ctx.input_path(p))} for i, p in enumerate(args["images"])]
    photos = load_manifest(ctx.input_path(str(args["manifest"])), producer="photo.resize")
    return [p for p in photos if "error" not in p]


def _fingerprint(photos: list[dict[str, Any]]) -> str:
    digest = hashlib.sha256("\n".join(p["path"] for p in photos).encode())
    return digest.hexdigest()[:16]


def best_shots(ctx: PluginContext, args: dict[str, Any]) -> dict[str, Any]:
    if (args.get("manifest") is None) == (args.get("images") is None):
        raise ValueError("give exactly one of 'manifest' or 'images'")
    best = int(args.get("best", 10))
    every = max(1, int(args.get("checkpoint_every", 50)))
    photos = _load(ctx, args)
    fp = _fingerprint(photos)

    # The scores are small, so the checkpoint carries them itself: a rerun resumes on any box.
    state = ctx.resume()
    scores: list[Any] = []
    if isinstance(state, dict) and state.get("fingerprint") == fp and isinstance(state.get("scores"), list):
        scores = state["scores"][: len(photos)]
    started_from = len(scores)

    def save() -> None:
        ctx.checkpoint({"done": len(scores), "total": len(photos), "fingerprint": fp, "scores": scores})

    for i in range(started_from, len(photos)):
        if ctx.cancelled:
            save()
            stop_cancelled(ctx)
        try:
            scores.append(score_image(Path(photos[i]["path"])))
        except Exception as exc:
            scores.append({"error": f"{type(exc).__name__}: {exc}"[:500]})
        if (i + 1) % every == 0:
            save()
        ctx.progress((i + 1) / max(1, len(photos)), f"scored {i + 1}/{len(photos)}")

    rows = []
    errors = []
    for photo, s in zip(photos, scores, strict=True):
        if "error" in s:
            errors.append({"path": photo["path"], "error": s["error"]})
            continue
        rows.append(
            {
                "index": photo.get("index"),
                "path": photo["path"],
                "source": photo.get("source"),
                "taken": photo.get("taken"),
                "camera": photo.get("camera"),
                **s,
                "score": combined_score(s["sharpness"], s["exposure"]),
            }
        )
    rows.sort(key=lambda r: (-r["score"], r["index"] if r["index"] is not None else 0, r["path"]))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    chosen = rows[:best]
    in_time_order = sorted(chosen, key=lambda r: (r["taken"] or "", r["index"] or 0, r["path"]))

    scores_file = ctx.workspace_path("scores.json")
    tmp = scores_file.with_name(".scores.json.tmp")
    tmp.write_text(json.dumps({"photos": rows, "errors": errors}, indent=1), encoding="utf-8")
    os.replace(tmp, scores_file)
    ctx.progress(1.0, f"picked {len(chosen)} of {len(rows)}")
    return {
        "best": chosen,
        "paths": [r["path"] for r in in_time_order],
        "scored": len(rows),
        "failed": len(errors),
        "errors": errors[:MAX_ERRORS_IN_OUTPUT],
        "started_from": started_from,
        "attempt": ctx.attempt,
        "scores_file": str(scores_file),
    }
