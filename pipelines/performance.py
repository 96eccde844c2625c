"""What the model's mAP50-95 is on traffic nobody labelled: an estimate from its own confidences, with an interval.

Calibrated on the version's validation split (labelled, never trained on), at the `profile` stage:
- for each class and each of mAP's ten IoU thresholds, the chance that a detection with a given confidence is a true
  positive: isotonic regression of "matched a label" on confidence (scikit-learn's `IsotonicRegression`, its
  thresholds computed through SciPy's pool-adjacent-violators: `_fit_curves`), over every detection from the score
  floor up;
- how many objects of each class an image holds on average: counted on every labelled image of the version's data
  (training and validation split), since that is the line's and not the model's. Measured over calibration draws
  (`bench/drift_power.py`): 60 images alone put a class's rate off by up to 15 %, which moves every estimate.

The estimate for a window of traffic rebuilds mAP as Ultralytics' validator computes it (its `ap_per_class`, to the
last digit: `average_precision`): each detection is a true positive with the chance its confidence earned on the
validation split, the number of objects is that rate, and the mAP is averaged over outcomes drawn from those chances. A
production line's camera changes (focus, light, dust) change how well the model sees, not how many defects pass
under it; where the detections would claim more true positives than there are objects (a dirty lens makes defects
everywhere), the claims are scaled down to the objects there are, so the excess counts as false positives.

The cost is against the version's validation images, estimated the same way at the window's size, each image read with
curves fitted without it (five folds): what an unchanged window reads to the estimator. Not the training images: a
model is surer of the images it was trained on than of new ones, so they read higher and every window then looked
costly (+0.039 on unchanged windows of 200 images, measured on the demo's champion: docs/monitoring.md). The interval
is a bootstrap over the window's images, the validation images and the calibration together. Measured
on a bank of shifts the estimate was never fitted on (`bench/drift_power.py`).

A detection that stays at one place of the frame while the parts move past is on the lens or in the view (dust, a
droplet, a scratch on the window), not on a part: where the log holds the detections' boxes, those found at one place
(same class, IoU >= 0.5) in at least STATIC_SHARE of a window's images are read as false (`fixed_in_frame`), unless
the version's own validation labels recur at one place that way (a line whose defects do: `Calibration.fixed_defects`).
"""

from __future__ import annotations

import types
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from conveyor.errors import ConveyorError
from pipelines.inference import Detection

IOU_THRESHOLDS = [round(0.5 + 0.05 * i, 2) for i in range(10)]
# A larger window is estimated on a random sample of this many images. Measured on a logged window of 10,000 records
# (2 cores): 4.7 s at 2000 images, 1.8 s at 1000, the cost's 90 % interval 0.078 wide against 0.086: the calibration
# on the validation split decides the interval, not the window.
MAX_IMAGES = 1000
INTERVAL_LEVEL = 0.9  # of the estimate's intervals
FOLDS = 5  # the cost's reference: each validation image read with curves fitted on the other folds
MIN_FOLD_DETECTIONS = 10  # of a class in the other folds; fewer, and the class is read with every image's curves
# The cost's reference is averaged over windows of the window's size drawn from the validation images, this many
# images in all (16 to 400 windows): on 40 images one window's sampled mAP moves by about 0.05.
REFERENCE_IMAGES = 4000
# A detection at one place of the frame (same class, IoU >= STATIC_IOU) in this share of a window's images, and in at
# least STATIC_MIN_IMAGES of them, is fixed in the frame. Measured (docs/monitoring.md): on unchanged windows of 40 and
# 200 images no detection recurs in more than 7 % of them; 12 dust spots on the lens put 66 % of the window's
# detections in more than half of its images.
STATIC_SHARE = 0.3
STATIC_MIN_IMAGES = 5
STATIC_IOU = 0.5
STATIC_SAMPLE = 200  # images of a window the rule is decided on (`fixed_in_frame`)
_STATIC_CELL = 0.05  # boxes are grouped by the cell of the frame their centre is in (fractions of the frame)
_STATIC_ANCHORS = 32  # fixed boxes of the sample a window's boxes are compared with, per class and cell
_STATIC_PAIRS = 40_000_000  # box pairs phase 1 compares at most (a dirty lens over 200 images: well under)
_STATIC_MIN_SAMPLE = 50  # images the sample keeps however crowded
_STATIC_CHUNK = 1_000_000  # box pairs compared at once (a few arrays of this many float64: tens of MB)


