"""Synthetic surface-defect dataset: textured parts on a production line with scratches, dents and stains.

Deterministic: every image comes from its own seeded generator (seed, split, index), so the same settings give
byte-identical files (checked against data.dvc's md5 by `conveyor data synth --check`).
The `shift` knobs move the domain (darker light, blur, a new background, larger defects) for drift checks.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import yaml
from PIL import Image
from rich.progress import Progress

from conveyor.paths import replace_folder, staged_beside
from conveyor.settings import SPLITS, DomainShift, SynthSettings

CLASS_NAMES = ("scratch", "dent", "stain")
DEFAULT_BACKGROUNDS = ("metal", "fabric", "wood")
_SPLIT_IDS = {name: i for i, name in enumerate(SPLITS)}

Box = tuple[int, float, float, float, float]  # class id, cx, cy, w, h (normalised)


@dataclass(frozen=True)
class SynthSummary:
    root: Path
    images: dict[str, int]
    boxes: dict[str, int]
    background_images: dict[str, int]


# --- backgrounds -------------------------------------------------------------------------------------------------


def _metal(rng: np.random.Generator, size: int) -> np.ndarray:
    base = rng.uniform(110, 170)
    streaks = cv2.GaussianBlur(rng.normal(0, 18, (size, size)).astype(np.float32), (0, 0), sigmaX=25, sigmaY=0.6)
    grain = rng.normal(0, 4, (size, size))
    gray = base + 2.5 * streaks + grain
    tint = np.array([1.0, 1.0, 1.04]) * rng.uniform(0.95, 1.05, 3)
    return gray[..., None] * tint


def _fabric(rng: np.random.Generator, size: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    period = rng.uniform(5, 9)
    angle = rng.uniform(0, np.pi)
    u = x * np.cos(angle) + y * np.sin(angle)
    v = -x * np.sin(angle) + y * np.cos(angle)
    weave = np.sin(2 * np.pi * u / period) * np.sin(2 * np.pi * v / period)
    color = rng.uniform([60, 70, 90], [140, 150, 180])
    return color + (14 * weave + rng.normal(0, 5, (size, size)))[..., None]


def _wood(rng: np.random.Generator, size: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    cx, cy = rng.uniform(-size, 2 * size, 2)
    warp = 6 * np.sin(y / rng.uniform(20, 50)) + rng.normal(0, 0.5, (size, size))
    rings = np.sin(np.hypot((x - cx) * 0.35, y - cy) / rng.uniform(3, 6) + warp)
    base = rng.uniform([40, 80, 120], [70, 120, 170])  # BGR browns
    return base + (18 * rings)[..., None] + rng.normal(0, 3, (size, size, 1))


def _concrete(rng: np.random.Generator, size: int) -> np.ndarray:
    blotches = cv2.GaussianBlur(rng.normal(0, 30, (size, size)).astype(np.float32), (0, 0), sigmaX=12)
    speckle = rng.normal(0, 14, (size, size)) * (rng.random((size, size)) < 0.3)
    return (rng.uniform(120, 150) + blotches + speckle)[..., None] * np.ones(3)


BACKGROUNDS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "metal": _metal,
    "fabric": _fabric,
    "wood": _wood,
    "concrete": _concrete,
}


# --- defects (each draws onto a float BGR image and returns its pixel box) ----------------------------------------


def _scratch(rng: np.random.Generator, img: np.ndarray, scale: float) -> tuple[float, float, float, float]:
    size = img.shape[0]
    length = rng.uniform(60, 150) * scale
    angle = rng.uniform(0, np.pi)
    cx, cy = rng.uniform(0.2 * size, 0.8 * size, 2)
    t = np.linspace(-0.5, 0.5, 6)
    bend = rng.normal(0, 0.06 * length) * (1 - (2 * t) ** 2)  # a gentle arc, zero at the ends
    xs = cx + t * length * np.cos(angle) - bend * np.sin(angle)
    ys = cy + t * length * np.sin(angle) + bend * np.cos(angle)
    points = np.stack([xs, ys], 1).round().astype(np.int32)
    mask = np.zeros(img.shape[:2], np.float32)
    thickness = int(rng.integers(2, 5))
    cv2.polylines(mask, [points], False, (1.0,), thickness=thickness, lineType=cv2.LINE_AA)
    bright = rng.random() < 0.5  # a scratch through paint shines; one in dirt is dark
    shade = rng.uniform(70, 110) * (1 if bright else -1)
    img += shade * mask[..., None]
    pad = thickness / 2 + 1
    return xs.min() - pad, ys.min() - pad, xs.max() + pad, ys.max() + pad


def _dent(rng: np.random.Generator, img: np.ndarray, scale: float) -> tuple[float, float, float, float]:
    size = img.shape[0]
    a, b = rng.uniform(14, 30, 2) * scale
    theta = rng.uniform(0, np.pi)
    cx, cy = rng.uniform(0.15 * size, 0.85 * size, 2)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    u = ((x - cx) * np.cos(theta) + (y - cy) * np.sin(theta)) / a
    v = (-(x - cx) * np.sin(theta) + (y - cy) * np.cos(theta)) / b
    r2 = u**2 + v**2
    inside = np.clip(1 - r2, 0, 1)
    light = rng.uniform(0, 2 * np.pi)
    # A concave bowl lit from one side: the side facing the light is dark, the far side bright.
    shading = -(u * np.cos(light) + v * np.sin(light)) * np.sqrt(inside)
    rim = np.exp(-((np.sqrt(r2) - 1) ** 2) / 0.02) * 0.5
    img += (rng.uniform(60, 90) * shading - 25 * inside - 20 * rim)[..., None]
    half_w = np.sqrt((a * np.cos(theta)) ** 2 + (b * np.sin(theta)) ** 2)
    half_h = np.sqrt((a * np.sin(theta)) ** 2 + (b * np.cos(theta)) ** 2)
    return cx - half_w, cy - half_h, cx + half_w, cy + half_h


def _stain(rng: np.random.Generator, img: np.ndarray, scale: float) -> tuple[float, float, float, float]:
    size = img.shape[0]
    radius = rng.uniform(14, 34) * scale
    cx, cy = rng.uniform(0.15 * size, 0.85 * size, 2)
    n = int(rng.integers(10, 17))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = radius * rng.uniform(0.55, 1.25, n)
    xs, ys = cx + radii * np.cos(angles), cy + radii * np.sin(angles)
    outline = np.zeros(img.shape[:2], np.float32)
    cv2.fillPoly(outline, [np.stack([xs, ys], 1).round().astype(np.int32)], (1.0,), lineType=cv2.LINE_AA)
    mask = cv2.GaussianBlur(outline, (0, 0), 1.5)  # soft edges, as a liquid leaves
    color = rng.uniform([10, 40, 50], [60, 90, 110])  # oily browns and rust (BGR)
    alpha = rng.uniform(0.6, 0.85)
    img[:] = img * (1 - alpha * mask[..., None]) + color * alpha * mask[..., None]
    return xs.min(), ys.min(), xs.max(), ys.max()


DEFECTS: tuple[Callable[[np.random.Generator, np.ndarray, float], tuple[float, float, float, float]], ...] = (
    _scratch,
    _dent,
    _stain,
)


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def render_image(settings: SynthSettings, split: str, index: int) -> tuple[np.ndarray, list[Box]]:
    """One image (uint8 BGR) and its YOLO boxes; a pure function of (settings, split, index)."""
    rng = np.random.default_rng([settings.seed, _SPLIT_IDS[split], index])
    shift: DomainShift = settings.shift
    size = settings.image_size
    background = shift.background or DEFAULT_BACKGROUNDS[int(rng.integers(len(DEFAULT_BACKGROUNDS)))]
    img: np.ndarray = BACKGROUNDS[background](rng, size).astype(np.float32)

    boxes: list[Box] = []
    placed: list[tuple[float, float, float, float]] = []
    if rng.random() >= settings.background_fraction:
        wanted = int(rng.integers(1, settings.max_defects + 1))
        for _ in range(wanted * 4):  # a few tries per defect to avoid heavy overlap
            if len(boxes) == wanted:
                break
            cls = int(rng.integers(len(DEFECTS)))
            trial = img.copy()
            x0, y0, x1, y1 = DEFECTS[cls](rng, trial, shift.defect_scale)
            x0, y0, x1, y1 = max(0.0, x0), max(0.0, y0), min(size - 1.0, x1), min(size - 1.0, y1)
            if x1 - x0 < 3 or y1 - y0 < 3 or any(_iou((x0, y0, x1, y1), p) > 0.2 for p in placed):
                continue
            img = trial
            placed.append((x0, y0, x1, y1))
            boxes.append((cls, (x0 + x1) / 2 / size, (y0 + y1) / 2 / size, (x1 - x0) / size, (y1 - y0) / size))

    # Lighting: a random gradient across the part, global gain, then the domain shift's brightness.
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    direction = rng.uniform(0, 2 * np.pi)
    gradient = 1 + rng.uniform(0.05, 0.3) * ((x - 0.5) * np.cos(direction) + (y - 0.5) * np.sin(direction))
    img *= (gradient * rng.uniform(0.85, 1.15) * shift.brightness)[..., None]
    img += rng.normal(0, rng.uniform(2, 7), img.shape)  # sensor noise
    if shift.blur_sigma > 0:
        img = cv2.GaussianBlur(img, (0, 0), shift.blur_sigma)
    return np.clip(img, 0, 255).astype(np.uint8), boxes


def write_dataset_yaml(root: Path, names: tuple[str, ...] | list[str]) -> None:
    """The YOLO data.yaml of a dataset folder: split folders relative to the yaml, class names by id."""
    content = {
        "train": "images/train",
        "val": "images/val",
        "test": "images/test",
        "names": dict(enumerate(names)),
    }
    (root / "data.yaml").write_text(yaml.safe_dump(content, sort_keys=False))


def generate(settings: SynthSettings, out: Path, *, overwrite: bool = False) -> SynthSummary:
    """Write the dataset to `out` (YOLO layout: images/<split>, labels/<split>, data.yaml).

    Refuses to write into a non-empty folder unless `overwrite`, which replaces only the dataset's own subfolders. The
    dataset is written beside `out` and put in place whole: a failure or Ctrl-C part way leaves `out` as it was (it
    left an emptied or half-written dataset).
    """
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty: `--overwrite` replaces the dataset there")
    with staged_beside(out, "synth-partial") as staging:
        images, boxes_per_split, background = _render_splits(settings, staging)
        write_dataset_yaml(staging, CLASS_NAMES)
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("images", "labels"):  # only the dataset's own parts: `out` may hold other files (data.dvc's folder)
        replace_folder(staging / sub, out / sub)
    (staging / "data.yaml").replace(out / "data.yaml")
    shutil.rmtree(staging, ignore_errors=True)
    return SynthSummary(out, images, boxes_per_split, background)


def _render_splits(settings: SynthSettings, out: Path) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """Every split's images and labels into `out`: the counts of images, boxes and background images per split."""
    images: dict[str, int] = {}
    boxes_per_split: dict[str, int] = {}
    background: dict[str, int] = {}
    total = sum(settings.counts.values())
    with Progress(transient=True) as progress:
        task = progress.add_task("synthesising images", total=total)
        for split in SPLITS:
            (out / "images" / split).mkdir(parents=True, exist_ok=True)
            (out / "labels" / split).mkdir(parents=True, exist_ok=True)
            n_boxes = n_background = 0
            for index in range(settings.counts[split]):
                image, boxes = render_image(settings, split, index)
                stem = f"{split}_{index:05d}"
                # PIL's encoder (pinned by the lock file) gives the same bytes for the same pixels.
                Image.fromarray(image[..., ::-1]).save(
                    out / "images" / split / f"{stem}.jpg", quality=settings.jpeg_quality
                )
                lines = [f"{c} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}" for c, cx, cy, w, h in boxes]
                (out / "labels" / split / f"{stem}.txt").write_text("".join(line + "\n" for line in lines))
                n_boxes += len(boxes)
                n_background += not boxes
                progress.advance(task)
            images[split] = settings.counts[split]
            boxes_per_split[split] = n_boxes
            background[split] = n_background
    return images, boxes_per_split, background
