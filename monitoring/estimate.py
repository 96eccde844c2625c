"""The label-free performance estimate of a drift check's window: the served model's scores, read against the
calibration in the version's profile (`pipelines/performance.py`). Every way it cannot be made is a reason the
check reports, never a guess: no calibration, no scores in the data, nothing in the window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipelines import performance
from pipelines.features import SCORE_CLASS, SCORE_CONFIDENCE
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
    """The estimate of the window, and its cost against the version's training images of `batch` (the condition
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
    frame = profile.frame
    if batch != "all" and "batch" in frame:
        frame = frame[frame["batch"] == batch]
    training = frame[frame["split"] == "train"] if "split" in frame and (frame["split"] == "train").any() else frame
    reference = scores_of(training) if SCORE_CONFIDENCE in training else []
    estimate = performance.estimate(profile.calibration, pairs, reference, bootstrap=bootstrap)
    against = (
        f"{len(reference)} training images" + (f" of batch '{batch}'" if batch != "all" else "")
        if reference
        else "the validation split's true mAP50-95"
    )
    return WindowEstimate(
        estimate,
        f"from the confidences of {len(pairs)} images, calibrated on {profile.calibration.images} validation "
        f"images{counted_on(profile.calibration)}; cost against {against}",
    )


def counted_on(calibration: performance.Calibration) -> str:
    """Where the objects per image were counted, when not on the validation images alone."""
    return f" (objects per image counted on {len(calibration.counted)} labelled images)" if calibration.counted else ""


def scores_of(records: Any) -> list[tuple[list[float], list[int]]]:
    """Each record's scores (confidences and classes); records without them are left out."""
    return [
        (list(conf), list(cls))
        for conf, cls in zip(records[SCORE_CONFIDENCE], records[SCORE_CLASS], strict=True)
        if conf is not None and cls is not None and len(conf) == len(cls)
    ]
