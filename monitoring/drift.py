"""Drift of current traffic against a version's reference profile: a verdict per group of related features.

Conveyor's part is making the two DataFrames (features) and deciding what a result means; the per-feature
statistics are Evidently's: the two-sample Kolmogorov-Smirnov test (its p-value) and the Wasserstein distance in
reference standard deviations (the effect size), and for the embedding the distance between the mean embeddings
(Hotelling's test beside it is SciPy's). The verdict is Conveyor's own, from those numbers (the rules below), not
Evidently's share of drifted columns; Evidently's report draws the same comparison for people.

Rules:
- Features come in groups that move together (`GROUPS`): focus and noise, exposure and colour, geometry, the
  model's predictions, its embedding. A feature drifted when it moved at least `monitor.effect_size` reference
  standard deviations (or its `monitor.columns` override) AND the K-S p-value is below `monitor.p_value`: a large
  change, and not an accident of a small window. A group drifted when any of its features did; the window drifted
  when any group did. So a strong change seen by one feature is never diluted by the many that did not move (the
  old rule, a share of drifted features, missed a camera out of focus that 3 of 19 features saw at p = 1e-52),
  and a small wobble of many features is not drift.
- Sharpness, noise and box areas are compared on a log scale: they span decades between surfaces and products, and
  a scale change (defects 0.6x the size) is then a shift. On the linear scale the demo champion's box areas, whose
  spread grows with their size, missed defects 0.6x the size in 1 of 5 windows of 40; on the log scale none.
- The image size, constant in the reference, drifted when `monitor.constant_share` of the current rows differ from
  it. Where the reference hardly varies, effects are measured in units of at least a material amount: 1 % of the
  image for the shares of clipped pixels, one grey level for brightness, contrast, colours and saturation, half a
  detection per image for counts (a clean reference often has no clipped pixels, a monochrome line no saturation at
  all, and a small reference may never have shown a class).
- The embedding is the model's `features` output in the reference's principal components, whitened: it drifted when
  its mean moved at least `monitor.embedding_effect` reference standard deviations and Hotelling's T² test (SciPy's F
  distribution) puts the move below `monitor.p_value`, or when one component drifted as a feature does.
- The model's predictions are also tested as one, the same way: they drifted when the means of the prediction
  features moved at least `monitor.effect_size` reference standard deviations together (Mahalanobis: box areas and
  confidences are correlated) and Hotelling's test puts the move below `monitor.p_value`. A change of what passes
  the camera moves several of them a little at once: defects 1.6x larger moved box areas 0.78-1.08 standard
  deviations and confidences down, two windows of 40 in five short of the threshold feature by feature.
- Fewer current rows than `monitor.min_samples` is "insufficient data", never "drift". A feature with fewer than
  `MIN_FEATURE_VALUES` (10) current values, or fewer reference values than `monitor.min_samples` (mean confidence
  when nothing is detected, a column an old log lacks), is left out and named as skipped. Prediction features have
  values only where the model found something, so a window where it finds fewer defects is still judged on them.
- A version trained on several batches of data (`conveyor data add`) knew several conditions: traffic is compared
  with each batch that has enough rows and the nearest one (fewest drifted groups, then the weakest change) is the
  verdict. Traffic that looks like any condition the model was trained on is not drift.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np

from conveyor.settings import ConfigError, MonitorSettings
from pipelines.features import (
    CLASS_PREFIX,
    CLIPPING_FEATURES,
    EMBEDDING,
    EXPOSURE_FEATURES,
    FOCUS_FEATURES,
    GEOMETRY_FEATURES,
    PREDICTION_FEATURES,
    expand_class_counts,
)
from pipelines.profile import EmbeddingBasis, Profile

EMBEDDING_COLUMN = "emb_{:02d}"
LOG_SCALE = {"sharpness", "noise", "mean_box_area", "max_box_area"}
# The smallest change of a feature that can matter, where the reference may hardly vary: a share of pixels clipped
# white or black moves by 1 % before anyone should hear of it (a clean reference often has none at all), a level of
# brightness, contrast, colour or saturation by one grey level of 255 (a monochrome line's saturation is 0 exactly,
# and a JPEG's chroma noise, a fraction of a level, measured in Evidently's 0.001 units, was drift at effect 245).
MIN_SCALE = {
    "highlights": 0.01,
    "shadows": 0.01,
    **dict.fromkeys(("brightness", "contrast", "mean_red", "mean_green", "mean_blue", "saturation"), 1.0),
}
# A window needs `monitor.min_samples` rows; a feature of it is then tested on as few as this many values. Prediction
# features have none where the model found nothing, so the old rule (min_samples values) went blind with the model: a
# window of 40 images of defects 0.6x the size, 28 with a detection, skipped box areas that had moved 2.1 standard
# deviations (K-S p = 1e-17). The p-value and the effect size still decide.
MIN_FEATURE_VALUES = 10
COUNT_SCALE = 0.5  # detections per image: half a detection per image on average before a count has moved
FOCUS = "focus & noise"
EXPOSURE = "exposure & colour"
GEOMETRY = "geometry"
PREDICTIONS = "predictions"
EMBEDDING_GROUP = "embedding"
GROUP_ORDER = [FOCUS, EXPOSURE, GEOMETRY, PREDICTIONS, EMBEDDING_GROUP]
Status = Literal["drift", "no drift", "insufficient data"]

# What a line engineer reads when a feature moved: (when it went down, when it went up).
_WORDS: dict[str, tuple[str, str]] = {
    "sharpness": (
        "images are much less sharp than in training: focus, or motion blur?",
        "images are sharper or grainier than in training",
    ),
    "noise": (
        "images are smoother than in training: blur or heavy compression?",
        "images are noisier than in training: sensor gain, light or a cable?",
    ),
    "blockiness": (
        "JPEG's 8-pixel grid shows less: less compression, or frames resized: a new camera setting?",
        "JPEG's 8-pixel grid shows more: stronger compression, or a softer image: encoder settings, or focus?",
    ),
    "brightness": (
        "images are darker than in training: exposure, a lamp or the aperture?",
        "images are brighter than in training: exposure or a new light?",
    ),
    "contrast": (
        "images have less contrast: haze, a dirty window, or blur?",
        "images have more contrast: the lighting changed?",
    ),
    "mean_red": (
        "colours changed (less red): white balance or lighting?",
        "colours changed (more red): white balance or lighting?",
    ),
    "mean_green": (
        "colours changed (less green): white balance or lighting?",
        "colours changed (more green): white balance or lighting?",
    ),
    "mean_blue": (
        "colours changed (less blue): white balance or lighting?",
        "colours changed (more blue): white balance or lighting?",
    ),
    "saturation": (
        "colours are paler: a monochrome camera, haze or white balance?",
        "colours are stronger: white balance or a new surface?",
    ),
    "highlights": (
        "fewer clipped highlights",
        "more clipped highlights: glare, a reflection or overexposure?",
    ),
    "shadows": (
        "fewer black pixels",
        "more black pixels: underexposure, dead pixels or something in the view?",
    ),
    "width": (
        "frames are narrower: the camera's resolution or crop changed?",
        "frames are wider: the camera's resolution or crop changed?",
    ),
    "height": (
        "frames are lower: the camera's resolution or crop changed?",
        "frames are taller: the camera's resolution or crop changed?",
    ),
    "aspect": (
        "frames have another shape: the camera's crop changed?",
        "frames have another shape: the camera's crop changed?",
    ),
    "detections": (
        "the model finds fewer defects than usual: missed defects, or better parts?",
        "the model finds more defects than usual: false alarms from dirt, or a new surface?",
    ),
    "mean_confidence": (
        "the model is less sure of what it finds",
        "the model is surer of what it finds than usual",
    ),
    "min_confidence": (
        "the model is less sure of what it finds",
        "the model is surer of what it finds than usual",
    ),
    "mean_box_area": (
        "the defects it finds are smaller than usual",
        "the defects it finds are larger than usual",
    ),
    "max_box_area": (
        "the defects it finds are smaller than usual",
        "the defects it finds are larger than usual",
    ),
}
_EMBEDDING_WORDS = (
    "the model sees something it was not trained on (its own features moved): a new surface, product or orientation?"
)
# The prediction features as one: each may move short of its threshold while together they moved far.
PREDICTIONS_TOGETHER = "predictions_together"
_PREDICTIONS_WORDS = (
    "what the model finds changed as a whole (its boxes' sizes, confidences and counts moved together): new "
    "products or defects?"
)


def group_of(feature: str) -> str:
    if feature in FOCUS_FEATURES:
        return FOCUS
    if feature in EXPOSURE_FEATURES or feature in CLIPPING_FEATURES:
        return EXPOSURE
    if feature in GEOMETRY_FEATURES:
        return GEOMETRY
    if feature in PREDICTION_FEATURES or feature.startswith(CLASS_PREFIX) or feature == PREDICTIONS_TOGETHER:
        return PREDICTIONS
    return EMBEDDING_GROUP


def describe(feature: str, reference_mean: float, current_mean: float) -> str:
    """The change in words, from its direction."""
    if feature == EMBEDDING or feature.startswith("emb_"):
        return _EMBEDDING_WORDS
    if feature == PREDICTIONS_TOGETHER:
        return _PREDICTIONS_WORDS
    lower, higher = _WORDS.get(feature, ("", ""))
    if feature.startswith(CLASS_PREFIX):
        name = feature.removeprefix(CLASS_PREFIX)
        lower, higher = f"fewer {name} found than usual", f"more {name} found than usual"
    return lower if current_mean < reference_mean else higher


@dataclass(frozen=True)
class FeatureDrift:
    name: str
    group: str
    method: str
    effect: float  # distance in reference standard deviations (or share of rows that differ, for a constant)
    threshold: float
    p_value: float
    drifted: bool
    reference_mean: float
    current_mean: float

    @property
    def strength(self) -> float:
        """How far past its threshold (1: at it)."""
        return self.effect / self.threshold if self.threshold else math.inf


@dataclass(frozen=True)
class GroupDrift:
    group: str
    drifted: bool
    strength: float  # the strongest feature's effect over its threshold
    feature: str  # the feature that decided (the strongest)
    words: str

    def summary(self) -> str:
        return f"{self.group}: {self.words}"


@dataclass
class DriftResult:
    status: Status
    message: str
    current_rows: int
    reference_rows: int = 0
    reference_batch: str = "all"
    features: list[FeatureDrift] = field(default_factory=list)
    groups: list[GroupDrift] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    snapshot: Any = None  # Evidently's, for HTML and JSON

    @property
    def drifted(self) -> list[str]:
        """The drifted features."""
        return [f.name for f in self.features if f.drifted]

    @property
    def drifted_groups(self) -> list[str]:
        """The drifted groups, strongest first: the first decided."""
        return [g.group for g in self.groups if g.drifted]

    def to_json(self) -> dict[str, Any]:
        raw = asdict(self)
        raw.pop("snapshot")
        raw["drifted"] = self.drifted
        raw["drifted_groups"] = self.drifted_groups
        return raw


def feature_frame(frame: Any, names: Sequence[str], basis: EmbeddingBasis | None) -> Any:
    """The numeric columns a check compares: image and prediction features, per-class counts, and the embedding in
    the reference's whitened principal components (emb_00, ...). Missing columns stay missing (the check names
    them); an embedding of another size than the basis (an older log) is missing too."""
    import pandas as pd

    from pipelines.features import IMAGE_FEATURES

    out = expand_class_counts(frame, names) if "class_counts" in frame else frame.reset_index(drop=True)
    keep = [c for c in [*IMAGE_FEATURES, *PREDICTION_FEATURES] if c in out] + [
        c for c in out.columns if str(c).startswith(CLASS_PREFIX)
    ]
    numeric = out[keep].apply(pd.to_numeric, errors="coerce").astype(float)
    if basis is not None and EMBEDDING in out:
        vectors = [np.asarray(v, dtype=np.float64) if v is not None else np.zeros(0) for v in out[EMBEDDING]]
        valid = np.array([v.shape == (basis.dims,) and bool(np.isfinite(v).all()) for v in vectors], dtype=bool)
        projected = np.full((len(vectors), len(basis.scale)), np.nan)
        if valid.any():
            projected[valid] = basis.project(np.stack([v for v, ok in zip(vectors, valid, strict=True) if ok]))
        columns = [EMBEDDING_COLUMN.format(i) for i in range(len(basis.scale))]
        numeric = pd.concat([numeric, pd.DataFrame(projected, columns=columns)], axis=1)
    return numeric.replace([np.inf, -np.inf], np.nan)


def check(profile: Profile, current_records: Any, policy: MonitorSettings, report: bool = True) -> DriftResult:
    """The verdict for `current_records` (prediction-log rows or features of a folder) against `profile`; with
    `report`, Evidently's report of the nearest comparison too."""
    names = list(profile.meta.get("names", []))
    embeddings = policy.embeddings and EMBEDDING not in policy.exclude
    basis = profile.basis if embeddings else None
    current = feature_frame(current_records, names, basis)
    if len(current) < policy.min_samples:
        return DriftResult(
            "insufficient data",
            f"{len(current)} current rows, fewer than monitor.min_samples ({policy.min_samples})",
            len(current),
        )
    reference_all = feature_frame(profile.frame, names, basis)
    _check_names(policy, reference_all.columns)
    if len(reference_all) < policy.min_samples:
        return DriftResult(
            "insufficient data",
            f"the reference profile has {len(reference_all)} rows, fewer than monitor.min_samples",
            len(current),
            len(reference_all),
        )
    batches = profile.frame.get("batch")
    candidates: list[tuple[str, Any]] = []
    if batches is not None:
        for batch, size in batches.value_counts().items():
            if size >= policy.min_samples:
                candidates.append((str(batch), reference_all[(batches == batch).to_numpy()].reset_index(drop=True)))
    # Every batch together is a candidate too: traffic mixing conditions the model was trained on (day and night
    # shifts in one window) is like none of them alone, and was drift against the nearest.
    candidates = [("all", reference_all)] if len(candidates) <= 1 else [*candidates, ("all", reference_all)]
    skipped_embedding = None
    if policy.embeddings and not embeddings:
        skipped_embedding = "excluded (monitor.exclude)"
    elif policy.embeddings and basis is None:
        skipped_embedding = "the profile has no embedding basis (a version exported without the features output)"
    elif policy.embeddings and EMBEDDING not in current_records:
        skipped_embedding = "the current data has no embeddings (an older log, or an export without features)"
    elif basis is not None and EMBEDDING_COLUMN.format(0) in current:
        usable = int(current[EMBEDDING_COLUMN.format(0)].notna().sum())
        if usable < min(policy.min_samples, MIN_FEATURE_VALUES):  # said once, not once per component
            widths = sorted({len(v) for v in current_records[EMBEDDING] if v is not None and hasattr(v, "__len__")})
            skipped_embedding = (
                f"{usable} of {len(current)} current rows have an embedding of the profile's width ({basis.dims}; "
                f"widths seen: {', '.join(map(str, widths)) or 'none'}): another model's export, or a device logging "
                "without the features output"
            )
    results = [_compare(batch, reference, current, policy) for batch, reference in candidates]
    results = [_completed(r, results[-1]) for r in results]  # the last is every batch together
    best = min(
        results,
        key=lambda r: (
            r.status == "insufficient data",
            len(r.drifted_groups),
            r.reference_batch == "all" and len(results) > 1,  # a batch of its own, where one is as near
            max((g.strength for g in r.groups), default=0.0),
        ),
    )
    if report and best.features:
        best.snapshot = evidently_report(dict(candidates)[best.reference_batch], current, policy)
    if skipped_embedding:
        best.skipped = {k: v for k, v in best.skipped.items() if not k.startswith("emb_")}
        best.skipped[EMBEDDING] = skipped_embedding
    return best


