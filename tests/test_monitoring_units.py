"""The drift check's parts without servers: features, Evidently's verdicts on known shifts, the bad inputs the
monitoring issue lists, and the alert policy. Evidently runs for real; the frames are made here so each case is
exact (the end-to-end loop is in test_monitoring.py)."""

from __future__ import annotations

import json
import math
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from conveyor.settings import MonitorSettings
from monitoring import alerts, current, drift
from pipelines.features import EMBEDDING, IMAGE_FEATURES, Embedder, image_features, prediction_features, thumbnail
from pipelines.inference import Detection
from serving.predlog import Pending, PredictionLog, read_log
from tests.monitoring_support import feature_rows, profile_of

POLICY = MonitorSettings(min_samples=20)


def test_image_and_prediction_features_measure_what_they_say() -> None:
    rng = np.random.default_rng(0)
    image = np.clip(rng.normal(128, 20, (240, 320, 3)), 0, 255).astype(np.uint8)
    image[..., 2] = 200  # red channel (BGR)
    thumb = thumbnail(image)
    assert max(thumb.shape[:2]) == 128
    sharp = image_features(thumb, 320, 240)
    assert set(sharp) == set(IMAGE_FEATURES)
    assert sharp["mean_red"] == pytest.approx(200) and sharp["aspect"] == pytest.approx(320 / 240)
    import cv2

    blurred = image_features(thumbnail(cv2.GaussianBlur(image, (0, 0), 3)), 320, 240)
    assert blurred["sharpness"] < sharp["sharpness"] / 5 and blurred["noise"] < sharp["noise"]
    darker = image_features(thumbnail((image * 0.5).astype(np.uint8)), 320, 240)
    assert darker["brightness"] == pytest.approx(sharp["brightness"] * 0.5, rel=0.02)
    found = [Detection(1, "dent", 0.8, (0, 0, 32, 24)), Detection(2, "stain", 0.4, (0, 0, 64, 48))]
    predicted = prediction_features(found, 320, 240)
    assert predicted["detections"] == 2 and predicted["min_confidence"] == pytest.approx(0.4)
    assert predicted["max_box_area"] == pytest.approx(0.04) and json.loads(predicted["class_counts"]) == {
        "dent": 1,
        "stain": 1,
    }
    assert prediction_features([], 320, 240)["mean_confidence"] is None


def test_embeddings_come_from_the_models_backbone() -> None:
    from conveyor.scaffold import REPO

    embedder = Embedder(REPO / "tests" / "assets" / "yolo11n-defects-320.pt")
    rng = np.random.default_rng(1)
    images = [np.clip(rng.normal(m, 30, (128, 128, 3)), 0, 255).astype(np.uint8) for m in (60, 60, 200)]
    vectors = embedder(images)
    assert vectors.shape == (3, 256) and np.isfinite(vectors).all()
    # Two images of the same kind are closer than an image of another kind.
    assert np.linalg.norm(vectors[0] - vectors[1]) < np.linalg.norm(vectors[0] - vectors[2])


def test_same_distribution_is_not_drift_and_a_shift_is() -> None:
    reference = profile_of(feature_rows(80, seed=1))
    same = drift.check(reference, feature_rows(60, seed=2), POLICY)
    assert same.status == "no drift", same.message
    assert same.drifted_share < POLICY.drift_share
    shifted = drift.check(reference, feature_rows(60, seed=3, shift=1.0), POLICY)
    assert shifted.status == "drift", shifted.message
    assert {"brightness", "sharpness", "noise", EMBEDDING} <= set(shifted.drifted)
    assert shifted.snapshot is not None
    by_name = {f.name: f for f in shifted.features}
    assert by_name["brightness"].current_mean < by_name["brightness"].reference_mean - 30


def test_per_feature_method_and_threshold_come_from_params() -> None:
    policy = MonitorSettings(
        min_samples=20, columns={"brightness": {"method": "wasserstein", "threshold": 10.0}}, exclude=["aspect"]
    )
    result = drift.check(profile_of(feature_rows(80, seed=1)), feature_rows(60, seed=3, shift=1.0), policy)
    brightness = next(f for f in result.features if f.name == "brightness")
    assert "wasserstein" in brightness.method.lower() and brightness.threshold == 10.0
    assert not brightness.drifted  # six standard deviations, under a threshold of ten
    assert result.skipped["aspect"].startswith("excluded")


def test_a_version_trained_on_two_conditions_accepts_both() -> None:
    """After a drift retraining, traffic like either batch the model was trained on is not drift."""
    reference = profile_of(feature_rows(60, seed=1), feature_rows(40, seed=4, shift=1.0, batch="add-20261122-x"))
    shifted = drift.check(reference, feature_rows(60, seed=5, shift=1.0), POLICY)
    assert shifted.status == "no drift" and shifted.reference_batch == "add-20261122-x", shifted.message
    base = drift.check(reference, feature_rows(60, seed=6), POLICY)
    assert base.status == "no drift" and base.reference_batch == "base", base.message
    novel = drift.check(reference, feature_rows(60, seed=7, shift=-1.0), POLICY)
    assert novel.status == "drift", novel.message


