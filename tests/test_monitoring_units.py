"""The drift check's parts without servers: features, the verdict per group on known changes, the dilution case,
the model's features output, the label-free estimate on a known shift, the bad inputs, and the alert policy.
Evidently's statistics run for real, and so does the model (the demo checkpoint, exported once for the module); the
frames are made here so each case is exact (the end-to-end loop is in test_monitoring.py)."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from conveyor.settings import ConfigError, MonitorSettings, SynthSettings
from monitoring import alerts, current, drift
from monitoring.check import add_performance_group
from monitoring.estimate import WindowEstimate, estimate_window
from pipelines import performance, shifts, synth
from pipelines.features import (
    EMBEDDING,
    IMAGE_FEATURES,
    SCORE_BOX,
    SCORE_CLASS,
    SCORE_CONFIDENCE,
    image_features,
    prediction_features,
    sample_image,
)
from pipelines.inference import Detection, Detector, Inference, ModelCard
from pipelines.prediction_log import Pending, PredictionLog, read_log
from tests.monitoring_support import NAMES, drifted, estimated, feature_rows, profile_of
from tests.serving_support import CHECKPOINT

POLICY = MonitorSettings(min_samples=20)


def features_of(image: np.ndarray) -> dict[str, float]:
    return image_features(sample_image(image, 320))


def test_image_and_prediction_features_measure_what_they_say() -> None:
    base, _ = synth.render_image(SynthSettings(), "test", 0)
    sent = shifts.encode_decode(base, 92)
    plain = features_of(sent)
    assert set(plain) == set(IMAGE_FEATURES)
    assert plain["width"] == 320 and plain["aspect"] == 1.0
    blurred = features_of(shifts.encode_decode(cv2.GaussianBlur(base, (0, 0), 2.5), 92))
    assert blurred["sharpness"] < plain["sharpness"] / 5 and blurred["noise"] < plain["noise"]
    noisy = features_of(shifts.encode_decode(shifts.sensor_noise(20)(base, np.random.default_rng(0)), 92))
    assert noisy["noise"] > 2 * plain["noise"]
    compressed = features_of(shifts.encode_decode(base, 10))
    assert compressed["blockiness"] > 1.5 * plain["blockiness"]
    darker = features_of(shifts.encode_decode((base * 0.5).astype(np.uint8), 92))
    assert darker["brightness"] == pytest.approx(plain["brightness"] * 0.5, rel=0.03)
    glare = features_of(shifts.encode_decode(shifts.glare(200, 0.3)(base, np.random.default_rng(0)), 92))
    assert glare["highlights"] > plain["highlights"] + 0.01
    grey = features_of(shifts.encode_decode(shifts.grayscale()(base, np.random.default_rng(0)), 92))
    assert grey["saturation"] < 3 < plain["saturation"]
    large = features_of(cv2.resize(sent, (640, 480), interpolation=cv2.INTER_LINEAR))
    assert large["width"] == 640 and large["aspect"] == pytest.approx(4 / 3)
    found = [Detection(1, "dent", 0.8, (0, 0, 32, 24)), Detection(2, "stain", 0.4, (0, 0, 64, 48))]
    predicted = prediction_features(found, 320, 240)
    assert predicted["detections"] == 2 and predicted["min_confidence"] == pytest.approx(0.4)
    assert predicted["max_box_area"] == pytest.approx(0.04) and json.loads(predicted["class_counts"]) == {
        "dent": 1,
        "stain": 1,
    }
    assert prediction_features([], 320, 240)["mean_confidence"] is None


@pytest.mark.parametrize(
    ("change", "group"),
    [
        ({"focus": -4.0}, drift.FOCUS),
        ({"exposure": -3.0}, drift.EXPOSURE),
        ({"width": 640.0}, drift.GEOMETRY),
        ({"predictions": 4.0}, drift.PREDICTIONS),
        ({"box_scale": 0.7}, drift.PREDICTIONS),  # defects 0.7x the size: only a log scale sees it past 1 std
        ({"embedding": 3.0}, drift.EMBEDDING_GROUP),
    ],
)
def test_each_group_decides_on_its_own_change(change: dict[str, Any], group: str) -> None:
    reference = profile_of(feature_rows(200, seed=1))
    result = drift.check(reference, feature_rows(40, seed=2, **change), POLICY, report=False)
    assert result.status == "drift", result.message
    assert result.drifted_groups == [group], result.message
    assert result.groups[0].group == group and result.groups[0].words in result.message


def test_the_embedding_is_excluded_and_thresholded_by_name_and_a_name_that_is_no_feature_is_refused() -> None:
    """`monitor.exclude: [embedding]` and `monitor.columns: {embedding: ...}` were ignored (only monitor.embeddings
    turned it off), and a misspelt feature was silently not excluded."""
    reference = profile_of(feature_rows(200, seed=1))
    window = feature_rows(40, seed=2, embedding=3.0)

    def policy(**changes: Any) -> MonitorSettings:
        return MonitorSettings.model_validate({**POLICY.model_dump(), **changes})

    excluded = drift.check(reference, window, policy(exclude=["embedding"]), report=False)
    assert excluded.status == "no drift" and excluded.skipped[drift.EMBEDDING] == "excluded (monitor.exclude)"
    assert not [f for f in excluded.features if f.group == drift.EMBEDDING_GROUP]
    raised = drift.check(reference, window, policy(columns={"embedding": {"effect": 100.0}}), report=False)
    embedding = next(f for f in raised.features if f.name == drift.EMBEDDING)
    assert embedding.threshold == 100.0 and not embedding.drifted  # its components are features of their own
    for key, value in (("exclude", ["sharpnes"]), ("columns", {"count_scratches": {"effect": 2.0}})):
        with pytest.raises(ConfigError, match=rf"monitor\.{key}: '(sharpnes|count_scratches)' not a feature"):
            drift.check(reference, window, policy(**{key: value}), report=False)


def test_embeddings_of_another_width_are_said_once() -> None:
    """A window whose embeddings are another model's width (or all missing) gave ten lines of `emb_NN: 0 current
    values (< min_samples)`, and not the reason."""
    reference = profile_of(feature_rows(200, seed=1))
    window = feature_rows(40, seed=2)
    window[EMBEDDING] = [[0.5] * 5 for _ in range(len(window))]
    result = drift.check(reference, window, POLICY, report=False)
    assert not [k for k in result.skipped if k.startswith("emb_")], result.skipped
    assert result.skipped[EMBEDDING].startswith("0 of 40 current rows have an embedding of the profile's width")
    assert "widths seen: 5" in result.skipped[EMBEDDING]
    window[EMBEDDING] = [None] * len(window)
    assert "widths seen: none" in drift.check(reference, window, POLICY, report=False).skipped[EMBEDDING]


def test_a_window_where_only_some_records_have_an_embedding_is_checked_and_reported() -> None:
    """A window joining records with and without an embedding (a log from before the features output, a device
    logging without it): Evidently's embedding picture took the missing values and raised, before any report, run
    or gauge was written, every hour for as long as such records stayed in the window."""
    reference = profile_of(feature_rows(200, seed=1))
    window = feature_rows(100, seed=2, focus=-6.0)
    window[EMBEDDING] = [None if i % 2 else v for i, v in enumerate(window[EMBEDDING])]
    result = drift.check(reference, window, POLICY)  # with Evidently's report
    assert result.status == "drift" and result.snapshot is not None, result.message
    assert any(f.name.startswith("emb_") for f in result.features)  # the 50 with one still tested


def test_the_predictions_moving_together_are_drift_where_each_alone_is_short() -> None:
    """Defects 1.6x larger moved the demo champion's box areas by 0.78-1.08 standard deviations in windows of 40 and
    its confidences down at the same time: two windows of five had no prediction feature past its threshold. The
    predictions as one (their means' Mahalanobis distance, Hotelling's p-value) moved 1.10-1.52. Here larger boxes
    and a few more of them: each feature short of its threshold, together past it; unchanged, together far short."""
    reference = profile_of(feature_rows(400, seed=0))
    moved = drift.check(reference, feature_rows(40, seed=6, box_scale=1.22, predictions=0.6), POLICY, report=False)
    alone = [f for f in moved.features if f.group == drift.PREDICTIONS and f.name != drift.PREDICTIONS_TOGETHER]
    assert len(alone) >= 5 and not any(f.drifted for f in alone), [(f.name, f.effect) for f in alone]
    together = next(f for f in moved.features if f.name == drift.PREDICTIONS_TOGETHER)
    assert together.drifted and together.effect > together.threshold and together.p_value < POLICY.p_value
    assert moved.status == "drift" and moved.drifted_groups == [drift.PREDICTIONS], moved.message
    assert "changed as a whole" in moved.message
    unchanged = drift.check(reference, feature_rows(40, seed=5), POLICY, report=False)
    still = next(f for f in unchanged.features if f.name == drift.PREDICTIONS_TOGETHER)
    assert unchanged.status == "no drift" and still.effect < 0.5 * still.threshold


def test_same_distribution_is_not_drift_at_either_window_size() -> None:
    reference = profile_of(feature_rows(300, seed=1))
    for size, seed in ((40, 2), (200, 3), (2000, 4)):
        result = drift.check(reference, feature_rows(size, seed=seed), POLICY, report=False)
        assert result.status == "no drift", (size, result.message)


def test_a_strong_focus_change_among_many_unchanged_features_is_drift() -> None:
    """The dilution case: 3 of ~30 features see an out-of-focus camera; the rest do not move. The share rule of
    before (30 % of features) called this "no drift"; the focus group decides alone."""
    reference = profile_of(feature_rows(300, seed=1))
    result = drift.check(reference, feature_rows(40, seed=2, focus=-6.0), POLICY)
    assert result.status == "drift", result.message
    moved = [f.name for f in result.features if f.drifted]
    assert moved == ["sharpness"] and len(result.features) > 25
    assert "less sharp than in training: focus" in result.message
    assert result.snapshot is not None  # Evidently's report of the same comparison


def test_a_small_wobble_of_many_features_is_not_drift() -> None:
    """Every group moves half a reference standard deviation: visible to a test on 2000 rows, but no change a
    line engineer should hear about."""
    reference = profile_of(feature_rows(300, seed=1))
    rows = feature_rows(2000, seed=2, exposure=0.4, focus=0.4, embedding=0.3)
    result = drift.check(reference, rows, POLICY, report=False)
    assert result.status == "no drift", result.message
    assert any(f.p_value < POLICY.p_value for f in result.features)  # significant, and small


def test_per_feature_effect_size_and_exclusion_come_from_params() -> None:
    policy = MonitorSettings(min_samples=20, columns={"brightness": {"effect": 10.0}}, exclude=["aspect"])
    result = drift.check(profile_of(feature_rows(200, seed=1)), feature_rows(60, seed=3, exposure=-4.0), policy)
    brightness = next(f for f in result.features if f.name == "brightness")
    assert brightness.threshold == 10.0 and not brightness.drifted  # four standard deviations, under ten
    assert result.skipped["aspect"].startswith("excluded")
    assert "contrast" in result.drifted  # the rest of the group still sees the change


def test_a_batch_too_small_to_test_a_feature_is_not_nearest_for_it() -> None:
    """A night batch of 40 images, few with a detection: too few values to test the predictions against it, so they
    counted as unmoved, the batch looked nearest, and night traffic whose boxes had collapsed (areas 20x smaller,
    confidence 0.3x) was "no drift against 'night'". What a batch cannot test is tested against every batch."""
    import pandas as pd

    night = feature_rows(40, seed=4, exposure=-4.0, batch="night")
    few = night.index[5:]  # 5 of 40 images with a detection: under monitor.min_samples (30) values
    night.loc[few, "detections"] = 0
    night.loc[few, ["mean_confidence", "min_confidence", "mean_box_area", "max_box_area"]] = None
    reference = profile_of(pd.concat([feature_rows(300, seed=1), night], ignore_index=True))
    traffic = feature_rows(80, seed=5, exposure=-4.0, box_scale=0.22)
    traffic["mean_confidence"] = traffic["mean_confidence"] * 0.3
    traffic["min_confidence"] = traffic["min_confidence"] * 0.3
    result = drift.check(reference, traffic, POLICY, report=False)
    assert result.status == "drift" and result.reference_batch == "night", result.message
    assert drift.PREDICTIONS in result.drifted_groups, result.message
    moved = next(f for f in result.features if f.name == "mean_box_area")
    assert moved.drifted and moved.method.endswith("against every batch")
    quiet = feature_rows(80, seed=6, exposure=-4.0)  # night as it was trained: few detections, boxes as they were
    quiet.loc[quiet.index[10:], "detections"] = 0
    quiet.loc[quiet.index[10:], ["mean_confidence", "min_confidence", "mean_box_area", "max_box_area"]] = None
    calm = drift.check(reference, quiet, POLICY, report=False)
    assert calm.status == "no drift" and calm.reference_batch == "night", calm.message


def test_a_monochrome_line_is_not_drift_by_a_fraction_of_a_grey_level() -> None:
    """A monochrome line's saturation is 0 exactly: the JPEG chroma noise of its traffic (under one level of 255) was
    measured in Evidently's units of 0.001, effect 245, "colours are stronger". A level is the unit now; a real
    colour still drifts."""
    reference_rows = feature_rows(200, seed=1)
    reference_rows["saturation"] = 0.0
    reference = profile_of(reference_rows)
    noisy = feature_rows(60, seed=2)
    noisy["saturation"] = np.random.default_rng(3).uniform(0, 0.5, len(noisy))
    calm = drift.check(reference, noisy, POLICY, report=False)
    assert calm.status == "no drift", calm.message
    coloured = feature_rows(60, seed=4)  # saturation about 30 levels
    assert "saturation" in drift.check(reference, coloured, POLICY, report=False).drifted


def test_a_version_trained_on_two_conditions_accepts_both() -> None:
    """After a drift retraining, traffic like either batch the model was trained on is not drift."""
    import pandas as pd

    reference = profile_of(feature_rows(100, seed=1), feature_rows(60, seed=4, exposure=-4.0, batch="add-20261122-x"))
    shifted = drift.check(reference, feature_rows(60, seed=5, exposure=-4.0), POLICY, report=False)
    assert shifted.status == "no drift" and shifted.reference_batch == "add-20261122-x", shifted.message
    base = drift.check(reference, feature_rows(60, seed=6), POLICY, report=False)
    assert base.status == "no drift" and base.reference_batch == "base", base.message
    novel = drift.check(reference, feature_rows(60, seed=7, exposure=4.0), POLICY, report=False)
    assert novel.status == "drift", novel.message
    # A window mixing both (day and night shifts in one window) is like neither batch alone: it was drift against
    # the nearest. Against every batch together, it is what the model was trained on.
    mixed = pd.concat([feature_rows(40, seed=8), feature_rows(40, seed=9, exposure=-4.0)], ignore_index=True)
    both = drift.check(reference, mixed, POLICY, report=False)
    assert both.status == "no drift" and both.reference_batch == "all", both.message


def test_fewer_samples_than_the_minimum_is_insufficient_never_drift() -> None:
    result = drift.check(profile_of(feature_rows(80, seed=1)), feature_rows(19, seed=3, focus=-8.0), POLICY)
    assert result.status == "insufficient data" and "fewer than monitor.min_samples (20)" in result.message
    tiny_reference = drift.check(profile_of(feature_rows(10, seed=1)), feature_rows(60, seed=3), POLICY)
    assert tiny_reference.status == "insufficient data" and "reference profile has 10 rows" in tiny_reference.message


def test_nan_and_missing_features_are_skipped_and_named() -> None:
    reference = profile_of(feature_rows(80, seed=1))
    now = feature_rows(60, seed=2, embeddings=False).drop(columns=["noise"])  # an older log: no noise, no embedding
    now["contrast"] = np.nan
    now.loc[:5, "brightness"] = np.inf
    result = drift.check(reference, now, POLICY, report=False)
    assert result.status == "no drift", result.message
    assert result.skipped["noise"] == "missing from the current data"
    assert "current values" in result.skipped["contrast"]
    assert "no embeddings" in result.skipped[EMBEDDING]
    assert "brightness" in {f.name for f in result.features}  # infinities are dropped, the rest is tested
    assert all(math.isfinite(f.effect) for f in result.features)
    other_size = feature_rows(60, seed=2)
    other_size[EMBEDDING] = [v[:16] for v in other_size[EMBEDDING]]  # a log from a model of another width
    assert drift.check(reference, other_size, POLICY, report=False).status == "no drift"


def test_a_prediction_feature_is_tested_where_the_model_found_few_defects() -> None:
    """Box areas exist only where the model found something, so a window of 40 images with 14 detections has 14 of
    them: fewer than min_samples, and still tested (smaller defects are when a model finds fewer). Below
    MIN_FEATURE_VALUES a feature is skipped and named."""
    reference = profile_of(feature_rows(300, seed=1))
    smaller = feature_rows(40, seed=2, box_scale=0.6)
    found_nothing = ["mean_confidence", "min_confidence", "mean_box_area", "max_box_area"]
    found = smaller.index[smaller["mean_box_area"].notna()]
    smaller.loc[found[:-14], found_nothing] = None
    assert smaller["mean_box_area"].notna().sum() == 14 < POLICY.min_samples
    result = drift.check(reference, smaller, POLICY, report=False)
    assert result.status == "drift" and result.drifted_groups == [drift.PREDICTIONS], result.message
    assert "mean_box_area" in result.drifted and "smaller than usual" in result.message
    smaller.loc[found[: -(drift.MIN_FEATURE_VALUES - 1)], found_nothing] = None  # 9 values left
    skipped = drift.check(reference, smaller, POLICY, report=False)
    assert "mean_box_area" not in {f.name for f in skipped.features}
    assert "current values" in skipped.skipped["mean_box_area"]


# --- the model's features output and the performance estimate, with the demo checkpoint --------------------------


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> Detector:
    from pipelines import runtimes
    from pipelines.export import VARIANTS, export_variant

    folder = tmp_path_factory.mktemp("export")
    onnx = export_variant(CHECKPOINT, VARIANTS["onnx_dynamic"], 320, folder, folder)
    return Detector(runtimes.OnnxRuntime(onnx), ModelCard(NAMES, 320, conf=0.25))


def test_the_exported_model_gives_the_pytorch_features(detector: Detector) -> None:
    from pipelines import model_features, runtimes

    images = runtimes.letterbox([synth.render_image(SynthSettings(), "test", i)[0] for i in range(4)], 320)
    reference, reference_features = runtimes.TorchRuntime(CHECKPOINT).infer_with_features(images)
    assert reference_features is not None and reference_features.shape == (4, 448)  # P3 64 + P4 128 + P5 256
    parity = runtimes.compare(detector.runtime, reference, reference_features, images)
    assert parity.features_rel_diff is not None and parity.features_rel_diff < 1e-4
    # A graph where a head input cannot be found is refused by name, never served with wrong features.
    with pytest.raises(model_features.FeatureOutputError, match="layer 99: expected one output tensor"):
        model_features._layer_tensors({"/model.16/Mul_output_0": 16}, {}, set(), [99])


def labelled(settings: SynthSettings, split: str, count: int, detector: Detector, change: Any = None) -> list[Any]:
    from pipelines.profile import read_labels

    out = []
    for i in range(count):
        image, boxes = synth.render_image(settings, split, i)
        labels = np.array(
            [[c, (x - w / 2) * 320, (y - h / 2) * 320, (x + w / 2) * 320, (y + h / 2) * 320] for c, x, y, w, h in boxes]
        ).reshape(-1, 5)
        if change is not None:
            image = change(image, np.random.default_rng(i))
        found = detector.run([shifts.encode_decode(image, 92)])[0]
        out.append((performance.Labelled(found.candidates, labels), found))
    assert read_labels(None, 320, 320).shape == (0, 5)
    return out


def test_the_estimate_follows_a_known_shift(detector: Detector) -> None:
    validation = labelled(SynthSettings(), "val", 60, detector)
    calibration = performance.fit([v for v, _ in validation], NAMES, 0.01)
    assert calibration.images == 60 and 0.3 < calibration.validation_map50_95 < 0.8
    new = SynthSettings(seed=1001)
    clean = labelled(new, "test", 120, detector)
    noisy = labelled(new, "test", 120, detector, shifts.sensor_noise(14))
    truth_clean = performance.score([v for v, _ in clean])
    truth_noisy = performance.score([v for v, _ in noisy])
    assert truth_clean - truth_noisy > 0.05  # the shift hurts the model

    def scores(found: list[Inference]) -> list[tuple[list[float], list[int]]]:
        return [([s for s, _ in f.scores], [c for _, c in f.scores]) for f in found]

    estimate_clean = performance.estimate(calibration, scores([f for _, f in clean]), bootstrap=30)
    estimate_noisy = performance.estimate(calibration, scores([f for _, f in noisy]), bootstrap=30)
    print(truth_clean, estimate_clean, truth_noisy, estimate_noisy)
    assert abs(estimate_clean.map50_95 - truth_clean) < 0.05, (estimate_clean, truth_clean)
    assert abs(estimate_noisy.map50_95 - truth_noisy) < 0.08, (estimate_noisy, truth_noisy)
    low, high = estimate_clean.cost_interval
    assert low < 0 < high  # unchanged images: no cost, within the interval
    assert estimate_noisy.cost_interval[0] > 0.03 and estimate_noisy.cost > estimate_clean.cost + 0.05
    assert estimate_clean.low <= estimate_clean.map50_95 <= estimate_clean.high


def test_background_images_without_a_label_file_count_as_images_without_objects(tmp_path: Path) -> None:
    """The validate stage reads an image without a label file as a background image; the object rate counts it as one
    with no objects, so a dataset whose backgrounds have no label files does not get a rate that is too high."""
    from pipelines.profile import ImageSource, calibrate

    label = tmp_path / "dent.txt"
    label.write_text("1 0.5 0.5 0.2 0.2\n")
    image = np.zeros((100, 100, 3), np.uint8)
    found = Inference([], [Detection(1, "dent", 0.9, (40, 40, 60, 60))], None)
    nothing = Inference([], [], None)
    seen = [
        (ImageSource(tmp_path / "v.jpg", "val", "b", label), image, found),
        (ImageSource(tmp_path / "t.jpg", "train", "b", label), image, found),
        *[(ImageSource(tmp_path / f"bg{i}.jpg", "train", "b", None), image, nothing) for i in range(2)],
    ]
    calibration = calibrate(seen, NAMES)
    assert calibration.images == 1 and calibration.objects_per_image == [0.0, 0.5, 0.0]
    assert calibration.batches == ["b"]  # each validation image's batch: the cost's reference of a batch


def test_the_object_rate_is_counted_on_every_labelled_image() -> None:
    """How many defects an image holds is the line's, not the model's: the rate comes from every labelled image of the
    version's data, not only the validation split, and the bootstrap resamples those images. A calibration made
    before the counts were kept still loads and estimates from the validation images."""
    dent = np.array([[1, 10, 10, 50, 50]], np.float64)
    validation = [performance.Labelled([Detection(1, "dent", 0.9, (10, 10, 50, 50))], dent)] * 4
    calibration = performance.fit(validation, NAMES, 0.01, [dent] * 4 + [np.zeros((0, 5))] * 12)
    assert calibration.objects_per_image == [0.0, 0.25, 0.0] and calibration.counted is not None
    assert performance.Calibration.from_json(json.loads(json.dumps(calibration.to_json()))) == calibration
    from_validation = performance.fit(validation, NAMES, 0.01).to_json()
    assert from_validation["objects_per_image"] == [0.0, 1.0, 0.0]
    loaded = performance.Calibration.from_json({k: v for k, v in from_validation.items() if k != "counted"})
    assert loaded.counted is None
    window = [([0.9], [1])] * 8
    # One dent an image in the window against a rate of 0.25: three in four of its sure detections are false ...
    rare = performance.estimate(calibration, window, bootstrap=10).map50_95
    # ... against a rate of 1.0 (the validation images alone), every one is right.
    assert rare < 0.5 < performance.estimate(loaded, window, bootstrap=10).map50_95
    records = feature_rows(40, seed=1)
    said = estimate_window(profile_of(records, calibration=calibration), records, "3", bootstrap=5).reason
    assert "calibrated on 4 validation images (objects per image counted on 16 labelled images)" in said


def test_the_cost_is_against_the_validation_images_of_the_batch_the_traffic_is_nearest() -> None:
    """The cost's reference is the version's validation images, of the batch the drift check found the traffic
    nearest where the calibration knows its images' batches: traffic read as well as a batch the model sees well
    costs nothing against that batch, and less than nothing against one it sees badly. A calibration made before
    the batches were kept is against every validation image."""
    dent = np.array([[1, 10, 10, 50, 50]], np.float64)
    seen = performance.Labelled([Detection(1, "dent", 0.9, (10, 10, 50, 50))], dent)
    missed = performance.Labelled([Detection(1, "dent", 0.3, (60, 60, 90, 90))], dent)  # a false box, a missed dent
    batches = ["line-a"] * 10 + ["dusty"] * 10
    calibration = performance.fit([seen] * 10 + [missed] * 10, NAMES, 0.01, batches=batches)
    assert calibration.batches == batches
    assert performance.Calibration.from_json(json.loads(json.dumps(calibration.to_json()))) == calibration
    window = [([0.9], [1])] * 20
    line_a = performance.estimate(calibration, window, batch="line-a", bootstrap=0)
    dusty = performance.estimate(calibration, window, batch="dusty", bootstrap=0)
    every = performance.estimate(calibration, window, bootstrap=0)
    assert line_a.map50_95 > 0.9 and abs(line_a.cost) < 0.05
    assert dusty.reference < 0.05 and dusty.cost < -0.9
    assert dusty.reference < every.reference < line_a.reference
    assert performance.estimate(calibration, window, batch="no such batch", bootstrap=0).reference == every.reference
    older = performance.Calibration.from_json({k: v for k, v in calibration.to_json().items() if k != "batches"})
    assert older.batches is None
    assert performance.estimate(older, window, batch="dusty", bootstrap=0).reference == every.reference
    with pytest.raises(performance.CalibrationError, match="2 batches for 20 validation images"):
        performance.fit([seen] * 10 + [missed] * 10, NAMES, 0.01, batches=["a", "b"])
    records = feature_rows(40, seed=1)
    said = estimate_window(profile_of(records, calibration=calibration), records, "3", "dusty", bootstrap=5).reason
    assert "cost against 10 validation images of batch 'dusty', each read out of fold" in said
    said = estimate_window(profile_of(records, calibration=older), records, "3", "dusty", bootstrap=5).reason
    assert "cost against 20 validation images, each read out of fold" in said


def test_the_curves_are_scikit_learns_isotonic_regression() -> None:
    """The calibration's curves are refitted 55 times an estimate (folds, bootstrap), so they are fitted without the
    estimator class; they must be the very thresholds `IsotonicRegression(y_min=0, y_max=1)` keeps: tied confidences,
    a class with one detection, one never matched, and one absent."""
    from sklearn.isotonic import IsotonicRegression

    rng = np.random.default_rng(3)
    for draw in range(40):
        n = 1 if draw == 0 else int(rng.integers(1, 300))
        confidence = np.round(rng.random(n), int(rng.integers(1, 4)))  # coarse rounding: many ties
        matched = rng.random((n, 10)) < confidence[:, None] * np.linspace(1.0, 0.1, 10)
        classes = rng.integers(0, 2, n) if draw % 4 else np.zeros(n, int)  # class 2 never shows; 1 sometimes not
        matched[classes == 1, :] = False if draw % 3 == 0 else matched[classes == 1, :]
        table = np.column_stack([np.zeros(n), classes, confidence, matched.astype(float)])
        curves = performance._fit_curves(table, 3)
        for c in range(3):
            rows = table[table[:, 1] == c]
            for t in range(10):
                if not len(rows):
                    assert curves[c][t].x == [] and curves[c][t](np.array([0.5])).tolist() == [0.0]
                    continue
                model = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(rows[:, 2], rows[:, 3 + t])
                assert curves[c][t].x == model.X_thresholds_.tolist()
                assert np.allclose(curves[c][t].y, model.y_thresholds_, rtol=0, atol=1e-12)
                grid = np.linspace(-0.2, 1.2, 57)
                assert np.allclose(curves[c][t](grid), model.predict(grid), rtol=0, atol=1e-12)


def test_the_average_precision_is_ultralytics() -> None:
    """The estimate computes AP without Ultralytics' `ap_per_class` (importing it imports PyTorch); it must be the
    very AP the validator reports: ties in confidence (sorted the same way), a class without detections, a detected
    class without objects, booleans and expected shares as true positives, one detection."""
    from ultralytics.utils.metrics import ap_per_class

    rng = np.random.default_rng(5)
    for draw in range(60):
        n = 1 if draw == 0 else int(rng.integers(2, 400))
        confidence = np.round(rng.random(n), int(rng.integers(1, 4)))  # coarse rounding: many ties
        classes = rng.integers(0, 3, n) if draw % 3 else rng.integers(0, 2, n)  # class 2 not detected
        correct = rng.random((n, 10)) < confidence[:, None] * np.linspace(1.0, 0.1, 10)
        tp = correct if draw % 2 else correct * rng.random((n, 1))  # shares, as an expected outcome
        targets = rng.integers(0, 3 if draw % 4 else 2, int(rng.integers(1, 300)))  # class 2 without objects
        expected = ap_per_class(tp, confidence, classes, targets)[5]
        assert np.array_equal(performance.average_precision(tp, confidence, classes, targets), expected), draw


def test_the_reference_reads_each_validation_image_with_curves_it_did_not_teach(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Read by curves it taught, a validation image reads what it taught, so the reference would hold none of the
    calibration's error that a new window meets: each image is read with curves fitted on the other folds (contiguous
    blocks of images). A class the other folds hardly show is read with every image's curves, or a rare class would
    read as always wrong there and every window would look better than its reference."""
    box = np.array([[1, 10, 10, 50, 50.0]])
    dents = [performance.Labelled([Detection(1, "dent", 0.5 + 0.02 * i, (10, 10, 50, 50))], box) for i in range(20)]
    calibration = performance.fit(dents, NAMES, 0.01)
    fitted_on: list[set[int]] = []
    fit_curves = performance._fit_curves

    def recorded(table: np.ndarray, classes: int) -> Any:
        fitted_on.append({int(i) for i in table[:, 0]})
        return fit_curves(table, classes)

    monkeypatch.setattr(performance, "_fit_curves", recorded)
    table = np.array(calibration.detections).reshape(-1, 13)
    performance._held_out(calibration, table, [table[table[:, 0] == i] for i in range(20)], range(20))
    assert len(fitted_on) == performance.FOLDS
    for image in range(20):
        fold = performance.fold_of(image, 20)
        assert image not in fitted_on[fold] and len(fitted_on[fold]) == 16
    assert [performance.fold_of(i, 20) for i in (0, 3, 4, 19)] == [0, 0, 1, 4]  # blocks, not every fifth image
    monkeypatch.setattr(performance, "_fit_curves", fit_curves)

    stain = performance.Labelled([Detection(2, "stain", 0.9, (10, 10, 50, 50))], np.array([[2, 10, 10, 50, 50.0]]))
    dent = performance.Labelled([Detection(1, "dent", 0.9, (10, 10, 50, 50))], np.array([[1, 10, 10, 50, 50.0]]))
    rare = performance.fit([stain] * 4 + [dent] * 16, NAMES, 0.01)  # every stain in the first fold
    found = performance.estimate(rare, [([0.9], [2])] * 4 + [([0.9], [1])] * 16, bootstrap=0)
    # Read without the first fold's curves, its stains would all be misses: a reference of 0.46.
    assert found.map50_95 > 0.9 and found.reference > 0.75


def ten_dents() -> performance.Calibration:
    """A calibration on ten validation images, each one dent found at a rising confidence."""
    box = np.array([[1, 10, 10, 50, 50.0]])
    return performance.fit(
        [performance.Labelled([Detection(1, "dent", 0.5 + 0.02 * i, (10, 10, 50, 50))], box) for i in range(10)],
        NAMES,
        0.01,
    )


def test_the_estimate_names_what_it_lacks() -> None:
    records = feature_rows(40, seed=1)
    assert "no performance calibration" in estimate_window(profile_of(records), records, "3").reason
    calibration = performance.Calibration(NAMES, 0.01, 1, [1.0, 1.0, 1.0], [], 0.5, [], [[1, 1, 1]])
    with_calibration = profile_of(records, calibration=calibration)
    missing = estimate_window(with_calibration, records.drop(columns=[SCORE_CONFIDENCE]), "3")
    assert missing.estimate is None and "carry no confidences" in missing.reason
    empty = estimate_window(with_calibration, records.iloc[:0], "3")
    assert empty.estimate is None and "no records" in empty.reason
    with pytest.raises(performance.CalibrationError, match="no images"):
        performance.estimate(calibration, [])
    # A window joining log files written before scores were logged and after: those without are left out, by name.
    joined = records.copy()
    joined.loc[:9, SCORE_CONFIDENCE] = np.nan
    joined.loc[10:19, SCORE_CLASS] = None
    fitted = ten_dents()
    found = estimate_window(profile_of(records, calibration=fitted), joined, "3", bootstrap=2)
    assert found.estimate is not None and "from the confidences of 20 images" in found.reason
    assert "carry no boxes" in found.reason  # logged before boxes were: dust cannot be told from defects
    joined[SCORE_CONFIDENCE] = np.nan
    assert "no record of the window carries confidences" in estimate_window(with_calibration, joined, "3").reason
    # A clean line: 1 dent in 100 validation images, so a window of 40 is expected to hold 0.4 objects. mAP is not
    # defined without objects: no estimate, a reason, and so no event (it was NaN, and an event went out).
    rare = performance.Calibration(NAMES, 0.01, 100, [0.0, 0.01, 0.0], fitted.curves, 0.99, [], [[0, 0, 0]] * 100)
    clean = estimate_window(profile_of(records, calibration=rare), records, "3", bootstrap=2)
    assert clean.estimate is None and "expected to hold 0.4 objects at the line's rate" in clean.reason
    decision = alerts.decide(drifted(drift.FOCUS), "3", [], [], clean, MonitorSettings(), datetime.now(UTC))
    assert not decision.alert and "too few to estimate mAP on" in decision.reason


def moving_and_fixed(images: int, spot_in: int, seed: int = 3) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Boxes (fractions of the frame) of a window: one defect a frame, somewhere on the part, and in the first
    `spot_in` frames a speck at one place of the frame (jittered as a detector's boxes are)."""
    rng = np.random.default_rng(seed)
    boxes, classes = [], []
    for i in range(images):
        x, y = rng.uniform(0.05, 0.8, 2)
        found = [[x, y, x + 0.1, y + 0.1]]
        if i < spot_in:
            jitter = rng.normal(0, 0.002, 4)
            found.append([0.40 + jitter[0], 0.20 + jitter[1], 0.44 + jitter[2], 0.24 + jitter[3]])
        boxes.append(np.array(found))
        classes.append(np.ones(len(found), np.int64))
    return boxes, classes


def test_crowded_candidates_at_one_place_keep_the_fixed_rule_bounded() -> None:
    """Clutter in a fixture: 100 candidates an image within a tenth of the frame. Every pair of 200 images is 400
    million; the sample shrinks until the pairs fit, and the rows are compared in chunks (it was 4 GB and 27 s)."""
    import tracemalloc

    rng = np.random.default_rng(0)
    boxes, classes = [], []
    for _ in range(200):
        centre, size = rng.uniform(0.45, 0.55, (100, 2)), rng.uniform(0.02, 0.05, (100, 2))
        boxes.append(np.column_stack([centre - size / 2, centre + size / 2]))
        classes.append(np.zeros(100, np.int64))
    tracemalloc.start()
    try:
        fixed = performance.fixed_in_frame(boxes, classes)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 200e6 and [len(f) for f in fixed] == [100] * 200


def test_detections_fixed_in_the_frame_are_the_lens_not_the_parts() -> None:
    """Parts move past the camera; dust on the lens stays. A detection at one place of the frame in 30 % of a window's
    images (and in 5) is fixed in the frame; one that moves, or stays in fewer images, is not."""
    fixed = performance.fixed_in_frame(*moving_and_fixed(40, spot_in=30))
    assert [f.tolist() for f in fixed] == [[False, True]] * 30 + [[False]] * 10
    assert not any(f.any() for f in performance.fixed_in_frame(*moving_and_fixed(40, spot_in=10)))  # 25 %
    assert not any(f.any() for f in performance.fixed_in_frame(*moving_and_fixed(8, spot_in=4)))  # 4 images of 8
    boxes, classes = moving_and_fixed(40, spot_in=30)
    # The speck as one of three classes in turn: each in 10 of 40 images, too few (a place is per class).
    turns = [np.array([1, i % 3])[: len(c)] for i, c in enumerate(classes)]
    assert not any(f.any() for f in performance.fixed_in_frame(boxes, turns))
    # A dirty lens over a large window: 90 jittering boxes an image over 1000 images (decided on 200 of them).
    rng = np.random.default_rng(0)
    specks = rng.uniform(0, 0.9, (90, 2))
    lens = [np.column_stack([specks, specks + 0.05]) + rng.normal(0, 0.004, (90, 4)) for _ in range(1000)]
    flagged = performance.fixed_in_frame(lens, [np.zeros(90, np.int64)] * 1000)
    assert sum(f.sum() for f in flagged) > 0.9 * 90_000 and all(f.any() for f in flagged[200:])
    # A large box, its centre jittering more than a cell of the frame: every pair within reach is compared.
    glare = [np.array([[0.2, 0.2, 0.8, 0.5]]) + np.tile(rng.normal(0, 0.06, 2), 2) for _ in range(40)]
    assert all(f.tolist() == [True] for f in performance.fixed_in_frame(glare, [np.zeros(1, np.int64)] * 40))
    # Boxes that cannot be compared (not finite, no area) are never fixed, and do not stop the others being.
    odd = [np.array([[np.nan, 0.1, 0.2, 0.2], [0.5, 0.5, 0.5, 0.6], [0.40, 0.20, 0.44, 0.24]]) for _ in range(10)]
    assert [f.tolist() for f in performance.fixed_in_frame(odd, [np.ones(3, np.int64)] * 10)] == [
        [False, False, True]
    ] * 10


def test_the_estimate_reads_detections_fixed_in_the_frame_as_false() -> None:
    """Dust on the lens makes detections the calibration reads as half right; beside each image's one defect they
    claim more true positives than there are objects, and every claim was scaled down (12 dust spots read 0.205 too
    low in the drift benchmark). With the boxes logged, the dust is read as false and the defect keeps its claim; a
    version whose own validation defects recur at one place keeps them as detections like any other."""

    def frame(i: int) -> tuple[float, float]:
        return 20 + 13 * (i % 11), 30 + 17 * (i % 7)  # a defect's corner: the parts move

    validation = []
    for i in range(20):
        x, y = frame(i)
        second = (x + 150, y + 100, x + 180, y + 130)  # a second defect, found at 0.5 on every other image
        labels = [[1, x, y, x + 40, y + 40]] + ([[1, *second]] if i % 2 else [])
        found = [Detection(1, "dent", 0.9, (x, y, x + 40, y + 40)), Detection(1, "dent", 0.5, second)]
        validation.append(performance.Labelled(found, np.array(labels, np.float64), (320, 320)))
    calibration = performance.fit(validation, NAMES, 0.01)
    assert calibration.fixed_defects is False
    window = []
    for i in range(40):
        x, y = frame(i + 3)
        boxes = [(x, y, x + 40, y + 40), *[(s, 250, s + 20, 270) for s in (20, 120, 220)]]  # three specks of dust
        window.append(([0.9, 0.5, 0.5, 0.5], [1, 1, 1, 1], [v / 320 for box in boxes for v in box]))
    blind = performance.estimate(calibration, [(c, k) for c, k, _ in window], bootstrap=0)
    seen = performance.estimate(calibration, window, bootstrap=0)
    assert seen.fixed_detections == 120 and seen.fixed_images == 40 and blind.fixed_detections == 0
    assert seen.map50_95 > blind.map50_95 + 0.1, (seen, blind)
    line = replace(calibration, fixed_defects=True)  # the line's defects recur at one place: so may its detections
    assert performance.estimate(line, window, bootstrap=0).map50_95 == pytest.approx(blind.map50_95)
    # The validation labels say which: defects at one place of the frame in every image; unknown without frame sizes.
    still = [performance.Labelled(v.detections, np.array([[1, 20, 30, 60, 70.0]]), (320, 320)) for v in validation]
    assert performance.fit(still, NAMES, 0.01).fixed_defects is True
    assert performance.fit([replace(v, size=None) for v in validation], NAMES, 0.01).fixed_defects is None
    empty = performance.Labelled([], np.zeros(0), (320, 320))  # labels read as a flat empty array: no objects
    assert performance.fit([empty, *validation], NAMES, 0.01).fixed_defects is False


def test_the_check_says_what_it_read_as_the_lens() -> None:
    """The check's reason says how many detections it read as the lens's, and in how many images."""
    records = feature_rows(40, seed=1)
    rng = np.random.default_rng(2)
    corner = np.array([0.0, 0.0, 0.1, 0.1])
    records[SCORE_BOX] = [  # the parts' detections anywhere, the last one a speck at one place of the frame
        [*(np.tile(rng.uniform(0, 0.8, (len(c) - 1, 2)), 2) + corner).ravel(), 0.40, 0.20, 0.44, 0.24]
        for c in records[SCORE_CONFIDENCE]
    ]
    fitted = ten_dents()
    found = estimate_window(profile_of(records, calibration=fitted), records, "3", bootstrap=2)
    assert found.estimate is not None and found.estimate.fixed_images == 40
    assert "in 40 of the 40 images read stay at one place of the frame" in found.reason
    assert "dust on the lens" in found.reason and "carry no boxes" not in found.reason
    # A window joining records with boxes and without says how many lack them.
    joined = records.copy()
    joined.loc[:9, SCORE_BOX] = np.nan
    assert (
        "10 of the records carry no boxes"
        in estimate_window(profile_of(records, calibration=fitted), joined, "3").reason
    )
    # A window larger than the estimate reads: counted on the images it read.
    large = performance.estimate(
        fitted, [([0.9, 0.3], [1, 1], [0.1, 0.1, 0.2, 0.2, 0.40, 0.20, 0.44, 0.24])] * 1200, bootstrap=0
    )
    assert large.images == performance.MAX_IMAGES and large.fixed_images == performance.MAX_IMAGES


# --- the prediction log --------------------------------------------------------------------------------------------


def pending(at: float, version: str) -> Pending:
    image = np.full((48, 64, 3), 100, np.uint8)
    found = Detection(0, "scratch", 0.9, (1.0, 2.0, 11.0, 12.0))
    return Pending(at, version, sample_image(image, 320), Inference([found], [found], np.ones(8, np.float32)))


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
    # A Parquet file of something else in the log's folder (it was a KeyError: 'time' for the whole window).
    import pandas as pd

    pd.DataFrame({"x": [1, 2]}).to_parquet(broken.with_name("part-8-other.parquet"))
    window = current.from_log(tmp_path / "log", hours=1)
    assert window.model_version == "2" and len(window.records) == 25
    assert window.other_versions == {"1": 30}
    assert len(window.unreadable) == 2 and "part-9-broken.parquet" in window.unreadable[1]
    assert "part-8-other.parquet: not a part of the prediction log" in window.unreadable[0]
    assert list(window.records[SCORE_CONFIDENCE].iloc[0]) == [0.9] and len(window.records[EMBEDDING].iloc[0]) == 8
    older = current.from_log(tmp_path / "log", hours=1, version="1", last=10)
    assert older.model_version == "1" and len(older.records) == 10
    with pytest.raises(
        current.NoCurrentDataError, match=r"version 7 served none of the .* records are of v1 \(30\), v2"
    ):
        current.from_log(tmp_path / "log", hours=1, version="7")
    assert read_log(tmp_path / "log").unreadable == window.unreadable


def test_a_large_window_is_read_part_by_part_into_a_bounded_sample(tmp_path: Path) -> None:
    """A day at 20 requests a second is 1.7 million records, ~10 GB held whole before the check kept one device's and
    one version's. The window is read part by part now, each version's records kept to a uniform sample of
    `max_records` (the same sample each time), and the counts are of every record."""
    import pandas as pd

    log = PredictionLog(tmp_path / "log", queue_size=1000, flush_seconds=60, keep_hours=48)
    log.directory.mkdir()
    now = time.time()
    for part in range(6):  # six part files, 100 records each, over 50 minutes
        for i in range(100):
            log.offer(pending(now - 3000 + part * 500 + i, "1" if part < 5 else "2"))
        log.flush()
    window = current.from_log(tmp_path / "log", hours=1, version="1", max_records=120)
    assert window.model_version == "1" and len(window.records) == 120 and window.other_versions == {"2": 100}
    assert "a sample of 120 of its 500 records (monitor.max_window_records)" in window.source
    times = window.records["time"]

    def at(seconds_ago: float) -> pd.Timestamp:
        return pd.Timestamp(now - seconds_ago, unit="s", tz="UTC")

    assert times.is_monotonic_increasing and times.min() < at(2500) and times.max() > at(1200)  # all of it
    again = current.from_log(tmp_path / "log", hours=1, version="1", max_records=120)
    assert window.records["time"].equals(again.records["time"])  # the same sample from the same records
    assert "_sample_key" not in window.records
    newest = current.from_log(tmp_path / "log", hours=1, version="1", last=150, max_records=120)
    assert len(newest.records) == 120 and newest.records["time"].min() >= at(1451)
    whole = current.from_log(tmp_path / "log", hours=1, max_records=1000)  # under the bound: every record
    assert whole.model_version == "2" and len(whole.records) == 100 and "sample" not in whole.source
    # The labelling selection reads only what it needs of a record.
    frames = read_log(tmp_path / "log", columns=["frame"]).records
    assert set(frames.columns) == {"time", "device", "frame"} and len(frames) == 600


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


def test_each_device_is_its_own_window_and_its_own_gauges(tmp_path: Path) -> None:
    """The server's records and an edge runner's share the log (same parts, same prefix); a check reads one
    device's; the gauges of every device's last check are served together, one family per metric."""
    from prometheus_client.parser import text_string_to_metric_families

    from monitoring.check import write_gauges
    from pipelines.log_parts import PartLog
    from pipelines.prediction_log import to_record
    from tests.monitoring_support import outcome_of

    server = PredictionLog(tmp_path / "log", queue_size=100, flush_seconds=60, keep_hours=48)
    edge = PartLog(server.directory, 100, 60, 48, lambda item: {**to_record(item), "device": "cam-7"})
    server.directory.mkdir()
    now = time.time()
    for i in range(12):
        server.offer(pending(now - 100 + i, "1"))
    for i in range(30):
        edge.offer(pending(now - 50 + i, "2"))
    server.flush()
    edge.flush()
    assert current.devices_in_log(tmp_path / "log", hours=1) == {"server": 12, "cam-7": 30}
    mine = current.from_log(tmp_path / "log", hours=1)
    assert mine.device == "server" and len(mine.records) == 12 and mine.model_version == "1" and not mine.other_versions
    camera = current.from_log(tmp_path / "log", hours=1, device="cam-7")
    assert camera.device == "cam-7" and len(camera.records) == 30 and camera.model_version == "2"
    with pytest.raises(current.NoCurrentDataError, match=r"records of cam-7 \(30\), server \(12\): choose one"):
        current.from_log(tmp_path / "log", hours=1, device="cam-9")
    with pytest.raises(current.NoCurrentDataError, match="device names are letters"):
        current.from_log(tmp_path / "log", hours=1, device="../etc")

    result = drift.DriftResult("drift", "test", 40, groups=[drift.GroupDrift("focus & noise", True, 3.0, "x", "y")])
    calm = drift.DriftResult("no drift", "test", 40, groups=[drift.GroupDrift("focus & noise", False, 0.2, "x", "")])
    gauges = tmp_path / "monitoring" / "drift.prom"
    write_gauges(gauges, outcome_of(result, "model", "2", tmp_path, device="cam-7"))
    write_gauges(gauges, outcome_of(calm, "model", "1", tmp_path))
    write_gauges(gauges, outcome_of(result, "model", "1", tmp_path))  # the server's newest check replaces its last
    families = {f.name: f for f in text_string_to_metric_families(gauges.read_text())}
    detected = {s.labels["device"]: s.value for s in families["conveyor_drift_detected"].samples}
    assert detected == {"cam-7": 1.0, "server": 1.0}
    strengths = {(s.labels["device"], s.labels["group"]) for s in families["conveyor_drift_group_strength"].samples}
    assert strengths == {("cam-7", "focus & noise"), ("server", "focus & noise")}
    assert gauges.read_text().count("# TYPE conveyor_drift_detected gauge") == 1
    # A camera not checked for a whole window (retired, or it sent nothing) leaves the dashboard: it said "drift" there
    # for good.
    day_old = time.time() - 2 * 86400
    os.utime(tmp_path / "monitoring" / "gauges" / "cam-7.prom", (day_old, day_old))
    write_gauges(gauges, outcome_of(calm, "model", "1", tmp_path), stale_after=timedelta(hours=24))
    assert 'device="cam-7"' not in gauges.read_text() and 'device="server"' in gauges.read_text()
    assert not (tmp_path / "monitoring" / "gauges" / "cam-7.prom").exists()


def test_the_checks_summary_is_strict_json(tmp_path: Path) -> None:
    """A constant feature's p-value (NaN) and a group's mean without values were written bare (`NaN`): jq reads
    them, a strict parser (JavaScript's JSON.parse, Go's) refuses the file. They are null now."""
    from monitoring.check import write_reports
    from tests.monitoring_support import outcome_of

    constant = drift.FeatureDrift("width", "geometry", "share", 0.0, 0.1, math.nan, False, 640.0, 640.0)
    result = drift.DriftResult("no drift", "test", 40, features=[constant])
    write_reports(outcome_of(result, "model", "1", tmp_path / "report"))
    text = (tmp_path / "report" / "summary.json").read_text()

    def refuse(name: str) -> None:
        raise ValueError(f"not JSON: {name}")

    summary = json.loads(text, parse_constant=refuse)
    assert [f["p_value"] for f in summary["features"] if f["name"] == "width"] == [None]


# --- the alert policy ---------------------------------------------------------------------------------------------


def test_the_action_follows_the_estimated_cost() -> None:
    now = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
    policy = MonitorSettings(retrain_cost=0.03, retrain_after=3)
    found = drifted(drift.FOCUS)
    harmful = alerts.decide(found, "3", [], [], estimated(0.08), policy, now)
    assert harmful.alert and harmful.action == "retrain" and "estimated cost 0.080" in harmful.reason
    harmless = alerts.decide(found, "3", [], [], estimated(0.005), policy, now)
    assert harmless.alert and harmless.action == "alert" and "no retraining" in harmless.reason
    lasting = alerts.decide(found, "3", [], ["drift", "drift"], estimated(0.005), policy, now)
    assert lasting.action == "retrain" and "3 checks in a row" in lasting.reason
    broken = alerts.decide(found, "3", [], ["drift", "no drift"], estimated(0.005), policy, now)
    assert broken.action == "alert"
    # Beyond doubt: a point estimate past the threshold whose interval reaches below it alerts, and retrains nothing.
    unsure = alerts.decide(found, "3", [], [], estimated(0.05), policy, now)
    assert unsure.alert and unsure.action == "alert"


def test_no_estimate_means_no_event_and_says_why() -> None:
    now = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
    missing = WindowEstimate(None, "v3's profile has no performance calibration: `conveyor profile --model 3`")
    decision = alerts.decide(drifted(drift.FOCUS), "3", [], [], missing, MonitorSettings(), now)
    assert not decision.alert and decision.action is None
    assert "conveyor profile --model 3" in decision.reason


def test_retrain_cost_must_be_a_threshold() -> None:
    """At 0 any drift would retrain and the estimate alone could never decide: refused."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="greater than 0"):
        MonitorSettings(retrain_cost=0.0)


def test_persistence_counts_windows_that_do_not_overlap(tmp_path: Path) -> None:
    """`monitor.retrain_after` counts windows of a device's own records: the same window checked again by hand, or
    an hourly check of a 24 h window, is not a new one (three overlapping checks had made a retraining)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    global_uri = mlflow.get_tracking_uri()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("monitoring", artifact_location=(tmp_path / "artifacts").as_uri())
    hour = 3600.0

    def check(start_h: float, end_h: float | None, status: str, device: str = "server") -> None:
        tags = {alerts.MODEL_TAG: "m", alerts.VERSION_TAG: "3", alerts.DEVICE_TAG: device, alerts.STATUS_TAG: status}
        if end_h is not None:
            tags |= {alerts.WINDOW_START_TAG: f"{start_h * hour}", alerts.WINDOW_END_TAG: f"{end_h * hour}"}
        client.create_run(experiment, tags=tags)
        time.sleep(0.01)  # runs are ordered by start time (ms)

    check(0, 24, "drift")  # the first day
    check(24, 48, "no drift")  # the second
    check(25, 49, "drift")  # an hour later: overlaps the second day's window
    check(25, 49, "drift")  # the same window, checked again by hand
    check(0, None, "drift", "folder")  # a folder of images: no window
    check(49, 73, "drift", "cam-2")  # another camera
    statuses = alerts.recent_statuses(client, "monitoring", "m", "3", 3, "server", (49 * hour, 73 * hour))
    assert statuses == ["drift", "drift"]  # the newest window, then the first day's (the overlapping ones skipped)
    # The current check repeats the newest window (run again by hand): that window is not an earlier one.
    assert alerts.recent_statuses(client, "monitoring", "m", "3", 3, "server", (25 * hour, 49 * hour)) == ["drift"]
    # A folder of images has no window: it neither counts nor is counted.
    assert alerts.recent_statuses(client, "monitoring", "m", "3", 3, "server", None) == []
    assert mlflow.get_tracking_uri() == global_uri  # the client's own store, nothing global touched


def test_a_credible_cost_is_drift_even_where_no_input_feature_moved() -> None:
    quiet = drift.DriftResult("no drift", "no drift against reference batch 'all'", 200, groups=[])
    add_performance_group(quiet, estimated(0.2), 0.03)
    assert quiet.status == "drift" and quiet.drifted_groups == ["performance"]
    assert "lost 0.200 mAP50-95" in quiet.message
    unsure = drift.DriftResult("no drift", "", 40, groups=[])
    add_performance_group(unsure, estimated(0.06), 0.03)  # its interval reaches below the threshold
    assert unsure.status == "no drift" and unsure.groups[0].group == "performance" and not unsure.groups[0].drifted


def test_alert_policy_cooldown_and_deduplication() -> None:
    now = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
    policy = MonitorSettings(cooldown_hours=6, dedupe_hours=24)
    found = drifted(drift.EXPOSURE)
    cost = estimated(0.1)
    assert alerts.decide(found, "3", [], [], cost, policy, now).alert
    quiet = drift.DriftResult("no drift", "", 60)
    assert alerts.decide(quiet, "3", [], [], cost, policy, now) == alerts.AlertDecision(False, "no drift")
    thin = drift.DriftResult("insufficient data", "", 5)
    assert not alerts.decide(thin, "3", [], [], cost, policy, now).alert
    recent = [alerts.PastAlert(now - timedelta(hours=2), "2", frozenset({drift.FOCUS}), "retrain")]
    cooling = alerts.decide(found, "3", recent, [], cost, policy, now)
    assert not cooling.alert and cooling.reason.startswith("cooldown")
    assert alerts.decide(found, "3", recent, [], estimated(0.0), policy, now).alert  # an alert only does not wait
    same = [alerts.PastAlert(now - timedelta(hours=10), "3", frozenset({drift.EXPOSURE}), "retrain")]
    duplicate = alerts.decide(found, "3", same, [], cost, policy, now)
    assert not duplicate.alert and duplicate.reason.startswith("duplicate")
    assert alerts.decide(found, "4", same, [], cost, policy, now).alert  # a new version may alert
    other = [alerts.PastAlert(now - timedelta(hours=10), "3", frozenset({drift.FOCUS}), "retrain")]
    assert alerts.decide(found, "3", other, [], cost, policy, now).alert  # drifting another way is news
    stale = [alerts.PastAlert(now - timedelta(hours=30), "3", frozenset({drift.EXPOSURE}), "retrain")]
    assert alerts.decide(found, "3", stale, [], cost, policy, now).alert  # past dedupe_hours: alerted again
    alert_only = [alerts.PastAlert(now - timedelta(hours=10), "3", frozenset({drift.EXPOSURE}), "alert")]
    now_harmful = alerts.decide(found, "3", alert_only, [], cost, policy, now)
    assert now_harmful.alert and now_harmful.action == "retrain"  # an alert-only event does not silence a retrain


def test_alert_history_is_read_back_from_the_tracking_server_after_it_restarts(tmp_path: Path) -> None:
    """What `log_check` and `mark_alert_emitted` write is what `past_alerts` reads — by a new client, from the same
    server restarted on the same store: only emitted alerts of this model since `since`, newest first; and the
    cooldown and de-duplication decide on that history."""
    from mlflow.tracking import MlflowClient

    from conveyor.net import free_port
    from conveyor.paths import ProjectPaths
    from conveyor.settings import Settings
    from monitoring.check import CheckOutcome, log_check, mark_alert_emitted
    from monitoring.current import CurrentData
    from tests.conftest import start_mlflow_server, stop_tree

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    store = tmp_path / "mlflow"
    store.mkdir()
    report_dir = tmp_path / "report"
    report_dir.mkdir()
    (report_dir / "summary.json").write_text("{}")
    paths = ProjectPaths(tmp_path)
    settings = Settings()
    other = settings.model_copy(update={"registry": settings.registry.model_copy(update={"model_name": "other"})})
    name, experiment = settings.registry.model_name, settings.monitor.experiment
    retrain = alerts.AlertDecision(True, "test", "retrain")

    def check(
        version: str,
        groups: tuple[str, ...],
        decision: alerts.AlertDecision,
        emitted: bool,
        on: Settings = settings,
        by_hand: bool = False,
    ) -> str:
        outcome = CheckOutcome(
            on.registry.model_name,
            version,
            drifted(*groups),
            estimated(0.1),
            CurrentData(None, "test window", version),
            decision,
            report_dir,
            "",
            None,
            datetime.now(UTC),
        )
        run_id, _ = log_check(client, paths, on, outcome, sends_events=not by_hand)
        if emitted:
            mark_alert_emitted(client, run_id, f"event-{run_id}")
        time.sleep(0.02)  # distinct start times (ms)
        return run_id

    server = start_mlflow_server(store, port)
    try:
        client = MlflowClient(url)
        check("1", (drift.FOCUS,), retrain, emitted=True)  # before `since`
        since = datetime.now(UTC)
        time.sleep(0.02)
        check("2", (drift.EXPOSURE,), retrain, emitted=True)
        check("2", (drift.EXPOSURE, drift.FOCUS), alerts.AlertDecision(True, "test", "alert"), emitted=True)
        # The flow failed between sending its event and recording it: still `pending`, read back as unrecorded
        # (kept by the check only if Prefect has a retraining for its event: test_monitoring).
        pending = check("2", (drift.FOCUS,), retrain, emitted=False)
        check("2", (), alerts.AlertDecision(False, "no drift"), emitted=False)
        check("2", (drift.FOCUS,), retrain, emitted=True, on=other)  # another model's
        # `conveyor drift` by hand decides as the flow would and sends nothing: its run says so (it said `pending`
        # for good, as if an event were on its way).
        by_hand = check("2", (drift.EXPOSURE,), retrain, emitted=False, by_hand=True)
        assert client.get_run(by_hand).data.tags[alerts.ALERT_TAG] == alerts.NOT_SENT
        stop_tree(server)
        server = start_mlflow_server(store, port)  # the same server, restarted on its store

        found = alerts.past_alerts(MlflowClient(url), experiment, name, since)
        assert [(a.model_version, a.groups, a.action, a.recorded) for a in found] == [
            ("2", frozenset({drift.FOCUS}), "retrain", False),
            ("2", frozenset({drift.EXPOSURE, drift.FOCUS}), "alert", True),
            ("2", frozenset({drift.EXPOSURE}), "retrain", True),
        ]
        assert found[0].event_id == str(alerts.event_id(pending))  # the id its event was sent with
        assert found[0].at >= found[1].at >= found[2].at >= since - timedelta(milliseconds=1)  # start_time: ms
        now = datetime.now(UTC)
        policy = MonitorSettings(cooldown_hours=6, dedupe_hours=24, retrain_after=3)
        cooling = alerts.decide(drifted(drift.EXPOSURE), "2", found, [], estimated(0.1), policy, now)
        assert not cooling.alert and cooling.reason.startswith("cooldown")  # the retrain alert read back
        again = alerts.decide(drifted(drift.EXPOSURE, drift.FOCUS), "2", found, [], estimated(0.0), policy, now)
        assert not again.alert and again.reason.startswith("duplicate")  # the alert-only alert read back
    finally:
        stop_tree(server)


def test_a_runtime_serves_two_threads_at_once(tmp_path: Path) -> None:
    """The server's image and tensor models share a worker's runtime: concurrent calls must not collide (OpenVINO
    refused them: "Infer Request is busy"), and each gets its own outputs."""
    import threading

    from pipelines import runtimes
    from pipelines.export import VARIANTS, export_variant

    model = runtimes.OpenVinoRuntime(export_variant(CHECKPOINT, VARIANTS["openvino"], 320, tmp_path, tmp_path))
    images = [runtimes.letterbox([synth.render_image(SynthSettings(), "test", i)[0]], 320) for i in range(2)]
    expected = [model.infer_with_features(image) for image in images]
    failures: list[BaseException] = []

    def hammer(k: int) -> None:
        try:
            for _ in range(20):
                raw, features = model.infer_with_features(images[k])
                wanted = expected[k][1]
                assert features is not None and wanted is not None
                assert np.array_equal(raw, expected[k][0]) and np.array_equal(features, wanted)
        except BaseException as exc:  # reported below, with the thread's error
            failures.append(exc)

    threads = [threading.Thread(target=hammer, args=(k,)) for k in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures


def test_a_feature_the_reference_never_showed_moves_only_by_a_material_amount() -> None:
    """A clean reference has no clipped pixels at all: a few dark pixels in some current frames are not drift, glare
    over a tenth of many frames is."""
    reference_rows = feature_rows(60, seed=1)
    reference_rows["shadows"] = 0.0
    reference_rows["highlights"] = 0.0
    reference = profile_of(reference_rows)
    speckled = feature_rows(40, seed=2)
    speckled["shadows"] = [0.002 if i % 3 == 0 else 0.0 for i in range(40)]
    speckled["highlights"] = 0.0
    # A class the reference never showed, found in one frame of ten (a small reference, a model learning it).
    speckled["class_counts"] = ['{"dent": 1}' if i % 10 == 0 else "{}" for i in range(40)]
    reference_rows["class_counts"] = "{}"
    assert drift.check(profile_of(reference_rows), speckled, POLICY, report=False).status == "no drift"
    glare = feature_rows(40, seed=3)
    glare["shadows"] = 0.0
    glare["highlights"] = [0.1 if i % 2 else 0.0 for i in range(40)]
    result = drift.check(reference, glare, POLICY, report=False)
    assert result.drifted_groups == [drift.EXPOSURE] and "clipped highlights" in result.message


def test_a_reference_made_at_another_threshold_is_refused_and_says_how_to_fix_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The detections the server logs are counted at serve.conf; a reference counted at another threshold would show
    drift that is only the threshold. The registry is not involved (its part is tested against a real server): the
    version's files are a folder with its profile."""
    from types import SimpleNamespace

    from conveyor.paths import ProjectPaths
    from pipelines import reference
    from pipelines.profile import write_profile

    folder = tmp_path / "model" / "profile"
    card = ModelCard(NAMES, 320, conf=0.25)
    write_profile(folder, feature_rows(12, 0), card, "openvino", None, 4, {})
    files = SimpleNamespace(artifacts={"profile": folder})
    monkeypatch.setattr(reference.source, "fetch", lambda *args: files)
    version = SimpleNamespace(name="defects", version="3", run_id=None, tags={})
    paths = ProjectPaths(tmp_path)
    assert reference.load_reference(None, paths, version, 0.25).meta["conf"] == 0.25  # type: ignore[arg-type]
    with pytest.raises(reference.ProfileMissingError, match=r"profiled at confidence 0.25, and serve.conf is 0.4"):
        reference.load_reference(None, paths, version, 0.4)  # type: ignore[arg-type]


def test_a_source_folder_none_of_whose_images_reads_is_an_error(tmp_path: Path) -> None:
    """It was an "insufficient data" verdict with exit 0, as if the line had been quiet. No image decodes, so the
    model is given none: a stand-in that holds it to that replaces the detector."""

    class NoImagesExpected:
        def run(self, images: list[Any]) -> list[Any]:
            assert not images
            return []

    for name in ("a.jpg", "b.png"):
        (tmp_path / name).write_bytes(b"not an image at all")
    with pytest.raises(current.NoCurrentDataError, match=r"none of the 2 images in .* could be read \(e\.g\. a\.jpg\)"):
        current.from_folder(tmp_path, NoImagesExpected())  # type: ignore[arg-type]


def test_a_small_window_of_a_clean_line_keeps_its_interval() -> None:
    """On a line with few defects (0.05 an image), a bootstrap draw of a small window could resample its object
    rate to nothing: that draw's mAP was NaN, the whole interval NaN, and the estimate was dropped as "no objects to
    score". A synthetic calibration: one class, detections true with the chance their confidence says."""
    from pipelines import performance
    from pipelines.performance import IOU_THRESHOLDS

    rng = np.random.default_rng(0)
    rows, objects = [], []
    for image in range(60):
        found = int(rng.poisson(0.05))
        objects.append([found])
        for _ in range(found + int(rng.poisson(1))):
            confidence = float(rng.uniform(0.01, 1))
            true = rng.random() < confidence
            rows.append([image, 0, confidence, *[float(true and t <= 0.5 + 0.5 * confidence) for t in IOU_THRESHOLDS]])
    table = np.array(rows, dtype=np.float64).reshape(-1, 3 + len(IOU_THRESHOLDS))
    counted = [[int(rng.random() < 0.05)] for _ in range(300)]
    calibration = performance.Calibration(
        ["defect"], 0.01, 60, list(np.mean(counted, axis=0)), performance._fit_curves(table, 1), 0.6,
        table.tolist(), objects, counted,
    )  # fmt: skip
    window = []
    for _ in range(20):
        found = int(rng.poisson(1.5))
        x = rng.uniform(0.1, 0.8, found)
        window.append(
            (list(rng.uniform(0.05, 1, found)), [0] * found, [v for c in x for v in (c, c, c + 0.1, c + 0.1)])
        )
    estimate = performance.estimate(calibration, window, bootstrap=50)
    assert np.isfinite([estimate.low, estimate.high, *estimate.cost_interval]).all(), estimate
    assert estimate.low <= estimate.map50_95 <= estimate.high