# Evidently draws a t-SNE map of up to 2500 embeddings per side for the report. Measured on 2 cores: 14 of the 18 s of
# a 10k-row check went to that picture. 150 points per side still show it; the test itself uses every row. Half of
# scikit-learn's default 1000 iterations map those 300 points in 0.25 s instead of 0.45 s, its fit (KL divergence)
# 0.79 instead of 0.74 on a logged 10k-row window: the same picture for a person.
TSNE_POINTS = 150
TSNE_ITERATIONS = 500


def _testable(reference: Any, current: Any, policy: MonitorSettings) -> tuple[list[str], list[str], dict[str, str]]:
    """(varying columns, columns constant in the reference, skipped with reasons)."""
    skipped: dict[str, str] = {}
    varying: list[str] = []
    constant: list[str] = []
    for column in reference.columns:
        if column in policy.exclude:
            skipped[column] = "excluded (monitor.exclude)"
        elif column not in current:
            skipped[column] = "missing from the current data"
        elif current[column].notna().sum() < min(policy.min_samples, MIN_FEATURE_VALUES):
            skipped[column] = f"{int(current[column].notna().sum())} current values (< min_samples)"
        elif reference[column].notna().sum() < policy.min_samples:
            skipped[column] = f"{int(reference[column].notna().sum())} reference values (< min_samples)"
        elif reference[column].dropna().nunique() == 1 and column in GEOMETRY_FEATURES:
            constant.append(column)
        else:
            varying.append(column)
    return varying, constant, skipped


