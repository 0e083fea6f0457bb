"""Pillow helpers: EXIF fields, simple visual features, orientation-aware sizes."""

from __future__ import annotations

import colorsys
from datetime import datetime
from pathlib import Path
from typing import Any

from PIL import Image, ImageStat

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".tif", ".tiff", ".webp", ".bmp"})

TAG_MAKE = 0x010F
TAG_MODEL = 0x0110
TAG_ORIENTATION = 0x0112
TAG_DATETIME = 0x0132
IFD_EXIF = 0x8769
TAG_DATETIME_ORIGINAL = 0x9003

# EXIF orientations 5..8 are stored rotated by 90 degrees: width and height swap on display.
SWAPPED_ORIENTATIONS = frozenset({5, 6, 7, 8})

# Features are computed on a thumbnail no larger than this (JPEGs decode straight at that scale).
FEATURE_EDGE = 64


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1", "replace")
    text = str(value).replace("\x00", "").strip()
    return text or None


def exif_datetime(value: Any) -> str | None:
    """EXIF 'YYYY:MM:DD HH:MM:SS' as ISO 8601 'YYYY-MM-DDTHH:MM:SS'; None if absent or invalid."""
    text = _text(value)
    if not text:
        return None
    for fmt in ("%Y:%m:%d %H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y:%m:%d %H:%M", "%Y:%m:%d"):
        try:
            return datetime.strptime(text[:19], fmt).isoformat()
        except ValueError:
            continue
    return None


def camera_name(make: str | None, model: str | None) -> str | None:
    """'Canon' + 'Canon EOS 5D' -> 'Canon EOS 5D'; 'NIKON CORPORATION' + 'D750' -> 'NIKON CORPORATION D750'."""
    if make and model:
        return model if model.lower().startswith(make.split()[0].lower()) else f"{make} {model}"
    return make or model


def read_exif(img: Image.Image) -> dict[str, Any]:
    exif = img.getexif()
    make = _text(exif.get(TAG_MAKE))
    model = _text(exif.get(TAG_MODEL))
    try:
        exif_ifd = exif.get_ifd(IFD_EXIF)
    except Exception:
        exif_ifd = {}
    taken = exif_datetime(exif_ifd.get(TAG_DATETIME_ORIGINAL))
    date_source = "DateTimeOriginal" if taken else None
    if taken is None:
        taken = exif_datetime(exif.get(TAG_DATETIME))
        date_source = "DateTime" if taken else None
    try:
        orientation = int(exif.get(TAG_ORIENTATION) or 1)
    except (TypeError, ValueError):
        orientation = 1
    if not 1 <= orientation <= 8:
        orientation = 1
    return {
        "make": make,
        "model": model,
        "camera": camera_name(make, model),
        "taken": taken,
        "date_source": date_source,
        "orientation": orientation,
    }


def displayed_size(width: int, height: int, orientation: int) -> tuple[int, int]:
    return (height, width) if orientation in SWAPPED_ORIENTATIONS else (width, height)


def shape_of(width: int, height: int) -> str:
    if width == height:
        return "square"
    return "landscape" if width > height else "portrait"


def colour_bucket(r: int, g: int, b: int) -> str:
    h, s, v = colorsys.rgb_to_hsv(r / 255, g / 255, b / 255)
    if v < 0.2:
        return "black"
    if s < 0.18:
        return "white" if v > 0.8 else "grey"
    hue = h * 360
    for limit, name in (
        (15, "red"),
        (45, "orange"),
        (70, "yellow"),
        (165, "green"),
        (200, "cyan"),
        (260, "blue"),
        (290, "purple"),
        (340, "magenta"),
    ):
        if hue < limit:
            return name
    return "red"


def visual_features(img: Image.Image) -> dict[str, Any]:
    """Mean brightness (0..255) and the dominant colour bucket, from a small RGB thumbnail."""
    small = img.convert("RGB")
    small.thumbnail((FEATURE_EDGE, FEATURE_EDGE))
    brightness = ImageStat.Stat(small.convert("L")).mean[0]
    counts: dict[str, int] = {}
    # Quantise first: 4096 pixels become a few hundred distinct colours.
    for count, (r, g, b) in small.quantize(colors=64).convert("RGB").getcolors(FEATURE_EDGE * FEATURE_EDGE) or []:
        name = colour_bucket(r, g, b)
        counts[name] = counts.get(name, 0) + count
    dominant = max(sorted(counts), key=lambda k: counts[k]) if counts else "grey"
    return {"brightness": round(brightness, 2), "colour": dominant}


def open_image(path: Path, draft_edge: int | None = None) -> Image.Image:
    """Open `path`; JPEGs are decoded directly at a reduced scale when only `draft_edge` pixels are needed."""
    img = Image.open(path)
    if draft_edge and img.format == "JPEG":
        img.draft("RGB", (draft_edge, draft_edge))
    return img
