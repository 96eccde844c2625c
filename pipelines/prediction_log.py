"""The prediction log: one small record per served image, for drift checks (what the model sees and predicts).

Rules: the request path only hands over a sample of the image (`features.sample_image`, about 0.15 ms) and what the
inference gave (detections, scores, the model's features output: no second inference); `offer` never blocks. The
writer thread (`pipelines/log_parts.py`, shared with the edge runner) computes the image statistics and writes
Parquet part files partitioned by hour (`date=YYYY-MM-DD/hour=HH/`). The queue is bounded: when the writer cannot
keep up (a slow disk), records are dropped and counted, and responses are never slowed. Hour folders older than
`keep_hours` are deleted. With `keep_frames` > 0, that share of served images is also kept as the bytes the client
sent, in the hour's `frames/` folder, where `conveyor label select` finds them. With `s3` set, a `LogShipper` copies
each part file (and kept frame) to s3://bucket/prefix under the same relative key, so every replica's records, and
the edge runners', meet in one place, where drift checks read them.

`read_log` reads a window back, from the folder or the store. Records carry the `device` that wrote them: the
server's have none (read as `server`), an edge runner's its name (`serving/edge/run.py --device`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pipelines.features import ImageSample, record
from pipelines.inference import Inference
from pipelines.log_parts import PART_GLOB, QUEUE_BYTES, LogShipper, PartLog

DEVICE_COLUMN = "device"  # who wrote a record: an edge runner's --device; the server's records have none
SERVER_DEVICE = "server"  # what they are read as

FUTURE_TOLERANCE = timedelta(hours=1)  # clocks that differ by less are not told apart from a window's own end


@dataclass(frozen=True)
class Pending:
    at: float
    model_version: str
    sample: ImageSample
    inference: Inference
    frame: bytes | None = None  # the image as sent, when this one is kept for labelling


def to_record(item: Pending) -> dict[str, Any]:
    return {
        "time": datetime.fromtimestamp(item.at, UTC),
        "model_version": item.model_version,
        "frame": None,
        **record(item.sample, item.inference),
    }


class PredictionLog(PartLog):
    """The server's log: its records are `to_record` of what it served."""

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
        queue_bytes: int = QUEUE_BYTES,
    ) -> None:
        super().__init__(
            directory,
            queue_size,
            flush_seconds,
            keep_hours,
            to_record,
            keep_frames,
            on_written,
            on_dropped,
            shipper,
            queue_bytes,
        )


def s3_shipper(url: str) -> LogShipper:
    """A shipper to `url` through the project's S3 client (endpoint and credentials from the environment)."""
    from conveyor import storage

    return LogShipper(url, functools.partial(storage.client, attempts=2))


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


def read_log(
    location: Path | str, since: datetime | None = None, last: int | None = None, columns: Sequence[str] | None = None
) -> LogWindow:
    """The logged records as a pandas DataFrame, oldest first: those after `since`, then the last `last` of them.
    `location` is the log's folder or the s3:// URL its shipper writes to. Every record has a `device`: the edge
    runner's name, or SERVER_DEVICE for the server's. `columns`: only these (with `time` and `device`), for a reader
    that needs a few of a record's ~6 KB (its features, its embedding).

    A part file that cannot be read (cut short by a full disk, or damaged) is skipped and named in `unreadable`; the
    rest of the window is still returned. The whole window is held: the drift check reads its window part by part
    instead (`LogParts`, `monitoring.current`), keeping a bounded sample.
    """
    import pandas as pd

    parts = LogParts(location, since, columns)
    frames = [part for _, part in parts]
    if not frames:
        return LogWindow(pd.DataFrame(), parts.unreadable)
    frame = concat_parts(frames)
    if last is not None:
        frame = frame.tail(last)
    return LogWindow(frame.reset_index(drop=True), parts.unreadable)


def concat_parts(frames: Sequence[Any]) -> Any:
    """Part files' records as one frame, oldest first.

    A part whose images all had no detection holds its per-image statistics (mean_confidence, ...) as all-None
    columns, which Parquet reads back as objects. pandas < 3 leaves such columns out when it picks a column's type
    across parts; pandas 3 will not, and the window's column would turn to objects. Drop them first, as pandas
    advises, and put back any column that no part had a value in."""
    import pandas as pd

    columns = list(dict.fromkeys(name for part in frames for name in part.columns))
    kept = [part.dropna(axis="columns", how="all") for part in frames]
    return pd.concat(kept, ignore_index=True).reindex(columns=columns).sort_values("time", kind="stable")


class LogParts:
    """The log's part files of a window, one at a time, as frames (oldest part first): each with `device` filled in,
    its records before `since` and those dated in the future left out. What could not be read, and what was left
    out, is in `unreadable` once iterated."""

    def __init__(self, location: Path | str, since: datetime | None, columns: Sequence[str] | None = None) -> None:
        self.location = location
        self.since = since
        self.columns = None if columns is None else list(dict.fromkeys(["time", DEVICE_COLUMN, *columns]))
        self.unreadable: list[str] = []

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        import pandas as pd

        ahead: dict[str, int] = {}
        self.unreadable = []
        for name, read in _log_parts(self.location, self.since):
            try:
                content = read()  # a store that is down raises StorageError: the window would be silently partial
            except OSError as exc:  # gone since it was listed (expired)
                self.unreadable.append(f"{name}: {str(exc).splitlines()[0][:200]}")
                continue
            try:
                part = self._read(content)
            except Exception as exc:  # pyarrow raises several types for a damaged file
                self.unreadable.append(f"{name}: {str(exc).splitlines()[0][:200]}")
                continue
            if not len(part):
                continue
            if "time" not in part:  # a Parquet file of something else put in the log's folder
                self.unreadable.append(f"{name}: not a part of the prediction log (no 'time' column)")
                continue
            if DEVICE_COLUMN not in part:
                part[DEVICE_COLUMN] = SERVER_DEVICE
            part[DEVICE_COLUMN] = part[DEVICE_COLUMN].fillna(SERVER_DEVICE).astype(str)
            if self.since is not None:
                part = part[part["time"] >= pd.Timestamp(self.since)]
            # A device whose clock ran ahead (no time sync yet) dates its records in the future: they fell in every
            # window, and being the newest, decided which version was checked. Left out, and said.
            future = part["time"] > pd.Timestamp(datetime.now(UTC) + FUTURE_TOLERANCE)
            if future.any():
                for device, count in part.loc[future, DEVICE_COLUMN].value_counts().items():
                    ahead[str(device)] = ahead.get(str(device), 0) + int(count)
                part = part[~future]
            if len(part):
                yield name, part
        if ahead:
            devices = ", ".join(sorted(ahead))
            self.unreadable.append(
                f"{sum(ahead.values())} records dated after now (a clock ahead: {devices}): left out"
            )

    def _read(self, content: bytes | Path) -> Any:
        import io

        import pandas as pd
        import pyarrow.parquet as pq

        source = content if isinstance(content, Path) else io.BytesIO(content)
        if self.columns is None:
            return pd.read_parquet(source)
        present = set(pq.read_schema(source).names)  # an older part may lack a column: read what it has
        if isinstance(source, io.BytesIO):
            source.seek(0)
        return pd.read_parquet(source, columns=[c for c in self.columns if c in present])


@dataclass(frozen=True)
class LogWindow:
    records: Any  # pandas DataFrame
    unreadable: list[str]