def test_fewer_samples_than_the_minimum_is_insufficient_never_drift() -> None:
    result = drift.check(profile_of(feature_rows(80, seed=1)), feature_rows(19, seed=3, shift=2.0), POLICY)
    assert result.status == "insufficient data" and "fewer than monitor.min_samples (20)" in result.message
    tiny_reference = drift.check(profile_of(feature_rows(10, seed=1)), feature_rows(60, seed=3), POLICY)
    assert tiny_reference.status == "insufficient data" and "reference profile has 10 rows" in tiny_reference.message


def test_nan_and_missing_features_are_skipped_and_named() -> None:
    reference = profile_of(feature_rows(80, seed=1))
    now = feature_rows(60, seed=2, embeddings=False).drop(columns=["noise"])  # an older log: no noise, no embedding
    now["contrast"] = np.nan
    now.loc[:5, "brightness"] = np.inf
    result = drift.check(reference, now, POLICY)
    assert result.status == "no drift", result.message
    assert result.skipped["noise"] == "missing from the current data"
    assert "current values" in result.skipped["contrast"]
    assert EMBEDDING in result.skipped
    assert "brightness" in {f.name for f in result.features}  # infinities are dropped, the rest is tested
    assert all(math.isfinite(f.score) for f in result.features)


def pending(at: float, version: str) -> Pending:
    image = np.full((48, 64, 3), 100, np.uint8)
    return Pending(at, version, 64, 48, image, [Detection(0, "scratch", 0.9, (1.0, 2.0, 11.0, 12.0))])


def test_log_window_keeps_one_version_and_names_corrupt_files(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path / "log", queue_size=100, flush_seconds=60, keep_hours=48)
    log.directory.mkdir()
    now = time.time()
    for i in range(30):
        log.offer(pending(now - 600 + i, "1"))
    log.flush()
    for i in range(25):  # the champion moved inside the window
        log.offer(pending(now - 300 + i, "2"))
    log.flush()
    broken = next((tmp_path / "log").rglob("part-*.parquet")).with_name("part-9-broken.parquet")
    broken.write_bytes(b"PAR1 cut short by a full disk")
    window = current.from_log(tmp_path / "log", hours=1)
    assert window.model_version == "2" and len(window.records) == 25
    assert window.other_versions == {"1": 30}
    assert len(window.unreadable) == 1 and "part-9-broken.parquet" in window.unreadable[0]
    older = current.from_log(tmp_path / "log", hours=1, version="1", last=10)
    assert older.model_version == "1" and len(older.records) == 10
    assert read_log(tmp_path / "log").unreadable == window.unreadable


def test_missing_and_empty_logs_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(current.NoCurrentDataError, match="no prediction log at"):
        current.from_log(tmp_path / "nothing", hours=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(current.NoCurrentDataError, match="holds no records"):
        current.from_log(tmp_path / "empty", hours=1)
    log = PredictionLog(tmp_path / "old", queue_size=10, flush_seconds=60, keep_hours=48)
    log.directory.mkdir()
    log.offer(pending(time.time() - 7200, "1"))
    log.flush()
    with pytest.raises(current.NoCurrentDataError, match="last 1 h holds no records"):
        current.from_log(tmp_path / "old", hours=1)


def test_alert_policy_cooldown_and_deduplication() -> None:
    now = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
    policy = MonitorSettings(cooldown_hours=6, dedupe_hours=24)
    brightness = drift.FeatureDrift("brightness", "K-S", 0.0, 0.05, True, 1, 2)
    found = drift.DriftResult("drift", "", 60, features=[brightness])
    assert alerts.decide(found, "3", [], policy, now).alert
    quiet = drift.DriftResult("no drift", "", 60)
    assert alerts.decide(quiet, "3", [], policy, now) == alerts.AlertDecision(False, "no drift")
    thin = drift.DriftResult("insufficient data", "", 5)
    assert not alerts.decide(thin, "3", [], policy, now).alert
    recent = [alerts.PastAlert(now - timedelta(hours=2), "2", frozenset({"noise"}))]
    cooling = alerts.decide(found, "3", recent, policy, now)
    assert not cooling.alert and cooling.reason.startswith("cooldown")
    same = [alerts.PastAlert(now - timedelta(hours=10), "3", frozenset({"brightness"}))]
    duplicate = alerts.decide(found, "3", same, policy, now)
    assert not duplicate.alert and duplicate.reason.startswith("duplicate")
    assert alerts.decide(found, "4", same, policy, now).alert  # a new version may alert
    other = [alerts.PastAlert(now - timedelta(hours=10), "3", frozenset({"noise"}))]
    assert alerts.decide(found, "3", other, policy, now).alert  # drifting another way is news
