#!/usr/bin/env python3
"""Conveyor edge runner: detections for images, or reject decisions for a camera stream, from this bundle alone.

Needs numpy, opencv-python-headless (the image and video decoder) and one runtime: openvino or onnxruntime; for
decisions over MQTT paho-mqtt, for signed rollouts cryptography, for the prediction log pyarrow (and boto3 to ship
it). No torch, no Ultralytics, no Conveyor beyond the two modules the bundle carries (features.py, log_parts.py: the
server's own feature and log code). Letterbox,
NMS and box scaling follow Ultralytics' (what the model was evaluated and is served with); Conveyor's tests hold this
file to the server's detections.

    python run.py IMAGE [IMAGE ...] [--runtime openvino|onnx] [--conf C] [--verify]
    python run.py --stream SOURCE [--mqtt HOST[:PORT]] [--line NAME] [--channel DIR|s3://...] [--public-key PEM]
                  [--rollouts DIR] [--device NAME] [--log DIR] [--log-s3 s3://...] [--no-log]

Images: one JSON line per image, {"image", "width", "height", "detections": [{class_id, class_name, confidence,
box}]}. --conf defaults to the bundle's threshold (serve.conf when the bundle was built).

Stream: SOURCE is a camera index (0), an RTSP/HTTP URL or a video file. A reader thread keeps only the newest frame,
so a slow model never falls behind the camera (the frames it never saw are counted as skipped); a video file plays
at its own frame rate, like a camera (--every-frame decides every frame instead, as fast as the model goes, or at
the file's rate with --paced). Each
frame gets one decision by the bundle's reject rule (edge.json: classes, minimum confidence, minimum box area, region
of interest), printed as a JSON line or published to MQTT (QoS 1, topic conveyor/LINE/decisions). While the broker is
away, decisions wait in a bounded queue and go out in order once it is back; a decision that finds the queue full is
dropped and counted. With --channel, the runner polls the line's channel for a new bundle, verifies its checksums
and its signature (--public-key), loads it beside the running model and swaps between two frames; a bundle that fails
is refused and the running model goes on. The bundle swapped in is kept (--rollouts, edge.json `rollouts`) and run
again after a restart. With the prediction log (edge.json `log`, on by default), each decided
frame also leaves the server's prediction-log record, with this runner's --device and the line, in hourly Parquet
parts under --log, shipped to the s3:// prefix where the server's land (edge.json, or --log-s3): `conveyor drift
--device NAME` checks them. At the end (the stream ended, Ctrl-C, --frames reached) a summary line: frames, frames/s,
capture-to-decision p50/p99, skipped frames, rejects, decisions published and dropped, records logged and shipped.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import json
import os
import queue
import re
import shutil
import signal
import sys
import tarfile
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import cv2
import numpy as np

HERE = Path(__file__).resolve().parent
MAX_WH = 7680  # class offset for class-aware NMS, as Ultralytics
PROBLEMS_KEPT = 20
LATENCIES_KEPT = 100_000
DEVICE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # as `conveyor drift --device` takes it
LINE_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # as params.yaml edge.line (the runner imports nothing of Conveyor)
FEATURES_OUTPUT = "features"  # the model's pooled features, added at export (Conveyor's pipelines/model_features.py)
SCORE_FLOOR = 0.01  # candidates kept for the log's performance estimate, as the server's (pipelines/inference.py)


UNLISTED = {"manifest.json", "manifest.sig"}  # the only files of a bundle its manifest cannot list
PYTHON_FILES = {".py", ".pyc", ".so", ".pyd"}  # what Python imports a module from


class StreamError(RuntimeError):
    """The stream could not be read on (not its end): the runner exits non-zero, so that its supervisor restarts it."""


class BundleError(Exception):
    """A bundle that cannot be trusted or run: damaged, unsigned, for another model, or unloadable."""


def verify(root: Path = HERE, public_key: Path | None = None) -> dict[str, Any]:
    """Every file the manifest lists is present with its SHA-256 (a copied bundle is checked before it is trusted),
    and, with `public_key`, the manifest carries the team's signature. Returns the manifest."""
    manifest_file = root / "manifest.json"
    if not manifest_file.is_file():
        raise BundleError(f"{root}: no manifest.json: not a Conveyor bundle")
    signed = manifest_file.read_bytes()  # read once: what is parsed is what the signature was checked on
    if public_key is not None:  # first: nothing an unsigned manifest names is read before the team's key vouches
        verify_signature(signed, root / "manifest.sig", public_key)
    try:
        manifest = json.loads(signed)
        listed = manifest["sha256"]
        if not isinstance(listed, dict) or not all(isinstance(v, str) for v in listed.values()):
            raise TypeError("sha256 is not a mapping of files to digests")
    except (ValueError, KeyError, TypeError) as exc:  # cut short, or not a manifest: it was a JSON traceback
        raise BundleError(f"bundle damaged: {manifest_file} is not a readable manifest ({exc!r})") from None
    for rel, expected in listed.items():
        path = root / rel
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"
        if digest != expected:
            raise BundleError(f"bundle damaged: {rel} has sha256 {digest}, manifest says {expected}")
    # A file the manifest does not list is covered by no checksum and no signature: a model put beside the signed
    # ones, or a module or package beside run.py (the first place Python imports from), would be loaded all the
    # same. Anything else (the runner's log in edge-log/, a shell's nohup.out) is not loaded, and left alone.
    unlisted = sorted(rel for rel in _loadable(root) if rel not in listed and rel not in UNLISTED)
    if unlisted:
        raise BundleError(
            f"bundle holds {len(unlisted)} file(s) its manifest does not list ({', '.join(unlisted[:3])}): added "
            "after it was built, so not trusted"
        )
    return dict(manifest)


def _loadable(root: Path) -> Iterator[str]:
    """The bundle's files the runner or Python may load: the model's, bytecode caches, modules at the top level and
    the files of packages there (Python imports from the script's folder first). Other folders (the runner's log,
    which grows by the hour) are not walked."""
    for entry in root.iterdir():
        if not entry.is_dir():
            if entry.suffix in PYTHON_FILES:
                yield entry.name
        elif entry.name in ("model", "__pycache__") or any(
            (entry / f"__init__{suffix}").exists() for suffix in PYTHON_FILES
        ):
            yield from (p.relative_to(root).as_posix() for p in entry.rglob("*") if p.is_file() or p.is_symlink())


