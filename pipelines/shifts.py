"""What happens to a camera line's images: a bank of shifts, each a seeded function of an image (and its boxes).

Used to measure what a drift check can see (`bench/drift_power.py`: each shift's true mAP cost beside the check's
verdict) and in tests. Camera shifts change pixels (focus, motion, noise, compression, exposure, colour, resolution,
glare, dust, occlusion, rotation); content shifts change what is in front of the camera (a new surface, larger
defects) and are rendered by the synthetic generator itself (`synth` overrides). Every shift is deterministic given
its generator, so a benchmark row can be reproduced image for image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

Boxes = np.ndarray  # [n, 5]: class id, x0, y0, x1, y1 in pixels
PixelShift = Callable[[np.ndarray, np.random.Generator], np.ndarray]
BoxShift = Callable[[Boxes, tuple[int, int]], Boxes]


@dataclass(frozen=True)
class Shift:
    """One change at one strength. `pixels` maps a BGR uint8 image to the changed one; `boxes` moves the labels when
    the geometry changes; `synth` overrides the generator's domain for a content shift; `jpeg_quality` is what the
    camera encodes the frame with."""

    kind: str
    strength: str
    description: str
    pixels: PixelShift | None = None
    boxes: BoxShift | None = None
    synth: dict[str, Any] = field(default_factory=dict)
    jpeg_quality: int = 92
    size: tuple[int, int] | None = None  # (width, height) the frames arrive at, when the camera's resolution changes

    @property
    def name(self) -> str:
        return f"{self.kind} {self.strength}"

    def apply(self, image: np.ndarray, boxes: Boxes, rng: np.random.Generator) -> tuple[np.ndarray, Boxes]:
        """The changed frame as the camera sends it (encoded and decoded at `jpeg_quality`) and its labels."""
        height, width = image.shape[:2]
        out = self.pixels(image, rng) if self.pixels is not None else image
        moved = self.boxes(boxes, (height, width)) if self.boxes is not None else boxes
        if self.size is not None and (out.shape[1], out.shape[0]) != self.size:
            sx, sy = self.size[0] / out.shape[1], self.size[1] / out.shape[0]
            interpolation = cv2.INTER_AREA if sx < 1 else cv2.INTER_LINEAR
            out = np.asarray(cv2.resize(out, self.size, interpolation=interpolation))
            moved = moved.copy()
            moved[:, [1, 3]] *= sx
            moved[:, [2, 4]] *= sy
        return encode_decode(out, self.jpeg_quality), moved


def encode(image: np.ndarray, quality: int) -> bytes:
    """JPEG bytes of a BGR frame, with the encoder and settings the synthetic generator writes its files with."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image[..., ::-1])).save(buffer, format="JPEG", quality=int(quality))
    return buffer.getvalue()


def encode_decode(image: np.ndarray, quality: int) -> np.ndarray:
    return np.asarray(cv2.imdecode(np.frombuffer(encode(image, quality), np.uint8), cv2.IMREAD_COLOR))


def _u8(image: np.ndarray) -> np.ndarray:
    return np.clip(image, 0, 255).astype(np.uint8)


# --- camera shifts -------------------------------------------------------------------------------------------------


def gaussian_blur(sigma: float) -> PixelShift:
    return lambda image, rng: cv2.GaussianBlur(image, (0, 0), sigma)


def motion_blur(length: int) -> PixelShift:
    def apply(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        kernel = np.zeros((length, length), np.float32)
        kernel[length // 2, :] = 1.0 / length  # the belt moves along x
        return cv2.filter2D(image, -1, kernel)

    return apply


def sensor_noise(sigma: float) -> PixelShift:
    return lambda image, rng: _u8(image + rng.normal(0, sigma, image.shape))


def gain(factor: float) -> PixelShift:
    return lambda image, rng: _u8(image.astype(np.float32) * factor)


def gamma(value: float) -> PixelShift:
    table = _u8(255.0 * (np.arange(256) / 255.0) ** value)
    return lambda image, rng: cv2.LUT(image, table)


def haze(amount: float) -> PixelShift:
    """Less contrast: a dirty window or fog between the camera and the part."""
    return lambda image, rng: _u8(image.astype(np.float32) * (1 - amount) + 190 * amount)


def colour_cast(red: float, blue: float) -> PixelShift:
    """White balance off: red and blue gains (BGR order)."""
    gains = np.array([blue, 1.0, red], np.float32)
    return lambda image, rng: _u8(image.astype(np.float32) * gains)


def grayscale() -> PixelShift:
    return lambda image, rng: cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)


def low_resolution(scale: float) -> PixelShift:
    """A cheaper sensor or a digital zoom: fewer real pixels, delivered at the same size."""

    def apply(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        height, width = image.shape[:2]
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        return cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)

    return apply


def glare(strength: float, radius: float = 0.22) -> PixelShift:
    """A specular reflection: a bright soft spot somewhere on the part."""

    def apply(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        height, width = image.shape[:2]
        cy, cx = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        spot = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * (radius * min(height, width)) ** 2))
        return _u8(image + strength * spot[..., None])

    return apply


