"""The prediction log's files: a writer thread that turns records into Parquet part files partitioned by hour, and a
shipper that copies them to S3.

Used by the server (`pipelines/prediction_log.py` gives it the server's records) and by the edge runner, which
carries this file in its bundle (`serving/bundle.py`): the same parts, in the same layout, under the same prefix, so
`conveyor drift` reads the edge's windows where it reads the server's. It therefore imports nothing from Conveyor:
the standard library, pyarrow when it writes, and the S3 client its caller hands in.

Rules: `offer` never blocks (a full queue drops the record and counts it); the writer thread builds the records
(`to_record`, where the image statistics are computed) and writes part files `date=YYYY-MM-DD/hour=HH/part-*.parquet`
atomically; hour folders older than `keep_hours` are deleted. With `keep_frames` > 0, that share of images is also
kept as bytes in the hour's `frames/` folder (written before the record that names it). The shipper uploads on a
thread of its own: a store that hangs (an upload waits out its read timeout, 30 s a try) never holds up the writer,
whose queue would otherwise fill and drop records.
"""

from __future__ import annotations

import logging
import queue
import random
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing import Self

LOG = logging.getLogger("conveyor.serving")
WARN_EVERY = 60  # failed shipping attempts between two warnings (about 10 minutes at the default flush)
PART_GLOB = "date=*/hour=*/part-*.parquet"
WRITING_PREFIX = ".writing-"  # a kept frame's name while it is written (never shipped, never read)
LOG_CLOSE_SECONDS = 30  # how long closing waits for the writer's last flush and the shipper's last upload, in all
# What the records waiting for the writer may hold in all: a record holds its image's sample (~200 kB at 320 px,
# ~0.5 MB at 640 px) and, when kept, the image as sent. 10,000 of them were 2 to 5 GB, in a 4 GiB pod, whenever the
# writer fell behind (a slow disk, a slow store).
QUEUE_BYTES = 256 * 2**20
# A kept frame's file suffix, from its first bytes. The image checks have their own copy (pipelines/inference.py):
# this file imports nothing of Conveyor (edge bundles carry it), and the DAG's stages that decode images must not
# depend on the log's writer.
JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _size_of(item: Any) -> int:
    """The bytes a waiting record holds: its image sample's arrays and the image kept with it."""
    sample = getattr(item, "sample", None)
    return int(getattr(sample, "nbytes", 0)) + len(getattr(item, "frame", None) or b"")


def hour_partition(at: datetime) -> str:
    """The log's folder for an hour: records and kept frames of that hour live (and expire) together."""
    return at.strftime("date=%Y-%m-%d/hour=%H")


def frame_suffix(data: bytes) -> str:
    return ".png" if data.startswith(PNG_MAGIC) else ".jpg" if data.startswith(JPEG_MAGIC) else ".img"