def verify_signature(message: bytes, signature_file: Path, public_key: Path) -> None:
    """The Ed25519 signature of the manifest, made with the team's private key (`conveyor edge keygen`)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(public_key.read_bytes())
    except OSError as exc:  # missing, a folder, unreadable
        raise BundleError(f"--public-key {public_key}: cannot read it: {exc.strerror or exc}") from None
    except (ValueError, TypeError):  # not PEM, or PEM of something else than a public key
        raise BundleError(
            f"--public-key {public_key}: not a PEM public key (`conveyor edge keygen` writes one)"
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"--public-key {public_key}: not an Ed25519 public key")
    if not signature_file.is_file():
        raise BundleError("bundle unsigned: no manifest.sig, and this runner only accepts signed bundles")
    try:
        key.verify(signature_file.read_bytes(), message)
    except InvalidSignature:
        raise BundleError("bundle signature invalid: not signed by the team's key, or changed since") from None


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
        self.root = root
        self.card = json.loads((root / "model" / "metadata.json").read_text())
        manifest = root / "manifest.json"
        self.manifest = json.loads(manifest.read_text()) if manifest.is_file() else {}
        if runtime in ("openvino", "openvino_int8"):
            import openvino as ov

            listed = sorted(
                rel
                for rel in self.manifest.get("sha256", {})
                if rel.startswith(f"model/{runtime}/") and rel.endswith(".xml")
            )
            # The network the manifest lists (a bundle without one, unverified: the folder's).
            xml = root / listed[0] if listed else next(iter(sorted((root / "model" / runtime).glob("*.xml"))), None)
            if xml is None:
                raise BundleError(
                    f"this bundle has no {runtime} model"
                    + (
                        " (int8 is bundled only when it passed the parity gate): use --runtime openvino"
                        if "int8" in runtime
                        else ""
                    )
                )
            # f32 as on the server: OpenVINO's bf16 default (CPUs with AMX) would move confidences in the 3rd digit.
            # Threads unpinned as on the server: a pinned thread cannot leave a core the log shipper or the broker
            # client landed on (docs/benchmarks.md: 5x slower with one core busy).
            compiled = ov.Core().compile_model(
                xml,
                "CPU",
                {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32", "ENABLE_CPU_PINNING": False},
            )
            named = [o for o in compiled.outputs if FEATURES_OUTPUT in o.get_names()]

            def infer(x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
                out = compiled(x)
                return np.asarray(out[0]), np.asarray(out[named[0]]) if named else None

            self._infer = infer
        elif runtime == "onnx":
            import onnxruntime as ort

            session = ort.InferenceSession(str(root / "model" / "model.onnx"), providers=["CPUExecutionProvider"])
            name = session.get_inputs()[0].name
            outputs = [o.name for o in session.get_outputs()]
            wanted = [outputs[0]] + ([FEATURES_OUTPUT] if FEATURES_OUTPUT in outputs else [])

            def infer(x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
                out = session.run(wanted, {name: x})
                return np.asarray(out[0]), np.asarray(out[1]) if len(out) > 1 else None

            self._infer = infer
        else:
            raise SystemExit(f"unknown runtime {runtime!r}: openvino, openvino_int8 (if bundled) or onnx")

    @property
    def version(self) -> str:
        return f"{self.manifest.get('model', '?')} v{self.manifest.get('version', '?')}"

    @property
    def version_number(self) -> str:
        return str(self.manifest.get("version", "?"))

    def threshold(self, conf: float | None = None) -> float:
        """`conf`, else the bundle's own threshold (serve.conf when it was built)."""
        return float(self.card.get("conf", 0.25)) if conf is None else conf

    def detect(self, image: np.ndarray, conf: float | None = None) -> list[dict]:
        raw, _ = self._infer(letterbox(image, self.card["imgsz"])[None])
        height, width = image.shape[:2]
        return postprocess(raw[0], (height, width), self.card, self.threshold(conf))

    def infer(self, image: np.ndarray, conf: float | None = None) -> Found:
        """Detections at `conf`, every candidate from SCORE_FLOOR up and the `features` output, from one inference
        and one NMS (greedy NMS never lets a lower score suppress a higher one): what the server logs per image."""
        raw, features = self._infer(letterbox(image, self.card["imgsz"])[None])
        threshold = self.threshold(conf)
        height, width = image.shape[:2]
        candidates = postprocess(raw[0], (height, width), self.card, min(SCORE_FLOOR, threshold))
        return Found(
            [d for d in candidates if d["confidence"] >= threshold],
            [d for d in candidates if d["confidence"] >= SCORE_FLOOR],
            None if features is None else features[0],
        )


@dataclass(frozen=True)
class Found:
    """One frame's inference, read by the log's feature code (`features.record`) as the server's `Inference` is."""

    found: list[dict]  # at the decision threshold
    candidate_dicts: list[dict]  # from SCORE_FLOOR up
    features: np.ndarray | None

    @property
    def detections(self) -> list[Any]:
        return [SimpleNamespace(**d) for d in self.found]

    @property
    def scores(self) -> list[tuple[float, int]]:
        return [(round(d["confidence"], 4), d["class_id"]) for d in self.candidate_dicts]

    @property
    def score_boxes(self) -> list[tuple[float, float, float, float]]:
        return [tuple(d["box"]) for d in self.candidate_dicts]

    def at(self, threshold: float) -> Found:
        """The same inference with its detections at another threshold (the candidates and features unchanged)."""
        return Found(
            [d for d in self.candidate_dicts if d["confidence"] >= threshold], self.candidate_dicts, self.features
        )