def _prepared(
    reference: Any, current: Any, policy: MonitorSettings
) -> tuple[Any, Any, list[str], list[str], dict[str, str]]:
    """Both sides as compared (`LOG_SCALE` columns as logs), the varying and the constant columns, and what
    was skipped."""
    varying, constant, skipped = _testable(reference, current, policy)
    ref = reference.copy()
    cur = current.copy()
    for column in LOG_SCALE & set(varying):
        ref[column] = np.log(ref[column].clip(lower=1e-6))
        cur[column] = np.log(cur[column].clip(lower=1e-6))
    return ref, cur, varying, constant, skipped


def _thresholds(columns: list[str], policy: MonitorSettings) -> dict[str, float]:
    return {c: policy.columns[c].effect if c in policy.columns else policy.effect_size for c in columns}


def embedding_threshold(policy: MonitorSettings) -> float:
    """The embedding's threshold: `monitor.columns.embedding.effect` where set, else `monitor.embedding_effect`."""
    return policy.columns[EMBEDDING].effect if EMBEDDING in policy.columns else policy.embedding_effect


def _check_names(policy: MonitorSettings, columns: Any) -> None:
    """`monitor.exclude` and `monitor.columns` name features of this check: a name that is none (a typo, a class the
    model does not have) would be ignored, and the feature it meant tested as before."""
    known = {*map(str, columns), EMBEDDING, PREDICTIONS_TOGETHER}
    for key, named in (("exclude", policy.exclude), ("columns", list(policy.columns))):
        unknown = [n for n in named if n not in known and not n.startswith("emb_")]
        if unknown:
            raise ConfigError(
                f"monitor.{key}: {', '.join(map(repr, unknown))} not a feature of the drift check; its features are "
                f"{', '.join(sorted(c for c in known if not c.startswith('emb_')))}"
            )


