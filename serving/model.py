"""The served model, as an inference server wants it: a batch-in, batch-out step over whatever model the slot holds.

Same shape as the `execute` of Triton's Python backend and the `predict` of KServe's `Model`: the server around it
(here PyTriton, in a cluster Triton itself) owns the protocol, the batching queue and the transport; this class only
turns a batch of requests into a batch of responses. It has no load step of its own: loading is the slot's
(`serving.swap.ModelSlot`, filled by `pipelines.model_source.load` at start and on every hot swap), so a request
always runs whole on one model version.

Tensors (the Open Inference Protocol view):
- image model `NAME`: input `image` BYTES [1] (an encoded JPEG or PNG);
- tensor model `NAME_preprocessed`: input `images` FP32 [3, S, S] (letterboxed RGB in [0, 1], S = the model's size).
Both answer, per image: `detections` FP32 [N, 6] = x0, y0, x1, y1, confidence, class id (boxes in original-image
pixels; for tensors in input pixels), padded with rows of -1 to the batch's largest N; `num_detections` INT32 [1];
`model_version` BYTES [1]; `error` BYTES [1], empty unless that image was refused (one bad image in a batch never
fails the other requests batched with it).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.features import sample_image
from pipelines.inference import Detection, Detector, ImageError, ImageLimits, Inference, decode_image
from pipelines.model_source import LoadedModel
from pipelines.prediction_log import Pending, PredictionLog
from serving.metrics import ServingMetrics
from serving.swap import ModelSlot

IMAGE_INPUT = "image"
TENSOR_INPUT = "images"


@dataclass(frozen=True)
class OutputSpec:
    """One output of the served model, as both Triton front ends declare it (PyTriton and a Triton repository)."""

    name: str
    dtype: type  # numpy's: np.float32, np.int32, or bytes for strings
    shape: tuple[int, ...]  # per request; -1 is any length

    @property
    def triton_type(self) -> str:
        return {np.float32: "TYPE_FP32", np.int32: "TYPE_INT32", bytes: "TYPE_STRING"}[self.dtype]


# What `execute_images` returns per request, in this order.
OUTPUTS = (
    OutputSpec("detections", np.float32, (-1, 6)),  # x1, y1, x2, y2, confidence, class per row
    OutputSpec("num_detections", np.int32, (1,)),
    OutputSpec("model_version", bytes, (1,)),
    OutputSpec("error", bytes, (1,)),  # empty, or why this image could not be read
)


class NoModelError(RuntimeError):
    """No model is loaded yet (no champion): the request cannot be served now, but may be later."""


@dataclass
class BatchItem:
    request: int  # which request of the batch this image belongs to
    image: np.ndarray | None
    error: str
    encoded: bytes = b""  # the request's bytes, kept only while the prediction log may keep the frame


class ServedModel:
    """One model instance (worker) of the server: detector `index` of whatever model the slot holds."""

    def __init__(
        self,
        slot: ModelSlot,
        index: int,
        metrics: ServingMetrics,
        predlog: PredictionLog | None,
        limits: ImageLimits,
    ) -> None:
        self.slot = slot
        self.index = index
        self.metrics = metrics
        self.predlog = predlog
        self.limits = limits

    def execute_images(
        self, encoded: Sequence[np.ndarray], sent_at: Sequence[float | None] = ()
    ) -> list[dict[str, np.ndarray]]:
        """One batch of image requests: `encoded[i]` holds request i's images as BYTES, any shape."""
        model = self._model()  # taken once: the whole batch runs on the model it started with
        self._observe_queue(sent_at)
        started = time.perf_counter()
        items: list[BatchItem] = []
        for r, tensor in enumerate(encoded):
            for raw in np.asarray(tensor, dtype=object).reshape(-1):
                data = bytes(raw)
                try:
                    items.append(BatchItem(r, decode_image(data, self.limits), "", data))
                except ImageError as exc:
                    items.append(BatchItem(r, None, str(exc)))
        detector = self._detector(model)
        found = detector.run([item.image for item in items if item.image is not None])
        results = iter(found)
        per_item = [next(results) if item.image is not None else None for item in items]
        self._account(model, items, per_item, time.perf_counter() - started)
        detections = [result.detections if result is not None else [] for result in per_item]
        return self._responses(len(encoded), items, detections, model.version)

    def execute_tensors(self, tensors: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """One batch of preprocessed requests: `tensors[i]` is request i's FP32 [n, 3, S, S]."""
        model = self._model()
        started = time.perf_counter()
        card = model.card
        expected = (3, card.imgsz, card.imgsz)
        items: list[BatchItem] = []
        frames: list[np.ndarray] = []
        for r, tensor in enumerate(tensors):
            if tensor.ndim < 3 or tensor.size == 0:  # no frame in it to reshape into
                items.append(
                    BatchItem(
                        r, None, f"tensor shape {list(tensor.shape)}, expected [n, {', '.join(map(str, expected))}]"
                    )
                )
                continue
            for frame in np.asarray(tensor, dtype=np.float32).reshape(-1, *tensor.shape[-3:]):
                if frame.shape != expected:
                    items.append(BatchItem(r, None, f"tensor shape {list(frame.shape)}, expected {list(expected)}"))
                else:
                    items.append(BatchItem(r, frame, ""))
                    frames.append(frame)
        found = self._detector(model).detect_tensors(np.stack(frames)) if frames else []
        per_item = _scatter(items, found)
        # Counted like images, but not logged: a letterboxed tensor is not the camera's frame, and the drift check
        # compares what the camera sends with the training images.
        self._count(
            items,
            [d if item.image is not None else None for item, d in zip(items, per_item, strict=True)],
            time.perf_counter() - started,
        )
        return self._responses(len(tensors), items, per_item, model.version)

    def _model(self) -> LoadedModel:
        model = self.slot.current
        if model is None:
            raise NoModelError(self.slot.state.reason)
        return model

    def _detector(self, model: LoadedModel) -> Detector:
        return model.detectors[self.index % len(model.detectors)]

    def _observe_queue(self, sent_at: Sequence[float | None]) -> None:
        now = time.time()
        for sent in sent_at:
            if sent:
                self.metrics.queue_seconds.observe(max(0.0, now - sent))

    def _account(
        self, model: LoadedModel, items: list[BatchItem], per_item: list[Inference | None], seconds: float
    ) -> None:
        self._count(items, [result.detections if result is not None else None for result in per_item], seconds)
        now = time.time()
        for item, result in zip(items, per_item, strict=True):
            if item.image is None or result is None:
                continue
            if self.predlog is not None:
                frame = item.encoded if item.encoded and self.predlog.wants_frame() else None
                sample = sample_image(item.image, model.card.imgsz)
                self.predlog.offer(Pending(now, model.version, sample, result, frame))

    def _count(self, items: list[BatchItem], per_item: list[list[Detection] | None], seconds: float) -> None:
        """The batch in the serving metrics: its time and size, each image served or refused, its detections."""
        m = self.metrics
        m.inference_seconds.observe(seconds)
        m.batch_size.observe(len(items))
        for item, detections in zip(items, per_item, strict=True):
            if item.image is None or detections is None:
                m.images.labels("refused").inc()
                continue
            m.images.labels("ok").inc()
            m.detections_per_image.observe(len(detections))
            for d in detections:
                m.confidence.observe(d.confidence)
                m.detections.labels(d.class_name).inc()

    @staticmethod
    def _responses(
        n_requests: int, items: list[BatchItem], per_item: list[list[Detection]], version: str
    ) -> list[dict[str, np.ndarray]]:
        width = max([len(d) for d in per_item] + [1])
        grouped: list[list[tuple[BatchItem, list[Detection]]]] = [[] for _ in range(n_requests)]
        for item, detections in zip(items, per_item, strict=True):
            grouped[item.request].append((item, detections))
        responses = []
        for group in grouped:
            table = np.full((len(group), width, 6), -1.0, dtype=np.float32)
            for row, (_, detections) in enumerate(group):
                for k, d in enumerate(detections):
                    table[row, k] = (*d.box, d.confidence, d.class_id)
            responses.append(
                {
                    "detections": table,
                    "num_detections": np.array([[len(d)] for _, d in group], dtype=np.int32).reshape(-1, 1),
                    "model_version": np.array([[version.encode()] for _ in group], dtype=object).reshape(-1, 1),
                    "error": np.array([[item.error.encode()] for item, _ in group], dtype=object).reshape(-1, 1),
                }
            )
        return responses


def _scatter(items: list[BatchItem], found: list[list[Detection]]) -> list[list[Detection]]:
    """Detections of the decoded images back beside every item of the batch (refused items get none)."""
    results = iter(found)
    return [next(results) if item.image is not None else [] for item in items]


def detections_from_outputs(
    table: np.ndarray, counts: np.ndarray, names: Sequence[str] | None = None
) -> list[list[dict[str, Any]]]:
    """The v2 outputs (`detections`, `num_detections`) of a batch back as JSON detections, one list per image."""
    out = []
    for rows, count in zip(table, np.asarray(counts).reshape(-1), strict=True):
        found = []
        for x0, y0, x1, y1, conf, cls in rows[: int(count)].tolist():
            found.append(
                Detection(int(cls), names[int(cls)] if names else str(int(cls)), conf, (x0, y0, x1, y1)).to_json()
            )
        out.append(found)
    return out
