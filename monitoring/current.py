"""The current data of a drift check: a window of the serving prediction log, or a folder of images.

A window is one device's: the server's records (`server`), or one edge runner's (its `--device` name), never mixed,
so a camera whose lens fogs is not averaged away by the others. It is measured against one version: the one that
served its newest record. Records another version served (the champion moved inside the window) are left out and
counted, never mixed into the comparison.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from rich.console import Console

from conveyor.errors import ConveyorError
from pipelines.batches import batch_of
from pipelines.inference import Detector
from pipelines.prediction_log import DEVICE_COLUMN, SERVER_DEVICE, read_log
from pipelines.profile import ImageSource, describe_images
from pipelines.validate import IMAGE_SUFFIXES

DEVICE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class NoCurrentDataError(ConveyorError, RuntimeError):
    """Nothing to check: no prediction log, an empty window, or an empty folder. The message says which."""


@dataclass
class CurrentData:
    records: Any  # pandas DataFrame of feature rows
    source: str  # what was read, for reports
    model_version: str | None  # the version that served these rows (None for a folder)
    other_versions: dict[str, int] = field(default_factory=dict)  # rows left out: served by another version
    unreadable: list[str] = field(default_factory=list)  # log files that could not be read
    device: str = SERVER_DEVICE  # whose records: the server's, an edge runner's, or "folder"


def from_log(
    directory: Path | str,
    hours: float,
    last: int | None = None,
    version: str | None = None,
    now: datetime | None = None,
    device: str = SERVER_DEVICE,
) -> CurrentData:
    """The last `hours` of one device's records in the prediction log (then its last `last` records), rows of one
    version only. `directory` is the log's folder or the s3:// prefix the server and the edge runners ship it to."""
    if not DEVICE_NAME.fullmatch(device) or device in (".", ".."):
        raise NoCurrentDataError(f"no device {device!r}: device names are letters, digits, '_', '.' and '-'")
    frame, described, unreadable = _window(directory, hours, now)
    devices = frame[DEVICE_COLUMN].value_counts() if len(frame) else None
    if devices is not None:
        frame = frame[(frame[DEVICE_COLUMN] == device).to_numpy()]
    described += f", last {last} records" if last else ""
    if not len(frame):
        problem = f"; {len(unreadable)} unreadable files" if unreadable else ""
        present = (
            "; it has records of "
            + ", ".join(f"{name} ({count})" for name, count in devices.items())
            + ": choose one with --device NAME"
            if devices is not None and len(devices)
            else ""
        )
        raise NoCurrentDataError(f"the {described} holds no records of device {device}{problem}{present}")
    versions = frame["model_version"].astype(str)
    chosen = version or str(versions.iloc[-1])
    others = {str(k): int(v) for k, v in versions[versions != chosen].value_counts().items()}
    frame = frame[(versions == chosen).to_numpy()]
    if last is not None:
        frame = frame.tail(last)
    return CurrentData(
        frame.reset_index(drop=True), f"{described}, device {device}", chosen, others, unreadable, device
    )


def devices_in_log(directory: Path | str, hours: float, now: datetime | None = None) -> dict[str, int]:
    """The devices with records in the last `hours` of the log and how many each, the server first."""
    frame, _, _ = _window(directory, hours, now)
    counts = {str(k): int(v) for k, v in frame[DEVICE_COLUMN].value_counts().items()} if len(frame) else {}
    return dict(sorted(counts.items(), key=lambda item: (item[0] != SERVER_DEVICE, item[0])))


def _window(directory: Path | str, hours: float, now: datetime | None) -> tuple[Any, str, list[str]]:
    if isinstance(directory, Path) and not directory.is_dir():
        raise NoCurrentDataError(
            f"no prediction log at {directory}: start `conveyor serve` (serve.prediction_log.enabled) and send it "
            f"traffic, or check a folder of images with --source DIR"
        )
    since = (now or datetime.now(UTC)) - timedelta(hours=hours)
    window = read_log(directory, since=since)
    return window.records, f"prediction log {directory}, last {hours:g} h", window.unreadable


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
    return CurrentData(frame, f"{len(files)} images in {folder}", None, {}, unreadable, "folder")
