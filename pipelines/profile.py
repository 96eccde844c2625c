"""The reference profile of a model version: what its world looked like when it was trained, and how its confidence
relates to its accuracy.

Per image of the training and validation splits: the image features, that model's own predictions (through the
serving export, at the serving confidence, with every score from the floor up) and its `features` output, plus the
batch the image came from (`conveyor data add` names files `<batch>__<name>`; the original data is batch `base`).
Beside the rows:
- the embedding basis: the principal components of the reference's `features` (scikit-learn's PCA), in which a
  drift check measures how far traffic moved, in units of the reference's own spread;
- the calibration of the label-free performance estimate, from the validation split and its labels
  (`pipelines/performance.py`).
Registered with the version (a pyfunc artifact), so a drift check always compares traffic with the profile of the
version that served it.
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

from conveyor.errors import ConveyorError
from conveyor.paths import ProjectPaths, read_stage_output
from conveyor.settings import Settings
from pipelines import performance, runtimes
from pipelines.batches import batch_of
from pipelines.features import EMBEDDING, record, sample_image
from pipelines.inference import Detector, Inference, ModelCard

PROFILE_FILE = "profile.parquet"
META_FILE = "profile.json"
BASIS_FILE = "embedding.npz"
CALIBRATION_FILE = "calibration.json"
CHUNK = 16


class ProfileError(ConveyorError, ValueError):
    """The profile cannot be built from what is there; the message says what is missing."""


@dataclass(frozen=True)
class ImageSource:
    path: Path
    split: str
    batch: str
    label: Path | None = None  # YOLO label file (validation images: for the calibration)


@dataclass(frozen=True)
class EmbeddingBasis:
    """The reference's principal components: `project` maps `features` vectors to whitened coordinates (each
    component has variance 1 on the reference)."""

    mean: np.ndarray
    components: np.ndarray  # [k, dims]
    scale: np.ndarray  # [k]: the reference's standard deviation along each component

    @property
    def dims(self) -> int:
        return int(self.components.shape[1])

    def project(self, vectors: np.ndarray) -> np.ndarray:
        return np.asarray(((vectors - self.mean) @ self.components.T) / self.scale, dtype=np.float64)

    @classmethod
    def fit(cls, vectors: np.ndarray, components: int) -> EmbeddingBasis:
        from sklearn.decomposition import PCA

        k = max(1, min(components, vectors.shape[0] - 1, vectors.shape[1]))
        pca = PCA(n_components=k, random_state=0).fit(vectors)
        return cls(pca.mean_, pca.components_, np.sqrt(np.maximum(pca.explained_variance_, 1e-12)))

    def save(self, path: Path) -> None:
        np.savez(path, mean=self.mean, components=self.components, scale=self.scale)

    @classmethod
    def load(cls, path: Path) -> EmbeddingBasis:
        with np.load(path) as saved:
            return cls(saved["mean"], saved["components"], saved["scale"])


@dataclass(frozen=True)
class Profile:
    """A loaded profile: its rows, the embedding basis, the performance calibration, and what produced it."""

    frame: Any  # pandas DataFrame
    basis: EmbeddingBasis | None
    calibration: performance.Calibration | None
    meta: dict[str, Any]

    @classmethod
    def load(cls, folder: Path) -> Profile:
        import pandas as pd

        meta = json.loads((folder / META_FILE).read_text())
        basis = EmbeddingBasis.load(folder / BASIS_FILE) if (folder / BASIS_FILE).is_file() else None
        calibration = (
            performance.Calibration.from_json(json.loads((folder / CALIBRATION_FILE).read_text()))
            if (folder / CALIBRATION_FILE).is_file()
            else None
        )
        return cls(pd.read_parquet(folder / PROFILE_FILE), basis, calibration, meta)


def read_labels(path: Path | None, width: int, height: int) -> np.ndarray:
    """A YOLO label file as [n, 5] (class, x0, y0, x1, y1 in pixels); none or empty: no objects."""
    rows = []
    if path is not None and path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                c, cx, cy, w, h = (float(v) for v in line.split()[:5])
                rows.append(
                    [c, (cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height]
                )
    return np.array(rows, dtype=np.float64).reshape(-1, 5)


def describe_images(
    sources: Sequence[ImageSource], detector: Detector, console: Console | None = None
) -> tuple[Any, list[tuple[ImageSource, np.ndarray, Inference]]]:
    """Feature rows of image files, one each (unreadable files are left out), and what the model gave for each; a
    progress bar on `console`."""
    with Progress(console=console or Console(), transient=True) as progress:
        task = progress.add_task("profiling images", total=len(sources))
        return _describe(sources, detector, lambda n: progress.advance(task, n))


def _describe(
    sources: Sequence[ImageSource], detector: Detector, advance: Callable[[int], None]
) -> tuple[Any, list[tuple[ImageSource, np.ndarray, Inference]]]:
    import cv2
    import pandas as pd

    rows: list[dict[str, Any]] = []
    seen: list[tuple[ImageSource, np.ndarray, Inference]] = []
    for start in range(0, len(sources), CHUNK):
        chunk = sources[start : start + CHUNK]
        readable = [(s, image) for s, image in ((s, cv2.imread(str(s.path))) for s in chunk) if image is not None]
        found = detector.run([image for _, image in readable])
        for (source, image), result in zip(readable, found, strict=True):
            rows.append(
                {
                    "file": source.path.name,
                    "split": source.split,
                    "batch": source.batch,
                    **record(sample_image(image, detector.card.imgsz), result),
                }
            )
            seen.append((source, image, result))
        advance(len(chunk))
    return pd.DataFrame(rows), seen


def calibrate(
    seen: Sequence[tuple[ImageSource, np.ndarray, Inference]], names: Sequence[str]
) -> performance.Calibration:
    """The performance estimate's calibration from the validation images among `seen` (with their labels); the
    objects per image from every image among them (the training and validation splits)."""
    from pipelines.inference import SCORE_FLOOR

    labels = [read_labels(source.label, image.shape[1], image.shape[0]) for source, image, _ in seen]  # each once
    validation = [
        (source.batch, performance.Labelled(list(result.candidates), found, (image.shape[1], image.shape[0])))
        for (source, image, result), found in zip(seen, labels, strict=True)
        if source.split == "val"
    ]
    if not validation:
        raise ProfileError("the validation split has no images: the performance estimate is calibrated on it")
    # Every image counts, a background image without a label file too (zero objects, as the validate stage reads it):
    # leaving those out would raise the rate.
    return performance.fit(
        [image for _, image in validation], names, SCORE_FLOOR, labels, [batch for batch, _ in validation]
    )


def write_profile(
    folder: Path,
    frame: Any,
    card: ModelCard,
    runtime: str,
    calibration: performance.Calibration | None,
    components: int,
    extra: dict[str, Any],
) -> None:
    """The profile's files, written to a temporary folder and renamed into place (complete or absent)."""
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    frame.to_parquet(staging / PROFILE_FILE)
    embedding: dict[str, Any] | None = None
    if EMBEDDING in frame and len(frame) > 2 and frame[EMBEDDING].notna().all():
        vectors = np.stack(frame[EMBEDDING].to_numpy()).astype(np.float64)
        basis = EmbeddingBasis.fit(vectors, components)
        basis.save(staging / BASIS_FILE)
        embedding = {"dims": basis.dims, "components": int(basis.components.shape[0]), "basis": "PCA, whitened"}
    if calibration is not None:
        (staging / CALIBRATION_FILE).write_text(json.dumps(calibration.to_json()))
    meta = {
        "rows": len(frame),
        "batches": _batches(frame),
        "names": card.names,
        "imgsz": card.imgsz,
        "conf": card.conf,
        "runtime": runtime,
        "embedding": embedding,
        "calibration": None
        if calibration is None
        else {"images": calibration.images, "validation_map50_95": round(calibration.validation_map50_95, 4)},
        **extra,
    }
    (staging / META_FILE).write_text(json.dumps(meta, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)


def training_sources(paths: ProjectPaths) -> list[ImageSource]:
    """The validated training and validation images (the manifest the train stage read), with their labels."""
    manifest_path = paths.validation / "manifest.json"
    if not manifest_path.is_file():
        raise ProfileError(f"{manifest_path} is missing: run the validate stage first (`conveyor validate`)")
    manifest = json.loads(manifest_path.read_text())
    data_root = paths.root / manifest["data_root"]
    return [
        ImageSource(
            data_root / sample["image"],
            split,
            batch_of(Path(sample["image"]).name),
            data_root / sample["label"] if sample.get("label") else None,
        )
        for split in ("train", "val")
        for sample in manifest["splits"].get(split, [])
    ]


def build(
    folder: Path,
    sources: Sequence[ImageSource],
    detector: Detector,
    runtime: str,
    settings: Settings,
    console: Console,
    extra: dict[str, Any] | None = None,
) -> Any:
    """Profile `sources` with `detector` into `folder`; returns the rows."""
    frame, seen = describe_images(sources, detector, console)
    calibration = calibrate(seen, detector.card.names)
    write_profile(
        folder, frame, detector.card, runtime, calibration, settings.monitor.embedding_components, extra or {}
    )
    console.print(
        f"reference profile: {len(frame)} images ({', '.join(f'{k} {v}' for k, v in _batches(frame).items())}), "
        f"{'with' if EMBEDDING in frame else 'without'} model features; performance estimate calibrated on "
        f"{calibration.images} validation images (mAP50-95 {calibration.validation_map50_95:.3f}; objects per image "
        f"counted on {len(calibration.counted or calibration.objects)} labelled images) -> {folder}",
        highlight=False,
    )
    return frame


def run(paths: ProjectPaths, settings: Settings, console: Console | None = None) -> Path:
    """The profile stage: the trained model's serving export over its training and validation images."""
    console = console or Console()
    export = read_stage_output(paths.export / "export.json", "export")
    names = read_stage_output(paths.validation / "manifest.json", "validate")["names"]
    runtime_name = settings.gates.serving_runtime
    exported = export["exports"].get(runtime_name)
    if exported is None:
        raise FileNotFoundError(f"the profile uses the serving export '{runtime_name}', and export produced none")
    card = ModelCard(names, int(export["imgsz"]), conf=settings.serve.conf, iou=settings.evaluate.iou)
    detector = Detector(runtimes.open_serving_export(runtime_name, paths.root / exported["path"]), card)
    out = paths.artifacts / "profile"
    build(out, training_sources(paths), detector, runtime_name, settings, console)
    return out


def _batches(frame: Any) -> dict[str, int]:
    return {str(k): int(v) for k, v in frame["batch"].value_counts().items()} if len(frame) else {}