class CalibrationError(ConveyorError, ValueError):
    """The estimate cannot be made: no calibration, or nothing to read; the message says what is missing."""


@dataclass(frozen=True)
class Labelled:
    """One validation image: its detections from the score floor up, and its true boxes [n, 5] (class, x0, y0,
    x1, y1 in pixels)."""

    detections: list[Detection]
    labels: np.ndarray
    size: tuple[int, int] | None = None  # the frame's width and height, where known (`fit`'s `fixed_defects`)


@dataclass(frozen=True)
class Curve:
    """A monotone step function (isotonic regression's thresholds)."""

    x: list[float]
    y: list[float]

    def __call__(self, values: np.ndarray) -> np.ndarray:
        if not self.x:
            return np.zeros(len(values))
        return np.interp(values, self.x, self.y)


@dataclass(frozen=True)
class Calibration:
    names: list[str]
    floor: float
    images: int
    objects_per_image: list[float]  # per class
    curves: list[list[Curve]]  # [class][IoU threshold]
    validation_map50_95: float  # the true mAP50-95 of these images (the reference of a cost)
    # The raw material, kept so an estimate's interval can include the calibration's own uncertainty:
    # per detection [image index, class, confidence, tp@0.50 ... tp@0.95], and per image its objects per class.
    detections: list[list[float]]
    objects: list[list[int]]
    # Per labelled image of the version's data (training and validation), its objects per class: the sample of
    # `objects_per_image`. None in a calibration made before it was kept (the validation images' `objects` then).
    counted: list[list[int]] | None = None
    # Per validation image, the batch of the version's data it belongs to (a cost against the batch the traffic is
    # nearest). None in a calibration made before it was kept: every validation image is then the reference.
    batches: list[str] | None = None
    # Whether the validation images' own objects recur at one place of the frame (`fixed_in_frame` of their labels):
    # detections fixed in a window's frames are then the line's, and are read like any other. None in a calibration
    # made before it was kept (read as False).
    fixed_defects: bool | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Calibration:
        curves = [[Curve(**c) for c in per_class] for per_class in raw["curves"]]
        return cls(**{**raw, "curves": curves})


@dataclass(frozen=True)
class Estimate:
    map50_95: float
    low: float
    high: float
    reference: float  # the same estimate on the version's validation images (out of fold), at the window's size
    cost_low: float
    cost_high: float
    validation_map50_95: float  # the true mAP50-95 of the validation split, for scale
    images: int
    level: float  # of the intervals
    fixed_detections: int = 0  # read as false: fixed in the frame (`fixed_in_frame`) ...
    fixed_images: int = 0  # ... in this many of the window's images

    @property
    def cost(self) -> float:
        """mAP50-95 lost against the version's own validation images (positive: worse); estimated the same way on
        both sides at this window size (the reference read out of fold), so the estimator's bias at that size
        cancels."""
        return self.reference - self.map50_95

    @property
    def cost_interval(self) -> tuple[float, float]:
        return self.cost_low, self.cost_high

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "cost": self.cost}


def match(detections: Sequence[Detection], labels: np.ndarray) -> np.ndarray:
    """True positive at each IoU threshold for each detection [n, 10], as Ultralytics' validator matches them."""
    import torch
    from ultralytics.engine.validator import BaseValidator
    from ultralytics.utils.metrics import box_iou

    order = sorted(range(len(detections)), key=lambda i: -detections[i].confidence)
    if not len(labels) or not detections:
        return np.zeros((len(detections), len(IOU_THRESHOLDS)), bool)
    ranked = [detections[i] for i in order]
    iou = box_iou(torch.tensor(labels[:, 1:5], dtype=torch.float32), torch.tensor([d.box for d in ranked]))
    matcher = types.SimpleNamespace(iouv=torch.tensor(IOU_THRESHOLDS))
    correct = BaseValidator.match_predictions(
        matcher,  # type: ignore[arg-type]
        torch.tensor([d.class_id for d in ranked]),
        torch.tensor(labels[:, 0]),
        iou,
    ).numpy()
    out = np.zeros_like(correct)
    out[order] = correct
    return out


