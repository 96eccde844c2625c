"""The current data of a drift check: a window of the serving prediction log, or a folder of images.

A window is measured against one version: the one that served its newest record. Records another version served
(the champion moved inside the window) are left out and counted, never mixed into the comparison.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from rich.console import Console

from conveyor.errors import ConveyorError
from pipelines.batches import batch_of
from pipelines.inference import Detector
from pipelines.prediction_log import read_log
from pipelines.profile import ImageSource, describe_images
from pipelines.validate import IMAGE_SUFFIXES


class NoCurrentDataError(ConveyorError, RuntimeError):
    """Nothing to check: no prediction log, an empty window, or an empty folder. The message says which."""


@dataclass
class CurrentData:
    records: Any  # pandas DataFrame of feature rows
    source: str  # what was read, for reports
    model_version: str | None  # the version that served these rows (None for a folder)
    other_versions: dict[str, int] = field(default_factory=dict)  # rows left out: served by another version
    unreadable: list[str] = field(default_factory=list)  # log files that could not be read


def from_log(
    directory: Path | str,
    hours: float,
    last: int | None = None,
    version: str | None = None,
    now: datetime | None = None,
) -> CurrentData:
    """The last `hours` of the prediction log (then its last `last` records), rows of one version only. `directory`
    is the log's folder or the s3:// prefix the server ships it to."""
    if isinstance(directory, Path) and not directory.is_dir():
        raise NoCurrentDataError(
            f"no prediction log at {directory}: start `conveyor serve` (serve.prediction_log.enabled) and send it "
            f"traffic, or check a folder of images with --source DIR"
        )
    since = (now or datetime.now(UTC)) - timedelta(hours=hours)
    window = read_log(directory, since=since)
    frame = window.records
    described = f"prediction log {directory}, last {hours:g} h" + (f", last {last} records" if last else "")
    if not len(frame):
        problem = f"; {len(window.unreadable)} unreadable files" if window.unreadable else ""
        raise NoCurrentDataError(f"the {described} holds no records{problem}")
    versions = frame["model_version"].astype(str)
    chosen = version or str(versions.iloc[-1])
    others = {str(k): int(v) for k, v in versions[versions != chosen].value_counts().items()}
    frame = frame[(versions == chosen).to_numpy()]
    if last is not None:
        frame = frame.tail(last)
    return CurrentData(frame.reset_index(drop=True), described, chosen, others, window.unreadable)


def from_folder(folder: Path, detector: Detector, console: Console | None = None) -> CurrentData:
    """Features of a folder of images (recursively), computed with the given model as the server would."""
    if not folder.is_dir():
        raise NoCurrentDataError(f"{folder} is not a folder of images")
    files: Sequence[Path] = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise NoCurrentDataError(f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    sources = [ImageSource(path, "current", batch_of(path.name)) for path in files]
    frame, _ = describe_images(sources, detector, console)
    unreadable = sorted({p.name for p in files} - set(frame["file"])) if len(frame) else [p.name for p in files]
    return CurrentData(frame, f"{len(files)} images in {folder}", None, {}, unreadable)