# --- decisions ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RejectRule:
    """When a part is rejected: a detection of one of `classes` (all when None) at `min_confidence` or more, whose box
    covers at least `min_area` pixels and whose centre lies in the region of interest (fractions of the frame)."""

    classes: tuple[str, ...] | None = None
    min_confidence: float = 0.5
    min_area: float = 0.0
    roi: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)

    @classmethod
    def load(cls, root: Path = HERE) -> RejectRule:
        config = root / "edge.json"
        rule = json.loads(config.read_text()).get("reject", {}) if config.is_file() else {}
        classes = rule.get("classes")
        return cls(
            tuple(classes) if classes else None,
            float(rule.get("min_confidence", 0.5)),
            float(rule.get("min_area", 0.0)),
            tuple(rule.get("roi", (0.0, 0.0, 1.0, 1.0))),
        )

    @classmethod
    def of_line(cls, root: Path, line: str) -> RejectRule:
        """The rule of a bundle taken from a line's channel: its edge.json must be there (signed, in the manifest)
        and name this line. Another line's bundle carries another line's rule and region of interest; a channel
        writer pointing this line at it is refused."""
        config = root / "edge.json"
        if not config.is_file():
            raise BundleError("the bundle has no edge.json (its reject rule): rebuild it with `conveyor bundle`")
        built_for = json.loads(config.read_text()).get("line")
        if built_for != line:
            raise BundleError(
                f"the bundle was built for line {built_for!r}, this runner is line {line!r}: build and publish it "
                f"with `conveyor bundle --publish --line {line}`"
            )
        return cls.load(root)

    def unmet_below(self, threshold: float) -> str | None:
        """What the rule promises and cannot keep when detections are made from `threshold` up (None: nothing)."""
        if self.min_confidence >= threshold:
            return None
        return (
            f"the reject rule's min_confidence {self.min_confidence} is below the detection threshold {threshold} "
            f"(--conf, or serve.conf when the bundle was built): no detection under {threshold} is made, so none "
            "rejects"
        )

    def reasons(self, detections: list[dict], width: int, height: int) -> list[dict]:
        """The detections that reject the part (none: it passes)."""
        x0, y0, x1, y1 = self.roi[0] * width, self.roi[1] * height, self.roi[2] * width, self.roi[3] * height
        found = []
        for d in detections:
            bx0, by0, bx1, by1 = d["box"]
            cx, cy = (bx0 + bx1) / 2, (by0 + by1) / 2
            if (
                (self.classes is None or d["class_name"] in self.classes)
                and d["confidence"] >= self.min_confidence
                and (bx1 - bx0) * (by1 - by0) >= self.min_area
                and x0 <= cx <= x1
                and y0 <= cy <= y1
            ):
                found.append(d)
        return found


# --- the stream -----------------------------------------------------------------------------------------------------


@dataclass
class Frame:
    index: int  # position in the stream (frames the reader saw, skipped ones included)
    captured: float  # time.monotonic() when the reader got it
    image: np.ndarray


def open_capture(source: str) -> Any:
    return cv2.VideoCapture(int(source) if source.isdigit() else source)


class FrameReader:
    """The stream's frames, newest first. By default a thread reads the stream and keeps only the newest frame: the
    consumer always gets the latest one, and every frame overwritten before it was taken is counted in `skipped`.
    With `every_frame`, frames are read in the consumer's own thread, one per call, so every frame is decided and
    none is skipped (and no thread competes with the model for the cores). A video file is paced at its own frame
    rate, as a camera delivers frames, unless `paced` is False (by default it is when not `every_frame`). A live
    source that stops delivering is reopened (a camera unplugged and back); a file that ends, or whose frames stop
    being readable (damaged, cut short), ends the stream."""

    def __init__(
        self,
        source: str,
        every_frame: bool = False,
        paced: bool | None = None,
        reopen_after: int = 25,
        open_capture: Callable = open_capture,
    ) -> None:
        self.source = source
        self.live = not Path(source).is_file()
        self.every_frame = every_frame
        self.reopen_after = reopen_after
        self._open = open_capture
        self.capture = self._open(source)
        if not self.capture.isOpened():
            raise SystemExit(f"cannot open the stream {source!r}: not a camera index, URL or readable video file")
        fps = float(self.capture.get(cv2.CAP_PROP_FPS) or 0.0)
        # A file's frames are numbered by their time in it, so a corrupt frame the decoder drops does not shift every
        # later frame's number (`conveyor edge score` matches decisions to parts by it).
        self.fps = fps if (fps > 0 and not self.live) else 0.0
        paced = not every_frame if paced is None else paced
        self.period = 1.0 / self.fps if paced and self.fps else 0.0
        self.skipped = 0
        self.unreadable = 0  # frames the decoder could not read (a corrupt frame, a camera that hiccuped)
        self.reopened = 0
        self.problems: deque[str] = deque(maxlen=PROBLEMS_KEPT)  # a camera down for a week: the last ones
        self.ended = threading.Event()
        self._index = 0
        self._started = time.monotonic()
        self._newest: Frame | None = None
        self.error: Exception | None = None  # what ended the reader thread, if not the stream's end
        self._ready = threading.Condition()
        self._thread: threading.Thread | None = None
        if not every_frame:
            self._thread = threading.Thread(target=self._run, name="frame-reader", daemon=True)
            self._thread.start()

    def _next(self) -> Frame | None:
        """The next frame of the stream, paced; None when it has ended."""
        failures = 0
        while not self.ended.is_set():
            ok, image = self.capture.read()
            if ok and image is not None:
                break
            if not self.live and self._at_end():
                return None
            failures += 1
            self.unreadable += 1
            if failures < self.reopen_after:
                continue
            if not self.live:  # a file damaged or cut short: its end
                self.problems.append(
                    f"{self.source}: no readable frame after frame {self._index}: damaged or truncated"
                )
                print(f"warning: {self.problems[-1]}", file=sys.stderr)
                return None
            self.problems.append(f"the stream stopped delivering: reopening {self.source}")
            if self.reopened < 10 or self.reopened % 100 == 0:  # a camera away for hours: not a line every 5 s
                print(
                    f"warning: no frame from {self.source} {failures} times: reopening it "
                    f"({self.reopened + 1} reopens so far)",
                    file=sys.stderr,
                )
            self.capture.release()
            time.sleep(min(5.0, 0.5 * (1 + self.reopened)))
            self.capture = self._open(self.source)
            self.reopened += 1
            failures = 0
        else:
            return None
        if self.fps:
            self._index = max(self._index, round(self.capture.get(cv2.CAP_PROP_POS_MSEC) * self.fps / 1000))
        if self.period:
            delay = self._started + self._index * self.period - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        frame = Frame(self._index, time.monotonic(), image)
        self._index += 1
        return frame

    def _run(self) -> None:
        try:
            while (frame := self._next()) is not None:
                with self._ready:
                    if self._newest is not None:
                        self.skipped += 1
                    self._newest = frame
                    self._ready.notify()
        except Exception as exc:  # a backend's error: the consumer waited for frames forever, deciding nothing
            self.error = exc
        finally:
            self.ended.set()
            with self._ready:
                self._ready.notify_all()
            # This thread owns the capture: released from another thread in the middle of a read (a stalled RTSP
            # read lasts up to 30 s), OpenCV's native decoder can crash the process.
            self.capture.release()

    def _at_end(self) -> bool:
        # The decoder's position does not count a frame it could not read; the frames' own numbers do.
        position = max(self.capture.get(cv2.CAP_PROP_POS_FRAMES), self._index)
        count = self.capture.get(cv2.CAP_PROP_FRAME_COUNT)
        return count <= 0 or position >= count

    def frames(self) -> Iterator[Frame]:
        """The newest frame each time (every frame, with `every_frame`), until the stream ends."""
        if self._thread is None:
            while True:
                try:
                    frame = self._next()
                except Exception as exc:  # as the reader thread's: said, and the runner exits non-zero
                    raise StreamError(f"reading {self.source} failed: {exc!r}") from exc
                if frame is None:
                    return
                yield frame
        while True:
            with self._ready:
                while self._newest is None and not self.ended.is_set():
                    self._ready.wait(0.5)
                frame, self._newest = self._newest, None
            if frame is None:
                if self.error is not None:
                    raise StreamError(f"reading {self.source} failed: {self.error!r}") from self.error
                return
            yield frame

    def close(self) -> None:
        """Stop reading. The reader thread releases the capture itself, once its read returns; a read still stuck
        after 5 s is left to it (a daemon thread), and the caller goes on to close the log and the publisher."""
        self.ended.set()
        if self._thread is None:
            self.capture.release()
            return
        self._thread.join(timeout=5)
        if self._thread.is_alive():
            print(f"warning: {self.source} is still in a read: left to finish on its own", file=sys.stderr)


