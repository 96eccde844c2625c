"""Helpers of the end-to-end flow tests (test_flow.py, test_faults.py): a small project, its commands, its records."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path
from typing import Any

import yaml
from mlflow.tracking import MlflowClient

from conveyor.net import wait_until
from conveyor.scaffold import REPO
from pipelines import registry
from tests.conftest import base_env, make_project

CHECKPOINT = REPO / "tests" / "assets" / "yolo11n-defects-320.pt"
# The default drift check runs on the hour: a test that deploys and straddles one got a scheduled check (and its
# alert) in the middle. The tests' deployments check at 04:30 on 29 February instead; test_monitoring checks that
# the deployed schedule is the params'.
RARE_CRON = "30 4 29 2 *"


def flow_params(model_name: str) -> dict[str, Any]:
    return {
        "synth": {"seed": 3, "image_size": 320, "counts": {"train": 16, "val": 8, "test": 16}},
        "train": {
            "weights": str(CHECKPOINT),
            "epochs": 1,
            "imgsz": 320,
            "batch": 8,
            "close_mosaic": 0,
            "plots": False,  # seconds a run, in every flow test; test_pipeline_e2e checks them
            # A gentle fine-tune that keeps what the checkpoint knows (it starts from weights: train.finetune applies),
            # for train.epochs (null), so that a test's set_params(train={"epochs": 30}) is what runs.
            "finetune": {
                "epochs": None,
                "extra": {"optimizer": "SGD", "lr0": 0.0001, "warmup_epochs": 0, "mosaic": 0.0},
            },
        },
        "evaluate": {"batch": 8},
        "export": {"formats": ["onnx_dynamic", "openvino"], "parity_images": 4, "latency": {"warmup": 1, "runs": 5}},
        # Only the regression gate can fail in these tests: the tiny models say nothing about real thresholds, and
        # two test workers share the cores (the latency gate's own tests are in test_gate.py).
        "gates": {
            "min_map50_95": 0.0,
            "min_map50": 0.0,
            "min_class_recall": 0.0,
            "regression_tolerance": 0.05,
            "parity_max_delta": 0.05,
            "latency_ratio": 100.0,
        },
        "registry": {"model_name": model_name},
        "tracking": {"experiment": "flow-tests"},
        "monitor": {"schedule": RARE_CRON},
    }


def make_flow_project(tmp_path: Path) -> tuple[Path, str]:
    """A project on the flow tests' params with synthetic data committed; returns it and its model's name."""
    name = f"defects-{uuid.uuid4().hex[:8]}"
    project = make_project(tmp_path / "project", flow_params(name))
    env = base_env()
    subprocess.run(["conveyor", "data", "synth"], cwd=project, env=env, check=True, capture_output=True)
    subprocess.run(["git", "add", "-A"], cwd=project, check=True)
    subprocess.run(["git", "commit", "-qm", "data"], cwd=project, check=True)
    return project, name


def servers_env(mlflow_server: str, prefect_server: str, **extra: str) -> dict[str, str]:
    return base_env(MLFLOW_TRACKING_URI=mlflow_server, PREFECT_API_URL=prefect_server, **extra)


def conveyor(project: Path, env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["conveyor", *args], cwd=project, env=env, capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"conveyor {' '.join(args)} failed:\n{result.stdout[-5000:]}\n{result.stderr[-5000:]}")
    return result


def set_params(project: Path, **sections: dict[str, Any]) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def champion_version(client: MlflowClient, name: str) -> str | None:
    champion = registry.current_champion(client, name)
    return str(champion.version) if champion else None


def wait_for(predicate: Any, timeout: float, what: str, poll: float = 0.5) -> None:
    wait_until(predicate, timeout, what, poll)


def flow_run_state(api: str, flow_run_id: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as prefect:
        state = prefect.read_flow_run(uuid.UUID(flow_run_id)).state
    assert state is not None
    return state.type.value