class PartLog:
    """Records handed over by `offer` (any object with `.at`, seconds since the epoch, and `.frame`, bytes or None),
    turned into rows by `to_record` on the writer thread and written every `flush_seconds`."""

    def __init__(
        self,
        directory: Path,
        queue_size: int,
        flush_seconds: float,
        keep_hours: int,
        to_record: Callable[[Any], dict[str, Any]],
        keep_frames: float = 0.0,
        on_written: Any = None,
        on_dropped: Any = None,
        shipper: LogShipper | None = None,
        queue_bytes: int = QUEUE_BYTES,
    ) -> None:
        self.directory = directory
        self.queue_bytes = queue_bytes
        self._queued_bytes = 0
        self._bytes_lock = threading.Lock()
        self.shipper = shipper
        self.flush_seconds = flush_seconds
        self.keep_hours = keep_hours
        self.keep_frames = keep_frames
        self._to_record = to_record
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._on_written = on_written or (lambda n: None)
        self._on_dropped = on_dropped or (lambda n: None)
        self._stop = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self.dropped = 0
        self.written = 0

    def start(self) -> Self:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        if self.shipper is not None:
            self.shipper.start(self.directory, self.flush_seconds)
        return self

    def wants_frame(self) -> bool:
        """Whether to keep the next image's bytes (a `keep_frames` share of them, at random)."""
        return self.keep_frames > 0 and random.random() < self.keep_frames

    def offer(self, item: Any) -> None:
        """Hand a record to the writer; never blocks. A full queue (by records, or by the bytes they hold) drops the
        record and counts it, as does a log already closed: its writer would never take it."""
        size = _size_of(item)
        with self._bytes_lock:
            refused = self._closed or self._queued_bytes + size > self.queue_bytes
            if not refused:
                try:
                    self._queue.put_nowait(item)
                    self._queued_bytes += size
                except queue.Full:
                    refused = True
        if refused:
            self.dropped += 1
            self._on_dropped(1)

    def close(self) -> None:
        """The last records written, then shipped: within LOG_CLOSE_SECONDS in all (the pod's grace period counts on
        it). What a hung store could not take stays in the local log, for the next start to ship."""
        deadline = time.monotonic() + LOG_CLOSE_SECONDS
        self._closed = True
        self._stop.set()
        self._thread.join(timeout=LOG_CLOSE_SECONDS)
        if self.shipper is not None:
            self.shipper.close(timeout=max(0.0, deadline - time.monotonic()))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._stop.wait(self.flush_seconds)
            self.flush()
        self.flush()

    def flush(self) -> bool:
        """Write what is queued (and ship it); True when there was something to write. Old hours are expired
        either way, before and whatever the write did: a full disk stopped every write, and the expiry that would
        have freed it ran only after a write that succeeded."""
        batch: list[Any] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            batch.append(item)
            with self._bytes_lock:
                self._queued_bytes -= _size_of(item)
        self._expire_logged()
        if not batch:
            return False
        try:
            records = [self._to_record(item) for item in batch]
            for item, row in zip(batch, records, strict=True):
                if item.frame is not None:
                    row["frame"] = self._keep_frame(row["time"], item.frame)
            written = self._write(records)
            self.written += len(batch)
            self._on_written(len(batch))
        except Exception:  # a full or read-only disk must not take the server down: count and log the loss
            LOG.exception("prediction log: could not write %d records to %s", len(batch), self.directory)
            self.dropped += len(batch)
            self._on_dropped(len(batch))
            return True
        if self.shipper is not None:  # frames first: a shipped record never names a frame the store lacks
            frames = [row["frame"] for row in records if row["frame"]]
            self.shipper.submit([*frames, *written])
        return True

    def _expire_logged(self) -> None:
        try:
            self._expire()
        except Exception:  # the writer thread goes on: the next flush tries again
            LOG.exception("prediction log: could not remove hours past keep_hours from %s", self.directory)

    def _keep_frame(self, at: datetime, data: bytes) -> str:
        """Write the image into its hour's frames/ folder; returns its path relative to the log directory."""
        relative = f"{hour_partition(at)}/frames/{uuid.uuid4().hex}{frame_suffix(data)}"
        path = self.directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        # Whole or not at all, as the part files: the shipper's thread may list the folder while this writes, and a
        # half-written frame it uploaded stayed half in the store (a key the store has is never sent again).
        partial = path.with_name(f"{WRITING_PREFIX}{path.name}")
        partial.write_bytes(data)
        partial.replace(path)
        return relative

    def _write(self, records: list[dict[str, Any]]) -> list[str]:
        """Part files of the records, one per hour; returns their paths relative to the log directory."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        by_hour: dict[str, list[dict[str, Any]]] = {}
        for row in records:
            by_hour.setdefault(hour_partition(row["time"]), []).append(row)
        # Every row's columns: Arrow takes a table's columns from its first row, so a flush across a hot swap to a
        # model with a features output dropped the new version's embeddings.
        columns = list(dict.fromkeys(key for row in records for key in row))
        written: list[str] = []
        try:
            for partition, rows in by_hour.items():
                folder = self.directory / partition
                folder.mkdir(parents=True, exist_ok=True)
                name = f"part-{int(time.time() * 1000)}-{uuid.uuid4().hex[:8]}.parquet"
                temporary = folder / f".{name}"
                pq.write_table(
                    pa.Table.from_pylist([{key: row.get(key) for key in columns} for row in rows]), temporary
                )
                temporary.rename(folder / name)  # readers never see half a file
                written.append(f"{partition}/{name}")
        except BaseException:
            # All or nothing: the batch is counted dropped, so no part of it stays on disk (one hour's part did, never
            # shipped, and counted as lost).
            for relative in written:
                (self.directory / relative).unlink(missing_ok=True)
            raise
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


def _one_thread() -> Any:
    """boto3's upload without s3transfer's pool of threads: Python's exit waits for those, so a hung request held the
    process past the pod's grace period whatever `close` gave up on (one PUT each anyway: these files are small)."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(use_threads=False)