# --- where decisions go ---------------------------------------------------------------------------------------------


class Publisher:
    published = 0
    dropped = 0

    def publish(self, decision: dict) -> None:
        raise NotImplementedError

    def close(self, timeout: float = 10.0) -> None:
        pass


class JsonLines(Publisher):
    def publish(self, decision: dict) -> None:
        print(json.dumps(decision), flush=True)
        self.published += 1


def topic_of(line: str) -> str:
    return f"conveyor/{line}/decisions"


class Mqtt(Publisher):
    """QoS 1 to `topic`, through paho-mqtt's own session: it reconnects by itself, and while the broker is away the
    decisions wait in paho's outgoing queue (bounded at `queue_size`) and go out in order once it is back. A decision
    that finds the queue full is dropped and counted; the ones queued before it keep their order."""

    def __init__(self, address: str, topic: str, client_id: str, queue_size: int = 10_000) -> None:
        import paho.mqtt.client as mqtt

        host, _, port = address.rpartition(":") if ":" in address else (address, "", "")
        self.topic = topic
        self._mqtt = mqtt
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        self.client.max_queued_messages_set(queue_size)
        self.client.max_inflight_messages_set(100)
        self.client.reconnect_delay_set(min_delay=1, max_delay=5)
        self.acknowledged = 0  # PUBACKs from the broker: delivered
        self._lock = threading.Lock()
        self.client.on_publish = self._acknowledged
        self.client.connect_async(host, int(port or 1883))
        self.client.loop_start()

    def _acknowledged(self, *args: Any) -> None:
        with self._lock:
            self.acknowledged += 1

    def publish(self, decision: dict) -> None:
        # Not connected (NO_CONN) still queues a QoS 1 message: paho sends it once the broker is back.
        info = self.client.publish(self.topic, json.dumps(decision), qos=1)
        if info.rc == self._mqtt.MQTT_ERR_QUEUE_SIZE:
            self.dropped += 1
            return
        self.published += 1

    def pending(self) -> int:
        with self._lock:
            return self.published - self.acknowledged

    def close(self, timeout: float = 10.0) -> None:
        """Wait up to `timeout` s for the broker to acknowledge what is queued, then disconnect."""
        deadline = time.monotonic() + timeout
        while self.pending() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.pending():
            print(f"warning: {self.pending()} decisions not acknowledged by the broker at exit", file=sys.stderr)
        self.client.disconnect()
        self.client.loop_stop()


# --- rollout --------------------------------------------------------------------------------------------------------


def manifest_digest(root: Path) -> str:
    """What names a bundle in the channel: the SHA-256 of its manifest (which holds the SHA-256 of every file)."""
    manifest = root / "manifest.json"
    return hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else ""


ARCHIVE_DIGEST = re.compile(r"[0-9a-f]{64}")
# A bundle is about 20-40 MB (two runtimes' models and the runner). Far past that is not a bundle: the channel's
# entry is not signed, so an archive is bounded before it is fetched whole or unpacked, not after.
MAX_ARCHIVE_BYTES = 512 * 2**20
MAX_UNPACKED_BYTES = 1024 * 2**20
CHUNK_BYTES = 2**20


def checked_entry(entry: Any, where: str) -> dict[str, Any]:
    """A channel entry whose fields are safe to act on. `LINE.json` is not signed (anyone who can write the channel
    writes it): its archive digest names a folder here, and its path is read inside the channel, so both are checked
    before either is used. The bundle itself is checked against the team's signature after it is fetched."""
    if not isinstance(entry, dict):
        raise BundleError(f"{where}: not a channel entry (a JSON object with bundle and sha256)")
    digest, bundle = entry.get("sha256"), entry.get("bundle")
    if not isinstance(digest, str) or not ARCHIVE_DIGEST.fullmatch(digest):
        raise BundleError(f"{where}: sha256 {str(digest)[:80]!r} is not an archive's SHA-256 (64 hex digits)")
    name = bundle.removeprefix("bundles/") if isinstance(bundle, str) and bundle.startswith("bundles/") else ""
    if not name.endswith(".tar.gz") or "/" in name or "\\" in name or name.startswith("."):
        raise BundleError(f"{where}: bundle {str(bundle)[:120]!r} is not bundles/NAME.tar.gz inside the channel")
    return entry