def vignetting(strength: float) -> PixelShift:
    """A lens that darkens towards the corners (a new lens, or a light moved)."""

    def apply(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        height, width = image.shape[:2]
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        r2 = ((x - width / 2) / (width / 2)) ** 2 + ((y - height / 2) / (height / 2)) ** 2
        return _u8(image * (1 - strength * np.clip(r2 / 2, 0, 1))[..., None].astype(np.float32))

    return apply


def dust(spots: int, max_radius: float = 0.035) -> PixelShift:
    """Dust or droplets on the lens: soft dark blobs that stay where they are from frame to frame."""

    def apply(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        height, width = image.shape[:2]
        placement = np.random.default_rng(12345)  # on the lens: the same spots in every frame
        mask = np.zeros((height, width), np.float32)
        for _ in range(spots):
            centre = (int(placement.uniform(0, width)), int(placement.uniform(0, height)))
            radius = int(placement.uniform(0.3, 1.0) * max_radius * min(height, width)) + 1
            cv2.circle(mask, centre, radius, (placement.uniform(0.5, 0.9),), -1, cv2.LINE_AA)
        soft = cv2.GaussianBlur(mask, (0, 0), 2.0)[..., None]
        return _u8(image * (1 - soft) + 40 * soft)

    return apply


def occlusion(fraction: float) -> PixelShift:
    """Something between the camera and the part (a cable, a guide rail): a dark bar over `fraction` of the view."""

    def apply(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        height = image.shape[0]
        out = image.copy()
        bar = max(1, round(fraction * height))
        top = int(rng.integers(0, max(1, height - bar)))
        out[top : top + bar] = (out[top : top + bar] * 0.15 + 20).astype(np.uint8)
        return out

    return apply


def salt_and_pepper(share: float) -> PixelShift:
    """Dead and hot pixels, or a bad cable: single pixels at black or white."""

    def apply(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = image.copy()
        hit = rng.random(image.shape[:2])
        out[hit < share / 2] = 0
        out[hit > 1 - share / 2] = 255
        return out

    return apply


def rotate(degrees: float) -> tuple[PixelShift, BoxShift]:
    """The camera's mount turned: the frame rotates about its centre (corners filled grey); labels are the rotated
    boxes' bounding boxes (exact at multiples of 90 degrees, slightly loose otherwise)."""

    def matrix(height: int, width: int) -> np.ndarray:
        return cv2.getRotationMatrix2D((width / 2, height / 2), degrees, 1.0)

    def pixels(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        height, width = image.shape[:2]
        return cv2.warpAffine(image, matrix(height, width), (width, height), borderValue=(114, 114, 114))

    def boxes(labels: Boxes, shape: tuple[int, int]) -> Boxes:
        height, width = shape
        m = matrix(height, width)
        out = labels.copy()
        for row in out:
            x0, y0, x1, y1 = row[1:]
            corners = np.array([[x0, y0, 1], [x1, y0, 1], [x0, y1, 1], [x1, y1, 1]], np.float64) @ m.T
            row[1:] = [
                max(0.0, corners[:, 0].min()),
                max(0.0, corners[:, 1].min()),
                min(width - 1.0, corners[:, 0].max()),
                min(height - 1.0, corners[:, 1].max()),
            ]
        return out

    return pixels, boxes


def hflip() -> tuple[PixelShift, BoxShift]:
    def boxes(labels: Boxes, shape: tuple[int, int]) -> Boxes:
        out = labels.copy()
        out[:, 1], out[:, 3] = shape[1] - labels[:, 3], shape[1] - labels[:, 1]
        return out

    return (lambda image, rng: np.ascontiguousarray(image[:, ::-1])), boxes


def _rotation(strength: str, degrees: float, description: str) -> Shift:
    pixels, boxes = rotate(degrees)
    return Shift("rotation", strength, description, pixels, boxes)


def bank() -> list[Shift]:
    """The shifts a line goes through, each at two or three strengths (mild to severe)."""
    flip_pixels, flip_boxes = hflip()
    return [
        Shift("focus", "mild", "Gaussian blur σ 1.0 px", gaussian_blur(1.0)),
        Shift("focus", "medium", "Gaussian blur σ 1.8 px", gaussian_blur(1.8)),
        Shift("focus", "severe", "Gaussian blur σ 2.5 px (out of focus)", gaussian_blur(2.5)),
        Shift("motion blur", "mild", "belt motion, 5 px", motion_blur(5)),
        Shift("motion blur", "severe", "belt motion, 11 px", motion_blur(11)),
        Shift("sensor noise", "mild", "Gaussian noise σ 8", sensor_noise(8)),
        Shift("sensor noise", "medium", "Gaussian noise σ 14", sensor_noise(14)),
        Shift("sensor noise", "severe", "Gaussian noise σ 20", sensor_noise(20)),
        Shift("compression", "mild", "JPEG quality 40", jpeg_quality=40),
        Shift("compression", "medium", "JPEG quality 20", jpeg_quality=20),
        Shift("compression", "severe", "JPEG quality 10", jpeg_quality=10),
        Shift("exposure", "darker", "gain 0.6", gain(0.6)),
        Shift("exposure", "dark", "gain 0.4", gain(0.4)),
        Shift("exposure", "overexposed", "gain 1.5 (highlights clip)", gain(1.5)),
        Shift("exposure", "gamma", "gamma 1.6", gamma(1.6)),
        Shift("contrast", "haze", "contrast 60 % (haze)", haze(0.4)),
        Shift("contrast", "heavy haze", "contrast 35 %", haze(0.65)),
        Shift("colour cast", "warm", "red ×1.2, blue ×0.8", colour_cast(1.2, 0.8)),
        Shift("colour cast", "cold", "red ×0.7, blue ×1.3", colour_cast(0.7, 1.3)),
        Shift("colour cast", "monochrome", "a monochrome camera", grayscale()),
        Shift("resolution", "half", "half the sensor's pixels, upscaled", low_resolution(0.5)),
        Shift("resolution", "third", "a third of the pixels, upscaled", low_resolution(0.33)),
        Shift("resolution", "larger frames", "frames at 640 px", size=(640, 640)),
        Shift("resolution", "smaller frames", "frames at 224 px", size=(224, 224)),
        Shift("glare", "mild", "specular spot +80", glare(80)),
        Shift("glare", "severe", "specular spot +160", glare(160, 0.3)),
        Shift("vignetting", "strong", "corners 60 % darker", vignetting(0.6)),
        Shift("dust", "some", "12 dust spots on the lens", dust(12)),
        Shift("dust", "dirty lens", "40 dust spots on the lens", dust(40, 0.05)),
        Shift("occlusion", "bar", "a guide rail over 15 % of the view", occlusion(0.15)),
        Shift("occlusion", "wide bar", "a guide rail over 30 % of the view", occlusion(0.3)),
        Shift("dead pixels", "some", "1 % salt and pepper", salt_and_pepper(0.01)),
        Shift("dead pixels", "many", "4 % salt and pepper", salt_and_pepper(0.04)),
        _rotation("quarter", 90, "camera mount turned 90°"),
        _rotation("half", 180, "camera mounted upside down"),
        Shift("mirror", "flipped", "image mirrored (a camera setting)", flip_pixels, flip_boxes),
        Shift("surface", "concrete", "a new surface: concrete", synth={"background": "concrete"}),
        Shift("surface", "metal only", "one supplier: metal parts only", synth={"background": "metal"}),
        Shift("defects", "larger", "defects 1.6× larger", synth={"defect_scale": 1.6}),
        Shift("defects", "smaller", "defects 0.6× the size", synth={"defect_scale": 0.6}),
    ]
