"""Label-free features of an image and of the model's predictions on it: what drift checks compare.

One implementation for both sides of a drift check: the server's prediction log computes them on what it serves,
the `profile` stage on the version's own training and validation images, `conveyor drift --source` on a folder.
The features come in groups of related measurements, and a drift check decides per group (`monitoring/drift.py`):

- exposure and colour, on a 128 px thumbnail (enough for light and colour): brightness, contrast, mean red, green
  and blue, saturation, and the shares of clipped highlights and crushed shadows;
- focus and noise, on the image at the model's input resolution (what the model sees: a thumbnail hides blur and
  noise): sharpness (variance of the Laplacian), noise (Immerkær's fast estimate of the noise sigma) and
  blockiness (how much more the grey level jumps across JPEG's 8-pixel block borders than inside the blocks, on the
  image as sent: compression);
- geometry: width, height, aspect;
- predictions: detections per image, their confidences and box areas, per-class counts, and the scores (confidence
  and class of every detection from the score floor up) that the performance estimate reads;
- the embedding: the model's own `features` output (`pipelines/model_features.py`), from the same inference.

The edge runner carries this file in its bundle and computes its records with it (`serving/edge/run.py --log`), so
it imports only numpy and OpenCV at run time; `record` reads any detections with `class_name`, `confidence` and
`box`, and any inference result with `detections`, `scores` and `features`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # this file is also shipped alone in edge bundles: no Conveyor import at run time
    from pipelines.inference import Detection, Inference

THUMBNAIL_SIDE = 128
EXPOSURE_FEATURES = ["brightness", "contrast", "mean_red", "mean_green", "mean_blue", "saturation"]
CLIPPING_FEATURES = ["highlights", "shadows"]
FOCUS_FEATURES = ["sharpness", "noise", "blockiness"]
GEOMETRY_FEATURES = ["width", "height", "aspect"]
IMAGE_FEATURES = [*EXPOSURE_FEATURES, *CLIPPING_FEATURES, *FOCUS_FEATURES, *GEOMETRY_FEATURES]
PREDICTION_FEATURES = ["detections", "mean_confidence", "min_confidence", "mean_box_area", "max_box_area"]
CLASS_PREFIX = "count_"  # per-class detections per image: count_<class name>
EMBEDDING = "embedding"  # the model's features output, a list column
SCORE_CONFIDENCE = "score_confidence"  # confidences of every detection from the score floor up, a list column
SCORE_CLASS = "score_class"  # and their class ids
SCORE_BOX = "score_box"  # and their boxes as fractions of the frame: x0, y0, x1, y1 each, one after the other
BLOCK = 8  # JPEG's block size
BLOCKINESS_CROP = 256  # blockiness is measured on the central crop of this size, aligned to the block grid
# Immerkær (1996): the Laplacian difference mask that cancels image structure up to second order.
_NOISE_MASK = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)


def thumbnail(image: np.ndarray) -> np.ndarray:
    """A BGR copy whose longer side is at most THUMBNAIL_SIDE."""
    import cv2

    scale = THUMBNAIL_SIDE / max(image.shape[:2])
    if scale < 1:
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(image)


def model_view(gray: np.ndarray, imgsz: int) -> np.ndarray:
    """The grey image at the model's input resolution, resized as the letterbox resizes (without its padding)."""
    import cv2

    height, width = gray.shape[:2]
    scale = imgsz / max(height, width)
    if abs(scale - 1) < 1e-6:
        return gray
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(cv2.resize(gray, size, interpolation=cv2.INTER_LINEAR))


def blockiness(crop: np.ndarray) -> float:
    """Mean absolute grey-level step across 8-pixel block borders over the mean step anywhere (1: no blocks), on a
    crop that starts on the block grid."""
    import cv2

    if crop.shape[0] < 2 * BLOCK or crop.shape[1] < 2 * BLOCK:
        return 1.0
    dx = cv2.absdiff(crop[:, 1:], crop[:, :-1])
    dy = cv2.absdiff(crop[1:, :], crop[:-1, :])
    across = (float(dx[:, BLOCK - 1 :: BLOCK].mean()) + float(dy[BLOCK - 1 :: BLOCK, :].mean())) / 2
    everywhere = (cv2.mean(dx)[0] + cv2.mean(dy)[0]) / 2
    return across / max(everywhere, 1e-6)


@dataclass(frozen=True)
class ImageSample:
    """The parts of an image its features are computed from, taken cheaply (on a server's request path) so the
    statistics can be computed later (on the prediction log's writer thread): about 200 kB for a 320 px image."""

    small: np.ndarray  # BGR, every few pixels: at most THUMBNAIL_SIDE on the longer side
    view: np.ndarray  # grey, at the model's input resolution
    block: np.ndarray  # grey, the central BLOCKINESS_CROP square of the image as sent, on the block grid
    width: int
    height: int

    @property
    def nbytes(self) -> int:
        return self.small.nbytes + self.view.nbytes + self.block.nbytes