class Channel:
    """Where the team publishes the bundle each line should run: `LINE.json` ({"bundle": the .tar.gz's path relative
    to the channel, "sha256" of the archive, "manifest_sha256", "model", "version"}) in a folder or under
    s3://bucket/prefix (boto3; endpoint and credentials from AWS_ENDPOINT_URL and AWS_*)."""

    def __init__(self, location: str, line: str) -> None:
        self.location = location.rstrip("/")
        self.line = line

    def _chunks(self, relative: str, limit: int) -> Iterator[bytes]:
        """The object's bytes in chunks, refused past `limit` bytes; FileNotFoundError when it is not there (a
        channel nothing was published to yet)."""
        if not self.location.startswith("s3://"):
            with (Path(self.location) / relative).open("rb") as handle:
                yield from _bounded(iter(lambda: handle.read(CHUNK_BYTES), b""), limit, relative)
            return
        from botocore.exceptions import ClientError

        bucket, _, prefix = self.location[5:].partition("/")
        key = f"{prefix}/{relative}" if prefix else relative
        s3 = s3_client()
        try:
            body = s3.get_object(Bucket=bucket, Key=key)["Body"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise FileNotFoundError(f"{self.location}/{key}: no such object") from None
            raise
        try:
            yield from _bounded(body.iter_chunks(CHUNK_BYTES), limit, relative)
        finally:
            body.close()

    def current(self) -> Any:
        """The line's entry as the channel holds it (checked by `checked_entry`), or None when nothing was published
        for it."""
        try:
            return json.loads(b"".join(self._chunks(f"{self.line}.json", 2**20)))
        except FileNotFoundError:
            return None

    def fetch(self, entry: dict[str, Any], into: Path) -> Path:
        """The entry's bundle, checked against its sha256 and unpacked into `into`; returns the bundle folder. The
        archive is written as it arrives (never whole in memory), and its members' sizes are added up from their
        headers before anything is unpacked."""
        entry = checked_entry(entry, f"{self.location}/{self.line}.json")
        into.mkdir(parents=True, exist_ok=True)
        path = into / "bundle.tar.gz"
        digest = hashlib.sha256()
        with path.open("wb") as out:
            for chunk in self._chunks(entry["bundle"], MAX_ARCHIVE_BYTES):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != entry["sha256"]:
            raise BundleError(f"{entry['bundle']}: sha256 {digest.hexdigest()}, the channel says {entry['sha256']}")
        with tarfile.open(path) as tar:
            members = tar.getmembers()
            unpacked = sum(m.size for m in members)
            if unpacked > MAX_UNPACKED_BYTES or any(m.issparse() for m in members):
                raise BundleError(
                    f"{entry['bundle']}: unpacks to {unpacked / 2**20:.0f} MB, past the {MAX_UNPACKED_BYTES // 2**20}"
                    " MB a bundle may take (or holds sparse files): not a bundle"
                )
            tar.extractall(into, members=members, filter="data")
        path.unlink()
        folders = [p for p in into.iterdir() if p.is_dir()]
        if len(folders) != 1:
            raise BundleError(f"{entry['bundle']}: expected one bundle folder in the archive, found {len(folders)}")
        return folders[0]


def _bounded(chunks: Iterator[bytes], limit: int, what: str) -> Iterator[bytes]:
    total = 0
    for chunk in chunks:
        total += len(chunk)
        if total > limit:
            raise BundleError(f"{what}: larger than {limit // 2**20} MB: not what a channel holds")
        yield chunk


BUNDLE_FOLDER = re.compile(r"[0-9a-f]{16}")  # a fetched bundle's folder: its archive's SHA-256, cut short
ROLLOUT_STATE = "current.json"  # in the rollout folder: the bundle last swapped in, run again after a restart


def rolled_out(
    directory: Path, public_key: Path | None, model_name: str | None, line: str | None = None
) -> Path | None:
    """The bundle this runner last took from the channel (`Rollout`'s folder), checked again (checksums, signature,
    the same model, built for `line`): the line restarts on what it ran, not on the bundle installed before, which
    may be months older or a version rolled back. None when there is none, or when it no longer passes (then
    said)."""
    state = directory / ROLLOUT_STATE
    if not state.is_file():
        return None
    try:
        root = directory / json.loads(state.read_text())["root"]
        manifest = verify(root, public_key)
        if model_name and manifest.get("model") != model_name:
            raise BundleError(f"it is for model {manifest.get('model')!r}, this bundle is {model_name!r}")
        if line is not None:
            RejectRule.of_line(root, line)
    except (BundleError, OSError, ValueError, KeyError, TypeError) as exc:
        print(
            f"warning: the bundle last rolled out here ({state}) is not run again: {exc}; starting on this one",
            file=sys.stderr,
        )
        return None
    return root


class Rollout:
    """Polls the channel in a thread; a new entry is fetched into `directory`, verified (checksums, signature, same
    model name) and loaded beside the running model; the stream loop takes it between two frames (`swap_if_ready`).
    The folder keeps only the bundle running (named in its current.json, which `rolled_out` reads at the next start)
    and the one waiting to be swapped in: a refused bundle, or one swapped out, is deleted."""

    def __init__(
        self,
        channel: Channel,
        model: Model,
        runtime: str,
        public_key: Path | None,
        poll_seconds: float,
        directory: Path,
    ) -> None:
        self.channel = channel
        self.runtime = runtime
        self.public_key = public_key
        self.poll_seconds = poll_seconds
        self.current = manifest_digest(model.root)
        self.running_name = model.manifest.get("model")
        self.refused: list[str] = []
        self.swaps: list[str] = []
        self.problems: list[str] = []  # what went wrong around a swap that did not stop it
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._seen: str | None = None
        self._ready: queue.Queue[tuple[Model, RejectRule, dict[str, Any]]] = queue.Queue(maxsize=1)
        self._keep_lock = threading.Lock()
        self._running = self._folder_of(model.root)  # the folders not to delete
        self._waiting: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rollout", daemon=True)

    def start(self) -> Rollout:
        """Poll the channel in a thread from now on (the stream loop swaps in what it verified)."""
        self._thread.start()
        return self

    def _folder_of(self, root: Path) -> str | None:
        """The folder of `directory` a bundle root lies in (None: the installed bundle, elsewhere)."""
        try:
            return root.resolve().relative_to(self.directory.resolve()).parts[0]
        except (ValueError, IndexError):
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception as exc:  # a store that is down: the running model goes on; ask again next time
                print(f"warning: rollout channel {self.channel.location}: {exc}", file=sys.stderr)
            try:
                self._tidy()
            except OSError as exc:  # its folder removed or unreadable: this thread must not die of it
                print(f"warning: cannot tidy {self.directory}: {exc}", file=sys.stderr)
            self._stop.wait(self.poll_seconds)

    def poll_once(self) -> None:
        if self._ready.full():
            # One bundle waits for the stream to take it (a camera that stalled): the channel is looked at again
            # once it is running, so a newer entry never races the one waiting (and its folder is never tidied away
            # while it waits).
            return
        raw = self.channel.current()
        if raw is None or (isinstance(raw, dict) and raw.get("manifest_sha256") == self.current):
            return  # nothing published, or running it already
        seen = json.dumps(raw, sort_keys=True)
        if seen == self._seen:
            return  # tried this very entry before: a refused bundle is not fetched again and again
        try:
            entry = checked_entry(raw, f"{self.channel.location}/{self.channel.line}.json")
        except BundleError as exc:
            self._refuse(raw, seen, exc, None)
            return
        folder = entry["sha256"][:16]  # named by the archive's own hash
        with self._keep_lock:
            in_use = folder in (self._running, self._waiting)
        if in_use:  # the very archive running (or waiting): never deleted to be fetched again
            self._seen = seen
            return
        target = self.directory / folder
        shutil.rmtree(target, ignore_errors=True)
        try:
            root = self.channel.fetch(entry, target)
        except (BundleError, tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
            # Not the archive the channel names, not an archive, or one cut short when it was published.
            self._refuse(entry, seen, exc, target)
            return
        # Anything else (the store away, a download cut short) leaves the entry to be fetched again next time.
        self._seen = seen
        try:
            manifest = verify(root, self.public_key)
            if self.running_name and manifest.get("model") != self.running_name:
                raise BundleError(
                    f"the bundle is for model {manifest.get('model')!r}, this line runs {self.running_name!r}"
                )
            rule = RejectRule.of_line(root, self.channel.line)
            model = Model(self.runtime, root)
            model.detect(np.zeros((model.card["imgsz"], model.card["imgsz"], 3), np.uint8))  # loads, and warms up
        except Exception as exc:  # a check failed, or the runtime cannot load or run it (its errors vary)
            self._refuse(entry, seen, exc, target)
            return
        with self._keep_lock:
            self._waiting = folder
        self._ready.put((model, rule, entry))

    def _refuse(self, entry: Any, seen: str, exc: BaseException, target: Path | None) -> None:
        """A bundle that failed a check is not fetched again (until the channel names another), nor kept."""
        self._seen = seen
        if target is not None:
            shutil.rmtree(target, ignore_errors=True)
        named = entry.get("bundle") if isinstance(entry, dict) else None
        reason = f"{str(named)[:120] if named else 'the channel entry'}: {str(exc) or type(exc).__name__}"
        self.refused.append(reason)
        print(f"refused bundle {reason}; the running model goes on", file=sys.stderr)

    def swap_if_ready(self) -> tuple[Model, RejectRule] | None:
        """The bundle verified and waiting, with the reject rule read from it when it was verified (nothing is read
        from its folder after the checks)."""
        try:
            model, rule, entry = self._ready.get_nowait()
        except queue.Empty:
            return None
        self.current = manifest_digest(model.root)
        self.swaps.append(model.version)
        with self._keep_lock:
            self._running, self._waiting = self._folder_of(model.root), None
        # What the next start runs (`rolled_out`): written whole, then renamed, so a kill leaves the old or the new.
        state = self.directory / ROLLOUT_STATE
        staged = state.with_suffix(".partial")
        root = model.root.resolve().relative_to(self.directory.resolve()).as_posix()
        try:
            staged.write_text(json.dumps({"root": root, "bundle": entry.get("bundle"), "taken": time.time()}))
            os.replace(staged, state)
        except OSError as exc:  # a full disk, a read-only mount: the swap stands; only a restart would not keep it
            self.problems.append(f"swapped to v{model.version} but could not record it for the next start: {exc}")
            print(f"warning: {self.problems[-1]}", file=sys.stderr)
        return model, rule

    def _tidy(self) -> None:
        """Delete the bundles no longer running or waiting (a swapped-out one: about 20 MB each)."""
        with self._keep_lock:
            keep = {self._running, self._waiting}
        for folder in self.directory.iterdir():
            if folder.is_dir() and BUNDLE_FOLDER.fullmatch(folder.name) and folder.name not in keep:
                shutil.rmtree(folder, ignore_errors=True)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


# --- the log for monitoring ----------------------------------------------------------------------------------------


def bundled_module(name: str, root: Path = HERE) -> ModuleType:
    """One of Conveyor's own modules the bundle carries (features.py, log_parts.py), loaded from the bundle: the
    same code the server logs with. Registered in sys.modules first (its dataclasses look themselves up there)."""
    import importlib.util

    key = f"conveyor_edge_{name}"
    if key in sys.modules:
        return sys.modules[key]
    path = root / f"{name}.py"
    if not path.is_file():
        raise BundleError(f"{path} missing: this bundle was built without the prediction log's code; rebuild it")
    spec = importlib.util.spec_from_file_location(key, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    # No bytecode cache beside the bundle's modules: its folder keeps exactly what its manifest lists (`verify`).
    writes, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = writes
    return module


def s3_client() -> Any:
    """boto3's S3 client; endpoint and credentials from the environment (AWS_ENDPOINT_URL, AWS_*). Short timeouts
    and two attempts, as the server's (`conveyor.storage.client`): the log's writer thread ships, and boto3's
    defaults (60 s, more retries) held it while the queue filled and dropped records."""
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 2, "mode": "standard"})
    return boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL"), config=config)


@dataclass(frozen=True)
class LogItem:
    at: float
    version: str
    sample: Any  # features.ImageSample
    found: Found
    frame: bytes | None = None


class EdgeLog:
    """The server's prediction-log records for the frames this runner decides, with its `device` and `line`: the
    bundle's features.py computes them and its log_parts.py writes the Parquet parts (date=/hour=/ folders under
    `directory`) on a writer thread and ships them to `s3` (the prefix the server ships to, where `conveyor drift
    --device NAME` and the monitoring flow read them). One frame in `every` is logged (a camera sees each part in
    many frames); the stream never waits for the log (a full queue drops records and counts them)."""

    def __init__(self, config: dict[str, Any], device: str, line: str, imgsz: int, root: Path = HERE) -> None:
        try:
            import pyarrow  # noqa: F401  (the writer needs it; fail now, not on the writer thread)
        except ImportError:
            raise BundleError("the edge log writes Parquet: pip install pyarrow, or run with --no-log") from None
        s3 = config.get("s3")
        if s3:
            try:
                import boto3  # noqa: F401  (the shipper's client)
            except ImportError:
                raise BundleError(f"shipping the log to {s3} needs boto3: pip install boto3, or --no-log") from None
        self.features = bundled_module("features", root)
        parts = bundled_module("log_parts", root)
        self.device, self.line, self.imgsz = device, line, imgsz
        self.every = max(1, int(config.get("every", 1)))
        self.writer = parts.PartLog(
            Path(config.get("directory") or "edge-log"),
            int(config.get("queue_size", 10_000)),
            float(config.get("flush_seconds", 5.0)),
            int(config.get("keep_hours", 336)),
            self._record,
            shipper=parts.LogShipper(s3, s3_client) if s3 else None,
        ).start()
        self._seen = 0

    def offer(self, image: np.ndarray, found: Found, version: str) -> None:
        self._seen += 1
        if (self._seen - 1) % self.every == 0:
            # The cheap part here (a sample of the frame); the statistics are computed on the writer thread.
            self.writer.offer(LogItem(time.time(), version, self.features.sample_image(image, self.imgsz), found))

    def _record(self, item: LogItem) -> dict[str, Any]:
        from datetime import UTC, datetime

        return {
            "time": datetime.fromtimestamp(item.at, UTC),
            "model_version": item.version,
            "frame": None,
            "device": self.device,
            "line": self.line,
            **self.features.record(item.sample, item.found),
        }

    def close(self) -> None:
        self.writer.close()

    def counts(self) -> dict[str, Any]:
        shipper = self.writer.shipper
        return {
            "logged": self.writer.written,
            "log_dropped": self.writer.dropped,
            "log_shipped": shipper.shipped if shipper else None,
            "log_behind": shipper.behind if shipper else None,
        }


# --- the loop -------------------------------------------------------------------------------------------------------


@dataclass
class StreamStats:
    frames: int = 0
    rejects: int = 0
    seconds: float = 0.0
    # The last LATENCIES_KEPT frames' (about an hour at 30 fps): a month's stream would otherwise keep every one.
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCIES_KEPT))

    def summary(
        self, reader: FrameReader, publisher: Publisher, rollout: Rollout | None, log: EdgeLog | None
    ) -> dict[str, Any]:
        latencies = np.array(self.latencies_ms) if self.latencies_ms else np.zeros(1)
        return {
            "summary": True,
            "frames": self.frames,
            "frames_per_second": round(self.frames / self.seconds, 2) if self.seconds else 0.0,
            "latency_p50_ms": round(float(np.percentile(latencies, 50)), 2),
            "latency_p99_ms": round(float(np.percentile(latencies, 99)), 2),
            "skipped": reader.skipped,
            "unreadable": reader.unreadable,
            "reopened": reader.reopened,
            "rejects": self.rejects,
            "published": publisher.published,
            "dropped": publisher.dropped,
            "swaps": rollout.swaps if rollout else [],
            "refused": rollout.refused if rollout else [],
            **(log.counts() if log else {}),
        }


