"""What the model's mAP50-95 is on traffic nobody labelled: an estimate from its own confidences, with an interval.

Calibrated on the version's validation split (labelled, never trained on), at the `profile` stage:
- for each class and each of mAP's ten IoU thresholds, the chance that a detection with a given confidence is a true
  positive: isotonic regression of "matched a label" on confidence (scikit-learn), over every detection from the
  score floor up;
- how many objects of each class an image holds on average: counted on every labelled image of the version's data
  (training and validation split), since that is the line's and not the model's. Measured over calibration draws
  (`bench/drift_power.py`): 60 images alone put a class's rate off by up to 15 %, which moves every estimate.

The estimate for a window of traffic rebuilds mAP as Ultralytics computes it (`ap_per_class`, the validator's own
function): each detection is a true positive with the chance its confidence earned on the validation split, the
number of objects is that rate, and the mAP is averaged over outcomes drawn from those chances. A
production line's camera changes (focus, light, dust) change how well the model sees, not how many defects pass
under it; where the detections would claim more true positives than there are objects (a dirty lens makes defects
everywhere), the claims are scaled down to the objects there are, so the excess counts as false positives.

The interval is a bootstrap over the window's images and the validation images together (the calibration's own
uncertainty included). Measured on a bank of shifts the estimate was never fitted on (`bench/drift_power.py`).
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
    reference: float  # the same estimate on the version's training images, at the window's size
    cost_low: float
    cost_high: float
    validation_map50_95: float  # the true mAP50-95 of the validation split, for scale
    images: int
    level: float  # of the intervals

    @property
    def cost(self) -> float:
        """mAP50-95 lost against the version's own training images (positive: worse); measured with the same
        estimator on both sides, so its bias at this window size cancels."""
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
    from sklearn.isotonic import IsotonicRegression

    curves = []
    for c in range(classes):
        rows = table[table[:, 1] == c]
        per_threshold = []
        for t in range(len(IOU_THRESHOLDS)):
            if not len(rows):
                per_threshold.append(Curve([], []))
                continue
            model = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(rows[:, 2], rows[:, 3 + t])
            per_threshold.append(Curve(model.X_thresholds_.tolist(), model.y_thresholds_.tolist()))
        curves.append(per_threshold)
    return curves


def class_counts(labels: np.ndarray, classes: int) -> list[int]:
    """How many objects of each class labels [n, 5] hold."""
    found = labels[:, 0].astype(int) if len(labels) else np.zeros(0, int)
    return [int((found == c).sum()) for c in range(classes)]


def fit(
    images: Sequence[Labelled], names: Sequence[str], floor: float, counted: Sequence[np.ndarray] = ()
) -> Calibration:
    """The calibration from the validation images (their detections from `floor` up, and their labels); the objects
    per image from `counted`, the labels of every image of the version's data, where given."""
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
    )


def _sampled_map(
    curves: list[list[Curve]],
    objects_per_image: Sequence[float],
    confidence: np.ndarray,
    classes: np.ndarray,
    n: int,
    rng: np.random.Generator,
    draws: int,
) -> float:
    """The mean mAP50-95 over `draws` outcomes drawn from each detection's chance of being a true positive (mAP of
    the expected true positives would be biased low: mAP is not linear in them)."""
    chance = np.zeros((len(confidence), len(IOU_THRESHOLDS)))
    targets = []
    for c, rate in enumerate(objects_per_image):
        expected_objects = round(rate * n)
        targets.append(np.full(expected_objects, c))
        mine = classes == c
        if not mine.any():
            continue
        shares = np.column_stack([curve(confidence[mine]) for curve in curves[c]])
        claimed = shares.sum(axis=0)
        # No more true positives than objects: an excess of confident detections is false positives.
        shares *= np.minimum(1.0, expected_objects / np.maximum(claimed, 1e-9))
        chance[mine] = shares
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


def estimate(
    calibration: Calibration,
    scores: Sequence[tuple[Sequence[float], Sequence[int]]],
    reference_scores: Sequence[tuple[Sequence[float], Sequence[int]]] = (),
    *,
    bootstrap: int = 50,
    draws: int = 16,
    level: float = INTERVAL_LEVEL,
    seed: int = 0,
) -> Estimate:
    """The estimated mAP50-95 of the images whose scores (confidences, classes) are given, with an interval, and its
    cost against `reference_scores` (the version's training images) estimated the same way at the same size. Each
    bootstrap draw resamples the window, the reference and the validation images (refitting the calibration), and
    estimates both sides with the same curves: the intervals hold all three uncertainties. Without reference scores
    the cost is against the validation split's true mAP."""
    if not scores:
        raise CalibrationError("no images to estimate on")
    rng = np.random.default_rng(seed)
    window = _per_image(scores, calibration.floor)
    if len(window) > MAX_IMAGES:  # a sample this large decides mAP to well under the calibration's uncertainty
        window = [window[i] for i in sorted(rng.choice(len(window), MAX_IMAGES, replace=False))]
    reference = _per_image(reference_scores, calibration.floor)
    n, m = len(window), len(reference)
    curves, rates = calibration.curves, calibration.objects_per_image

    def same_size() -> np.ndarray:
        return rng.choice(m, n, replace=n > m)

    point = _window_map(curves, rates, window, np.arange(n), rng, draws)
    if reference:
        base = float(np.mean([_window_map(curves, rates, reference, same_size(), rng, 4) for _ in range(4)]))
    else:
        base = calibration.validation_map50_95
    table = np.array(calibration.detections, dtype=np.float64).reshape(-1, 3 + len(IOU_THRESHOLDS))
    counted = np.array(calibration.counted or calibration.objects, dtype=np.float64)
    maps, costs = [], []
    for _ in range(bootstrap):
        chosen = rng.integers(0, calibration.images, calibration.images)
        rows = np.concatenate([table[table[:, 0] == i] for i in chosen]) if len(table) else table
        resampled = _fit_curves(rows, len(calibration.names))
        resampled_rates = counted[rng.integers(0, len(counted), len(counted))].mean(axis=0)
        value = _window_map(resampled, resampled_rates, window, rng.integers(0, n, n), rng, 1)
        against = _window_map(resampled, resampled_rates, reference, same_size(), rng, 1) if reference else base
        maps.append(value)
        costs.append(against - value)
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


def _window_map(
    curves: list[list[Curve]],
    rates: Sequence[float],
    per_image: Sequence[tuple[np.ndarray, np.ndarray]],
    chosen: np.ndarray,
    rng: np.random.Generator,
    draws: int,
) -> float:
    confidence = np.concatenate([per_image[i][0] for i in chosen]) if len(chosen) else np.zeros(0)
    classes = np.concatenate([per_image[i][1] for i in chosen]) if len(chosen) else np.zeros(0, np.int64)
    return _sampled_map(curves, rates, confidence, classes, len(chosen), rng, draws)
