"""Sharpness and exposure of one photo, with Pillow only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image, ImageFilter, ImageStat

# Photos are scored at this size at most, so that big and small photos compare fairly.
SCORE_EDGE = 512
# Edge variance at which the sharpness score is 0.5; it approaches 1 as edges get crisper.
SHARPNESS_HALF = 100.0
# Grey levels at or beyond these count as clipped (lost shadows or blown highlights).
CLIP_LOW, CLIP_HIGH = 4, 251


def score_image(path: Path) -> dict[str, Any]:
    with Image.open(path) as img:
        if img.format == "JPEG":
            img.draft("L", (SCORE_EDGE, SCORE_EDGE))
        grey = img.convert("L")
    grey.thumbnail((SCORE_EDGE, SCORE_EDGE))
    edges = grey.filter(ImageFilter.FIND_EDGES)
    w, h = edges.size
    if w > 2 and h > 2:
        edges = edges.crop((1, 1, w - 1, h - 1))  # the filter's border row is not image content
    sharpness = ImageStat.Stat(edges).var[0]
    hist = grey.histogram()
    pixels = max(1, sum(hist))
    clipped = (sum(hist[: CLIP_LOW + 1]) + sum(hist[CLIP_HIGH:])) / pixels
    brightness = ImageStat.Stat(grey).mean[0]
    closeness = 1.0 - abs(brightness - 128.0) / 128.0
    exposure = max(0.0, closeness - clipped)
    return {
        "sharpness": round(sharpness, 3),
        "exposure": round(exposure, 4),
        "brightness": round(brightness, 2),
        "clipped": round(clipped, 4),
    }


def combined_score(sharpness: float, exposure: float) -> float:
    sharp = sharpness / (sharpness + SHARPNESS_HALF)
    return round(sharp * (0.5 + 0.5 * exposure), 5)
