"""The label-free performance estimate of a drift check's window: the served model's scores, read against the
calibration in the version's profile (`pipelines/performance.py`). Every way it cannot be made is a reason the
check reports, never a guess: no calibration, no scores in the data, nothing in the window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines import performance
from pipelines.features import SCORE_BOX, SCORE_CLASS, SCORE_CONFIDENCE
from pipelines.profile import Profile


@dataclass(frozen=True)
class WindowEstimate:
    estimate: performance.Estimate | None
    reason: str  # why there is none, or how it was made

    def to_json(self) -> dict[str, Any]:
        return {"reason": self.reason, **(self.estimate.to_json() if self.estimate is not None else {})}


def estimate_window(
    profile: Profile, records: Any, version: str, batch: str = "all", bootstrap: int = 50
) -> WindowEstimate:
    """The estimate of the window, and its cost against the version's validation images of `batch` (the condition
    the drift check found nearest; "all": every batch)."""
    if profile.calibration is None:
        return WindowEstimate(
            None,
            f"v{version}'s profile has no performance calibration (profiled before estimates existed): "
            f"`conveyor profile --model {version}` makes one",
        )
    if not len(records):
        return WindowEstimate(None, "the window holds no records")
    if SCORE_CONFIDENCE not in records or SCORE_CLASS not in records:
        return WindowEstimate(
            None, "the records carry no confidences (logged before scores were): the estimate needs them"
        )
    pairs = scores_of(records)
    if not pairs:
        return WindowEstimate(None, "no record of the window carries confidences")
    calibration = profile.calibration
    try:
        estimate = performance.estimate(calibration, pairs, batch=batch, bootstrap=bootstrap)
    except performance.CalibrationError as exc:
        return WindowEstimate(None, str(exc))
    if not np.isfinite([estimate.map50_95, estimate.reference, *estimate.cost_interval]).all():
        return WindowEstimate(None, "the estimate is not a number on this window (no objects to score)")
    reference = len(performance.reference_images(calibration, batch))
    of_batch = f" of batch '{batch}'" if reference < calibration.images else ""
    read = "each read out of fold" if calibration.images > 1 else "read in sample (one validation image: no folds)"
    boxed = sum(len(p) > 2 and p[2] is not None for p in pairs)
    return WindowEstimate(
        estimate,
        f"from the confidences of {len(pairs)} images, calibrated on {calibration.images} validation "
        f"images{counted_on(calibration)}; cost against {reference} validation images{of_batch}, {read}"
        f"{fixed_note(estimate, calibration, boxed, len(pairs))}",
    )


def fixed_note(found: performance.Estimate, calibration: performance.Calibration, boxed: int, of: int) -> str:
    """What the estimate made of detections fixed in the frame, when anything; `boxed` of the `of` records carried
    boxes."""
    if not boxed:
        return "; the records carry no boxes (logged before they were): dust on the lens cannot be told from defects"
    unboxed = f"; {of - boxed} of the records carry no boxes (logged before they were)" if boxed < of else ""
    if calibration.fixed_defects:
        return (
            "; detections fixed in the frame read as any other (the validation images' defects recur at one place)"
            + unboxed
        )
    if found.fixed_detections:
        return (
            f"; {found.fixed_detections} detections in {found.fixed_images} of the {found.images} images read stay at "
            f"one place of the frame (in >= {performance.STATIC_SHARE:.0%} of them: dust on the lens, a mark in the "
            f"view, or the same defect on every part?), read as false{unboxed}"
        )
    return unboxed


def described(found: performance.Estimate) -> str:
    """The estimate and its cost in one sentence, as `conveyor drift` and the report say it."""
    low, high = found.cost_interval
    return (
        f"estimated mAP50-95 {found.map50_95:.3f} ({found.low:.3f} to {found.high:.3f}, {found.level:.0%}) against "
        f"{found.reference:.3f} on its validation images read the same way (their true mAP50-95: "
        f"{found.validation_map50_95:.3f}): cost {found.cost:+.3f} ({low:+.3f} to {high:+.3f})"
    )


def counted_on(calibration: performance.Calibration) -> str:
    """Where the objects per image were counted, when not on the validation images alone."""
    return f" (objects per image counted on {len(calibration.counted)} labelled images)" if calibration.counted else ""


def scores_of(records: Any) -> list[performance.Scores]:
    """Each record's scores (confidences, classes and boxes, as the log holds them: arrays, read from Parquet; boxes
    None where not logged); records without confidences are left out. (Copied into lists, 10,000 records took 0.3 s
    of the check.)"""
    boxes = records[SCORE_BOX] if SCORE_BOX in records else [None] * len(records)
    return [
        (conf, cls, box if _listed(box) and len(box) == 4 * len(conf) else None)
        for conf, cls, box in zip(records[SCORE_CONFIDENCE], records[SCORE_CLASS], boxes, strict=True)
        if _listed(conf) and _listed(cls) and len(conf) == len(cls)
    ]


def _listed(cell: Any) -> bool:
    """A cell holding scores; not None, nor the NaN a window gets where it joins log files written before scores were
    logged."""
    return isinstance(cell, list | tuple | np.ndarray)