_AP_RECALL = np.linspace(0, 1, 101)  # COCO's 101 recall points, as Ultralytics' `compute_ap`
_TRAPEZOID = getattr(np, "trapezoid", None) or np.trapz  # NumPy 2 renamed it; Ultralytics picks the same way


def average_precision(tp: np.ndarray, confidence: np.ndarray, classes: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per class with objects (sorted) and per IoU threshold, the AP exactly as Ultralytics' `ap_per_class` computes
    it (its `ap`, element [5]; `test_the_average_precision_is_ultralytics` holds it there): detections sorted by
    confidence the same way, precision and recall accumulated, the precision envelope read at COCO's 101 recall
    points. Not the library's function itself: importing `ultralytics.utils.metrics` imports PyTorch, 1.4 s of a
    10,000-record drift check's 10 s that reads nothing else of it, and the function also builds the
    precision-recall curves at 1000 points and the F1 curve for every call, which the estimate's 130 calls never
    read."""
    order = np.argsort(-confidence)  # the same call as `ap_per_class`: the same order among ties
    tp, classes = tp[order], classes[order]
    found, objects = np.unique(targets, return_counts=True)
    ap = np.zeros((len(found), tp.shape[1]))
    for k, (c, labelled) in enumerate(zip(found, objects, strict=True)):
        mine = classes == c
        if not mine.any():
            continue
        true_positives = tp[mine].cumsum(0)
        recall = true_positives / (labelled + 1e-16)
        precision = true_positives / (true_positives + (1 - tp[mine]).cumsum(0))
        last = recall[-1:]
        extended_recall = np.concatenate([np.zeros((1, tp.shape[1])), recall, last, np.ones((1, tp.shape[1]))])
        envelope = np.concatenate([np.ones((1, tp.shape[1])), precision, np.zeros((2, tp.shape[1]))])
        envelope = np.flip(np.maximum.accumulate(np.flip(envelope, 0), 0), 0)
        for j in range(tp.shape[1]):
            ap[k, j] = _TRAPEZOID(np.interp(_AP_RECALL, extended_recall[:, j], envelope[:, j]), _AP_RECALL)
    return ap


def _map(tp: np.ndarray, confidence: np.ndarray, classes: np.ndarray, targets: np.ndarray) -> float:
    """mAP50-95 as Ultralytics' validator computes it (`average_precision`: tp may hold expected shares instead of
    booleans), averaged over the classes with objects."""
    if not len(targets):
        return float("nan")
    if not len(confidence):
        return 0.0
    return float(average_precision(tp, confidence, classes, targets).mean())


def score(images: Sequence[Labelled]) -> float:
    """The true mAP50-95 of labelled images."""
    tp = [match(i.detections, i.labels) for i in images]
    detections = [d for i in images for d in i.detections]
    targets = np.concatenate([i.labels[:, 0] for i in images if len(i.labels)] or [np.zeros(0)])
    return _map(
        np.concatenate(tp) if tp else np.zeros((0, 10)),
        np.array([d.confidence for d in detections]),
        np.array([d.class_id for d in detections]),
        targets,
    )


def _fit_curves(table: np.ndarray, classes: int) -> list[list[Curve]]:
    """Per class and IoU threshold, the isotonic regression of "matched a label" on confidence, as scikit-learn's
    `IsotonicRegression(y_min=0, y_max=1)` fits it (tied confidences pooled, SciPy's pool-adjacent-violators, points
    inside flat runs dropped: its `X_thresholds_` and `y_thresholds_`), the ties pooled once for all ten thresholds.
    An estimate refits its curves 55 times (five folds, 50 bootstrap draws): through the estimator class, its input
    checks took 0.6 of a 10,000-record check's 1.3 s of estimate (bench/drift_power.py's `check_s_10k`)."""
    from scipy.optimize import isotonic_regression

    curves = []
    for c in range(classes):
        rows = table[table[:, 1] == c]
        if not len(rows):
            curves.append([Curve([], []) for _ in IOU_THRESHOLDS])
            continue
        confidence, tie, ties = np.unique(rows[:, 2], return_inverse=True, return_counts=True)
        per_threshold = []
        for t in range(len(IOU_THRESHOLDS)):
            pooled = np.bincount(tie, weights=rows[:, 3 + t], minlength=len(confidence)) / ties
            chance = np.clip(isotonic_regression(pooled, weights=ties.astype(np.float64)).x, 0.0, 1.0)
            kept = np.ones(len(chance), bool)  # a point whose neighbours hold its value changes no interpolation
            kept[1:-1] = (chance[1:-1] != chance[:-2]) | (chance[1:-1] != chance[2:])
            per_threshold.append(Curve(confidence[kept].tolist(), chance[kept].tolist()))
        curves.append(per_threshold)
    return curves


def class_counts(labels: np.ndarray, classes: int) -> list[int]:
    """How many objects of each class labels [n, 5] hold."""
    found = labels[:, 0].astype(int) if len(labels) else np.zeros(0, int)
    return [int((found == c).sum()) for c in range(classes)]


def fit(
    images: Sequence[Labelled],
    names: Sequence[str],
    floor: float,
    counted: Sequence[np.ndarray] = (),
    batches: Sequence[str] = (),
) -> Calibration:
    """The calibration from the validation images (their detections from `floor` up, and their labels); the objects
    per image from `counted`, the labels of every image of the version's data, where given; each validation image's
    data batch from `batches`, where given."""
    if batches and len(batches) != len(images):
        raise CalibrationError(f"{len(batches)} batches for {len(images)} validation images")
    if not images:
        raise CalibrationError("no validation images to calibrate the performance estimate on")
    table = []
    objects = []
    for index, image in enumerate(images):
        kept = [d for d in image.detections if d.confidence >= floor]
        for detection, correct in zip(kept, match(kept, image.labels), strict=True):
            table.append([index, detection.class_id, detection.confidence, *correct.astype(float)])
        objects.append(class_counts(image.labels, len(names)))
    array = np.array(table, dtype=np.float64).reshape(-1, 3 + len(IOU_THRESHOLDS))
    per_image = [class_counts(labels, len(names)) for labels in counted] if len(counted) else None
    counts = np.array(per_image or objects, dtype=np.float64)
    return Calibration(
        names=list(names),
        floor=floor,
        images=len(images),
        objects_per_image=counts.mean(axis=0).tolist(),
        curves=_fit_curves(array, len(names)),
        validation_map50_95=score(
            [Labelled([d for d in i.detections if d.confidence >= floor], i.labels) for i in images]
        ),
        detections=[[round(v, 5) for v in row] for row in array.tolist()],
        objects=objects,
        counted=per_image,
        batches=list(batches) or None,
        fixed_defects=_fixed_defects(images),
    )


def _fixed_defects(images: Sequence[Labelled]) -> bool | None:
    """Whether the labelled objects of these images (those whose frame size is known) recur at one place of the frame
    as `fixed_in_frame` reads detections; None where no image's size is known."""
    sized = [(np.asarray(i.labels, np.float64).reshape(-1, 5), i.size) for i in images if i.size is not None]
    if not sized:
        return None
    boxes = [found[:, 1:5] / np.array([*size, *size], np.float64) for found, size in sized]
    return any(part.any() for part in fixed_in_frame(boxes, [found[:, 0] for found, _ in sized]))