def _completed(result: DriftResult, every: DriftResult) -> DriftResult:
    """`result` with the features its batch has too few values to test (a batch of few images with detections, for
    the predictions) tested against every batch together (`every`). Skipped, they counted as unmoved: the batch
    looked nearest for what it could not see, and a change of the predictions against it went unsaid."""
    tested = {f.name for f in result.features}
    missing = [f for f in every.features if f.name not in tested]
    if result is every or not missing or not result.features:
        return result
    features = [*result.features, *(replace(f, method=f"{f.method}, against every batch") for f in missing)]
    groups = _groups(features)
    status, message = _verdict(result.reference_batch, features, groups)
    skipped = {k: v for k, v in result.skipped.items() if k not in {f.name for f in missing}}
    return replace(result, status=status, message=message, features=features, groups=groups, skipped=skipped)


def _compare(batch: str, reference: Any, current: Any, policy: MonitorSettings) -> DriftResult:
    """The verdict for `current` against one reference batch: every feature's statistics, then one decision per
    group, then the window's."""
    ref, cur, varying, constant, skipped = _prepared(reference, current, policy)
    features = [
        *_varying_drifts(ref, cur, reference, current, varying, policy),
        *_constant_drifts(reference, current, constant, policy),
        *_embedding_drift(ref, cur, varying, policy),
        *_predictions_together(ref, cur, varying, policy),
    ]
    groups = _groups(features)
    status, message = _verdict(batch, features, groups)
    return DriftResult(status, message, len(current), len(reference), batch, features, groups, skipped)


