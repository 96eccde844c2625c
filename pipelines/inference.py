"""From images to detections: decode, letterbox, one `Runtime` call per batch, NMS, boxes back in image pixels.

One implementation for everything that predicts: the server, batch prediction, the pyfunc in the registry and the
benchmark. Letterbox and NMS are Ultralytics' own (`LetterBox`, `non_max_suppression`, `scale_boxes`), the code its
validator scores mAP with, so served detections are the evaluated detections. The edge runner (`serving/edge`)
re-implements them in numpy because a device has no torch; a test holds it to these results.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.runtimes import Runtime, letterbox

JPEG_END = b"\xff\xd9"


class ImageError(ValueError):
    """The bytes are not an image this detector accepts; the message says why (never a server error)."""


@dataclass(frozen=True)
class ModelCard:
    """What a model needs around its weights: class names, input size and the post-processing thresholds."""

    names: list[str]
    imgsz: int
    conf: float = 0.25
    iou: float = 0.7
    max_det: int = 300

    @classmethod
    def load(cls, path: Path) -> ModelCard:
        raw = json.loads(path.read_text())
        return cls(
            names=list(raw["names"]),
            imgsz=int(raw["imgsz"]),
            conf=float(raw.get("conf", 0.25)),
            iou=float(raw.get("iou", 0.7)),
            max_det=int(raw.get("max_det", 300)),
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Detection:
    class_id: int
    class_name: str
    confidence: float
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels of the original image

    def to_json(self) -> dict[str, Any]:
        return {
            "class_id": self.class_id,
            "class_name": self.class_name,
            "confidence": round(self.confidence, 5),
            "box": [round(v, 2) for v in self.box],
        }


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20_000_000
    max_pixels: int = 40_000_000  # a decompression bomb is refused before it is decoded


JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


EXIF_ORIENTATION = 0x0112
TRANSPOSED = {5, 6, 7, 8}  # EXIF orientations that turn the image a quarter: width and height swap


def check_image_bytes(data: bytes, limits: ImageLimits) -> tuple[int, int]:
    """Width and height of an encoded JPEG or PNG, after the checks that need no full decode: size, format, pixel
    count (decompression bombs) and a JPEG's end marker (truncation). Raises ImageError naming the problem."""
    from PIL import Image, JpegImagePlugin, PngImagePlugin

    if not data:
        raise ImageError("empty body: expected a JPEG or PNG image")
    if len(data) > limits.max_bytes:
        raise ImageError(f"image is {len(data)} bytes, over the limit of {limits.max_bytes}")
    # The format's own header parser, not Image.open: Ultralytics patches that to install plugins on failure.
    parser: type[JpegImagePlugin.JpegImageFile] | type[PngImagePlugin.PngImageFile]
    if data.startswith(JPEG_MAGIC):
        parser = JpegImagePlugin.JpegImageFile
    elif data.startswith(PNG_MAGIC):
        parser = PngImagePlugin.PngImageFile
    else:
        raise ImageError(f"not a JPEG or PNG image (starts with {data[:8]!r})")
    try:
        with parser(io.BytesIO(data)) as image:
            width, height = image.size
            # Before anything else reads the image: a PNG's getexif() decodes every pixel (a 0.2 MB PNG of
            # 40000x40000 took 1.2 GB). A quarter turn swaps width and height, not their product.
            if width * height > limits.max_pixels:
                raise ImageError(
                    f"image is {width}x{height} = {width * height} pixels, over the limit of {limits.max_pixels}"
                )
            # OpenCV's decoder turns a JPEG upright by its EXIF orientation, as a viewer does: the detections are in
            # that frame, so its width and height are reported. The EXIF block the header parser found (a JPEG's
            # APP1, a PNG's eXIf before its pixels), read without decoding the image.
            exif = Image.Exif()
            if image.info.get("exif"):
                exif.load(image.info["exif"])
            if exif.get(EXIF_ORIENTATION) in TRANSPOSED:
                width, height = height, width
    except ImageError:
        raise
    except Exception as exc:  # a damaged header: decoders raise many types
        raise ImageError(f"not a decodable image ({type(exc).__name__}: {exc})") from None
    if parser is JpegImagePlugin.JpegImageFile and not data.rstrip(b"\x00").endswith(JPEG_END):
        raise ImageError("truncated JPEG (no end-of-image marker)")
    return width, height


def decode_image(data: bytes, limits: ImageLimits | None = None) -> np.ndarray:
    """BGR uint8 pixels of an encoded image, checked first (see `check_image_bytes`)."""
    import cv2

    check_image_bytes(data, limits or ImageLimits())
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ImageError("the image header is valid but its pixels do not decode")
    return np.asarray(image)


