"""`conveyor label select`, end to end: the frames, the serving model, the reference, the selection files."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress

from conveyor.paths import ProjectPaths
from conveyor.settings import Settings
from labelling.select import Candidate, embed_files, frames_from_log, frames_in, select
from labelling.tasks import DEFAULT_IMAGE_URL, SELECTION_FILE, SelectionFiles, selection_id, write_selection


@dataclass(frozen=True)
class SelectOptions:
    source: Path | None = None  # a folder of unlabelled images; None: the prediction log's kept frames
    hours: float | None = None  # the log window (default monitor.window_hours)
    count: int | None = None
    model: str | None = None  # a registry reference (default serve.model, i.e. the champion)
    out: Path | None = None
    image_url: str | None = None  # default DEFAULT_IMAGE_URL (Label Studio's local-files route)


@dataclass(frozen=True)
class Selection:
    files: SelectionFiles
    chosen: list[Candidate]
    pool: int  # frames scored
    model: str
    reference: str  # where the reference embeddings came from


def known_frames(paths: ProjectPaths) -> set[str]:
    """The SHA-256 of every image in the dataset and of every frame an earlier selection chose: labelled already, or
    waiting in a labelling project. Offered again, the same frames came back each run (the scoring is
    deterministic), and `label import` then refused the whole export for the one already in the dataset."""
    from pipelines.data import image_hashes

    known = set(image_hashes(paths.data))
    for record in paths.labelling.glob(f"**/{SELECTION_FILE}"):
        with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):  # damaged: `label import` says so
            known.update(str(frame["sha256"]) for frame in json.loads(record.read_text())["frames"])
    return known


def select_frames(paths: ProjectPaths, settings: Settings, options: SelectOptions, console: Console) -> Selection:
    from conveyor.tracking import Tracker
    from pipelines.features import EMBEDDING
    from pipelines.model_source import open_version
    from pipelines.reference import ProfileMissingError, load_reference

    if options.source is not None:
        frames, others = frames_in(options.source)
        described = str(options.source)
        if others:
            console.print(
                f"{len(others)} images left out: not JPEG or PNG, which the server takes (e.g. {others[0].name})",
                highlight=False,
            )
    else:
        hours = options.hours or settings.monitor.window_hours
        log = settings.serve.prediction_log
        location = paths.prediction_log_source(log.directory, log.s3)  # where `conveyor drift` reads it
        since = datetime.now(UTC) - timedelta(hours=hours)
        frames = frames_from_log(location, since=since, cache=paths.labelling / "frames")
        described = f"prediction log {location}, last {hours:g} h"
    client = Tracker.client_for(paths)
    opened = open_version(paths, settings, options.model, client=client)
    version, files, loaded = opened.version, opened.files, opened.model
    model = f"{files.name} v{files.version}"
    try:
        profile = load_reference(client, paths, version, settings.serve.conf)
        reference = np.stack(profile.frame[EMBEDDING].to_numpy()) if EMBEDDING in profile.frame else np.zeros((0, 0))
        where = f"v{files.version}'s profile ({len(reference)} images)"
    except ProfileMissingError:
        reference = np.zeros((0, 0))
    if len(reference) < 2:
        train = sorted((paths.data / "images" / "train").glob("*"))[: settings.label.reference_images]
        reference = embed_files(train, loaded.detectors[0])
        where = f"{len(reference)} training images of data/"
    console.print(f"{len(frames)} frames from {described}; model {model}; reference: {where}", highlight=False)
    left_out: list[Path] = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("scoring frames", total=len(frames))
        chosen = select(
            frames,
            loaded.detectors[0],
            reference,
            settings.label,
            options.count,
            lambda n: progress.advance(task, n),
            known=known_frames(paths),
            on_known=left_out.append,
        )
    if left_out:
        console.print(
            f"{len(left_out)} frames left out: in the dataset already, or chosen by an earlier selection "
            f"(under {paths.labelling})",
            highlight=False,
        )
    out = options.out or paths.labelling / selection_id()
    written = write_selection(
        out,
        chosen,
        loaded.detectors[0].card.names,
        settings.serve.conf,
        model,
        described,
        options.image_url or DEFAULT_IMAGE_URL,
    )
    return Selection(written, chosen, len(frames), model, where)