def sample_image(image: np.ndarray, imgsz: int) -> ImageSample:
    """The sample of a BGR (or grey) image as sent; `imgsz` is the model's input size."""
    import cv2

    colour = image if image.ndim == 3 else cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    height, width = colour.shape[:2]
    step = max(1, -(-max(height, width) // THUMBNAIL_SIDE))
    gray = cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY)
    side_h, side_w = min(height, BLOCKINESS_CROP), min(width, BLOCKINESS_CROP)
    top = ((height - side_h) // 2) // BLOCK * BLOCK
    left = ((width - side_w) // 2) // BLOCK * BLOCK
    return ImageSample(
        np.ascontiguousarray(colour[::step, ::step]),  # a thumbnail by sampling: means need no filtering
        model_view(gray, imgsz),
        np.ascontiguousarray(gray[top : top + side_h, left : left + side_w]),
        width,
        height,
    )


def image_features(sample: ImageSample) -> dict[str, float]:
    """Every image feature of a sample (about 1 ms for a 320 px image)."""
    import cv2

    small_gray = cv2.cvtColor(sample.small, cv2.COLOR_BGR2GRAY)
    blue, green, red = cv2.mean(sample.small)[:3]
    mean_gray, std_gray = (float(v[0][0]) for v in cv2.meanStdDev(small_gray))
    saturation = cv2.mean(cv2.cvtColor(sample.small, cv2.COLOR_BGR2HSV))[1]
    view = sample.view.astype(np.float32)
    _, laplacian_std = cv2.meanStdDev(cv2.Laplacian(view, cv2.CV_32F))
    residual = cv2.filter2D(view, -1, _NOISE_MASK, borderType=cv2.BORDER_REFLECT)[1:-1, 1:-1]
    pixels = small_gray.size or 1
    return {
        "brightness": mean_gray,
        "contrast": std_gray,
        "mean_red": float(red),
        "mean_green": float(green),
        "mean_blue": float(blue),
        "saturation": float(saturation),
        "highlights": float(np.count_nonzero(small_gray >= 250)) / pixels,
        "shadows": float(np.count_nonzero(small_gray <= 5)) / pixels,
        "sharpness": float(laplacian_std[0][0]) ** 2,
        "noise": float(cv2.norm(residual, cv2.NORM_L1)) / max(residual.size, 1) * float(np.sqrt(np.pi / 2)) / 6,
        "blockiness": blockiness(sample.block),
        "width": float(sample.width),
        "height": float(sample.height),
        "aspect": float(sample.width) / float(sample.height or 1),
    }


def prediction_features(detections: Sequence[Detection], width: int, height: int) -> dict[str, Any]:
    """Per-image summary of what the model found; box areas are fractions of the image."""
    confidences = [d.confidence for d in detections]
    area = float(width * height) or 1.0
    box_areas = [(d.box[2] - d.box[0]) * (d.box[3] - d.box[1]) / area for d in detections]
    return {
        "detections": len(detections),
        "mean_confidence": float(np.mean(confidences)) if confidences else None,
        "min_confidence": float(min(confidences)) if confidences else None,
        "mean_box_area": float(np.mean(box_areas)) if box_areas else None,
        "max_box_area": float(max(box_areas)) if box_areas else None,
        "class_counts": json.dumps(dict(Counter(d.class_name for d in detections)), sort_keys=True),
    }


def record(sample: ImageSample, found: Inference) -> dict[str, Any]:
    """The feature row of one image and what the model gave for it: the same for the log, the profile and a folder."""
    row: dict[str, Any] = {
        **image_features(sample),
        **prediction_features(found.detections, sample.width, sample.height),
        SCORE_CONFIDENCE: [s for s, _ in found.scores],
        SCORE_CLASS: [c for _, c in found.scores],
        SCORE_BOX: [
            round(v / side, 4)
            for box in found.score_boxes
            for v, side in zip(box, (sample.width, sample.height) * 2, strict=True)
        ],
    }
    if found.features is not None:
        row[EMBEDDING] = np.asarray(found.features, dtype=np.float32).tolist()
    return row


def expand_class_counts(frame: Any, names: Iterable[str]) -> Any:
    """`class_counts` (JSON per row) as one numeric column per class, `count_<name>`; returns a new frame."""
    import pandas as pd

    counts = [json.loads(text) if isinstance(text, str) and text else {} for text in frame.get("class_counts", [])]
    columns = {f"{CLASS_PREFIX}{name}": [float(c.get(name, 0)) for c in counts] for name in names}
    return pd.concat([frame.reset_index(drop=True), pd.DataFrame(columns, index=range(len(counts)))], axis=1)