def postprocess(
    raw: np.ndarray, shapes: Sequence[tuple[int, int]], card: ModelCard, conf: float | None = None
) -> list[list[Detection]]:
    """NMS on raw (batch, 4 + classes, anchors) outputs, boxes scaled back to each original (height, width)."""
    import torch
    from ultralytics.utils import nms, ops

    kept = nms.non_max_suppression(
        torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32)),
        card.conf if conf is None else conf,
        card.iou,
        max_det=card.max_det,
        max_time_img=10.0,  # Ultralytics' default (0.05 s) silently truncates NMS on a busy CPU
    )
    out = []
    for rows, shape in zip(kept, shapes, strict=True):
        rows[:, :4] = ops.scale_boxes((card.imgsz, card.imgsz), rows[:, :4], shape)
        out.append(
            [
                Detection(int(c), card.names[int(c)], float(s), (float(x0), float(y0), float(x1), float(y1)))
                for x0, y0, x1, y1, s, c in rows.tolist()
            ]
        )
    return out


# Detections from this confidence up are kept as scores (confidence, class) beside the served detections: the
# label-free performance estimate reads the whole ranking, as mAP does (`pipelines/performance.py`).
SCORE_FLOOR = 0.01


@dataclass(frozen=True)
class Inference:
    """What one image gave: the detections at the card's confidence, every detection from SCORE_FLOOR up (those
    included), and the model's `features` output (None when the export has none)."""

    detections: list[Detection]
    candidates: list[Detection]
    features: np.ndarray | None

    @property
    def scores(self) -> list[tuple[float, int]]:
        """Confidence and class of every candidate: what the performance estimate reads from the log."""
        return [(round(d.confidence, 4), d.class_id) for d in self.candidates]

    @property
    def score_boxes(self) -> list[tuple[float, float, float, float]]:
        """Their boxes in pixels: the estimate reads a detection that stays at one place of the frame as the lens's."""
        return [d.box for d in self.candidates]


class Detector:
    """A runtime with its model card: images in, detections out, in batches as large as the runtime takes."""

    def __init__(self, runtime: Runtime, card: ModelCard) -> None:
        self.runtime = runtime
        self.card = card

    def _batches(self, n: int) -> list[slice]:
        """Slices of `n` inputs, each as large as the runtime takes (a static export or a TensorRT engine: one)."""
        step = self.runtime.max_batch or n
        return [slice(i, i + step) for i in range(0, n, step)]

    def detect(self, images: Sequence[np.ndarray], conf: float | None = None) -> list[list[Detection]]:
        if not images:
            return []
        results: list[list[Detection]] = []
        for batch in self._batches(len(images)):
            chunk = images[batch]
            raw = self.runtime.infer(letterbox(chunk, self.card.imgsz))
            results.extend(postprocess(raw, [(im.shape[0], im.shape[1]) for im in chunk], self.card, conf))
        return results

    def detect_tensors(self, frames: np.ndarray) -> list[list[Detection]]:
        """Detections of frames already letterboxed (FP32 [n, 3, S, S]), in batches as large as the runtime takes
        (a static ONNX export or a TensorRT engine takes one frame at a time)."""
        results: list[list[Detection]] = []
        for batch in self._batches(len(frames)):
            chunk = np.ascontiguousarray(frames[batch])
            results.extend(
                postprocess(self.runtime.infer(chunk), [(self.card.imgsz, self.card.imgsz)] * len(chunk), self.card)
            )
        return results

    def run(self, images: Sequence[np.ndarray], floor: float = SCORE_FLOOR) -> list[Inference]:
        """Detections, scores and features of each image, from one inference per batch. One NMS at the lower of
        `floor` and the card's confidence serves both: greedy NMS never lets a lower score suppress a higher one,
        so the detections at the card's confidence are exactly those `detect` returns."""
        if not images:
            return []
        results: list[Inference] = []
        threshold = self.card.conf
        for batch in self._batches(len(images)):
            chunk = images[batch]
            raw, features = self.runtime.infer_with_features(letterbox(chunk, self.card.imgsz))
            found = postprocess(raw, [(im.shape[0], im.shape[1]) for im in chunk], self.card, min(floor, threshold))
            for k, detections in enumerate(found):
                results.append(
                    Inference(
                        [d for d in detections if d.confidence >= threshold],
                        [d for d in detections if d.confidence >= floor],
                        None if features is None else features[k],
                    )
                )
        return results

    def warm_up(self) -> None:
        """One inference on a blank frame: compiles lazily built kernels before real traffic arrives."""
        self.detect([np.full((self.card.imgsz, self.card.imgsz, 3), 114, np.uint8)])