def run_stream(
    model: Model,
    reader: FrameReader,
    rule: RejectRule,
    publisher: Publisher,
    line: str,
    conf: float | None = None,
    max_frames: int | None = None,
    rollout: Rollout | None = None,
    log: EdgeLog | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """One decision per frame the reader hands over, until the stream ends or `max_frames`; returns the summary.
    Each decision names its line and its `device` (the line's name by default): two cameras on one line share the
    topic, and each counts its own frames. With `log`, the frames' prediction-log records too (closed, so flushed
    and shipped, before the summary)."""
    stats = StreamStats()
    started = time.monotonic()
    stop = threading.Event()

    def on_sigterm(*_: object) -> None:
        stop.set()
        reader.ended.set()  # a camera that delivers nothing would otherwise keep the loop waiting for a frame

    previous = (
        signal.signal(signal.SIGTERM, on_sigterm) if threading.current_thread() is threading.main_thread() else None
    )
    try:
        for frame in reader.frames():
            if rollout is not None and (swapped := rollout.swap_if_ready()) is not None:
                # Between two frames: this frame and every later one on the new bundle (its model and its rule).
                model, rule = swapped
                if log is not None:  # its features at the new model's input size, as its profile was made
                    log.imgsz = int(model.card["imgsz"])
            if log is None:
                found = model.detect(frame.image, conf)
            else:
                inference = model.infer(frame.image, conf)
                found = inference.found
            height, width = frame.image.shape[:2]
            reasons = rule.reasons(found, width, height)
            decided = time.monotonic()
            publisher.publish(
                {
                    "line": line,
                    "device": device or line,
                    "frame": frame.index,
                    "reject": bool(reasons),
                    "reasons": reasons,
                    "detections": len(found),
                    "model": model.version,
                    "latency_ms": round((decided - frame.captured) * 1000, 2),
                    "time": time.time(),
                }
            )
            stats.frames += 1
            stats.rejects += bool(reasons)
            stats.latencies_ms.append((decided - frame.captured) * 1000)
            if log is not None:  # after the decision is out: the log never delays it
                # At the bundle's threshold (serve.conf), whatever --conf decides at: the drift check compares the
                # log with the version's profile, made at serve.conf, and another threshold would read as drift.
                logged = inference if conf is None else inference.at(model.threshold())
                log.offer(frame.image, logged, model.version_number)
            if stop.is_set() or (max_frames is not None and stats.frames >= max_frames):
                break
    except KeyboardInterrupt:
        pass
    finally:
        stats.seconds = time.monotonic() - started
        try:
            reader.close()
        finally:  # the log's last records are written whatever the reader did
            if log is not None:
                log.close()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
    return stats.summary(reader, publisher, rollout, log)


def _positive(kind: type[int] | type[float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = kind(text)
        if not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{text}: must be a positive number")
        return value

    parse.__name__ = kind.__name__  # argparse names it: "invalid int value: '1.5'"
    return parse


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text}: a confidence is between 0 and 1")
    return value


def _broker(text: str) -> str:
    """HOST[:PORT], the port checked here: a bad one was a traceback, or a run that published nothing."""
    host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
    if not host or (port and not (port.isdigit() and 0 < int(port) < 65536)):
        raise argparse.ArgumentTypeError(f"{text}: HOST or HOST:PORT, the port 1-65535")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("images", nargs="*", type=Path)
    parser.add_argument("--runtime", default="openvino", choices=["openvino", "openvino_int8", "onnx"])
    parser.add_argument("--conf", type=_fraction, default=None)
    parser.add_argument("--verify", action="store_true", help="check the manifest's checksums first")
    parser.add_argument("--stream", help="a camera index, an RTSP/HTTP URL or a video file: decisions per frame")
    parser.add_argument("--every-frame", action="store_true", help="decide every frame (no newest-frame skipping)")
    parser.add_argument("--paced", action="store_true", help="with --every-frame: a file still plays at its rate")
    parser.add_argument("--frames", type=_positive(int), default=None, help="stop after this many decided frames")
    parser.add_argument("--line", default=None, help="the line's name (default: edge.json's)")
    parser.add_argument(
        "--mqtt", type=_broker, default=None, help="HOST[:PORT] of an MQTT broker; default: JSON lines on stdout"
    )
    parser.add_argument("--queue", type=_positive(int), default=None, help="decisions kept while the broker is away")
    parser.add_argument("--channel", default=None, help="a folder or s3://bucket/prefix to take new bundles from")
    parser.add_argument("--public-key", type=Path, default=None, help="the team's Ed25519 public key (PEM)")
    parser.add_argument("--poll", type=_positive(float), default=None, help="seconds between looks at the channel")
    parser.add_argument(
        "--rollouts",
        type=Path,
        default=None,
        help="folder of the bundles taken from the channel; the last one is run again after a restart "
        "(default: edge.json's, edge-rollouts)",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="this camera's name: in its decisions, its MQTT client id and the prediction log (default: the line)",
    )
    parser.add_argument("--log", default=None, help="folder of the prediction log (default: edge.json's log)")
    parser.add_argument("--log-s3", default=None, help="s3://bucket/prefix the log is shipped to (the server's)")
    parser.add_argument("--no-log", action="store_true", help="write no prediction log")
    args = parser.parse_args(argv)
    try:
        config = json.loads((HERE / "edge.json").read_text()) if (HERE / "edge.json").is_file() else {}
        if not isinstance(config, dict):
            raise TypeError(f"a {type(config).__name__}, not a mapping")
    except (ValueError, TypeError) as exc:  # a traceback before any check ran
        print(f"error: bundle damaged: {HERE / 'edge.json'} is not readable ({exc}); use --verify", file=sys.stderr)
        return 2
    channel = args.channel or config.get("channel") if args.stream is not None else None
    if channel and args.public_key is None:
        # Unsigned bundles from a channel would be swapped in on checksums alone: anyone who can write the channel
        # could change what the line rejects.
        print(
            f"error: rollout channel {channel} needs --public-key (the team's Ed25519 key): only signed bundles are "
            "swapped in",
            file=sys.stderr,
        )
        return 2
    rollouts = args.rollouts or Path(config.get("rollouts") or "edge-rollouts")
    line = args.line or config.get("line", "line-1")
    if not LINE_NAME.fullmatch(line):
        parser.error(f"--line {line!r}: letters, digits, '_', '.' and '-' (it names the MQTT topic and channel files)")
    root = HERE
    try:
        if args.verify or args.public_key:
            manifest = verify(HERE, args.public_key)
            if channel and (taken := rolled_out(rollouts, args.public_key, manifest.get("model"), line)) is not None:
                root = taken
        model = load_model(args.runtime, root)
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if root != HERE:
        print(f"running {model.version}, the bundle last taken from the channel ({root})", file=sys.stderr)
    if args.stream is None:
        if not args.images:
            parser.error("give IMAGE files, or --stream SOURCE")
        return detect_images(model, args.images, args.conf)
    device = args.device or line
    if not DEVICE_NAME.fullmatch(device) or device in (".", "..", "server", "folder"):
        parser.error(f"--device {device!r}: letters, digits, '_', '.', '-', and not 'server' or 'folder'")
    log_config = {
        **config.get("log", {}),
        **({"directory": args.log} if args.log else {}),
        **({"s3": args.log_s3} if args.log_s3 else {}),
    }
    try:
        log = (
            EdgeLog(log_config, device, line, model.card["imgsz"])
            if not args.no_log and (log_config.get("enabled") or args.log or args.log_s3)
            else None
        )
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    reader = FrameReader(args.stream, every_frame=args.every_frame, paced=True if args.paced else None)
    publisher: Publisher = (
        Mqtt(
            args.mqtt,
            f"conveyor/{line}/decisions",
            f"conveyor-edge-{line}-{device}",  # one client per camera: a broker drops a client whose id reconnects
            args.queue or config.get("queue", 10_000),
        )
        if args.mqtt
        else JsonLines()
    )
    rollout = (
        Rollout(
            Channel(channel, line),
            model,
            args.runtime,
            args.public_key,
            args.poll or config.get("poll_seconds", 10),
            rollouts,
        ).start()
        if channel
        else None
    )
    rule = RejectRule.load(root)
    unmet = rule.unmet_below(model.threshold(args.conf))
    if unmet:
        print(f"warning: {unmet}", file=sys.stderr)
    try:
        summary = run_stream(model, reader, rule, publisher, line, args.conf, args.frames, rollout, log, device)
    except StreamError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        publisher.close()
        if rollout is not None:
            rollout.close()
    print(json.dumps(summary), file=sys.stderr if args.mqtt is None else sys.stdout, flush=True)
    return 0


def load_model(runtime: str, root: Path) -> Model:
    """The bundle's model on `runtime`; a runtime's own load errors (their types vary) as a BundleError."""
    try:
        return Model(runtime, root)
    except (BundleError, SystemExit):
        raise
    except Exception as exc:
        raise BundleError(f"cannot load the bundle's {runtime} model from {root}: {exc}") from None


def detect_images(model: Model, images: list[Path], conf: float | None) -> int:
    failed = 0
    for path in images:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            print(json.dumps({"image": str(path), "error": "cannot read or decode image"}))
            failed += 1
            continue
        found = model.detect(image, conf)
        height, width = image.shape[:2]
        print(json.dumps({"image": str(path), "width": width, "height": height, "detections": found}))
    return 1 if failed else 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
