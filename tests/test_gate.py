"""The gates that the flow tests loosen, each failing a model it should fail: the worst class's recall, export parity
(detections and the features output), and latency judged against the champion on the same host, with real
runtimes: a model as fast as the champion passes on a busy host, a slower one fails."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conveyor.settings import GateSettings
from pipelines import gate, runtimes
from pipelines.evaluate import ClassMetrics, Evaluation
from tests.load_support import busy_with_bursts, latency_exports


def evaluation(recalls: dict[str, float]) -> Evaluation:
    per_class: dict[str, ClassMetrics | None] = {
        name: ClassMetrics(0.8, 0.5, 0.8, recall, 10) for name, recall in recalls.items()
    }
    return Evaluation("test", 60, 0.8, 0.5, 0.8, 0.8, per_class, {})


def test_the_worst_class_decides_the_recall_gate() -> None:
    cfg = GateSettings(min_class_recall=0.5)
    passed = gate.absolute_gates(evaluation({"scratch": 0.6, "dent": 0.9}), cfg)
    assert all(g.passed for g in passed)
    blind = gate.absolute_gates(evaluation({"scratch": 0.2, "dent": 0.99}), cfg)
    recall = next(g for g in blind if g.gate == "min class recall")
    assert not recall.passed and recall.value == "0.200" and recall.detail == "worst class: scratch"
    # A class the test split does not hold cannot be checked: the gate fails closed, naming it.
    absent = evaluation({"scratch": 0.9})
    absent.per_class["dent"] = None
    unknown = next(g for g in gate.absolute_gates(absent, cfg) if g.gate == "min class recall")
    assert not unknown.passed and "no test instances of dent" in unknown.detail, unknown
    # A recall that is not a number fails, whichever order the classes come in (min() kept the first it met).
    for order in ({"dent": 0.9, "scratch": float("nan")}, {"scratch": float("nan"), "dent": 0.9}):
        nan = next(g for g in gate.absolute_gates(evaluation(order), cfg) if g.gate == "min class recall")
        assert not nan.passed and "recall of scratch is not a number" in nan.detail, nan


def test_parity_fails_an_export_that_scores_or_sees_differently() -> None:
    cfg = GateSettings(serving_formats=["openvino"], parity_max_delta=0.01, features_max_rel_diff=0.05)
    good = {"delta_map50_95": -0.004, "max_abs_diff": 1.2, "features_rel_diff": 0.017, "latency_p95_ms": 9.0}
    rows = gate.export_gates({"exports": {"openvino": good}, "imgsz": 320}, cfg)
    assert [g.passed for g in rows] == [True, True]
    worse = {**good, "delta_map50_95": -0.03}
    assert not gate.export_gates({"exports": {"openvino": worse}}, cfg)[0].passed
    better = {**good, "delta_map50_95": +0.03}  # scoring differently either way: it is not the model tested
    assert not gate.export_gates({"exports": {"openvino": better}}, cfg)[0].passed
    blind = {**good, "features_rel_diff": 0.2}
    features = gate.export_gates({"exports": {"openvino": blind}}, cfg)[1]
    assert not features.passed and features.gate == "features parity openvino" and features.value == "20.00%"
    missing = gate.export_gates({"exports": {}, "skipped": {"openvino": "failed to export"}}, cfg)
    assert not missing[0].passed and missing[0].detail == "failed to export"


def test_latency_is_judged_against_the_champion_and_a_declared_target() -> None:
    cfg = GateSettings(latency_ratio=1.1)
    same = gate.LatencyComparison.from_pairs([40.0, 41.0, 39.0, 80.0, 40.0, 40.0, 42.0], [38.0] * 7)
    (row,) = gate.latency_gates(cfg, same, "", 40.0, "a slow host")
    assert row.passed and row.value == "1.05x" and "median of 7 back-to-back pairs on this host" in row.detail
    assert "95 % CI 1.03-2.11x" in row.detail  # one pair hit by a burst widens the interval, not the median
    slower = gate.LatencyComparison.from_pairs([60.0] * 7, [38.0] * 7)
    assert not gate.latency_gates(cfg, slower, "", 60.0, "a slow host")[0].passed
    (first,) = gate.latency_gates(cfg, None, "no champion yet: nothing to compare with", 40.0, "host")
    assert first.passed and first.detail.startswith("no champion yet")
    target = GateSettings.model_validate({"latency_target": {"hardware": "EPYC 9R14", "budget_ms": 20}})
    there = gate.latency_gates(target, same, "", 40.0, "AMD EPYC 9R14 96-Core Processor, AVX-512")[1]
    assert not there.passed and there.value == "40.0 ms"  # on the target, the budget holds
    elsewhere = gate.latency_gates(target, same, "", 40.0, "Intel(R) Xeon(R) Processor, AMX")[1]
    assert elsewhere.passed and elsewhere.value == "not checked" and "the budget is for EPYC 9R14" in elsewhere.detail
    # Whole words of one part of the host: a budget for an L4 was checked on an L40S, one for an A10 on an A100.
    assert gate.hardware_matches("L4", "AMD EPYC 7R13, AVX2, NVIDIA L4")
    assert not gate.hardware_matches("L4", "AMD EPYC 7R13, AVX2, NVIDIA L40S")
    assert not gate.hardware_matches("A10", "Intel(R) Xeon(R), AVX-512, NVIDIA A100-SXM4-80GB")
    assert gate.hardware_matches("epyc 9r14", "AMD EPYC 9R14 96-Core Processor, AVX-512")


def test_a_model_without_its_serving_export_fails_the_latency_gate(tmp_path: Path) -> None:
    """With a champion to compare with and no export of the serving runtime, the latency gate passed ("no openvino
    export of this model"): the model would be served on a runtime nobody measured."""
    from conveyor.paths import ProjectPaths
    from conveyor.settings import Settings

    export = {"imgsz": 320, "exports": {}, "skipped": {"openvino": "failed to export: disk full"}}
    (row,) = gate.side_by_side_latency(ProjectPaths(tmp_path), Settings(), export, "1", False, None, "")
    assert not row.passed and row.detail == "no openvino export of this model to measure: failed to export: disk full"
    # The first model too: it passed ("no champion yet") where serving_runtime was not in serving_formats, so that
    # no parity gate failed it either (refused now: tests/test_settings.py).
    (first,) = gate.side_by_side_latency(ProjectPaths(tmp_path), Settings(), export, None, False, None, "")
    assert not first.passed and first.detail == row.detail
    measured = {"imgsz": 320, "exports": {"openvino": {"path": "x", "latency_p95_ms": 9.0}}}
    (no_champion,) = gate.side_by_side_latency(ProjectPaths(tmp_path), Settings(), measured, None, False, None, "")
    assert no_champion.passed and no_champion.detail.startswith("no champion yet")


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return latency_exports(tmp_path_factory.mktemp("latency"))


@pytest.fixture
def busy_host() -> Iterator[None]:
    """Other work on the host while the gate measures: one core kept busy, and another process's bursts of work."""
    with busy_with_bursts():
        yield


def test_a_model_as_fast_as_the_champion_passes_on_a_busy_host(exports: dict[str, Path], busy_host: None) -> None:
    sample = np.full((1, 3, 320, 320), 114 / 255, np.float32)
    comparison = gate.compare_latency(
        partial(runtimes.OpenVinoRuntime, exports["same"]),
        partial(runtimes.OpenVinoRuntime, exports["champion"]),
        sample,
        3,
        20,
    )
    (row,) = gate.latency_gates(GateSettings(), comparison, "", comparison.challenger_ms, "busy")
    assert row.passed, (row, comparison)


def test_a_slower_model_fails_the_latency_gate(exports: dict[str, Path]) -> None:
    sample = np.full((1, 3, 320, 320), 114 / 255, np.float32)
    comparison = gate.compare_latency(
        partial(runtimes.OpenVinoRuntime, exports["larger"]),
        partial(runtimes.OpenVinoRuntime, exports["champion"]),
        sample,
        3,
        20,
    )
    (row,) = gate.latency_gates(GateSettings(), comparison, "", comparison.challenger_ms, "host")
    assert not row.passed and comparison.ratio > 1.5, (row, comparison)


def test_each_model_is_timed_at_the_size_it_serves(exports: dict[str, Path]) -> None:
    """A challenger trained at 640 px against a 320 px champion. Dynamic exports take any size: both timed at the
    challenger's size read alike, and the gate passed a model about three times slower in service."""
    from conveyor.paths import ProjectPaths
    from conveyor.settings import Settings

    settings = Settings.model_validate({"export": {"latency": {"warmup": 1, "runs": 5}}})  # 30 pairs: 3x apart
    challenger = exports["same"]  # the same network; trained at 640 px, it is served at 640
    export = {"imgsz": 640, "exports": {"openvino": {"path": challenger.name, "latency_p95_ms": 1.0}}}
    args = (ProjectPaths(challenger.parent), settings, export, "1", False, exports["champion"], "")
    (row,) = gate.side_by_side_latency(*args, 320)
    assert not row.passed and "this model at 640 px, the champion at 320 px" in row.detail, row
    (same_size,) = gate.side_by_side_latency(*args, 640)  # a champion served at 640 too: the same model, as fast
    assert same_size.passed and "px" not in same_size.detail.split("ms")[-1], same_size


def test_export_parity_scores_openvino_in_the_precision_it_serves(exports: dict[str, Path]) -> None:
    """The export stage scores each export through Ultralytics' validator, whose OpenVINO backend compiles with its own
    config: bf16 on CPUs that have it (this one, AVX-512 bf16), while the server runs f32. In the block, every
    compile is f32; after it, OpenVINO is as it was."""
    import openvino as ov

    from conveyor.yolo import load_yolo

    original = ov.Core.compile_model
    with runtimes.openvino_f32():
        model = load_yolo(str(exports["champion"]))
        model.predict(np.zeros((320, 320, 3), np.uint8), imgsz=320, verbose=False)
        predictor: Any = model.predictor
        compiled = predictor.model.backend.ov_compiled_model
        assert str(compiled.get_property("INFERENCE_PRECISION_HINT")) == "<Type: 'float32'>"
    assert ov.Core.compile_model is original


def test_openvino_threads_are_left_unpinned_and_rounds_balance_the_opening_order(exports: dict[str, Path]) -> None:
    # Pinned threads cannot leave a core that other work landed on (bench/latency_gate.py): 5x slower there.
    assert runtimes.OpenVinoRuntime(exports["champion"])._compiled.get_property("ENABLE_CPU_PINNING") is False
    pinned = runtimes.OpenVinoRuntime(exports["champion"], pin_threads=True)
    assert pinned._compiled.get_property("ENABLE_CPU_PINNING") is True
    sample = np.full((1, 3, 320, 320), 114 / 255, np.float32)
    opened = partial(runtimes.OpenVinoRuntime, exports["champion"])
    with pytest.raises(ValueError, match="rounds must be even"):
        gate.compare_latency(opened, opened, sample, 0, 1, rounds=3)
    assert gate.compare_latency(opened, opened, sample, 0, 3, rounds=2).pairs == 6


def test_a_champion_that_cannot_be_re_scored_fails_the_regression_gate(tmp_path: Path) -> None:
    """A champion registered by hand (no run) or whose run lost its weights made the gate stage crash, and with it
    every later training run, where a failed gate says what to do. Without the champion's weights the regression
    gate fails, naming why and the way out; before, weights of None read as "no champion yet" and passed."""
    import json

    from conveyor.paths import ProjectPaths
    from conveyor.settings import Settings

    paths = ProjectPaths(tmp_path)
    for folder, name, content in (
        (paths.evaluate, "evaluation.json", evaluation({"scratch": 0.9, "dent": 0.9}).to_json()),
        (paths.export, "export.json", {"imgsz": 320, "exports": {}}),
        (paths.validation, "manifest.json", {"names": ["scratch", "dent"]}),
    ):
        folder.mkdir(parents=True)
        (folder / name).write_text(json.dumps(content))
    why = "conveyor-defect-detector v4's MLflow run abc has no weights/best.pt"
    report = gate.evaluate_gates(paths, Settings(), None, "4", "run", champion_weights_missing=why)
    regression = next(g for g in report.gates if g.gate == "no regression vs champion")
    assert not report.passed and not regression.passed
    assert why in regression.detail and "--force" in regression.detail and "conveyor rollback" in regression.detail
