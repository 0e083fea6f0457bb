"""Generated photos for the photo-pipeline tests: small JPEGs with real EXIF tags and known content.

Every photo is drawn upright as it should be *displayed* (a magenta marker in
its top-left corner), then stored the way a camera would: rotated according to
its EXIF Orientation tag. So a correct pipeline shows the marker top-left
again. Kinds vary what the best-shot score sees: `sharp` (fine texture, good
exposure), `blurred` (the same, Gaussian-blurred), `dark` and `bright`
(textured but badly exposed, with clipping).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

TAG_MAKE = 0x010F
TAG_MODEL = 0x0110
TAG_ORIENTATION = 0x0112
TAG_DATETIME = 0x0132
IFD_EXIF = 0x8769
TAG_DATETIME_ORIGINAL = 0x9003

CAMERAS = [
    ("Canon", "Canon EOS 5D Mark IV"),
    ("NIKON CORPORATION", "NIKON D750"),
    ("Apple", "iPhone 12"),
]
# The pattern repeats every 6 photos: half of them sharp and well exposed.
KINDS = ["sharp", "blurred", "sharp", "dark", "sharp", "bright"]
ORIENTATIONS = [1, 6, 1, 8, 3]  # 6 and 8: a portrait photo stored as landscape pixels
BASE_COLOURS = [(190, 60, 50), (60, 150, 70), (60, 90, 190), (200, 180, 60), (150, 150, 150)]
MARKER = (255, 0, 255)
MARKER_FRACTION = 0.2  # of the displayed width
FIRST_DAY = datetime(2023, 6, 1, 8, 0, 0)

# How to store a displayed image so that its EXIF orientation displays it upright again
# (the inverse of what ImageOps.exif_transpose does for that orientation).
_STORE_TRANSPOSE = {
    1: None,
    3: Image.Transpose.ROTATE_180,
    6: Image.Transpose.ROTATE_90,
    8: Image.Transpose.ROTATE_270,
}


@dataclass(frozen=True)
class PhotoSpec:
    name: str
    path: Path
    make: str
    model: str
    taken: datetime
    orientation: int
    kind: str
    stored_size: tuple[int, int]
    displayed_size: tuple[int, int]

    @property
    def camera(self) -> str:
        return camera_of(self.make, self.model)

    @property
    def taken_iso(self) -> str:
        return self.taken.isoformat()

    @property
    def shape(self) -> str:
        w, h = self.displayed_size
        return "square" if w == h else ("landscape" if w > h else "portrait")


def camera_of(make: str, model: str) -> str:
    """How the photo plugin names a camera: the model, prefixed by the make unless it already starts with it."""
    return model if model.lower().startswith(make.split()[0].lower()) else f"{make} {model}"


def scene(size: tuple[int, int], colour: tuple[int, int, int], kind: str, rng: random.Random) -> Image.Image:
    """The photo as displayed: a colour gradient with texture, adjusted for its kind, marker top-left."""
    w, h = size
    base = Image.new("RGB", size, colour)
    shade = Image.linear_gradient("L").resize(size).point(lambda v: 90 + v * 100 // 255)
    img = Image.composite(base, Image.new("RGB", size, (30, 30, 30)), shade)
    noise = Image.effect_noise(size, 60).convert("RGB")
    img = Image.blend(img, noise, 0.3)
    draw = ImageDraw.Draw(img)
    for _ in range(6):  # a few crisp shapes, so sharp photos have real edges
        x, y = rng.randrange(w), rng.randrange(h)
        draw.rectangle(
            [x, y, x + rng.randrange(8, 30), y + rng.randrange(8, 30)], fill=tuple(rng.randrange(256) for _ in range(3))
        )
    if kind == "dark":
        img = img.point(lambda v: v * 18 // 100)
    elif kind == "bright":
        img = img.point(lambda v: min(255, v + 150))
    side = max(4, int(w * MARKER_FRACTION))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 0, side - 1, side - 1], fill=MARKER)
    if kind == "blurred":
        img = img.filter(ImageFilter.GaussianBlur(3))
    return img


def exif_for(make: str, model: str, taken: datetime, orientation: int) -> Image.Exif:
    exif = Image.Exif()
    stamp = taken.strftime("%Y:%m:%d %H:%M:%S")
    exif[TAG_MAKE] = make
    exif[TAG_MODEL] = model
    exif[TAG_DATETIME] = stamp
    exif[TAG_ORIENTATION] = orientation
    exif.get_ifd(IFD_EXIF)[TAG_DATETIME_ORIGINAL] = stamp
    return exif


def make_photos(folder: Path, count: int, *, size: tuple[int, int] = (160, 120), seed: int = 7) -> list[PhotoSpec]:
    """Write `count` JPEGs into `folder` (two sub-folders, to exercise the walk); return what each holds.

    `size` is the landscape sensor size; portrait photos (orientation 6 and 8)
    are displayed at the transposed size.
    """
    rng = random.Random(seed)
    specs = []
    for i in range(count):
        make, model = CAMERAS[i % len(CAMERAS)]
        kind = KINDS[i % len(KINDS)]
        orientation = ORIENTATIONS[i % len(ORIENTATIONS)]
        taken = FIRST_DAY + timedelta(days=i // 10, minutes=7 * i)
        stored = size
        displayed = (size[1], size[0]) if orientation in (6, 8) else size
        img = scene(displayed, BASE_COLOURS[i % len(BASE_COLOURS)], kind, rng)
        transpose = _STORE_TRANSPOSE[orientation]
        if transpose is not None:
            img = img.transpose(transpose)
        assert img.size == stored
        sub = folder / ("day-a" if i % 2 == 0 else "day-b")
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"IMG_{i:04d}.jpg"
        img.save(path, "JPEG", quality=90, exif=exif_for(make, model, taken, orientation))
        specs.append(
            PhotoSpec(
                name=path.relative_to(folder).as_posix(),
                path=path,
                make=make,
                model=model,
                taken=taken,
                orientation=orientation,
                kind=kind,
                stored_size=stored,
                displayed_size=displayed,
            )
        )
    return specs


def expected_resized_size(spec: PhotoSpec, max_edge: int) -> tuple[int, int]:
    """The displayed size scaled to fit max_edge x max_edge (never enlarged), as Pillow's thumbnail rounds."""
    w, h = spec.displayed_size
    if max(w, h) <= max_edge:
        return w, h
    scale = max_edge / max(w, h)
    return (max_edge, max(1, round(h * scale))) if w >= h else (max(1, round(w * scale)), max_edge)
