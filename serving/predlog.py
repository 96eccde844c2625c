"""The prediction log: one small record per served image, for drift checks (what the model sees and predicts).

Rules: the request path only hands over a thumbnail and the detections (`offer` never blocks); a writer thread
computes the image statistics and writes Parquet part files partitioned by hour (`date=YYYY-MM-DD/hour=HH/`).
The queue is bounded: when the writer cannot keep up (a slow disk), records are dropped and counted, and responses
are never slowed. Hour folders older than `keep_hours` are deleted. `read_log` reads a window back.
"""

from __future__ import annotations

import json
import logging
import queue
import shutil
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.inference import Detection

LOG = logging.getLogger("conveyor.serving")
THUMBNAIL_SIDE = 128  # statistics of a 128 px thumbnail: cheap, and enough for brightness, contrast and blur trends


@dataclass(frozen=True)
class Pending:
    at: float
    model_version: str
    width: int
    height: int
    thumbnail: np.ndarray  # small grayscale uint8
    detections: list[Detection]


def thumbnail(image: np.ndarray) -> np.ndarray:
    import cv2

    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image
    scale = THUMBNAIL_SIDE / max(gray.shape[:2])
    if scale < 1:
        gray = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(gray)


def image_stats(gray: np.ndarray) -> dict[str, float]:
    """Brightness (mean), contrast (std) and sharpness (variance of the Laplacian) of a grayscale image."""
    import cv2

    return {
        "brightness": float(gray.mean()),
        "contrast": float(gray.std()),
        "sharpness": float(cv2.Laplacian(gray, cv2.CV_64F).var()),
    }


def to_record(item: Pending) -> dict[str, Any]:
    confidences = [d.confidence for d in item.detections]
    area = float(item.width * item.height) or 1.0
    box_areas = [(d.box[2] - d.box[0]) * (d.box[3] - d.box[1]) / area for d in item.detections]
    return {
        "time": datetime.fromtimestamp(item.at, UTC),
        "model_version": item.model_version,
        "width": item.width,
        "height": item.height,
        **image_stats(item.thumbnail),
        "detections": len(item.detections),
        "mean_confidence": float(np.mean(confidences)) if confidences else None,
        "min_confidence": float(min(confidences)) if confidences else None,
        "class_counts": json.dumps(dict(Counter(d.class_name for d in item.detections)), sort_keys=True),
        "mean_box_area": float(np.mean(box_areas)) if box_areas else None,
        "box_areas": box_areas,
    }


class PredictionLog:
    def __init__(
        self,
        directory: Path,
        queue_size: int,
        flush_seconds: float,
        keep_hours: int,
        on_written: Any = None,
        on_dropped: Any = None,
    ) -> None:
        self.directory = directory
        self.flush_seconds = flush_seconds
        self.keep_hours = keep_hours
        self._queue: queue.Queue[Pending] = queue.Queue(maxsize=queue_size)
        self._on_written = on_written or (lambda n: None)
        self._on_dropped = on_dropped or (lambda n: None)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self.dropped = 0
        self.written = 0

    def start(self) -> PredictionLog:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    def offer(self, item: Pending) -> None:
        """Hand a record to the writer; never blocks (a full queue drops the record and counts it)."""
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1
            self._on_dropped(1)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._stop.wait(self.flush_seconds)
            self.flush()
        self.flush()

    def flush(self) -> None:
        batch: list[Pending] = []
        while True:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        if not batch:
            return
        try:
            self._write([to_record(item) for item in batch])
            self.written += len(batch)
            self._on_written(len(batch))
            self._expire()
        except Exception:  # a full or read-only disk must not take the server down: count and log the loss
            LOG.exception("prediction log: could not write %d records to %s", len(batch), self.directory)
            self.dropped += len(batch)
            self._on_dropped(len(batch))

    def _write(self, records: list[dict[str, Any]]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        by_hour: dict[str, list[dict[str, Any]]] = {}
        for record in records:
            by_hour.setdefault(record["time"].strftime("date=%Y-%m-%d/hour=%H"), []).append(record)
        for partition, rows in by_hour.items():
            folder = self.directory / partition
            folder.mkdir(parents=True, exist_ok=True)
            name = f"part-{int(time.time() * 1000)}-{uuid.uuid4().hex[:8]}.parquet"
            temporary = folder / f".{name}"
            pq.write_table(pa.Table.from_pylist(rows), temporary)
            temporary.rename(folder / name)  # readers never see half a file

    def _expire(self) -> None:
        cutoff = datetime.now(UTC) - timedelta(hours=self.keep_hours)
        for folder in self.directory.glob("date=*/hour=*"):
            try:
                hour = datetime.strptime(f"{folder.parent.name[5:]} {folder.name[5:]}", "%Y-%m-%d %H").replace(
                    tzinfo=UTC
                )
            except ValueError:
                continue
            if hour < cutoff - timedelta(hours=1):
                shutil.rmtree(folder, ignore_errors=True)


def read_log(directory: Path, since: datetime | None = None, last: int | None = None) -> Any:
    """The logged records as a pandas DataFrame, oldest first: those after `since`, then the last `last` of them."""
    import pandas as pd

    files = sorted(p for p in directory.glob("date=*/hour=*/part-*.parquet"))
    if not files:
        return pd.DataFrame()
    frame = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True).sort_values("time")
    if since is not None:
        frame = frame[frame["time"] >= pd.Timestamp(since)]
    if last is not None:
        frame = frame.tail(last)
    return frame.reset_index(drop=True)