def fixed_in_frame(boxes: Sequence[np.ndarray], classes: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Per image, which of its boxes ([k, 4]: x0, y0, x1, y1 as fractions of the frame; `classes` [k]) are fixed in
    the frame: a box of the same class at IoU >= STATIC_IOU is in at least STATIC_SHARE of the images (and in
    STATIC_MIN_IMAGES), its own included. Parts move past a camera; what stays is on the lens or in the view.

    Decided on up to STATIC_SAMPLE of the images, spread over the window (a share of 30 % is read within about 3 points
    on 200 images), pair by pair. A box of any image is fixed where it is at the place of one the sample found so
    (IoU >= STATIC_IOU, same class; compared with up to _STATIC_ANCHORS of those per class and cell of the frame): at
    a spot the sample saw in 30 % of its images, not only where its own box recurs that often. Every pair of a dirty
    lens's 90 detections an image over 1000 images would be 8 billion; this is at most 1 s on 2 cores, whatever the
    window's size or how its boxes jitter."""
    sizes = [len(b) for b in boxes]
    if len(boxes) < STATIC_MIN_IMAGES or not sum(sizes):
        return [np.zeros(size, bool) for size in sizes]
    every = np.concatenate([np.asarray(b, np.float64).reshape(-1, 4) for b in boxes])
    kind = np.concatenate([np.asarray(c, np.int64).reshape(-1) for c in classes])
    image = np.repeat(np.arange(len(boxes)), sizes)
    usable = np.isfinite(every).all(axis=1) & (every[:, 2] > every[:, 0]) & (every[:, 3] > every[:, 1])
    # Each box's class and cell of the frame (a box that is not finite is never compared: its cell is any).
    place = np.column_stack([kind, np.floor(np.nan_to_num((every[:, :2] + every[:, 2:]) / 2) / _STATIC_CELL)])
    place = place.astype(np.int64)
    target = min(len(boxes), STATIC_SAMPLE)
    while True:
        sampled = np.unique(np.linspace(0, len(boxes) - 1, target).round().astype(np.int64))
        position = np.full(len(boxes), -1, np.int64)
        position[sampled] = np.arange(len(sampled))
        in_sample = np.flatnonzero(usable & (position[image] >= 0))
        # Crowded candidates at one place (clutter in a fixture) make pairs grow with the square of the sample: fewer
        # images then, so that the work stays bounded (a share read on 50 images is still within about 6 points).
        pairs = sum(len(mine) * len(other) for mine, other in _neighbours(every, place, in_sample, in_sample))
        if pairs <= _STATIC_PAIRS or target <= _STATIC_MIN_SAMPLE:
            break
        target = max(_STATIC_MIN_SAMPLE, target // 2)
    need = max(STATIC_MIN_IMAGES, STATIC_SHARE * len(sampled))
    # Phase 1: in the sample, the images holding a box at each box's place.
    holders = np.zeros(len(every), np.int64)
    held_of: tuple[np.ndarray, np.ndarray] | None = None  # a group's candidates and their images, across its chunks
    for mine, other, overlap in _overlapping(every, place, in_sample, in_sample):
        if held_of is None or held_of[0] is not other:
            held = np.zeros((len(other), len(sampled)), np.float32)
            held[np.arange(len(other)), position[image[other]]] = 1.0
            held_of = (other, held)
        holders[mine] = ((overlap.astype(np.float32) @ held_of[1]) > 0).sum(axis=1)
    anchors = _thinned(place, in_sample[holders[in_sample] >= need])
    # Phase 2: every box at the place of a fixed one.
    fixed = np.zeros(len(every), bool)
    if len(anchors):
        for mine, _, overlap in _overlapping(every, place, np.flatnonzero(usable), anchors):
            fixed[mine] = overlap.any(axis=1)
    return list(np.split(fixed, np.cumsum(sizes)[:-1]))


def _by_place(place: np.ndarray, indices: np.ndarray) -> dict[tuple[int, int, int], np.ndarray]:
    """The boxes `indices` grouped by their class and cell of the frame (`place` rows), each group in index order."""
    groups: dict[tuple[int, int, int], list[int]] = {}
    for index, (c, x, y) in zip(indices.tolist(), place[indices].tolist(), strict=True):
        groups.setdefault((c, x, y), []).append(index)
    return {key: np.array(members, np.int64) for key, members in groups.items()}


def _thinned(place: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """At most _STATIC_ANCHORS of the boxes `indices` per class and cell of the frame, spread over them: a dust spot
    found in 200 sampled images is 200 near-copies of one box, and a box at its place overlaps nearly all of them."""
    kept = [
        members[
            np.unique(np.linspace(0, len(members) - 1, min(len(members), _STATIC_ANCHORS)).round().astype(np.int64))
        ]
        for members in _by_place(place, indices).values()
    ]
    return np.concatenate(kept) if kept else indices


def _neighbours(
    every: np.ndarray, place: np.ndarray, queries: np.ndarray, candidates: np.ndarray
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """For the boxes `queries` (indices into `every`), in groups of one class and one cell of the frame (`place`):
    the group and the `candidates` of that class within its reach. Reach: at IoU >= STATIC_IOU two boxes' centres
    are apart by at most half the smaller width (height) on each axis, so a group looks as many cells away as half
    its widest (tallest) box spans, and misses no pair."""
    placed = _by_place(place, candidates)
    for (c, x, y), mine in _by_place(place, queries).items():
        span = every[mine, 2:] - every[mine, :2]
        reach_x, reach_y = (max(1, int(np.ceil(v / 2 / _STATIC_CELL))) for v in span.max(axis=0))
        near = [
            placed[key]
            for dx in range(-reach_x, reach_x + 1)
            for dy in range(-reach_y, reach_y + 1)
            if (key := (c, x + dx, y + dy)) in placed
        ]
        if near:
            yield mine, np.concatenate(near)


def _overlapping(
    every: np.ndarray, place: np.ndarray, queries: np.ndarray, candidates: np.ndarray
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """`_neighbours`, with which pairs overlap at IoU >= STATIC_IOU; a group's rows in chunks, so that memory stays
    bounded however many boxes crowd one place."""
    area = (every[:, 2] - every[:, 0]) * (every[:, 3] - every[:, 1])
    for group, other in _neighbours(every, place, queries, candidates):
        b = every[other]
        rows = max(1, _STATIC_CHUNK // len(other))
        for start in range(0, len(group), rows):
            mine = group[start : start + rows]
            a = every[mine]
            width = np.clip(
                np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None
            )
            height = np.clip(
                np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None
            )
            inter = width * height
            union = np.maximum(area[mine][:, None] + area[other][None, :] - inter, 1e-12)
            yield mine, other, inter / union >= STATIC_IOU


def _chance(curves: list[list[Curve]], confidence: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Each detection's chance of being a true positive at each IoU threshold [n, 10], as the curves read it."""
    chance = np.zeros((len(confidence), len(IOU_THRESHOLDS)))
    for c, per_threshold in enumerate(curves):
        mine = classes == c
        if mine.any():
            chance[mine] = np.column_stack([curve(confidence[mine]) for curve in per_threshold])
    return chance


def objects_assumed(rate: float, images: int) -> int:
    """How many objects of a class the estimate takes `images` images to hold, at `rate` objects per image."""
    return round(rate * images)


def _sampled_map(
    chance: np.ndarray,
    objects_per_image: Sequence[float],
    confidence: np.ndarray,
    classes: np.ndarray,
    n: int,
    rng: np.random.Generator,
    draws: int,
) -> float:
    """The mean mAP50-95 over `draws` outcomes drawn from each detection's chance of being a true positive (mAP of
    the expected true positives would be biased low: mAP is not linear in them)."""
    chance = chance.copy()
    targets = []
    for c, rate in enumerate(objects_per_image):
        expected_objects = objects_assumed(rate, n)
        targets.append(np.full(expected_objects, c))
        mine = classes == c
        if not mine.any():
            continue
        claimed = chance[mine].sum(axis=0)
        # No more true positives than objects: an excess of confident detections is false positives.
        chance[mine] *= np.minimum(1.0, expected_objects / np.maximum(claimed, 1e-9))
    objects = np.concatenate(targets) if targets else np.zeros(0)
    # One uniform draw per detection for all thresholds: a detection right at IoU 0.9 is right at 0.5 too.
    samples = [_map(rng.random((len(confidence), 1)) < chance, confidence, classes, objects) for _ in range(draws)]
    return float(np.mean(samples))


# One image's scores as the log holds them: confidences and classes, and where logged their boxes (fractions of the
# frame, x0, y0, x1, y1 each, one after the other).
Scores = tuple[Sequence[float], Sequence[int]] | tuple[Sequence[float], Sequence[int], Sequence[float] | None]


def _per_image(scores: Sequence[Scores], floor: float) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """Each image's confidences, classes and boxes ([k, 4], None where not logged) from `floor` up."""
    out = []
    for image in scores:
        confidence, classes = np.asarray(image[0], dtype=np.float64), np.asarray(image[1], dtype=np.int64)
        kept = confidence >= floor
        boxes = None
        if len(image) > 2 and isinstance(image[2], list | tuple | np.ndarray) and len(image[2]) == 4 * len(confidence):
            boxes = np.asarray(image[2], dtype=np.float64).reshape(-1, 4)[kept]
        out.append((confidence[kept], classes[kept], boxes))
    return out


def _fixed_of(window: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray | None]]) -> list[np.ndarray]:
    """`fixed_in_frame` over the window's images whose boxes were logged (the others: none fixed)."""
    boxed = [i for i, (_, _, boxes) in enumerate(window) if boxes is not None]
    fixed = [np.zeros(len(confidence), bool) for confidence, _, _ in window]
    found = fixed_in_frame([window[i][2] for i in boxed], [window[i][1] for i in boxed])  # type: ignore[misc]
    for i, part in zip(boxed, found, strict=True):
        fixed[i] = part
    return fixed


def reference_images(calibration: Calibration, batch: str = "all") -> list[int]:
    """The validation images a cost is against: those of `batch` where the calibration knows its images' batches and
    holds any of that batch, else every one."""
    every = list(range(calibration.images))
    if batch == "all" or not calibration.batches or batch not in calibration.batches:
        return every
    return [i for i in every if calibration.batches[i] == batch]


def fold_of(image: int, images: int) -> int:
    """The fold of a validation image: contiguous blocks, so that neighbouring frames (often near-duplicates) teach
    one another's curves no more than they would a new window's."""
    return image * min(FOLDS, images) // images


def _held_out(
    calibration: Calibration, table: np.ndarray, rows_of: Sequence[np.ndarray], images: Sequence[int]
) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[np.ndarray]]:
    """The detections of each of the validation `images` (`rows_of` each image in the calibration's table) and their
    chances read with curves fitted on the other folds, so that no image is read by curves it taught (in sample, a
    validation image reads what it taught: its own estimate holds none of the calibration's error that a new window
    meets). A class the other folds hardly show is read with every image's curves: curves without it would read it as
    always wrong, and a rare class would make every window look better than its reference."""
    # One image, one fold: the other folds show no class, and every class is read with every image's curves.
    block = np.array([fold_of(int(i), calibration.images) for i in table[:, 0]], dtype=np.int64)
    curves = []
    for k in range(min(FOLDS, calibration.images)):
        taught = table[block != k]
        fitted = _fit_curves(taught, len(calibration.names))
        shown = np.bincount(taught[:, 1].astype(np.int64), minlength=len(calibration.names))
        curves.append(
            [fitted[c] if shown[c] >= MIN_FOLD_DETECTIONS else calibration.curves[c] for c in range(len(fitted))]
        )
    per_image, chances = [], []
    for i in images:
        confidence, classes = rows_of[i][:, 2], rows_of[i][:, 1].astype(np.int64)
        per_image.append((confidence, classes))
        chances.append(_chance(curves[fold_of(i, calibration.images)], confidence, classes))
    return per_image, chances


def estimate(
    calibration: Calibration,
    scores: Sequence[Scores],
    *,
    batch: str = "all",
    bootstrap: int = 50,
    draws: int = 16,
    level: float = INTERVAL_LEVEL,
    seed: int = 0,
) -> Estimate:
    """The estimated mAP50-95 of the images whose scores (confidences, classes) are given, with an interval, and its
    cost against the version's validation images (of `batch`: `reference_images`) estimated the same way at the same
    size, each read out of fold. Each bootstrap draw resamples the validation images (refitting the curves), the window
    and the reference images, and reads both sides with its curves: the intervals hold all three uncertainties."""
    if not scores:
        raise CalibrationError("no images to estimate on")
    read_images = min(len(scores), MAX_IMAGES)
    if not any(objects_assumed(rate, read_images) for rate in calibration.objects_per_image):
        # mAP is not defined without objects: a window this small, on a line this clean, holds none to score.
        expected = sum(calibration.objects_per_image) * read_images
        raise CalibrationError(
            f"{len(scores)} images are expected to hold {expected:.1f} objects at the line's rate "
            f"({sum(calibration.objects_per_image):.3f} per image): too few to estimate mAP on; a longer window "
            "holds more"
        )
    rng = np.random.default_rng(seed)
    window = _per_image(scores, calibration.floor)
    if len(window) > MAX_IMAGES:  # a sample this large decides mAP to well under the calibration's uncertainty
        window = [window[i] for i in sorted(rng.choice(len(window), MAX_IMAGES, replace=False))]
    # Read as false, on the window's own images (a bootstrap draw repeats images: that is no place in the frame).
    fixed = (
        [np.zeros(len(confidence), bool) for confidence, _, _ in window]
        if calibration.fixed_defects
        else _fixed_of(window)
    )
    table = np.array(calibration.detections, dtype=np.float64).reshape(-1, 3 + len(IOU_THRESHOLDS))
    reference_ids = np.array(reference_images(calibration, batch), dtype=np.int64)
    owner = table[:, 0].astype(np.int64)
    rows_of = [table[owner == i] for i in range(calibration.images)]  # each validation image's detections
    reference, reference_chances = _held_out(calibration, table, rows_of, reference_ids.tolist())
    position = np.full(calibration.images, -1, dtype=np.int64)  # of each validation image among the reference's
    position[reference_ids] = np.arange(len(reference_ids))
    n, m = len(window), len(reference)
    curves, rates = calibration.curves, calibration.objects_per_image

    def against(curves: list[list[Curve]] | None, chosen: np.ndarray, rates: Sequence[float]) -> float:
        """The reference images at positions `chosen`, read by `curves` (None: out of fold)."""
        confidence, classes = _joined([reference[i] for i in chosen])
        chance = (
            np.concatenate([reference_chances[i] for i in chosen]).reshape(-1, len(IOU_THRESHOLDS))
            if curves is None
            else _chance(curves, confidence, classes)
        )
        return _sampled_map(chance, rates, confidence, classes, len(chosen), rng, 1)

    def read(curves: list[list[Curve]], chosen: np.ndarray, rates: Sequence[float], draws: int) -> float:
        confidence, classes = _joined([window[i] for i in chosen])
        chance = _chance(curves, confidence, classes)
        chance[np.concatenate([fixed[i] for i in chosen])] = 0.0
        return _sampled_map(chance, rates, confidence, classes, len(chosen), rng, draws)

    point = read(curves, np.arange(n), rates, draws)
    # Reference windows are drawn with replacement, as windows of traffic are: drawn without, 40 of 60 images would
    # vary less than a window does (+0.035 on unchanged windows of 40, against +0.013).
    windows = [rng.integers(0, m, n) for _ in range(min(400, max(16, -(-REFERENCE_IMAGES // n))))]
    base = float(np.mean([against(None, chosen, rates) for chosen in windows]))
    # A bootstrap draw reads both sides with its own curves, so that the calibration's error moves both alike, and
    # moves its reference by what reading out of fold moved the point's (the same windows read both ways).
    out_of_fold = base - float(np.mean([against(curves, chosen, rates) for chosen in windows]))
    counted = np.array(calibration.counted or calibration.objects, dtype=np.float64)
    maps, costs = [], []
    for _ in range(bootstrap):
        chosen = rng.integers(0, calibration.images, calibration.images)
        rows = np.concatenate([rows_of[i] for i in chosen]) if len(table) else table
        resampled = _fit_curves(rows, len(calibration.names))
        resampled_rates = counted[rng.integers(0, len(counted), len(counted))].mean(axis=0)
        value = read(resampled, rng.integers(0, n, n), resampled_rates, 1)
        maps.append(value)
        # The reference images as this draw resampled them (the same draw as its curves: one validation image is one
        # unit), so how few of them there are is an uncertainty of the cost too.
        mapped = position[chosen]
        pool = mapped[mapped >= 0]
        if not len(pool):
            pool = np.arange(m)
        costs.append(against(resampled, pool[rng.integers(0, len(pool), n)], resampled_rates) + out_of_fold - value)
    tail = (1 - level) / 2 * 100
    # A draw whose resampled line rate rounds to no object at all (a clean line, a small window) has no mAP: it was
    # a NaN that made the whole interval NaN, and the estimate was dropped as "no objects to score".
    maps = [v for v in maps if np.isfinite(v)]
    costs = [v for v in costs if np.isfinite(v)]
    low, high = (float(v) for v in np.percentile(maps, [tail, 100 - tail])) if maps else (point, point)
    cost_low, cost_high = (
        (float(v) for v in np.percentile(costs, [tail, 100 - tail])) if costs else (base - point, base - point)
    )
    return Estimate(
        point,
        min(low, point),
        max(high, point),
        base,
        min(cost_low, base - point),
        max(cost_high, base - point),
        calibration.validation_map50_95,
        n,
        level,
        int(sum(part.sum() for part in fixed)),
        sum(bool(part.any()) for part in fixed),
    )


def _joined(images: Sequence[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, np.ndarray]:
    """The confidences and classes of these images' detections, one after the other."""
    if not images:
        return np.zeros(0), np.zeros(0, np.int64)
    return np.concatenate([image[0] for image in images]), np.concatenate([image[1] for image in images])