def _varying_drifts(
    ref: Any, cur: Any, reference: Any, current: Any, columns: list[str], policy: MonitorSettings
) -> list[FeatureDrift]:
    """Each varying column (embedding components included), tested on the compared scale (`ref`, `cur`: logs for
    the `LOG_SCALE` columns), its means on the original one (`reference`, `current`)."""
    thresholds = _thresholds(columns, policy)
    features = []
    for column in columns:
        threshold = thresholds[column]
        p_value, effect = _statistics(column, ref[column].dropna(), cur[column].dropna(), threshold, policy)
        features.append(
            FeatureDrift(
                column,
                group_of(column),
                "K-S p-value, Wasserstein (ref. std)",
                effect,
                threshold,
                p_value,
                effect >= threshold and p_value < policy.p_value,
                _mean(reference[column]),
                _mean(current[column]),
            )
        )
    return features


def _statistics(column: str, before: Any, now: Any, threshold: float, policy: MonitorSettings) -> tuple[float, float]:
    """(K-S p-value, Wasserstein distance in reference standard deviations) of one column's values, both Evidently's;
    the distance in units of at least the column's material amount (`MIN_SCALE`, `COUNT_SCALE`)."""
    from evidently.legacy.calculations.stattests import ks_stat_test, wasserstein_stat_test
    from evidently.legacy.core import ColumnType

    numeric = ColumnType.Numerical
    p_value = float(ks_stat_test(before, now, numeric, policy.p_value).drift_score)
    effect = float(wasserstein_stat_test(before, now, numeric, threshold).drift_score)
    floor = material_amount(column)
    if floor:  # Evidently divides by max(std, 0.001): too fine a unit for a share of pixels or a count
        spread = max(float(np.std(before)), 0.001)
        effect *= spread / max(spread, floor)
    return p_value, effect


