#!/usr/bin/env python3
"""Conveyor edge runner: detections for images, from this bundle alone.

Needs numpy, opencv-python-headless (the image decoder) and one runtime: openvino or onnxruntime. No torch, no
Ultralytics, no Conveyor. Letterbox, NMS and box scaling follow Ultralytics' (what the model was evaluated and is
served with); Conveyor's tests hold this file to the server's detections.

    python run.py IMAGE [IMAGE ...] [--runtime openvino|onnx] [--conf C] [--verify]

--conf defaults to the bundle's threshold: serve.conf when the bundle was built.

Prints one JSON line per image: {"image", "width", "height", "detections": [{class_id, class_name, confidence, box}]}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import cv2
import numpy as np

HERE = Path(__file__).resolve().parent
MAX_WH = 7680  # class offset for class-aware NMS, as Ultralytics


def verify(root: Path = HERE) -> None:
    """Every file the manifest lists is present with its SHA-256: a copied bundle is checked before it is trusted."""
    manifest = json.loads((root / "manifest.json").read_text())
    for rel, expected in manifest["sha256"].items():
        digest = hashlib.sha256((root / rel).read_bytes()).hexdigest()
        if digest != expected:
            raise SystemExit(f"bundle damaged: {rel} has sha256 {digest}, manifest says {expected}")


def letterbox(image: np.ndarray, size: int) -> np.ndarray:
    height, width = image.shape[:2]
    r = min(size / height, size / width)
    new_w, new_h = max(round(width * r), 1), max(round(height * r), 1)
    dw, dh = (size - new_w) / 2, (size - new_h) / 2
    if (width, height) != (new_w, new_h):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    image = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(114, 114, 114))
    return np.ascontiguousarray(image[..., ::-1].transpose(2, 0, 1), dtype=np.float32) / 255.0


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    """Greedy NMS, highest score first (torchvision.ops.nms)."""
    order = np.argsort(-scores, kind="stable")
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        x0 = np.maximum(boxes[i, 0], boxes[rest, 0])
        y0 = np.maximum(boxes[i, 1], boxes[rest, 1])
        x1 = np.minimum(boxes[i, 2], boxes[rest, 2])
        y1 = np.minimum(boxes[i, 3], boxes[rest, 3])
        inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
        overlap = inter / (areas[i] + areas[rest] - inter)
        order = rest[overlap <= iou]
    return keep


def postprocess(raw: np.ndarray, shape: tuple[int, int], card: dict, conf: float) -> list[dict]:
    """One image's raw output (4 + classes, anchors) → detections in original-image pixels."""
    preds = raw.T
    scores_all = preds[:, 4:]
    cls = scores_all.argmax(1)
    scores = scores_all[np.arange(len(cls)), cls]
    mask = scores > conf
    preds, cls, scores = preds[mask], cls[mask], scores[mask]
    xy, wh = preds[:, :2], preds[:, 2:4]
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], axis=1)
    keep = nms(boxes + cls[:, None] * MAX_WH, scores, card["iou"])[: card.get("max_det", 300)]
    boxes, cls, scores = boxes[keep], cls[keep], scores[keep]
    size = card["imgsz"]
    height, width = shape
    gain = min(size / height, size / width)
    new_h, new_w = max(round(height * gain), 1), max(round(width * gain), 1)
    pad_x, pad_y = round((size - new_w) / 2 - 0.1), round((size - new_h) / 2 - 0.1)
    boxes = (boxes - [pad_x, pad_y, pad_x, pad_y]) / [new_w / width, new_h / height, new_w / width, new_h / height]
    boxes = np.clip(boxes, 0, [width, height, width, height])
    return [
        {
            "class_id": int(c),
            "class_name": card["names"][int(c)],
            "confidence": round(float(s), 5),
            "box": [round(float(v), 2) for v in b],
        }
        for b, s, c in zip(boxes, scores, cls, strict=True)
    ]


class Model:
    def __init__(self, runtime: str, root: Path = HERE) -> None:
        self.card = json.loads((root / "model" / "metadata.json").read_text())
        if runtime in ("openvino", "openvino_int8"):
            import openvino as ov

            xml = next((root / "model" / runtime).glob("*.xml"))
            # f32 as on the server: OpenVINO's bf16 default (CPUs with AMX) would move confidences in the 3rd digit.
            self._compiled = ov.Core().compile_model(
                xml, "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
            )
            self._infer = lambda x: np.asarray(self._compiled(x)[0])
        elif runtime == "onnx":
            import onnxruntime as ort

            session = ort.InferenceSession(str(root / "model" / "model.onnx"), providers=["CPUExecutionProvider"])
            name = session.get_inputs()[0].name
            self._infer = lambda x: np.asarray(session.run(None, {name: x})[0])
        else:
            raise SystemExit(f"unknown runtime {runtime!r}: openvino, openvino_int8 (if bundled) or onnx")

    def detect(self, image: np.ndarray, conf: float | None = None) -> list[dict]:
        raw = self._infer(letterbox(image, self.card["imgsz"])[None])
        height, width = image.shape[:2]
        return postprocess(raw[0], (height, width), self.card, self.card.get("conf", 0.25) if conf is None else conf)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--runtime", default="openvino", choices=["openvino", "openvino_int8", "onnx"])
    parser.add_argument("--conf", type=float, default=None)
    parser.add_argument("--verify", action="store_true", help="check the manifest's checksums first")
    args = parser.parse_args(argv)
    if args.verify:
        verify()
    model = Model(args.runtime)
    failed = 0
    for path in args.images:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            print(json.dumps({"image": str(path), "error": "cannot read or decode image"}))
            failed += 1
            continue
        found = model.detect(image, args.conf)
        height, width = image.shape[:2]
        print(json.dumps({"image": str(path), "width": width, "height": height, "detections": found}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
