"""The current data of a drift check: a window of the serving prediction log, or a folder of images.

A window is one device's: the server's records (`server`), or one edge runner's (its `--device` name), never mixed,
so a camera whose lens fogs is not averaged away by the others. It is measured against one version: the one that
served its newest record. Records another version served (the champion moved inside the window) are left out and
counted, never mixed into the comparison.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from rich.console import Console

from conveyor.errors import ConveyorError
from pipelines.batches import batch_of
from pipelines.inference import Detector
from pipelines.prediction_log import DEVICE_COLUMN, SERVER_DEVICE, LogParts, concat_parts
from pipelines.profile import ImageSource, describe_images
from pipelines.validate import IMAGE_SUFFIXES

DEVICE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
FOLDER_DEVICE = "folder"  # a check of a folder of images: no device's traffic


class NoCurrentDataError(ConveyorError, RuntimeError):
    """Nothing to check: no prediction log, an empty window, or an empty folder. The message says which."""


@dataclass
class CurrentData:
    records: Any  # pandas DataFrame of feature rows
    source: str  # what was read, for reports
    model_version: str | None  # the version that served these rows (None for a folder)
    other_versions: dict[str, int] = field(default_factory=dict)  # rows left out: served by another version
    unreadable: list[str] = field(default_factory=list)  # log files that could not be read
    device: str = SERVER_DEVICE  # whose records: the server's, an edge runner's, or FOLDER_DEVICE


def from_log(
    directory: Path | str,
    hours: float,
    last: int | None = None,
    version: str | None = None,
    now: datetime | None = None,
    device: str = SERVER_DEVICE,
    max_records: int | None = None,
) -> CurrentData:
    """The last `hours` of one device's records in the prediction log (then its last `last` records), rows of one
    version only. `directory` is the log's folder or the s3:// prefix the server and the edge runners ship it to.

    Read part by part, keeping at most `max_records` of each version (a uniform sample, the same one each time the
    same records are read): a day at 20 requests a second is 1.7 million records, about 10 GB held whole."""
    if not DEVICE_NAME.fullmatch(device) or device in (".", ".."):
        raise NoCurrentDataError(f"no device {device!r}: device names are letters, digits, '_', '.' and '-'")
    parts, described = _parts(directory, hours, now)
    kept = _VersionSamples(last, max_records)
    devices: Counter[str] = Counter()
    for name, part in parts:
        devices.update(part[DEVICE_COLUMN].value_counts().to_dict())
        mine = part[(part[DEVICE_COLUMN] == device).to_numpy()]
        if len(mine):
            kept.add(name, mine)
    unreadable = parts.unreadable
    described += f", last {last} records" if last else ""
    if not kept.counts:
        problem = f"; {len(unreadable)} unreadable files" if unreadable else ""
        present = (
            "; it has records of "
            + ", ".join(f"{name} ({count})" for name, count in devices.most_common())
            + ": choose one with --device NAME"
            if devices
            else ""
        )
        raise NoCurrentDataError(f"the {described} holds no records of device {device}{problem}{present}")
    chosen = version or kept.newest_version
    others = {v: n for v, n in kept.counts.items() if v != chosen}
    if chosen not in kept.counts:  # it was "insufficient data: 0 current rows", exit 0
        served = ", ".join(f"v{v} ({n})" for v, n in sorted(others.items()))
        raise NoCurrentDataError(
            f"version {chosen} served none of the {described} of device {device}: its records are of {served}"
        )
    frame = kept.frame(chosen)
    held = min(kept.counts[chosen], last or kept.counts[chosen])
    if len(frame) < held:
        described += f", a sample of {len(frame)} of its {held} records (monitor.max_window_records)"
    return CurrentData(
        frame.reset_index(drop=True), f"{described}, device {device}", chosen, others, unreadable, device
    )


class _VersionSamples:
    """Each model version's records of a window, bounded while the window is read: its newest `last` (when given),
    then a uniform sample of `cap` (when over it). The sample draws a key per record from the part file's name, so
    the same records read again give the same sample."""

    def __init__(self, last: int | None, cap: int | None) -> None:
        self.last = last
        self.cap = cap
        self.counts: dict[str, int] = {}  # every record read, per version
        self.held: dict[str, list[Any]] = {}
        self.newest: tuple[Any, str] | None = None  # (time, version) of the newest record

    def add(self, name: str, part: Any) -> None:
        import numpy as np

        part = part.sort_values("time", kind="stable")
        versions = part["model_version"].astype(str)
        newest_at = part["time"].iloc[-1]
        if self.newest is None or newest_at >= self.newest[0]:
            self.newest = (newest_at, str(versions.iloc[-1]))
        if self.cap is not None and self.last is None:
            part = part.assign(_sample_key=np.random.default_rng(zlib.crc32(name.encode())).random(len(part)))
        for version, rows in part.groupby(versions.to_numpy(), sort=False):
            key = str(version)
            self.counts[key] = self.counts.get(key, 0) + len(rows)
            self.held.setdefault(key, []).append(rows)
            bound = self.last if self.last is not None else self.cap
            if bound is not None and sum(len(f) for f in self.held[key]) > 2 * bound:
                self.held[key] = [self._bounded(self.held[key])]

    def _bounded(self, frames: list[Any]) -> Any:
        frame = concat_parts(frames)
        if self.last is not None:
            return frame.tail(self.last)
        if self.cap is not None and len(frame) > self.cap:
            return frame.nsmallest(self.cap, "_sample_key").sort_values("time", kind="stable")
        return frame

    @property
    def newest_version(self) -> str:
        assert self.newest is not None
        return self.newest[1]

    def frame(self, version: str) -> Any:
        frame = self._bounded(self.held[version])
        if self.cap is not None and len(frame) > self.cap:  # the newest `last`, then sampled
            frame = frame.sample(self.cap, random_state=0).sort_values("time", kind="stable")
        return frame.drop(columns="_sample_key", errors="ignore")


def devices_in_log(directory: Path | str, hours: float, now: datetime | None = None) -> dict[str, int]:
    """The devices with records in the last `hours` of the log and how many each, the server first (their `time` and
    `device` columns only)."""
    parts, _ = _parts(directory, hours, now, columns=())
    counts: Counter[str] = Counter()
    for _, part in parts:
        counts.update(part[DEVICE_COLUMN].value_counts().to_dict())
    return dict(sorted(counts.items(), key=lambda item: (item[0] != SERVER_DEVICE, item[0])))


def _parts(
    directory: Path | str, hours: float, now: datetime | None, columns: Sequence[str] | None = None
) -> tuple[LogParts, str]:
    if isinstance(directory, Path) and not directory.is_dir():
        raise NoCurrentDataError(
            f"no prediction log at {directory}: start `conveyor serve` (serve.prediction_log.enabled) and send it "
            "traffic, or check a folder of images with --source DIR. A server on another machine (a cluster's pods) "
            "ships its log where this check can read it with serve.prediction_log.s3 (or CONVEYOR_PREDICTION_LOG_S3)"
        )
    since = (now or datetime.now(UTC)) - timedelta(hours=hours)
    return LogParts(directory, since, columns), f"prediction log {directory}, last {hours:g} h"


def from_folder(folder: Path, detector: Detector, console: Console | None = None) -> CurrentData:
    """Features of a folder of images (recursively), computed with the given model as the server would."""
    if not folder.is_dir():
        raise NoCurrentDataError(f"{folder} is not a folder of images")
    files: Sequence[Path] = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise NoCurrentDataError(f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    sources = [ImageSource(path, "current", batch_of(path.name)) for path in files]
    frame, _ = describe_images(sources, detector, console)
    if not len(frame):  # it was an "insufficient data" verdict, exit 0, as if the line had been quiet
        raise NoCurrentDataError(
            f"none of the {len(files)} images in {folder} could be read (e.g. {files[0].name}): damaged, or not the "
            "image its name says"
        )
    unreadable = sorted({p.name for p in files} - set(frame["file"]))
    return CurrentData(frame, f"{len(files)} images in {folder}", None, {}, unreadable, FOLDER_DEVICE)
