"""The prediction log: one small record per served image, for drift checks (what the model sees and predicts).

Rules: the request path only hands over a sample of the image (`features.sample_image`, about 0.15 ms) and what the
inference gave (detections, scores, the model's features output: no second inference); `offer` never blocks. A
writer thread computes the image statistics and writes Parquet part files partitioned by hour
(`date=YYYY-MM-DD/hour=HH/`).
The queue is bounded: when the writer cannot keep up (a slow disk), records are dropped and counted, and responses
are never slowed. Hour folders older than `keep_hours` are deleted. `read_log` reads a window back.
With `keep_frames` > 0, that share of served images is also kept as the bytes the client sent, in the hour's
`frames/` folder (written before the record that names it), where `conveyor label select` finds them.
With `s3` set, a `LogShipper` copies each part file (and kept frame) to s3://bucket/prefix under the same relative
key, so every replica's records meet in one place, where drift checks read them (`read_log` takes either).
"""

from __future__ import annotations

import functools
import logging
import queue
import random
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pipelines.features import ImageSample, record
from pipelines.inference import JPEG_MAGIC, PNG_MAGIC, Inference

LOG = logging.getLogger("conveyor.serving")


@dataclass(frozen=True)
class Pending:
    at: float
    model_version: str
    sample: ImageSample
    inference: Inference
    frame: bytes | None = None  # the image as sent, when this one is kept for labelling


def hour_partition(at: datetime) -> str:
    """The log's folder for an hour: records and kept frames of that hour live (and expire) together."""
    return at.strftime("date=%Y-%m-%d/hour=%H")


def to_record(item: Pending) -> dict[str, Any]:
    return {
        "time": datetime.fromtimestamp(item.at, UTC),
        "model_version": item.model_version,
        "frame": None,
        **record(item.sample, item.inference),
    }


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
        shipper: LogShipper | None = None,
    ) -> None:
        self.directory = directory
        self.shipper = shipper
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
            if self.shipper is not None and self.shipper.behind:
                self.shipper.catch_up(self.directory)
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
            for item, row in zip(batch, records, strict=True):
                if item.frame is not None:
                    row["frame"] = self._keep_frame(row["time"], item.frame)
            written = self._write(records)
            self.written += len(batch)
            self._on_written(len(batch))
            self._expire()
        except Exception:  # a full or read-only disk must not take the server down: count and log the loss
            LOG.exception("prediction log: could not write %d records to %s", len(batch), self.directory)
            self.dropped += len(batch)
            self._on_dropped(len(batch))
            return
        if self.shipper is not None:  # frames first: a shipped record never names a frame the store lacks
            frames = [row["frame"] for row in records if row["frame"]]
            self.shipper.ship(self.directory, [*frames, *written])

    def _keep_frame(self, at: datetime, data: bytes) -> str:
        """Write the image into its hour's frames/ folder; returns its path relative to the log directory."""
        suffix = ".png" if data.startswith(PNG_MAGIC) else ".jpg" if data.startswith(JPEG_MAGIC) else ".img"
        relative = f"{hour_partition(at)}/frames/{uuid.uuid4().hex}{suffix}"
        path = self.directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return relative

    def _write(self, records: list[dict[str, Any]]) -> list[str]:
        """Part files of the records, one per hour; returns their paths relative to the log directory."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        by_hour: dict[str, list[dict[str, Any]]] = {}
        for row in records:
            by_hour.setdefault(hour_partition(row["time"]), []).append(row)
        written = []
        for partition, rows in by_hour.items():
            folder = self.directory / partition
            folder.mkdir(parents=True, exist_ok=True)
            name = f"part-{int(time.time() * 1000)}-{uuid.uuid4().hex[:8]}.parquet"
            temporary = folder / f".{name}"
            pq.write_table(pa.Table.from_pylist(rows), temporary)
            temporary.rename(folder / name)  # readers never see half a file
            written.append(f"{partition}/{name}")
        return written

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


class LogShipper:
    """Copies the log's files to s3://bucket/prefix/<same relative path> (one PUT each: atomic, so a reader never
    sees half a file). A failed upload (the store is down, credentials refused) never reaches the request path: the
    file stays in the local log and the shipper is `behind`; each flush then compares the local log with the store's
    listing and uploads what is missing, so an outage or a restart loses nothing the local log still keeps
    (`keep_hours`). It starts behind, to carry over what an earlier process left unshipped. Objects in the store
    expire by the bucket's lifecycle rules, not here."""

    def __init__(self, url: str) -> None:
        from conveyor.storage import S3Location

        self.location = S3Location.parse(url)
        self.behind = True
        self.shipped = 0
        self.failures = 0
        self._client: Any = None

    def key(self, relative: str) -> str:
        return f"{self.location.prefix}/{relative}" if self.location.prefix else relative

    def _s3(self) -> Any:
        if self._client is None:
            from conveyor import storage

            self._client = storage.client(attempts=2)
        return self._client

    def ship(self, directory: Path, relative: list[str]) -> None:
        if self.behind:
            self.catch_up(directory)  # includes these files
            return
        try:
            for name in relative:
                self._s3().upload_file(str(directory / name), self.location.bucket, self.key(name))
                self.shipped += 1
        except Exception as exc:  # botocore raises many types; the files wait in the local log
            self._failed(exc)

    def catch_up(self, directory: Path) -> None:
        """Upload every local log file the store lacks (frames before part files)."""
        from conveyor import storage

        try:
            remote = set(storage.list_keys(self.location, s3=self._s3()))
            local = sorted(directory.glob("date=*/hour=*/frames/*")) + sorted(directory.glob(PART_GLOB))
            for path in local:
                name = path.relative_to(directory).as_posix()
                if self.key(name) not in remote:
                    self._s3().upload_file(str(path), self.location.bucket, self.key(name))
                    self.shipped += 1
        except Exception as exc:
            self._failed(exc)
            return
        if self.behind and self.failures:
            LOG.info("prediction log: caught up with %s", self.location.url)
        self.behind = False

    def _failed(self, exc: Exception) -> None:
        if not self.behind:
            LOG.warning(
                "prediction log: cannot ship to %s (%s); records stay in the local log and are shipped when the "
                "store answers again",
                self.location.url,
                str(exc).splitlines()[0][:300],
            )
        self.behind = True
        self.failures += 1