class LogShipper:
    """Copies the log's files to s3://bucket/prefix/<same relative path> (one PUT each: atomic, so a reader never
    sees half a file). A failed upload (the store is down, credentials refused) never reaches the request path: the
    file stays in the local log and the shipper is `behind`; each flush then compares the local log with the store's
    listing and uploads what is missing, so an outage or a restart loses nothing the local log still keeps
    (`keep_hours`). It starts behind, to carry over what an earlier process left unshipped. Objects in the store
    expire by the bucket's lifecycle rules, not here. `make_client` returns a boto3 S3 client.

    Started (`start`, by the log's `start`), it uploads on a thread of its own what the writer `submit`s, and catches
    up once a cycle while behind; `ship` and `catch_up` are that thread's steps, also called directly."""

    def __init__(self, url: str, make_client: Callable[[], Any]) -> None:
        if not url.startswith("s3://") or not url.removeprefix("s3://").partition("/")[0]:
            raise ValueError(f"not an S3 URL: {url} (expected s3://bucket/prefix)")
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        self.url, self.bucket, self.prefix = url, bucket, prefix.strip("/")
        self.behind = True
        self.shipped = 0
        self.failures = 0
        self._uploaded: set[str] = set()  # keys uploaded by this process (where the store refuses to list)
        self._cannot_list = False
        self._make_client = make_client
        self._client: Any = None
        self._submitted: list[str] = []  # files written and not yet handed to `ship`, oldest first
        self._submitted_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, directory: Path, every: float) -> None:
        """Ship from `directory` on a thread: at once for what is submitted, and every `every` seconds while behind."""
        self._thread = threading.Thread(target=self._run, args=(directory, every), name="log-shipper", daemon=True)
        self._thread.start()

    def submit(self, relative: list[str]) -> None:
        """Files just written (relative to the log's folder), to be shipped; never waits on the store."""
        with self._submitted_lock:
            self._submitted.extend(relative)
        self._wake.set()

    def close(self, timeout: float) -> None:
        """A last pass over what was submitted, waited for up to `timeout` seconds (a hung upload is left to its
        daemon thread: the files stay in the local log)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    def _run(self, directory: Path, every: float) -> None:
        while not self._stop.is_set():
            self._wake.wait(every)
            self._wake.clear()
            self._pass(directory)
        self._pass(directory)

    def _pass(self, directory: Path) -> None:
        with self._submitted_lock:
            names, self._submitted = self._submitted, []
        if names:
            self.ship(directory, names)  # catches up instead while behind (these files included)
        elif self.behind:
            self.catch_up(directory)

    def key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def _s3(self) -> Any:
        if self._client is None:
            self._client = self._make_client()
        return self._client

    def _listing(self) -> set[str]:
        """The keys under the prefix; where listing is refused, the keys this process uploaded."""
        if self._cannot_list:
            return self._uploaded
        remote: set[str] = set()
        try:
            pages = self._s3().get_paginator("list_objects_v2")
            for page in pages.paginate(Bucket=self.bucket, Prefix=f"{self.prefix}/" if self.prefix else ""):
                remote |= {item["Key"] for item in page.get("Contents", [])}
        except Exception as exc:
            code = getattr(exc, "response", {}).get("Error", {}).get("Code")
            if code not in ("AccessDenied", "403"):
                raise
            self._cannot_list = True
            LOG.warning(
                "prediction log: %s refuses to list (%s): shipping without comparing with the store", self.url, code
            )
            return self._uploaded
        return remote

    def _remember(self, key: str) -> None:
        if self._cannot_list:
            self._uploaded.add(key)

    def ship(self, directory: Path, relative: list[str]) -> None:
        if self.behind:
            self.catch_up(directory)  # includes these files
            return
        try:
            for name in relative:
                self._s3().upload_file(str(directory / name), self.bucket, self.key(name), Config=_one_thread())
                self._remember(self.key(name))
                self.shipped += 1
        except Exception as exc:  # botocore raises many types; the files wait in the local log
            self._failed(exc)

    def catch_up(self, directory: Path) -> None:
        """Upload every local log file the store lacks (frames before part files). Credentials that may upload and
        not list (a least-privilege key for a device) compare with what this process uploaded instead: each start
        then uploads the local log again once (the same bytes under the same keys)."""
        try:
            remote = self._listing()
            frames = [p for p in directory.glob("date=*/hour=*/frames/*") if not p.name.startswith(WRITING_PREFIX)]
            local = sorted(frames) + sorted(directory.glob(PART_GLOB))
            keys = [self.key(path.relative_to(directory).as_posix()) for path in local]
            for path, key in zip(local, keys, strict=True):
                if key not in remote:
                    try:
                        self._s3().upload_file(str(path), self.bucket, key, Config=_one_thread())
                    except FileNotFoundError:  # its hour expired while this pass ran (the writer's thread)
                        continue
                    self._remember(key)
                    self.shipped += 1
            if self._cannot_list:  # what the local log no longer keeps need not be remembered
                self._uploaded &= set(keys)
            # Every file this pass listed is in the store now (or expired): one submitted meanwhile is taken off the
            # queue, or the next pass uploaded it (and counted it) a second time. One written after the listing stays.
            seen = set(keys)
            with self._submitted_lock:
                self._submitted = [name for name in self._submitted if self.key(name) not in seen]
        except Exception as exc:
            self._failed(exc)
            return
        if self.behind and self.failures:
            LOG.info("prediction log: caught up with %s", self.url)
        self.behind = False

    def _failed(self, exc: Exception) -> None:
        # Said when shipping stops, and again every WARN_EVERY failures while it stays stopped: a store that never
        # answered from the start (a wrong endpoint, a missing bucket) was never said at all.
        if not self.behind or self.failures % WARN_EVERY == 0:
            LOG.warning(
                "prediction log: cannot ship to %s (%s; %d attempts failed); records stay in the local log (for "
                "keep_hours) and are shipped when the store answers again",
                self.url,
                str(exc).splitlines()[0][:300],
                self.failures + 1,
            )
        self.behind = True
        self.failures += 1