def material_amount(column: str) -> float:
    """The smallest move of a column that can matter, its effect's unit where the reference hardly varies (0: none)."""
    return MIN_SCALE.get(column, COUNT_SCALE if column.startswith(CLASS_PREFIX) or column == "detections" else 0)


def _constant_drifts(reference: Any, current: Any, columns: list[str], policy: MonitorSettings) -> list[FeatureDrift]:
    """Each column constant in the reference (the image size): the share of current rows unlike that constant."""
    features = []
    for column in columns:
        value = reference[column].dropna().iloc[0]
        share = float((current[column].dropna() != value).mean())
        features.append(
            FeatureDrift(
                column,
                group_of(column),
                "share of rows unlike the constant reference",
                share,
                policy.constant_share,
                math.nan,
                share >= policy.constant_share,
                float(value),
                _mean(current[column]),
            )
        )
    return features


def _embedding_drift(ref: Any, cur: Any, varying: list[str], policy: MonitorSettings) -> list[FeatureDrift]:
    """The embedding as a whole (none with fewer than 2 components): Evidently's distance between the mean
    embeddings and Hotelling's T² p-value."""
    from evidently.legacy.metrics.data_drift.embedding_drift_methods import DistanceDriftMethod

    columns = [c for c in varying if c.startswith("emb_")]
    if len(columns) < 2:
        return []
    before, now = ref[columns].dropna(), cur[columns].dropna()
    threshold = embedding_threshold(policy)
    distance = float(DistanceDriftMethod(dist="euclidean", threshold=threshold)(now, before)[0])
    p_value = hotelling_p(before.to_numpy(), now.to_numpy())
    return [
        FeatureDrift(
            EMBEDDING,
            EMBEDDING_GROUP,
            "mean distance (ref. std), Hotelling T² p-value",
            distance,
            threshold,
            p_value,
            distance >= threshold and p_value < policy.p_value,
            math.nan,
            math.nan,
        )
    ]


