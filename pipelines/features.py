"""Label-free features of an image and of the model's predictions on it: what drift checks compare.

One implementation for both sides of a drift check: the server's prediction log computes them on what it serves, and
the `profile` stage on the version's own training and validation images. Image statistics are taken on a 128 px
thumbnail (cheap on the request path, and enough for lighting, colour, blur and noise trends); embeddings are the
model's own backbone, pooled (Ultralytics' `embed`), on the same thumbnail.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.inference import Detection

THUMBNAIL_SIDE = 128
IMAGE_FEATURES = [
    "brightness",
    "contrast",
    "mean_red",
    "mean_green",
    "mean_blue",
    "sharpness",
    "noise",
    "width",
    "height",
    "aspect",
]
PREDICTION_FEATURES = ["detections", "mean_confidence", "min_confidence", "mean_box_area", "max_box_area"]
CLASS_PREFIX = "count_"  # per-class detections per image: count_<class name>
EMBEDDING = "embedding"  # the pooled backbone vector, a list column


def thumbnail(image: np.ndarray) -> np.ndarray:
    """A BGR copy whose longer side is at most THUMBNAIL_SIDE."""
    import cv2

    scale = THUMBNAIL_SIDE / max(image.shape[:2])
    if scale < 1:
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(image)


def image_features(thumb: np.ndarray, width: int, height: int) -> dict[str, float]:
    """Statistics of a BGR thumbnail; `width` and `height` are the original image's."""
    import cv2
    from skimage.restoration import estimate_sigma

    gray = cv2.cvtColor(thumb, cv2.COLOR_BGR2GRAY) if thumb.ndim == 3 else thumb
    colour = thumb if thumb.ndim == 3 else np.repeat(thumb[..., None], 3, axis=2)
    blue, green, red = (float(c) for c in colour.reshape(-1, 3).mean(axis=0))
    return {
        "brightness": float(gray.mean()),
        "contrast": float(gray.std()),
        "mean_red": red,
        "mean_green": green,
        "mean_blue": blue,
        "sharpness": float(cv2.Laplacian(gray, cv2.CV_64F).var()),
        "noise": float(estimate_sigma(gray)),  # wavelet MAD estimate of the Gaussian noise sigma (Donoho)
        "width": float(width),
        "height": float(height),
        "aspect": float(width) / float(height or 1),
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


def expand_class_counts(frame: Any, names: Iterable[str]) -> Any:
    """`class_counts` (JSON per row) as one numeric column per class, `count_<name>`; returns a new frame."""
    import pandas as pd

    counts = [json.loads(text) if isinstance(text, str) and text else {} for text in frame.get("class_counts", [])]
    columns = {f"{CLASS_PREFIX}{name}": [float(c.get(name, 0)) for c in counts] for name in names}
    return pd.concat([frame.reset_index(drop=True), pd.DataFrame(columns, index=range(len(counts)))], axis=1)


class Embedder:
    """The model's backbone, pooled: one vector per thumbnail (Ultralytics `embed` on its last backbone layer)."""

    def __init__(self, weights: Path) -> None:
        import torch

        from conveyor.yolo import load_yolo

        model: Any = load_yolo(str(weights)).model
        self.model = model.float().eval()
        self.layer = len(self.model.yaml["backbone"]) - 1
        self._torch = torch

    def __call__(self, thumbs: Sequence[np.ndarray]) -> np.ndarray:
        """float32 [n, channels] for BGR thumbnails (letterboxed to THUMBNAIL_SIDE, as served images are)."""
        from pipelines.runtimes import letterbox

        if not thumbs:
            return np.zeros((0, 0), dtype=np.float32)
        batch = self._torch.from_numpy(letterbox(list(thumbs), THUMBNAIL_SIDE))
        with self._torch.inference_mode():
            pooled = self.model.predict(batch, embed=[self.layer])
        return np.stack([p.numpy() for p in pooled]).astype(np.float32)


def projection(dims_in: int, dims_out: int, seed: int = 0) -> np.ndarray:
    """A fixed Gaussian random projection (Johnson–Lindenstrauss): distances survive, dimensions shrink."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((dims_in, dims_out)) / np.sqrt(dims_out)).astype(np.float32)
