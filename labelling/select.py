"""Which frames are worth a person's labelling time: `conveyor label select`.

Rules:
- A frame scores by **uncertainty** (its most doubtful detection: 1 at the model's serving threshold, falling to 0 at
  `label.floor` below it and at confidence 1 above it; a frame the model is sure about scores low) and **novelty**
  (how far the model's own features of it are from the reference images': 0 within the reference's own spread, 1 at
  twice it; each feature scaled by its spread in the reference).
  The weights are `label.uncertainty_weight` and `label.novelty_weight`. Novelty matters because under a domain
  shift a detector is not unsure, it is blind: on the shifted frames of the test below it finds nothing above 0.1,
  so uncertainty alone picks in-distribution frames with borderline boxes (measured: 4 of 8 shifted, a random
  pick's share).
- **Diversity**: the best `count x pool_factor` frames are clustered by embedding (scikit-learn's k-means into
  `count` clusters) and the best frame of each cluster is taken, so N frames are not N copies of one scene.
- The model is the one serving (the champion by default); its profile's embeddings are the reference, or, for a
  version without a profile, `label.reference_images` of the current training images.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from conveyor.errors import ConveyorError
from conveyor.paths import write_atomically
from conveyor.settings import LabelSettings
from pipelines.inference import Detection, Detector, decode_image
from pipelines.validate import IMAGE_SUFFIXES

NEIGHBOURS = 5  # novelty: mean distance to this many nearest reference embeddings


class NothingToSelectError(ConveyorError, ValueError):
    """No frame to choose from (an empty folder, a log without kept frames)."""


@dataclass(frozen=True)
class Candidate:
    path: Path
    sha256: str  # of the file's bytes: a frame served many times is one candidate
    width: int
    height: int
    detections: list[Detection]  # from label.floor up (pre-annotations keep those above the serving threshold)
    uncertainty: float
    novelty: float
    score: float
    cluster: int = -1


# What the server takes (`pipelines.inference.check_image_bytes`), so what a frame of the line is: a selection is
# scored with the server's own checks and decoding.
FRAME_SUFFIXES = {".jpg", ".jpeg", ".png"}


def frames_in(folder: Path) -> tuple[list[Path], list[Path]]:
    """The JPEG and PNG frames under `folder`, and its other images (BMP, TIFF, WebP), which are left out and named:
    they were listed, then dropped as unreadable without a word."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder of images")
    images = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    frames = [p for p in images if p.suffix.lower() in FRAME_SUFFIXES]
    others = [p for p in images if p.suffix.lower() not in FRAME_SUFFIXES]
    if not frames:
        also = f"; {len(others)} in other formats, which the server does not take: convert them" if others else ""
        raise NothingToSelectError(f"{folder}: no JPEG or PNG images ({', '.join(sorted(FRAME_SUFFIXES))}){also}")
    return frames, others


def frames_from_log(location: Path | str, since: Any = None, cache: Path | None = None) -> list[Path]:
    """The frames the server kept (`serve.prediction_log.keep_frames`) in the window, from the log where drift checks
    read it: the local folder, or `s3://...` (`serve.prediction_log.s3`, every replica's frames), whose frames are
    downloaded into `cache` once."""
    from pipelines.prediction_log import read_log

    records = read_log(location, since=since, columns=["frame"]).records  # not the features: ~6 KB a record
    names = [] if not len(records) or "frame" not in records else [str(f) for f in records["frame"].dropna()]
    if isinstance(location, Path):
        kept = [location / f for f in names if (location / f).is_file()]
    else:
        kept = _downloaded(location, names, cache or Path(tempfile.mkdtemp(prefix="conveyor-frames-")))
    if not kept:
        raise NothingToSelectError(
            f"{location}: no kept frames in this window. The server keeps a share of served images when "
            "params.yaml `serve.prediction_log.keep_frames` is above 0 (e.g. 0.1); or select from a folder (--source)"
        )
    return kept


def _downloaded(url: str, names: list[str], cache: Path) -> list[Path]:
    """Each named frame under the s3:// log `url`, downloaded into `cache` unless already there; one that is gone
    (its hour expired meanwhile) is left out."""
    from conveyor.storage import ObjectReader

    reader: ObjectReader | None = None
    kept = []
    for name in names:
        local = cache / name
        if not local.is_file():
            reader = reader or ObjectReader()
            try:
                content = reader(f"{url.rstrip('/')}/{name}")
            except FileNotFoundError:
                continue
            local.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(local, content)
        kept.append(local)
    return kept


def uncertainty(detections: Sequence[Detection], threshold: float, floor: float) -> float:
    """1 for a detection at the serving threshold, 0 at the floor and at confidence 1; the frame's most doubtful."""
    best = 0.0
    for d in detections:
        c = d.confidence
        doubt = (c - floor) / (threshold - floor) if c < threshold else (1 - c) / (1 - threshold)
        best = max(best, min(1.0, max(0.0, doubt)))
    return best