def _predictions_together(ref: Any, cur: Any, varying: list[str], policy: MonitorSettings) -> list[FeatureDrift]:
    """The prediction features as one (none with fewer than 2 of them, too few images with a detection, or excluded
    by `monitor.exclude`): the distance between their means in reference standard deviations, their correlations
    counted (Mahalanobis: box areas and confidences move together), and Hotelling's T² p-value, decided as the
    embedding is, at `monitor.effect_size` (or its `monitor.columns` override). Each column is measured in units of at
    least its material amount, as one feature is (`COUNT_SCALE` for detections), and the covariance is scikit-learn's
    Ledoit-Wolf shrinkage: on images with one detection, mean and minimum confidence are the same number, and a plain
    inverse would blow a tiny move along their difference up. Measured on the demo champion: defects 1.6x larger moved
    box areas 0.78-1.08 standard deviations in windows of 40, two of five short of the threshold alone, and the
    predictions together past it in all five; unchanged windows far short (docs/monitoring.md)."""
    from sklearn.covariance import LedoitWolf

    columns = [c for c in PREDICTION_FEATURES if c in varying]
    if len(columns) < 2 or PREDICTIONS_TOGETHER in policy.exclude:
        return []
    before, now = ref[columns].dropna().to_numpy(), cur[columns].dropna().to_numpy()
    if len(now) < MIN_FEATURE_VALUES or len(before) <= len(columns):
        return []
    unit = np.maximum(before.std(axis=0), np.maximum([material_amount(c) for c in columns], 1e-9))
    before, now = before / unit, now / unit
    shift = now.mean(axis=0) - before.mean(axis=0)
    precision = LedoitWolf().fit(before).precision_
    distance = float(np.sqrt(max(float(shift @ precision @ shift), 0.0)))
    threshold = _thresholds([PREDICTIONS_TOGETHER], policy)[PREDICTIONS_TOGETHER]
    p_value = hotelling_p(before, now)
    return [
        FeatureDrift(
            PREDICTIONS_TOGETHER,
            PREDICTIONS,
            "mean distance (Mahalanobis, ref. std), Hotelling T² p-value",
            distance,
            threshold,
            p_value,
            distance >= threshold and p_value < policy.p_value,
            math.nan,
            math.nan,
        )
    ]


def _verdict(batch: str, features: list[FeatureDrift], groups: list[GroupDrift]) -> tuple[Status, str]:
    """The window's status and message: drift when any group drifted, naming the drifted groups strongest first."""
    against = f"against reference batch '{batch}'"
    drifted = [g for g in groups if g.drifted]
    if drifted:
        return "drift", f"drift {against}: " + "; ".join(g.summary() for g in drifted)
    if features:
        return "no drift", f"no drift {against}: no group moved past its thresholds"
    return "insufficient data", f"nothing to compare {against}: every feature was skipped"


