"""What every format's reader shares: the parsed source (`Source` of `Item`s, boxes as YOLO lines with the source's
class ids), split names as exporters write them, a pixel box as a YOLO line, and an image's size."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from conveyor.settings import Split
from pipelines.inference import EXIF_ORIENTATION, TRANSPOSED
from pipelines.validate import Problem

Format = Literal["yolo", "coco", "voc"]
SPLIT_ALIASES: dict[str, Split] = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
EDGE_TOLERANCE_PX = 1.0  # boxes past the image edge by less than this are clipped (rounding in exports)


@dataclass
class Item:
    """One image of the source: where it is, its split if the source names one, and its boxes as YOLO label lines
    with the *source's* class ids (None: no label file, a background image)."""

    image: Path
    name: str  # the path it gets under images/<split>/
    split: Split | None
    lines: list[str] | None
    errors: list[Problem] = field(default_factory=list)
    label_source: Path | None = None  # the file the boxes came from (a YOLO .txt, a COCO .json, a VOC .xml)


@dataclass
class Source:
    format: Format
    names: list[str]  # the source's classes, by source id
    items: list[Item]
    problems: list[Problem]  # problems not tied to one image (an annotation naming no image, ...)
    has_splits: bool  # the source names splits (missing ones are then carved on import only)
    # Annotation files that cannot be read at all: which images they held is unknown, so no policy can leave out
    # just those (a COCO file cut short held a whole split).
    unreadable: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # said, refusing nothing (a label file without its image)


def relative_name(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root if root.is_dir() else root.parent).as_posix()
    except ValueError:
        return path.as_posix()


def split_from_name(*words: str) -> Split | None:
    """`instances_train2017` -> train, `valid` -> val: the first split alias among the name's tokens."""
    for word in words:
        for token in word.lower().replace("-", "_").replace(".", "_").split("_"):
            token = token.rstrip("0123456789")
            if token in SPLIT_ALIASES:
                return SPLIT_ALIASES[token]
    return None


def box_line(
    class_id: int, x0: float, y0: float, x1: float, y1: float, width: float, height: float
) -> tuple[str | None, str]:
    """A YOLO line for a pixel box, or a reason it is not one. Tiny overflows (rounding) are clipped."""
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):  # a coordinate missing (NaN passes every comparison)
        return None, f"box ({x0:g},{y0:g})-({x1:g},{y1:g}) lacks a coordinate"
    if x1 <= x0 or y1 <= y0:
        return None, f"box has no area ({x0:g},{y0:g})-({x1:g},{y1:g})"
    tol = EDGE_TOLERANCE_PX
    if x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
        return None, f"box ({x0:g},{y0:g})-({x1:g},{y1:g}) is outside the {width:g}x{height:g} image"
    x0, y0, x1, y1 = max(x0, 0.0), max(y0, 0.0), min(x1, width), min(y1, height)
    if x1 <= x0 or y1 <= y0:  # within the tolerance, but wholly past the edge: nothing of it is in the image
        return None, f"box ({x0:g},{y0:g})-({x1:g},{y1:g}) has no area inside the {width:g}x{height:g} image"
    cx, cy, w, h = (x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height
    return f"{class_id} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}", ""


def image_size(path: Path) -> tuple[int, int] | None:
    """Width and height of the image as the trainer and the server see it: a JPEG turned upright by its EXIF
    orientation, as OpenCV decodes it (Ultralytics trains on those pixels). The stored size was used, so a phone's
    portrait photo without a size in its annotations got its boxes divided by the wrong sides. Read from the
    header, without decoding the pixels."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height = image.size
            if image.format == "JPEG" and image.getexif().get(EXIF_ORIENTATION) in TRANSPOSED:
                return height, width
            return width, height
    except Exception:  # not an image: OSError, or what Ultralytics' patched Image.open raises once imported
        return None


def size_mismatch(width: float, height: float, path: Path) -> str | None:
    """Why an annotation's own size of its image cannot be trusted for the image (None when it can, or when the image
    cannot be read: the validate stage names that). Boxes are divided by it, so any size of the image's shape is
    right (an image resized in proportion since it was labelled keeps its boxes); a size of another shape puts every
    box on other pixels, and passes every other check."""
    actual = image_size(path)
    if actual is None or _same_shape((width, height), actual):
        return None
    given = f"gives the image's size as {width:g}x{height:g}"
    if _same_shape((height, width), actual):
        return (
            f"{given}, as stored; turned upright by its EXIF orientation (as the model sees it) it is "
            f"{actual[0]}x{actual[1]}, so its boxes would land on other pixels: export from a tool that applies the "
            "orientation"
        )
    return f"{given}, but the image is {actual[0]}x{actual[1]}, another shape: its boxes would land on other pixels"


def _same_shape(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """The same aspect ratio, to a pixel's rounding at the larger of the two sizes."""
    return abs(a[0] * b[1] - a[1] * b[0]) <= max(*a, *b)
