"""Drift of current traffic against a version's reference profile, with Evidently's tests.

Conveyor's part is making the two DataFrames (features) and deciding what a result means; the statistics are
Evidently's: one `ValueDrift` per feature (K-S below 1000 rows, normed Wasserstein above, or the test
`monitor.columns` names), `DriftedColumnsCount` for the share, `EmbeddingsDrift` (a reference-vs-current classifier)
for the projected backbone embeddings.

Rules:
- Fewer current rows than `monitor.min_samples` is "insufficient data", never "drift". A feature with fewer
  non-missing values than that on either side (mean confidence when nothing is detected, a column an old log lacks)
  is left out of the test and named as skipped.
- Per-image counts (detections, detections per class) use K-S unless `monitor.columns` says otherwise.
- The drifted share counts the embedding as one more feature: drift when share >= `monitor.drift_share`.
- A version trained on several batches of data (`conveyor data add`) knew several conditions: traffic is compared
  with each batch that has enough rows and the nearest one (smallest drifted share) is the verdict. Traffic that
  looks like any condition the model was trained on is not drift.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from conveyor.settings import MonitorSettings
from pipelines.features import CLASS_PREFIX, EMBEDDING, IMAGE_FEATURES, PREDICTION_FEATURES, expand_class_counts
from pipelines.profile import Profile

EMBEDDING_COLUMN = "emb_{:02d}"
_METHOD = re.compile(r"drift detection method is (.+?)\. ")
Status = Literal["drift", "no drift", "insufficient data"]


@dataclass(frozen=True)
class FeatureDrift:
    name: str
    method: str
    score: float
    threshold: float
    drifted: bool
    reference_mean: float
    current_mean: float


@dataclass
class DriftResult:
    status: Status
    message: str
    current_rows: int
    reference_rows: int = 0
    reference_batch: str = "all"
    drifted_share: float = 0.0
    features: list[FeatureDrift] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    snapshot: Any = None  # Evidently's, for HTML and JSON

    @property
    def drifted(self) -> list[str]:
        return [f.name for f in self.features if f.drifted]

    def to_json(self) -> dict[str, Any]:
        raw = asdict(self)
        raw.pop("snapshot")
        raw["drifted"] = self.drifted
        return raw


def feature_frame(frame: Any, names: Sequence[str], matrix: np.ndarray | None) -> Any:
    """The numeric columns a check compares: image and prediction features, per-class counts, and the embedding
    projected to a few columns (emb_00, ...). Missing columns stay missing (the check names them)."""
    import pandas as pd

    out = expand_class_counts(frame, names) if "class_counts" in frame else frame.reset_index(drop=True)
    keep = [c for c in [*IMAGE_FEATURES, *PREDICTION_FEATURES] if c in out] + [
        c for c in out.columns if str(c).startswith(CLASS_PREFIX)
    ]
    numeric = out[keep].apply(pd.to_numeric, errors="coerce").astype(float)
    if matrix is not None and EMBEDDING in out:
        vectors = [np.asarray(v, dtype=np.float32) if v is not None else None for v in out[EMBEDDING]]
        valid = [v is not None and v.shape == (matrix.shape[0],) and np.isfinite(v).all() for v in vectors]
        projected = np.full((len(vectors), matrix.shape[1]), np.nan, dtype=np.float32)
        if any(valid):
            rows = np.stack([v for v, ok in zip(vectors, valid, strict=True) if ok and v is not None])
            projected[np.array(valid)] = rows @ matrix
        embedding = pd.DataFrame(projected, columns=[EMBEDDING_COLUMN.format(i) for i in range(matrix.shape[1])])
        numeric = pd.concat([numeric, embedding], axis=1)
    return numeric.replace([np.inf, -np.inf], np.nan)


def check(profile: Profile, current_records: Any, policy: MonitorSettings) -> DriftResult:
    """The verdict for `current_records` (prediction-log rows or features of a folder) against `profile`."""
    names = list(profile.meta.get("names", []))
    matrix = profile.projection if policy.embeddings else None
    current = feature_frame(current_records, names, matrix)
    if len(current) < policy.min_samples:
        return DriftResult(
            "insufficient data",
            f"{len(current)} current rows, fewer than monitor.min_samples ({policy.min_samples})",
            len(current),
        )
    reference_all = feature_frame(profile.frame, names, matrix)
    batches = profile.frame.get("batch")
    candidates: list[tuple[str, Any]] = []
    if batches is not None:
        for batch, size in batches.value_counts().items():
            if size >= policy.min_samples:
                candidates.append((str(batch), reference_all[(batches == batch).to_numpy()].reset_index(drop=True)))
    if len(candidates) <= 1:
        candidates = [("all", reference_all)]
    if len(reference_all) < policy.min_samples:
        return DriftResult(
            "insufficient data",
            f"the reference profile has {len(reference_all)} rows, fewer than monitor.min_samples",
            len(current),
            len(reference_all),
        )
    results = [_compare(batch, reference, current, policy) for batch, reference in candidates]
    # The nearest condition: a comparison that could test nothing never wins over one that could.
    return min(results, key=lambda r: (r.status == "insufficient data", r.drifted_share, -r.reference_rows))


# Evidently draws a t-SNE map of up to 2500 embeddings per side for the report. Measured on 2 cores: 14 of the 18 s of
# a 10k-row check went to that picture. 300 points per side still show it; the test itself uses every row.
TSNE_POINTS = 300


def _compare(batch: str, reference: Any, current: Any, policy: MonitorSettings) -> DriftResult:
    from evidently import DataDefinition, Dataset, Report
    from evidently.legacy.metrics.data_drift import embeddings_drift

    embeddings_drift.SAMPLE_CONSTANT = min(embeddings_drift.SAMPLE_CONSTANT, TSNE_POINTS)
    from evidently.metrics import DriftedColumnsCount, EmbeddingsDrift, ValueDrift
    from evidently.metrics.embeddings import ModelDriftMethod
    from evidently.tests import lte

    skipped: dict[str, str] = {}
    embedding_columns = [c for c in current.columns if str(c).startswith("emb_")]
    columns: list[str] = []
    for column in reference.columns:
        if str(column).startswith("emb_"):
            continue
        if column in policy.exclude:
            skipped[column] = "excluded (monitor.exclude)"
        elif column not in current:
            skipped[column] = "missing from the current data"
        elif current[column].notna().sum() < policy.min_samples:
            skipped[column] = f"{int(current[column].notna().sum())} current values (< min_samples)"
        elif reference[column].notna().sum() < policy.min_samples:
            skipped[column] = f"{int(reference[column].notna().sum())} reference values (< min_samples)"
        else:
            columns.append(column)
    use_embeddings = bool(embedding_columns) and all(c in reference for c in embedding_columns)
    if use_embeddings:
        have = current[embedding_columns].notna().all(axis=1).sum()
        have_ref = reference[embedding_columns].notna().all(axis=1).sum()
        if min(have, have_ref) < policy.min_samples:
            skipped[EMBEDDING] = f"{int(min(have, have_ref))} rows with embeddings (< min_samples)"
            use_embeddings = False
    elif policy.embeddings:
        skipped[EMBEDDING] = "no embeddings on one side (the log or the profile has none)"
    # Per-image counts are small integers: Evidently would pick chi-square, which a count never seen in the reference
    # (4 dents where the reference had at most 3) drives to p = 0. K-S is conservative on discrete data instead.
    methods = {c: "ks" for c in columns if c == "detections" or c.startswith(CLASS_PREFIX)}
    methods |= {c: t.method for c, t in policy.columns.items() if c in columns}
    thresholds = {c: t.threshold for c, t in policy.columns.items() if c in columns and t.threshold is not None}
    metrics: list[Any] = [ValueDrift(column=c, method=methods.get(c), threshold=thresholds.get(c)) for c in columns]
    metrics.append(
        DriftedColumnsCount(
            columns=columns,
            drift_share=policy.drift_share,
            per_column_method=methods or None,
            per_column_threshold=thresholds or None,
            tests=[lte(policy.drift_share, is_critical=False)] if columns else None,
        )
    )
    embedding_metric = None
    all_columns = columns + (embedding_columns if use_embeddings else [])
    definition = DataDefinition(
        numerical_columns=all_columns,
        embeddings={EMBEDDING: embedding_columns} if use_embeddings else None,
    )
    if use_embeddings:
        embedding_metric = EmbeddingsDrift(
            embeddings_name=EMBEDDING,
            drift_method=ModelDriftMethod(threshold=policy.embedding_threshold),
            tests=[lte(policy.embedding_threshold)],
        )
        metrics.append(embedding_metric)
    report = Report(metrics, include_tests=True)
    ref_data = Dataset.from_pandas(reference[all_columns].dropna(axis=0, how="all"), data_definition=definition)
    cur_data = Dataset.from_pandas(current[all_columns].dropna(axis=0, how="all"), data_definition=definition)
    snapshot = report.run(cur_data, ref_data)  # Evidently's order: current first
    raw = snapshot.dict()
    # Evidently's own test per column decides (p-value tests drift below their threshold, distances above it).
    verdicts = {t["metric_config"]["metric_id"]: t for t in raw.get("tests", [])}
    by_name = {m["config"].get("column"): m for m in raw["metrics"] if m["config"]["type"].endswith("ValueDrift")}
    features: list[FeatureDrift] = []
    for column in columns:
        value = by_name[column]
        verdict = verdicts[value["id"]]
        described = _METHOD.search(verdict.get("description", ""))
        features.append(
            FeatureDrift(
                column,
                described.group(1) if described else str(value["config"]["method"]),
                float(value["value"]),
                float(value["config"]["threshold"]),
                str(verdict["status"]).endswith("FAIL"),
                _mean(reference[column]),
                _mean(current[column]),
            )
        )
    if use_embeddings and embedding_metric is not None:
        score = float(next(m for m in raw["metrics"] if "Embeddings" in m["config"]["type"])["value"])
        features.append(
            FeatureDrift(
                EMBEDDING,
                "classifier ROC AUC",
                score,
                policy.embedding_threshold,
                score > policy.embedding_threshold,
                math.nan,
                math.nan,
            )
        )
    share = sum(f.drifted for f in features) / len(features) if features else 0.0
    status: Status = "drift" if features and share >= policy.drift_share else "no drift"
    if not features:
        status = "insufficient data"
    drifted_names = [f.name for f in features if f.drifted]
    message = (
        f"{len(drifted_names)} of {len(features)} features drifted ({share:.0%}; threshold "
        f"{policy.drift_share:.0%}) against reference batch '{batch}'"
        + (f": {', '.join(drifted_names)}" if drifted_names else "")
    )
    return DriftResult(status, message, len(current), len(reference), batch, share, features, skipped, snapshot)


def _mean(series: Any) -> float:
    value = series.mean()
    return float(value) if value == value else math.nan
