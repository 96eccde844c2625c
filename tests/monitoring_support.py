"""Feature rows for drift tests and the monitoring benchmark: shaped like the prediction log's and the profile's,
from known distributions, so a verdict can be checked exactly."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from pipelines.features import EMBEDDING
from pipelines.profile import Profile

NAMES = ["scratch", "dent", "stain"]


def feature_rows(n: int, seed: int, shift: float = 0.0, batch: str = "base", embeddings: bool = True) -> pd.DataFrame:
    """Rows shaped like the prediction log's and the profile's; `shift` darkens, blurs and enlarges defects."""
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    for _ in range(n):
        found = int(rng.integers(0, 4))
        row: dict[str, Any] = {
            "batch": batch,
            "model_version": "1",
            "brightness": rng.normal(120 - 60 * shift, 10),
            "contrast": rng.normal(40 - 15 * shift, 5),
            "mean_red": rng.normal(110 - 55 * shift, 8),
            "mean_green": rng.normal(118 - 55 * shift, 8),
            "mean_blue": rng.normal(125 - 55 * shift, 8),
            "sharpness": rng.normal(300 - 250 * shift, 30),
            "noise": rng.normal(2.0 - 1.2 * shift, 0.2),
            "width": 320.0,
            "height": 320.0,
            "aspect": 1.0,
            "detections": found,
            "mean_confidence": rng.uniform(0.4, 0.9) - 0.2 * shift if found else None,
            "min_confidence": rng.uniform(0.3, 0.5) - 0.1 * shift if found else None,
            "mean_box_area": rng.uniform(0.01, 0.04) * (1 + 2 * shift) if found else None,
            "max_box_area": rng.uniform(0.02, 0.06) * (1 + 2 * shift) if found else None,
            "class_counts": json.dumps({"dent": found}),
        }
        if embeddings:
            row[EMBEDDING] = rng.normal(shift, 1.0, 256).tolist()
        rows.append(row)
    return pd.DataFrame(rows)


def profile_of(*frames: pd.DataFrame) -> Profile:
    matrix = np.random.default_rng(0).standard_normal((256, 16)).astype(np.float32) / 4
    return Profile(pd.concat(frames, ignore_index=True), matrix, {"names": NAMES})
