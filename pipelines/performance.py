"""What the model's mAP50-95 is on traffic nobody labelled: an estimate from its own confidences, with an interval.

Calibrated on the version's validation split (labelled, never trained on), at the `profile` stage:
- for each class and each of mAP's ten IoU thresholds, the chance that a detection with a given confidence is a true
  positive: isotonic regression of "matched a label" on confidence (scikit-learn's `IsotonicRegression`, its
  thresholds computed through SciPy's pool-adjacent-violators: `_fit_curves`), over every detection from the score
  floor up;
- how many objects of each class an image holds on average: counted on every labelled image of the version's data
  (training and validation split), since that is the line's and not the model's. Measured over calibration draws
  (`bench/drift_power.py`): 60 images alone put a class's rate off by up to 15 %, which moves every estimate.

The estimate for a window of traffic rebuilds mAP as Ultralytics computes it (`ap_per_class`, the validator's own
function): each detection is a true positive with the chance its confidence earned on the validation split, the
number of objects is that rate, and the mAP is averaged over outcomes drawn from those chances. A
production line's camera changes (focus, light, dust) change how well the model sees, not how many defects pass
under it; where the detections would claim more true positives than there are objects (a dirty lens makes defects
everywhere), the claims are scaled down to the objects there are, so the excess counts as false positives.

The cost is against the version's validation images, estimated the same way at the window's size, each image read with
curves fitted without it (five folds): what an unchanged window reads to the estimator. Not the training images: a
model is surer of the images it was trained on than of new ones, so they read higher and every window then looked
costly (+0.039 on unchanged windows of 200 images, measured on the demo's champion: docs/monitoring.md). The interval
is a bootstrap over the window's images, the validation images and the calibration together. Measured
on a bank of shifts the estimate was never fitted on (`bench/drift_power.py`).
"""

from __future__ import annotations

import types
from collections.abc import Sequence
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


class CalibrationError(ConveyorError, ValueError):
    """The estimate cannot be made: no calibration, or nothing to read; the message says what is missing."""


@dataclass(frozen=True)
class Labelled:
    """One validation image: its detections from the score floor up, and its true boxes [n, 5] (class, x0, y0,
    x1, y1 in pixels)."""

    detections: list[Detection]
    labels: np.ndarray


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


def _map(tp: np.ndarray, confidence: np.ndarray, classes: np.ndarray, targets: np.ndarray) -> float:
    """mAP50-95 with Ultralytics' `ap_per_class` (tp may hold expected shares instead of booleans)."""
    from ultralytics.utils.metrics import ap_per_class

    if not len(targets):
        return float("nan")
    if not len(confidence):
        return 0.0
    return float(ap_per_class(tp, confidence, classes, targets)[5].mean())  # over classes with objects


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
    )


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


def _per_image(scores: Sequence[tuple[Sequence[float], Sequence[int]]], floor: float) -> list[tuple[Any, Any]]:
    out = []
    for conf, cls in scores:
        confidence, classes = np.asarray(conf, dtype=np.float64), np.asarray(cls, dtype=np.int64)
        out.append((confidence[confidence >= floor], classes[confidence >= floor]))
    return out


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
    scores: Sequence[tuple[Sequence[float], Sequence[int]]],
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
    rng = np.random.default_rng(seed)
    window = _per_image(scores, calibration.floor)
    if len(window) > MAX_IMAGES:  # a sample this large decides mAP to well under the calibration's uncertainty
        window = [window[i] for i in sorted(rng.choice(len(window), MAX_IMAGES, replace=False))]
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
        return _sampled_map(_chance(curves, confidence, classes), rates, confidence, classes, len(chosen), rng, draws)

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
    )


def _joined(images: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The confidences and classes of these images' detections, one after the other."""
    if not images:
        return np.zeros(0), np.zeros(0, np.int64)
    return np.concatenate([image[0] for image in images]), np.concatenate([image[1] for image in images])