def evidently_report(reference: Any, current: Any, policy: MonitorSettings) -> Any:
    """Evidently's report of the same comparison, for people: each feature's distributions and distance, and the
    embedding's picture. (Its plots are most of its cost: about 0.1 s a feature.)"""
    from evidently import DataDefinition, Dataset, Report
    from evidently.legacy.metrics.data_drift import embeddings_drift
    from sklearn.manifold import TSNE

    embeddings_drift.SAMPLE_CONSTANT = min(embeddings_drift.SAMPLE_CONSTANT, TSNE_POINTS)
    embeddings_drift.TSNE = functools.partial(TSNE, max_iter=TSNE_ITERATIONS)  # Evidently calls TSNE(n_components=2)
    from evidently.metrics import EmbeddingsDrift, ValueDrift
    from evidently.metrics.embeddings import DistanceDriftMethod

    ref, cur, columns, _, _ = _prepared(reference, current, policy)
    thresholds = _thresholds(columns, policy)
    embedding_columns = [c for c in columns if c.startswith("emb_")]
    plain = [c for c in columns if c not in embedding_columns]
    metrics: list[Any] = [ValueDrift(column=c, method="wasserstein", threshold=thresholds[c]) for c in plain]
    # Evidently's embedding picture takes no missing value: a window joining records with and without an embedding
    # (an older log, an export without the features output) crashed the whole check here. Their drift is judged by
    # the check's own test; the report then leaves the picture out.
    embedded = len(embedding_columns) >= 2 and all(
        bool(side[embedding_columns].notna().all(axis=None)) for side in (ref, cur)
    )
    if embedded:
        metrics.append(
            EmbeddingsDrift(
                embeddings_name=EMBEDDING,
                drift_method=DistanceDriftMethod(dist="euclidean", threshold=embedding_threshold(policy)),
            )
        )
    shown = columns if embedded else plain
    definition = DataDefinition(
        numerical_columns=shown, embeddings={EMBEDDING: embedding_columns} if embedded else None
    )
    return Report(metrics, include_tests=False).run(
        Dataset.from_pandas(cur[shown].dropna(axis=0, how="all"), data_definition=definition),
        Dataset.from_pandas(ref[shown].dropna(axis=0, how="all"), data_definition=definition),
    )  # Evidently's order: current first


def _groups(features: list[FeatureDrift]) -> list[GroupDrift]:
    """One decision per group, drifted groups first, strongest first."""
    out = []
    for group in GROUP_ORDER:
        members = [f for f in features if f.group == group]
        if not members:
            continue
        # A feature that drifted alone says what changed in its own words; the predictions together only when none did.
        strongest = max(
            members,
            key=lambda f: (
                f.drifted,
                f.drifted and f.name != PREDICTIONS_TOGETHER,
                f.strength if math.isfinite(f.strength) else 1e9,
            ),
        )
        words = describe(strongest.name, strongest.reference_mean, strongest.current_mean)
        if strongest.drifted and strongest.name in LOG_SCALE and strongest.reference_mean > 0:
            words += f" ({strongest.name} ×{strongest.current_mean / strongest.reference_mean:.2g})"
        out.append(GroupDrift(group, any(f.drifted for f in members), strongest.strength, strongest.name, words))
    return sorted(out, key=lambda g: (not g.drifted, -g.strength if math.isfinite(g.strength) else -1e9))


def hotelling_p(reference: np.ndarray, current: np.ndarray) -> float:
    """Hotelling's two-sample T² test of equal means: the p-value (SciPy's F distribution)."""
    from scipy import stats

    n, m, k = len(current), len(reference), reference.shape[1]
    if n < 2 or m < 2 or n + m - k - 1 <= 0:
        return math.nan
    difference = current.mean(axis=0) - reference.mean(axis=0)
    pooled = ((n - 1) * np.cov(current, rowvar=False) + (m - 1) * np.cov(reference, rowvar=False)) / (n + m - 2)
    t2 = n * m / (n + m) * float(difference @ np.linalg.pinv(np.atleast_2d(pooled)) @ difference)
    f = (n + m - k - 1) / (k * (n + m - 2)) * t2
    return float(stats.f.sf(f, k, n + m - k - 1))


def _mean(series: Any) -> float:
    value = series.mean()
    return float(value) if value == value else math.nan