def novelty(embeddings: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per frame, 0 while its distance to the reference is within the reference's own spread (the 90th percentile of
    each reference image's distance to the others), rising to 1 at twice that distance."""
    from sklearn.neighbors import NearestNeighbors

    scale = np.maximum(reference.std(axis=0), 1e-6)  # feature maps of different depths differ in magnitude
    reference, embeddings = reference / scale, embeddings / scale
    k = min(NEIGHBOURS, len(reference) - 1)
    index = NearestNeighbors(n_neighbors=k + 1).fit(reference)
    own = index.kneighbors(reference)[0][:, 1:].mean(axis=1)  # leave each reference image out of its own
    theirs = index.kneighbors(embeddings, n_neighbors=k)[0].mean(axis=1)
    spread = max(float(np.quantile(own, 0.9)), 1e-9)
    return np.clip(theirs / spread - 1.0, 0.0, 1.0)


def diverse(scores: np.ndarray, embeddings: np.ndarray, count: int, pool_factor: int) -> list[tuple[int, int]]:
    """(index, cluster) of the best frame in each of `count` k-means clusters of the best `count x pool_factor`."""
    from sklearn.cluster import KMeans

    order = np.argsort(-scores, kind="stable")
    pool = order[: count * pool_factor]
    if len(pool) <= count or not embeddings.shape[1]:  # no features to cluster by: the best, in order
        return [(int(i), n) for n, i in enumerate(pool[:count])]
    unit = embeddings[pool] / np.maximum(np.linalg.norm(embeddings[pool], axis=1, keepdims=True), 1e-9)
    distinct = len(np.unique(unit.round(6), axis=0))  # k-means cannot make more clusters than there are points
    clusters = KMeans(n_clusters=min(count, distinct), n_init=4, random_state=0).fit_predict(unit)
    chosen = []
    for cluster in range(count):
        members = pool[clusters == cluster]
        if len(members):
            chosen.append((int(members[np.argmax(scores[members])]), cluster))
    # Fewer clusters than asked (the pool's frames look the same to the model: one scene served again): the next
    # frames of the ranking that differ from every one taken fill the rest.
    for i in order:
        if len(chosen) >= count:
            break
        taken = embeddings[[j for j, _ in chosen]]
        if not np.any(np.all(np.isclose(taken, embeddings[i]), axis=1)):
            chosen.append((int(i), len(chosen)))
    return sorted(chosen, key=lambda pair: -scores[pair[0]])


def model_features(detector: Detector, images: Sequence[np.ndarray], batch: int = 16) -> np.ndarray:
    """The model's features output for each image ([n, 0] when its export has none)."""
    found = [f for i in range(0, len(images), batch) for f in detector.run(images[i : i + batch])]
    if not found or any(f.features is None for f in found):
        return np.zeros((len(found), 0), np.float32)
    return np.stack([f.features for f in found if f.features is not None]).astype(np.float32)


def embed_files(files: Sequence[Path], detector: Detector) -> np.ndarray:
    """The features of the training images among `files`, in any format OpenCV reads (the dataset keeps BMP, TIFF
    and WebP as they came; the server's JPEG-or-PNG check is for what it is sent). Others are left out."""
    import cv2

    images = [cv2.imdecode(np.frombuffer(p.read_bytes(), np.uint8), cv2.IMREAD_COLOR) for p in files]
    return model_features(detector, [np.asarray(image) for image in images if image is not None])


def select(
    frames: Sequence[Path],
    detector: Detector,
    reference: np.ndarray,
    settings: LabelSettings,
    count: int | None = None,
    advance: Callable[[int], None] = lambda n: None,
    known: Collection[str] = frozenset(),
    on_known: Callable[[Path], None] = lambda path: None,
) -> list[Candidate]:
    """The `count` frames most worth labelling, best first. Unreadable files are skipped, a frame whose bytes
    repeat an earlier one's (the same image served again) is scored once, and one whose SHA-256 is `known` (in the
    dataset already, or chosen by an earlier selection) is not offered again."""
    count = count or settings.count
    readable: dict[str, tuple[Path, np.ndarray]] = {}
    seen = 0
    for path in frames:
        with contextlib.suppress(OSError, ValueError):  # an unreadable frame is not worth labelling
            data = path.read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            if digest in known:
                seen += 1
                on_known(path)
            elif digest not in readable:
                readable[digest] = (path, decode_image(data))
        advance(1)
    if not readable:
        if seen:
            raise NothingToSelectError(
                f"each of the {len(frames)} frames that could be read is in the dataset already or was selected "
                f"before ({seen}): nothing new to label"
            )
        raise NothingToSelectError(f"none of the {len(frames)} frames could be read as an image")
    digests = list(readable)
    images = [readable[d][1] for d in digests]
    found = [result for i in range(0, len(images), 16) for result in detector.run(images[i : i + 16], settings.floor)]
    detections = [result.candidates for result in found]
    embeddings = (
        np.stack([r.features for r in found if r.features is not None]).astype(np.float32)
        if all(r.features is not None for r in found)
        else np.zeros((len(found), 0), np.float32)
    )
    doubt = np.array([uncertainty(d, detector.card.conf, settings.floor) for d in detections])
    usable = len(reference) > 1 and embeddings.shape[1] and reference.shape[1] == embeddings.shape[1]
    far = novelty(embeddings, reference) if usable else np.zeros(len(images))
    scores = settings.uncertainty_weight * doubt + settings.novelty_weight * far
    return [
        Candidate(
            readable[digests[i]][0],
            digests[i],
            images[i].shape[1],
            images[i].shape[0],
            detections[i],
            float(doubt[i]),
            float(far[i]),
            float(scores[i]),
            cluster,
        )
        for i, cluster in diverse(scores, embeddings, min(count, len(images)), settings.pool_factor)
    ]
