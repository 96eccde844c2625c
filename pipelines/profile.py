"""The reference profile of a model version: what its world looked like when it was trained.

Per image of the training and validation splits: the image features, that model's own predictions (through the
serving export, at the serving confidence) and its pooled backbone embedding, plus the batch the image came from
(`conveyor data add` names files `<batch>__<name>`; the original data is batch `base`). Registered with the version
(a pyfunc artifact), so a drift check always compares traffic with the profile of the version that served it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import Progress

from conveyor.paths import ProjectPaths
from conveyor.settings import Settings
from pipelines import runtimes
from pipelines.data import batch_of
from pipelines.features import (
    EMBEDDING,
    Embedder,
    image_features,
    prediction_features,
    projection,
    thumbnail,
)
from pipelines.inference import Detector, ModelCard

PROFILE_FILE = "profile.parquet"
META_FILE = "profile.json"
PROJECTION_FILE = "projection.npy"
CHUNK = 16


@dataclass(frozen=True)
class ImageSource:
    path: Path
    split: str
    batch: str


@dataclass(frozen=True)
class Profile:
    """A loaded profile: its rows, the embedding projection and what produced it."""

    frame: Any  # pandas DataFrame
    projection: np.ndarray | None
    meta: dict[str, Any]

    @classmethod
    def load(cls, folder: Path) -> Profile:
        import pandas as pd

        meta = json.loads((folder / META_FILE).read_text())
        matrix = np.load(folder / PROJECTION_FILE) if (folder / PROJECTION_FILE).is_file() else None
        return cls(pd.read_parquet(folder / PROFILE_FILE), matrix, meta)


def describe_images(
    sources: Sequence[ImageSource],
    detector: Detector,
    embedder: Embedder | None,
    console: Console | None = None,
) -> Any:
    """Features, predictions and embeddings of image files, one row each (unreadable files are left out); a progress
    bar on `console`."""
    with Progress(console=console or Console(), transient=True) as progress:
        task = progress.add_task("profiling images", total=len(sources))
        return _describe(sources, detector, embedder, lambda n: progress.advance(task, n))


def _describe(
    sources: Sequence[ImageSource], detector: Detector, embedder: Embedder | None, advance: Callable[[int], None]
) -> Any:
    import cv2
    import pandas as pd

    rows: list[dict[str, Any]] = []
    for start in range(0, len(sources), CHUNK):
        chunk = sources[start : start + CHUNK]
        loaded = [(s, cv2.imread(str(s.path))) for s in chunk]
        readable = [(s, image) for s, image in loaded if image is not None]
        images = [image for _, image in readable]
        found = detector.detect(images)
        thumbs = [thumbnail(image) for image in images]
        vectors = embedder(thumbs) if embedder is not None and thumbs else None
        for i, ((source, image), detections) in enumerate(zip(readable, found, strict=True)):
            height, width = image.shape[:2]
            row: dict[str, Any] = {
                "file": source.path.name,
                "split": source.split,
                "batch": source.batch,
                **image_features(thumbs[i], width, height),
                **prediction_features(detections, width, height),
            }
            if vectors is not None:
                row[EMBEDDING] = vectors[i].tolist()
            rows.append(row)
        advance(len(chunk))
    return pd.DataFrame(rows)


def write_profile(
    folder: Path, frame: Any, card: ModelCard, runtime: str, embedding_dims: int | None, extra: dict[str, Any]
) -> None:
    """The profile's files, written to a temporary folder and renamed into place (complete or absent)."""
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    frame.to_parquet(staging / PROFILE_FILE)
    embedding: dict[str, Any] | None = None
    if embedding_dims and EMBEDDING in frame and len(frame):
        dims_in = len(frame[EMBEDDING].iloc[0])
        np.save(staging / PROJECTION_FILE, projection(dims_in, embedding_dims))
        embedding = {"dims_in": dims_in, "dims_out": embedding_dims, "projection": "gaussian, seed 0"}
    meta = {
        "rows": len(frame),
        "batches": _batches(frame),
        "names": card.names,
        "imgsz": card.imgsz,
        "conf": card.conf,
        "runtime": runtime,
        "embedding": embedding,
        **extra,
    }
    (staging / META_FILE).write_text(json.dumps(meta, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)


def training_sources(paths: ProjectPaths) -> list[ImageSource]:
    """The validated training and validation images (the manifest the train stage read)."""
    manifest = json.loads((paths.validation / "manifest.json").read_text())
    data_root = paths.root / manifest["data_root"]
    return [
        ImageSource(data_root / sample["image"], split, batch_of(Path(sample["image"]).name))
        for split in ("train", "val")
        for sample in manifest["splits"].get(split, [])
    ]


def run(paths: ProjectPaths, settings: Settings, console: Console | None = None) -> Path:
    """The profile stage: the trained model's serving export over its training and validation images."""
    console = console or Console()
    export = json.loads((paths.export / "export.json").read_text())
    names = json.loads((paths.validation / "manifest.json").read_text())["names"]
    runtime_name = settings.gates.serving_runtime
    exported = export["exports"].get(runtime_name)
    if exported is None:
        raise FileNotFoundError(f"the profile uses the serving export '{runtime_name}', and export produced none")
    fmt = "openvino" if runtime_name.startswith("openvino") else "onnx"
    card = ModelCard(names, int(export["imgsz"]), conf=settings.serve.conf, iou=settings.evaluate.iou)
    detector = Detector(runtimes.open_runtime(fmt, paths.root / exported["path"], runtime_name), card)
    monitor = settings.monitor
    embedder = Embedder(paths.train / "weights" / "best.pt") if monitor.embeddings else None
    sources = training_sources(paths)
    frame = describe_images(sources, detector, embedder, console)
    out = paths.artifacts / "profile"
    write_profile(out, frame, card, runtime_name, monitor.embedding_dims if embedder else None, {})
    console.print(
        f"reference profile: {len(frame)} images ({', '.join(f'{k} {v}' for k, v in _batches(frame).items())}), "
        f"{'with' if embedder else 'without'} embeddings -> {out}",
        highlight=False,
    )
    return out


def _batches(frame: Any) -> dict[str, int]:
    return {str(k): int(v) for k, v in frame["batch"].value_counts().items()} if len(frame) else {}
