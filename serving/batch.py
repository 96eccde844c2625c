"""`conveyor predict SOURCE`: batch prediction over a folder, a glob, a list file or an S3 prefix of images, into JSONL.

The same model, runtime and post-processing as the server (`pipelines.model_source` + `pipelines.inference.Detector`).
Resumable: images already in the output file are skipped, and a line cut short by a crash is dropped and redone.
A bad image becomes an `error` line and the run goes on; the summary counts them.
"""

from __future__ import annotations

import glob
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from conveyor.errors import ConveyorError
from conveyor.paths import write_atomically
from pipelines.inference import ImageError, ImageLimits, decode_image
from pipelines.model_source import LoadedModel

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


class SourceError(ConveyorError, ValueError):
    """The SOURCE names no images (or a kind of source this command does not read); the message says which."""


@dataclass(frozen=True)
class BatchSummary:
    images: int
    skipped: int  # already in the output from an earlier run
    failed: int
    detections: int
    seconds: float
    out: Path
    version: str

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def list_images(source: str) -> list[str]:
    """A folder (recursively), a glob pattern, a text file listing one image path per line, or s3://bucket/prefix
    (every image object under it; endpoint and credentials from the environment)."""
    if source.startswith("s3://"):
        from conveyor import storage

        urls = storage.list_objects(source, IMAGE_SUFFIXES)
        if not urls:
            raise SourceError(f"{source}: no .jpg, .jpeg or .png objects under this prefix")
        return urls
    path = Path(source)
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    elif any(ch in source for ch in "*?[") and not path.is_file():  # `photo[1].jpg` is a file, not a pattern
        found = sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).suffix.lower() in IMAGE_SUFFIXES)
    elif path.is_file() and path.suffix.lower() not in IMAGE_SUFFIXES:
        base = path.parent
        try:
            lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        except UnicodeDecodeError:  # an image of another format, most likely
            raise SourceError(
                f"{source}: neither a .jpg, .jpeg or .png image nor a text file listing one image path per line"
            ) from None
        found = [(base / line) if not Path(line).is_absolute() else Path(line) for line in lines if line]
    elif path.is_file():
        found = [path]
    else:
        raise SourceError(f"{source}: no such folder, image, list file or matching glob")
    if not found:
        raise SourceError(f"{source}: no .jpg, .jpeg or .png images found")
    unique: dict[str, str] = {}  # a list file naming one image twice (or as `a.jpg` and `./a.jpg`): once
    for image in found:
        unique.setdefault(image_key(str(image)), str(image))
    return list(unique.values())


def image_key(image: str) -> str:
    """What makes two names one image: the absolute, normalised path (`imgs/a.jpg`, `./imgs/a.jpg` and
    `/data/imgs/a.jpg` from /data are one), or the s3:// URL as it is. A resume named by another spelling of the same
    folder predicted every image again."""
    return image if image.startswith("s3://") else os.path.normpath(os.path.abspath(image))


def reader_for(source: str) -> Callable[[str], bytes]:
    """How to read the images `list_images(source)` names: files, or objects through one S3 client."""
    if source.startswith("s3://"):
        from conveyor import storage

        return storage.ObjectReader()
    return lambda image: Path(image).read_bytes()


LINE_START = b'{"image": '  # how every line `predict` writes begins (json.dumps of a dict whose first key is image)


class OutputError(ConveyorError, ValueError):
    """--out names something that is not this command's output: it is left as it is."""


def done_images(out: Path) -> set[str]:
    """Images already predicted in `out` (see `read_output`)."""
    return read_output(out)[0]