PART_GLOB = "date=*/hour=*/part-*.parquet"


def _partition_hour(relative: str) -> datetime | None:
    """The hour a part file's partition (`date=YYYY-MM-DD/hour=HH/...`) holds, or None for another path."""
    pieces = relative.split("/")
    if len(pieces) < 3 or not pieces[-3].startswith("date=") or not pieces[-2].startswith("hour="):
        return None
    try:
        return datetime.strptime(f"{pieces[-3][5:]} {pieces[-2][5:]}", "%Y-%m-%d %H").replace(tzinfo=UTC)
    except ValueError:
        return None


def _log_parts(location: Path | str, since: datetime | None) -> Iterator[tuple[str, Callable[[], bytes | Path]]]:
    """(name, how to read it) for each part file of the log at a folder or an s3:// URL, skipping hours before
    `since`."""

    def wanted(name: str) -> bool:
        hour = _partition_hour(name)
        return hour is not None and (since is None or hour + timedelta(hours=1) > since)

    if isinstance(location, str) and location.startswith("s3://"):
        from conveyor import storage

        root = storage.S3Location.parse(location)
        reader = storage.ObjectReader()
        with storage.explained(root.bucket, reader.endpoint):
            keys = storage.list_keys(root)
        for key in sorted(keys):
            name = key.removeprefix(f"{root.prefix}/") if root.prefix else key
            if name.rsplit("/", 1)[-1].startswith("part-") and name.endswith(".parquet") and wanted(name):
                yield name, functools.partial(reader, f"s3://{root.bucket}/{key}")
        return
    directory = Path(location)
    for file in sorted(directory.glob(PART_GLOB)):
        name = file.relative_to(directory).as_posix()
        if wanted(name):
            yield name, functools.partial(Path, file)


def read_log(location: Path | str, since: datetime | None = None, last: int | None = None) -> LogWindow:
    """The logged records as a pandas DataFrame, oldest first: those after `since`, then the last `last` of them.
    `location` is the log's folder or the s3:// URL its shipper writes to.

    A part file that cannot be read (cut short by a full disk, or damaged) is skipped and named in `unreadable`; the
    rest of the window is still returned.
    """
    import io

    import pandas as pd

    frames = []
    unreadable: list[str] = []
    for name, read in _log_parts(location, since):
        try:
            content = read()  # a store that is down raises StorageError: the window would be silently partial
        except OSError as exc:  # gone since it was listed (expired)
            unreadable.append(f"{name}: {str(exc).splitlines()[0][:200]}")
            continue
        try:
            frames.append(pd.read_parquet(content if isinstance(content, Path) else io.BytesIO(content)))
        except Exception as exc:  # pyarrow raises several types for a damaged file
            unreadable.append(f"{name}: {str(exc).splitlines()[0][:200]}")
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
