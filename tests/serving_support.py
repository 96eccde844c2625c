"""Shared by the serving tests: a registered model without the training pipeline, and a running server.

The model is Conveyor's own demo checkpoint (tests/assets), exported once per session to ONNX and OpenVINO and
registered the way the pipeline registers (`promotion.log_model_version`), against the real MLflow server.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from conveyor.net import free_port, wait_started
from conveyor.scaffold import REPO
from tests.conftest import VENV_BIN, base_env, make_project, stop_tree

CHECKPOINT = REPO / "tests" / "assets" / "yolo11n-defects-320.pt"
NAMES = ["scratch", "dent", "stain"]


def export_checkpoint(root: Path, weights: Path = CHECKPOINT) -> dict[str, str]:
    """The pyfunc artifacts of a version: ONNX (dynamic batch), OpenVINO, weights and metadata."""
    from pipelines.export import VARIANTS, export_variant

    root.mkdir(parents=True, exist_ok=True)
    onnx = export_variant(weights, VARIANTS["onnx_dynamic"], 320, root, root)
    openvino = export_variant(weights, VARIANTS["openvino"], 320, root, root)
    metadata = root / "metadata.json"
    metadata.write_text(json.dumps({"names": NAMES, "imgsz": 320, "conf": 0.25, "iou": 0.7}))
    return {"metadata": str(metadata), "weights": str(weights), "onnx": str(onnx), "openvino": str(openvino)}


def register(client: MlflowClient, name: str, artifacts: dict[str, str], *, passed: bool = True) -> str:
    from pipelines import registry
    from pipelines.promotion import log_model_version

    experiment = client.get_experiment_by_name("serving-tests")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("serving-tests")
    run = client.create_run(experiment_id)
    registry.ensure_registered_model(client, name)
    tags = {"conveyor.gates.passed": str(passed).lower(), "conveyor.gates.failed": "-" if passed else "mAP50-95"}
    version = log_model_version(client, name, run.info.run_id, artifacts, tags)
    return str(version.version)


@dataclass
class RunningServer:
    url: str
    grpc: str
    tracking_uri: str
    token: str
    name: str
    project: Path
    process: subprocess.Popen[bytes]
    log: Path

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def get(self, path: str, auth: bool = True) -> tuple[int, Any]:
        request = urllib.request.Request(self.url + path, headers=self.headers() if auth else {})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                body = response.read()
                return response.status, json.loads(body) if body.startswith(b"{") else body.decode()
        except urllib.error.HTTPError as exc:
            body = exc.read()
            return exc.code, json.loads(body) if body.startswith(b"{") else body.decode()

    def answers_live(self) -> bool:
        """Whether Conveyor's API answers on this port: {"live": true}. Anything else there (another server's
        Triton answers 200 with no body) is not this server."""
        try:
            return self.get("/v2/health/live", auth=False) == (200, {"live": True})
        except OSError:  # not listening yet
            return False

    def wait_version(self, version: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"the server exited ({self.process.returncode}) waiting for v{version}\n{self.tail()}"
                )
            status, body = self.get("/v2/health/ready")
            if status == 200 and isinstance(body, dict) and body.get("version") == version:
                return
            time.sleep(0.5)
        raise TimeoutError(f"the server did not switch to v{version}: {self.get('/v2/health/ready')}\n{self.tail()}")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def start_server(root: Path, mlflow_server: str, name: str, serve: dict[str, object] | None = None) -> RunningServer:
    port, grpc_port = free_port(), free_port()
    params: dict[str, object] = {
        "registry": {"model_name": name},
        "serve": {"port": port, "grpc_port": grpc_port, "poll_seconds": 1, **(serve or {})},
    }
    project = make_project(root / "project", params)
    token = uuid.uuid4().hex
    log = root / "serve.log"
    process = subprocess.Popen(
        [str(VENV_BIN / "conveyor"), "serve"],
        cwd=project,
        env=base_env(MLFLOW_TRACKING_URI=mlflow_server, CONVEYOR_SERVE_TOKEN=token),
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = RunningServer(
        f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}", mlflow_server, token, name, project, process, log
    )
    try:
        wait_started(f"{server.url}/v2/health/live", server.answers_live, 120, process)
    except Exception as exc:
        stop_tree(process)
        raise AssertionError(f"server did not start: {exc}\n{server.tail()}") from exc
    return server
