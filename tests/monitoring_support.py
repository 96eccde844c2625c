"""Feature rows for drift tests and the monitoring benchmark: shaped like the prediction log's and the profile's,
from known distributions, so a verdict can be checked exactly. Each keyword moves one group of features by that many
of its reference standard deviations (negative: down)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from monitoring import drift
from monitoring.estimate import WindowEstimate
from pipelines import performance, registry
from pipelines.data import dir_md5
from pipelines.features import EMBEDDING, SCORE_CLASS, SCORE_CONFIDENCE
from pipelines.profile import EmbeddingBasis, Profile
from tests.serving_support import CHECKPOINT, export_checkpoint, register

NAMES = ["scratch", "dent", "stain"]
EMBEDDING_DIMS = 32
# The features' spread: a few directions carry most of it, as in a model's features (the basis finds them).
EMBEDDING_SCALE = np.array([3.0] * 6 + [0.5] * (EMBEDDING_DIMS - 6))


def feature_rows(
    n: int,
    seed: int,
    *,
    exposure: float = 0.0,
    focus: float = 0.0,
    predictions: float = 0.0,
    box_scale: float = 1.0,
    embedding: float = 0.0,
    width: float = 320.0,
    batch: str = "base",
    embeddings: bool = True,
) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    for _ in range(n):
        found = int(np.clip(rng.integers(0, 4) + round(predictions * 1.1), 0, 20))
        confidences = sorted(rng.uniform(0.3, 0.95, found).tolist(), reverse=True)
        area = float(np.exp(rng.normal(np.log(0.02), 0.55))) * box_scale**2
        row: dict[str, Any] = {
            "batch": batch,
            "model_version": "1",
            "brightness": rng.normal(120 + 10 * exposure, 10),
            "contrast": rng.normal(40 + 5 * exposure, 5),
            "mean_red": rng.normal(110 + 8 * exposure, 8),
            "mean_green": rng.normal(118 + 8 * exposure, 8),
            "mean_blue": rng.normal(125 + 8 * exposure, 8),
            "saturation": rng.normal(30, 4),
            "highlights": rng.uniform(0, 0.002),
            "shadows": rng.uniform(0, 0.002),
            "sharpness": float(np.exp(rng.normal(np.log(300) + 0.3 * focus, 0.3))),  # log-normal, as measured
            "noise": float(np.exp(rng.normal(np.log(5), 0.2))),
            "blockiness": rng.normal(1.1, 0.05),
            "width": width,
            "height": 320.0,
            "aspect": width / 320.0,
            "detections": found,
            "mean_confidence": float(np.mean(confidences)) if found else None,
            "min_confidence": float(min(confidences)) if found else None,
            # Log-normal, as measured on the demo champion's profile (log-std 0.53); `box_scale` scales their sides.
            "mean_box_area": area if found else None,
            "max_box_area": area * float(np.exp(abs(rng.normal(0, 0.4)))) if found else None,
            "class_counts": json.dumps({"dent": found}),
            SCORE_CONFIDENCE: [*confidences, *rng.uniform(0.01, 0.25, 3).tolist()],
            SCORE_CLASS: [1] * (found + 3),
        }
        if embeddings:
            moved = embedding * EMBEDDING_SCALE[0] * np.eye(EMBEDDING_DIMS)[0]
            row[EMBEDDING] = (rng.normal(0, 1, EMBEDDING_DIMS) * EMBEDDING_SCALE + moved).tolist()
        rows.append(row)
    return pd.DataFrame(rows)


def outcome_of(
    result: Any, model_name: str, version: str, report_dir: Path, cost: float | None = 0.01, device: str = "server"
) -> Any:
    """A check's outcome around a constructed verdict (for the gauges and reports, without a model)."""
    from datetime import UTC, datetime

    from monitoring import alerts, current
    from monitoring.check import CheckOutcome
    from monitoring.estimate import WindowEstimate
    from pipelines.performance import Estimate

    found = (
        None
        if cost is None
        else Estimate(0.6 - cost, 0.55 - cost, 0.65 - cost, 0.6, cost - 0.05, cost + 0.05, 0.62, 40, 0.9)
    )
    return CheckOutcome(
        model_name,
        version,
        result,
        WindowEstimate(found, "constructed"),
        current.CurrentData(None, "constructed", version, device=device),
        alerts.AlertDecision(False, result.status),
        report_dir,
        "run",
        None,
        datetime.now(UTC),
    )


def profile_of(*frames: pd.DataFrame, calibration: Any = None) -> Profile:
    frame = pd.concat(frames, ignore_index=True)
    basis = EmbeddingBasis.fit(np.stack(frame[EMBEDDING].to_numpy()), 10) if EMBEDDING in frame else None
    return Profile(frame, basis, calibration, {"names": NAMES})


def register_old_version(client: MlflowClient, name: str, project: Path, export_dir: Path) -> None:
    """The checkpoint as v1, the way the pipeline registers (weights in its run), minus the reference profile."""
    version = register(client, name, export_checkpoint(export_dir))
    run_id = client.get_model_version(name, version).run_id
    assert run_id is not None
    weights = export_dir / "weights" / "best.pt"
    weights.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(CHECKPOINT, weights)
    client.log_artifact(run_id, str(weights), "weights")
    client.set_model_version_tag(name, version, "conveyor.data_md5", dir_md5(project / "data"))
    registry.promote(client, name, version, reason="the line's first model", actor="user:test")


def estimated(cost: float) -> WindowEstimate:
    """A window's estimate whose cost is `cost`, its interval ±0.05 around it."""
    found = performance.Estimate(0.6 - cost, 0.55 - cost, 0.65 - cost, 0.6, cost - 0.05, cost + 0.05, 0.62, 40, 0.9)
    return WindowEstimate(found, "test")


def drifted(*groups: str) -> drift.DriftResult:
    """A drift verdict decided by `groups`."""
    return drift.DriftResult(
        "drift", "", 60, groups=[drift.GroupDrift(g, True, 3.0, "sharpness", "less sharp") for g in groups]
    )
