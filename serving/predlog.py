"""The prediction log: one small record per served image, for drift checks (what the model sees and predicts).

Rules: the request path only hands over a thumbnail and the detections (`offer` never blocks); a writer thread
computes the image statistics and writes Parquet part files partitioned by hour (`date=YYYY-MM-DD/hour=HH/`).
The queue is bounded: when the writer cannot keep up (a slow disk), records are dropped and counted, and responses
are never slowed. Hour folders older than `keep_hours` are deleted. `read_log` reads a window back.
With `keep_frames` > 0, that share of served images is also kept as the bytes the client sent, in the hour's
`frames/` folder (written before the record that names it), where `conveyor label select` finds them.
"""

from __future__ import annotations

import logging
import queue
import random
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.features import EMBEDDING, Embedder, image_features, prediction_features
from pipelines.inference import JPEG_MAGIC, PNG_MAGIC, Detection

LOG = logging.getLogger("conveyor.serving")
EMBED_BATCH = 16  # thumbnails per backbone forward pass in the writer thread


@dataclass(frozen=True)
class Pending:
    at: float
    model_version: str
    width: int
    height: int
    thumbnail: np.ndarray  # small BGR copy (features.thumbnail)
    detections: list[Detection]
    embedder: Embedder | None = None  # the served version's backbone, when embeddings are logged
    frame: bytes | None = None  # the image as sent, when this one is kept for labelling


def hour_partition(at: datetime) -> str:
    """The log's folder for an hour: records and kept frames of that hour live (and expire) together."""
    return at.strftime("date=%Y-%m-%d/hour=%H")


def to_record(item: Pending) -> dict[str, Any]:
    return {
        "time": datetime.fromtimestamp(item.at, UTC),
        "model_version": item.model_version,
        "frame": None,
        **image_features(item.thumbnail, item.width, item.height),
        **prediction_features(item.detections, item.width, item.height),
    }


def with_embeddings(items: list[Pending], records: list[dict[str, Any]]) -> None:
    """Add each record's backbone embedding, one forward pass per embedder (model version) in the batch."""
    groups: dict[int, list[int]] = {}
    for i, item in enumerate(items):
        if item.embedder is not None:
            groups.setdefault(id(item.embedder), []).append(i)
    for indices in groups.values():
        embedder = items[indices[0]].embedder
        assert embedder is not None
        for start in range(0, len(indices), EMBED_BATCH):
            chunk = indices[start : start + EMBED_BATCH]
            vectors = embedder([items[i].thumbnail for i in chunk])
            for i, vector in zip(chunk, vectors, strict=True):
                records[i][EMBEDDING] = vector.tolist()


class PredictionLog:
    def __init__(
        self,
        directory: Path,
        queue_size: int,
        flush_seconds: float,
        keep_hours: int,
        keep_frames: float = 0.0,
        on_written: Any = None,
        on_dropped: Any = None,
    ) -> None:
        self.directory = directory
        self.flush_seconds = flush_seconds
        self.keep_hours = keep_hours
        self.keep_frames = keep_frames
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

    def wants_frame(self) -> bool:
        """Whether to keep the next image's bytes (a `keep_frames` share of them, at random)."""
        return self.keep_frames > 0 and random.random() < self.keep_frames

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
            records = [to_record(item) for item in batch]
            for item, record in zip(batch, records, strict=True):
                if item.frame is not None:
                    record["frame"] = self._keep_frame(record["time"], item.frame)
            try:
                with_embeddings(batch, records)
            except Exception:  # the records still carry every other feature
                LOG.exception("prediction log: embeddings failed for %d records; kept without them", len(batch))
            self._write(records)
            self.written += len(batch)
            self._on_written(len(batch))
            self._expire()
        except Exception:  # a full or read-only disk must not take the server down: count and log the loss
            LOG.exception("prediction log: could not write %d records to %s", len(batch), self.directory)
            self.dropped += len(batch)
            self._on_dropped(len(batch))

    def _keep_frame(self, at: datetime, data: bytes) -> str:
        """Write the image into its hour's frames/ folder; returns its path relative to the log directory."""
        suffix = ".png" if data.startswith(PNG_MAGIC) else ".jpg" if data.startswith(JPEG_MAGIC) else ".img"
        relative = f"{hour_partition(at)}/frames/{uuid.uuid4().hex}{suffix}"
        path = self.directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return relative

    def _write(self, records: list[dict[str, Any]]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        by_hour: dict[str, list[dict[str, Any]]] = {}
        for record in records:
            by_hour.setdefault(hour_partition(record["time"]), []).append(record)
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


def read_log(directory: Path, since: datetime | None = None, last: int | None = None) -> LogWindow:
    """The logged records as a pandas DataFrame, oldest first: those after `since`, then the last `last` of them.

    A part file that cannot be read (cut short by a full disk, or damaged) is skipped and named in `unreadable`; the
    rest of the window is still returned.
    """
    import pandas as pd

    frames = []
    unreadable: list[str] = []
    for file in sorted(directory.glob("date=*/hour=*/part-*.parquet")):
        try:
            frames.append(pd.read_parquet(file))
        except Exception as exc:  # pyarrow raises several types for a damaged file
            unreadable.append(f"{file.relative_to(directory)}: {str(exc).splitlines()[0][:200]}")
    frames = [f for f in frames if len(f)]
    if not frames:
        return LogWindow(pd.DataFrame(), unreadable)
    frame = pd.concat(frames, ignore_index=True).sort_values("time", kind="stable")
    if since is not None:
        frame = frame[frame["time"] >= pd.Timestamp(since)]
    if last is not None:
        frame = frame.tail(last)
    return LogWindow(frame.reset_index(drop=True), unreadable)


@dataclass(frozen=True)
class LogWindow:
    records: Any  # pandas DataFrame
    unreadable: list[str]