def read_output(out: Path) -> tuple[set[str], set[str]]:
    """Images already predicted in `out`, and the model versions that predicted them, in one read. Done includes an
    image that could not be decoded (its `error` line says why; a store that does not answer stops the run instead).
    An image that could not be read (`"retry": true`: permission denied, gone) is not done: its line is removed and
    it is tried again. A torn last line (a crash mid-write) is removed so it is redone. A file that is not predictions
    (another line that does not read as one) is refused and left untouched: it may be anything the user named."""
    if out.is_dir():
        raise OutputError(f"--out {out} is a folder: name a .jsonl file")
    if not out.is_file():
        return set(), set()
    done: set[str] = set()
    versions: set[str] = set()
    kept: list[bytes] = []
    data = out.read_bytes()
    lines = data.splitlines(keepends=True)
    for number, line in enumerate(lines, 1):
        last = number == len(lines)
        if not line.strip():  # a blank line (an editor's last newline): kept, not a record
            kept.append(line)
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        # Each line is written whole, with its newline; only a crash leaves one cut short, and only the last, and it
        # starts as every line does (or is the start of that start). Anything else is not this command's file.
        torn = last and not line.endswith(b"\n") and (line.startswith(LINE_START) or LINE_START.startswith(line))
        if torn:
            break
        if not isinstance(record, dict) or not isinstance(record.get("image"), str):
            raise OutputError(
                f"--out {out}: line {number} is not a prediction of `conveyor predict` (it would be overwritten): "
                "name a new file, or an earlier output of this command to resume it"
            )
        if record.get("retry") is True:
            continue
        done.add(record["image"])
        if record.get("version") is not None:
            versions.add(str(record["version"]))
        kept.append(line)
    if sum(map(len, kept)) != len(data):  # a kill while it is rewritten leaves the old file or the new one
        write_atomically(out, b"".join(kept))
    return done, versions


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def predict(
    model: LoadedModel,
    images: list[str],
    out: Path,
    batch_size: int,
    limits: ImageLimits,
    console: Console,
    read: Callable[[str], bytes] | None = None,
) -> BatchSummary:
    """Detections for `images` (paths or s3:// URLs, read with `read`) appended to `out`, skipping those done."""
    read = read or (lambda image: Path(image).read_bytes())
    out.parent.mkdir(parents=True, exist_ok=True)
    done, versions = read_output(out)
    others = versions - {model.version}
    if others:  # resumed with another model, the earlier images were skipped and kept the other version's results
        raise OutputError(
            f"--out {out} holds predictions of {model.name} v{', v'.join(sorted(others))}, not v{model.version}: name "
            f"a new --out, or resume with --model {sorted(others)[-1]}"
        )
    done_keys = {image_key(image) for image in done}
    todo = [image for image in images if image_key(image) not in done_keys]
    detector = model.detectors[0]
    failed = detections = 0
    started = time.perf_counter()
    with (
        out.open("a", encoding="utf-8") as sink,
        Progress(
            TextColumn("[bold]predict[/]"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console
        ) as progress,
    ):
        task = progress.add_task("images", total=len(todo))
        for chunk in _chunks(todo, batch_size):
            lines: dict[str, dict[str, object]] = {}
            frames = []
            for path in chunk:
                try:
                    frames.append((path, decode_image(read(path), limits)))
                except ImageError as exc:  # one bad image; a store that is down stops the run
                    lines[path] = {"image": path, "error": str(exc), "version": model.version}
                    failed += 1
                except OSError as exc:  # not readable now (permission denied, gone): tried again on a resume
                    lines[path] = {"image": path, "error": str(exc), "version": model.version, "retry": True}
                    failed += 1
            for (path, frame), found in zip(frames, detector.detect([f for _, f in frames]), strict=True):
                detections += len(found)
                lines[path] = {
                    "image": path,
                    "model": model.name,
                    "version": model.version,
                    "width": frame.shape[1],
                    "height": frame.shape[0],
                    "detections": [d.to_json() for d in found],
                }
            for path in chunk:  # in input order; each line is written whole
                sink.write(json.dumps(lines[path]) + "\n")
            sink.flush()
            progress.advance(task, len(chunk))
    return BatchSummary(
        len(todo), len(images) - len(todo), failed, detections, time.perf_counter() - started, out, model.version
    )
