"""End to end: `dvc repro` in a fresh git+DVC project on tiny data, tracked on a real MLflow server.

Proves: every stage's artifacts and DVC metrics, the MLflow run's params / per-epoch metrics / artifacts / lineage
tags, no network attempt beyond loopback, raw data untouched, a no-op re-run, and that changing train.epochs
re-runs train and what follows but not validate.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import run_cmd

pytestmark = pytest.mark.slow


def _dvc(project: Path, env: dict[str, str], *args: str) -> str:
    return run_cmd([sys.executable, "-m", "dvc", *args], project, env).stdout


def test_dvc_repro_end_to_end(project: Path, mlflow_server: str, netguard_env: tuple[dict[str, str], Path]) -> None:
    env, netlog = netguard_env
    env = {**env, "MLFLOW_TRACKING_URI": mlflow_server}

    run_cmd(["conveyor", "data", "synth"], project, env)
    data_md5 = yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"]
    run_cmd(["git", "add", "-A"], project, env)
    run_cmd(["git", "commit", "-qm", "tiny synthetic data"], project, env)
    commit = run_cmd(["git", "rev-parse", "HEAD"], project, env).stdout.strip()

    first = _dvc(project, env, "repro")
    for stage in ("validate", "train", "evaluate", "export", "profile", "gate"):
        assert f"Running stage '{stage}'" in first

    # --- artifacts and DVC metrics ---
    report = json.loads((project / "artifacts/validation/report.json").read_text())
    assert report["ok"] and report["errors"] == 0
    assert report["counts"]["train"]["accepted"] == 16
    assert (project / "artifacts/train/weights/best.pt").is_file()
    assert (project / "artifacts/train/results.csv").is_file()
    assert (project / "artifacts/evaluate/confusion_matrix.png").is_file()
    evaluation = json.loads((project / "metrics/evaluate.json").read_text())
    assert evaluation["split"] == "test"
    assert 0.0 <= evaluation["mAP50-95"] <= evaluation["mAP50"] <= 1.0
    assert set(evaluation["per_class"]) == {"scratch", "dent", "stain"}
    export = json.loads((project / "artifacts/export/export.json").read_text())
    assert set(export["exports"]) == {"onnx", "onnx_dynamic", "openvino"}
    assert (project / "artifacts/export/onnx/model.onnx").is_file()
    assert (project / "artifacts/export/onnx_dynamic/model.onnx").is_file()
    assert list((project / "artifacts/export/openvino").rglob("*.xml"))
    assert export["exports"]["onnx"]["max_abs_diff"] < 1e-2  # fp32 ONNX matches PyTorch's raw outputs
    assert "tensorrt" in export["skipped"] and export["skipped"]["tensorrt"]
    # The drift reference: every train and val image, with its features, predictions and the model's own features.
    profile = pd.read_parquet(project / "artifacts/profile/profile.parquet")
    assert len(profile) == 16 + 8 and set(profile["split"]) == {"train", "val"} and set(profile["batch"]) == {"base"}
    summary = json.loads((project / "artifacts/profile/profile.json").read_text())
    dims = summary["embedding"]["dims"]  # the model's pooled Detect-head inputs: its channels at P3+P4+P5
    assert profile["brightness"].between(1, 254).all() and {len(v) for v in profile["embedding"]} == {dims}
    assert dims > 0 and summary["embedding"]["components"] <= dims
    assert (project / "artifacts/profile/embedding.npz").is_file() and summary["calibration"]["images"] == 8
    metrics_show = _dvc(project, env, "metrics", "show")
    assert "mAP50-95" in metrics_show and "metrics/evaluate.json" in metrics_show
    plots = json.loads(_dvc(project, env, "plots", "show", "--json"))["data"]
    assert {"mAP", "loss", "artifacts/evaluate/confusion_matrix_normalized.png"} <= set(plots)

    # --- the MLflow run: one for the whole pipeline ---
    run_id = json.loads((project / "artifacts/train/run.json").read_text())["run_id"]
    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert run.data.params["train.epochs"] == "2"
    assert run.data.params["data.train_images"] == "16"
    history = client.get_metric_history(run_id, "metrics/mAP50-95")
    assert [m.step for m in history] == [1, 2]
    assert "train/box_loss" in run.data.metrics
    assert "best/metrics/mAP50-95" in run.data.metrics  # best.pt re-validated, not logged as an extra epoch
    assert "test/mAP50-95" in run.data.metrics  # evaluate logged into the same run
    assert "export/onnx/delta_mAP50-95" in run.data.metrics  # so did export
    assert "latency_ms/openvino" in run.data.metrics
    assert run.data.tags["conveyor.data_md5"] == data_md5
    assert run.data.tags["conveyor.git_commit"] == commit
    assert run.data.tags["conveyor.git_dirty"] == "false"
    assert len(run.data.tags["conveyor.params_hash"]) == 12
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"weights", "train", "train_plots", "evaluate", "export"} <= artifacts
    assert {a.path for a in client.list_artifacts(run_id, "weights")} >= {"weights/best.pt", "weights/last.pt"}
    assert "export/onnx/model.onnx" in {a.path for a in client.list_artifacts(run_id, "export/onnx")}

    # --- offline: nothing but loopback was ever contacted ---
    assert netlog.read_text() == "", f"network attempts:\n{netlog.read_text()}"

    # --- raw data untouched, and a no-op re-run ---
    assert _dvc(project, env, "status", "data.dvc").strip().endswith("up to date.")
    again = _dvc(project, env, "repro")
    assert "Running stage" not in again
    assert json.loads((project / "artifacts/train/run.json").read_text())["run_id"] == run_id

    # --- train.epochs changes: train and what follows re-run, validate does not ---
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["epochs"] = 1  # fewer than before: the cheapest change that re-runs training
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    rerun = _dvc(project, env, "repro")
    assert "Running stage 'validate'" not in rerun
    for stage in ("train", "evaluate", "export", "profile"):
        assert f"Running stage '{stage}'" in rerun
    new_run_id = json.loads((project / "artifacts/train/run.json").read_text())["run_id"]
    assert new_run_id != run_id
    assert len(client.get_metric_history(new_run_id, "metrics/mAP50-95")) == 1
    assert netlog.read_text() == ""

    # --- an export that fails part way leaves no figures of the run before in metrics/ ---
    assert (project / "metrics/export.json").is_file()
    shutil.rmtree(project / ".conveyor/export-eval", ignore_errors=True)
    (project / ".conveyor/export-eval").write_text("a file where the stage scores its exports: it cannot")
    failed = subprocess.run(
        [sys.executable, "-m", "dvc", "repro", "--force", "--single-item", "export"],
        cwd=project, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert failed.returncode != 0, failed.stdout[-2000:]
    assert not (project / "metrics/export.json").exists(), "the last run's export figures were left for this model"
