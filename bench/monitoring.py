"""Benchmark: drift monitoring's costs, in one run, one table.

    python -m bench.monitoring            # or: make bench-monitoring

- Feature extraction (images/s): JPEG decode and the image's sample (the server's request path), then the image
  statistics and prediction features (the log writer's part, given the detections, as the server has them); on the
  synthetic generator's 320 px images, one process. The embedding is the model's own output: no cost here.
- The check (`monitoring.drift.check`: the groups' statistics and Evidently's report) for 1k, 10k and 100k current
  rows with embeddings, against a 300-row profile (the default dataset's train + val).
- Trigger latency: a real Prefect server, `conveyor deploy` and `conveyor worker` (orchestration.worker_poll_seconds
  from params.yaml); `conveyor.drift.detected` is emitted and the time until the training flow run is Running is
  read from the run's state history (the server's timestamps).

Writes bench/results/monitoring.json with `images_per_s` (every feature), `check_s_10k` and
`trigger_s` (median of the trigger repeats).
"""

from __future__ import annotations

import statistics
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

import conveyor  # noqa: F401  (offline switches before the ML imports)
from bench.record import host, write_result
from conveyor.net import free_port
from conveyor.paths import available_cores
from conveyor.scaffold import REPO
from conveyor.settings import MonitorSettings, SynthSettings
from tests.conftest import VENV_BIN, base_env, make_project, stop_tree, wait_http
from tests.monitoring_support import feature_rows, profile_of

RESULTS = REPO / "bench" / "results" / "monitoring.json"
CHECKPOINT = REPO / "tests" / "assets" / "yolo11n-defects-320.pt"


def feature_throughput(images: list[bytes], writer: bool) -> float:
    """Images per second through the request path's part (decode, sample) or, with `writer`, also the log writer's
    (the statistics). The model's features come with its inference: nothing to measure here."""
    import cv2

    from pipelines.features import image_features, prediction_features, sample_image
    from pipelines.inference import Detection

    found = [Detection(1, "dent", 0.7, (10.0, 10.0, 60.0, 50.0))]
    started = time.perf_counter()
    for data in images:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        sample = sample_image(image, 320)
        if writer:
            image_features(sample)
            prediction_features(found, image.shape[1], image.shape[0])
    return len(images) / (time.perf_counter() - started)


def check_seconds(rows: int) -> tuple[float, str]:
    from monitoring import drift

    reference = profile_of(feature_rows(300, seed=1))
    current = feature_rows(rows, seed=2)
    started = time.perf_counter()
    result = drift.check(reference, current, MonitorSettings())
    return time.perf_counter() - started, result.status


def trigger_latency(repeats: int, console: Console) -> list[float]:
    """Event -> training flow run Running, through a real Prefect server, automation and worker."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.events import emit_event
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.drift_check import DRIFT_EVENT, model_resource

    work = Path(tempfile.mkdtemp(prefix="bench-monitoring-"))
    name = f"bench-{int(time.time())}"
    project = make_project(work / "project", {"registry": {"model_name": name}})
    port = free_port()
    env = base_env(PREFECT_HOME=str(work / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    log = (work / "server.log").open("wb")
    server = subprocess.Popen(
        [str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    api = f"http://127.0.0.1:{port}/api"
    worker: subprocess.Popen[bytes] | None = None
    latencies: list[float] = []
    try:
        wait_http(f"{api}/health", 180, server)
        project_env = {**env, "PREFECT_API_URL": api}
        subprocess.run(["conveyor", "deploy"], cwd=project, env=project_env, check=True, capture_output=True)
        worker = subprocess.Popen(
            ["conveyor", "worker"], cwd=project, env=project_env,
            stdout=(work / "worker.log").open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        time.sleep(10)  # the worker registers with its pool
        with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            seen: set[str] = set()
            for i in range(repeats):
                emitted = datetime.now(UTC)
                emit_event(
                    DRIFT_EVENT,
                    resource={"prefect.resource.id": model_resource(name), "conveyor.drift.action": "retrain"},
                    payload={"model_version": "1", "action": "retrain", "drifted_groups": ["bench"]},
                )
                from prefect.events.worker import EventsWorker

                EventsWorker.drain_all()
                deadline = time.monotonic() + 120
                running_at = None
                while time.monotonic() < deadline and running_at is None:
                    runs = client.read_flow_runs(
                        deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["scheduled-training"]))
                    )
                    for run in runs:
                        if str(run.id) in seen or run.parameters.get("reason") != "drift":
                            continue
                        states = client.read_flow_run_states(run.id)
                        running = [s.timestamp for s in states if s.type.value == "RUNNING"]
                        if running:
                            running_at = running[0]
                            seen.add(str(run.id))
                            client.set_flow_run_state(run.id, _cancelled(), force=True)
                    time.sleep(0.2)
                if running_at is None:
                    raise TimeoutError(f"repeat {i}: no retraining run was Running within 120 s")
                latencies.append((running_at - emitted).total_seconds())
                console.print(f"trigger {i + 1}: {latencies[-1]:.1f} s")
                time.sleep(3)
    finally:
        if worker is not None:
            stop_tree(worker)
        stop_tree(server)
        log.close()
    return latencies


def _cancelled() -> Any:
    from prefect.states import Cancelled

    return Cancelled(message="benchmark: only the start of the run is measured")


def main() -> None:
    from pipelines import synth

    console = Console()
    folder = Path(tempfile.mkdtemp(prefix="bench-images-"))
    synth.generate(SynthSettings(counts={"train": 0, "val": 0, "test": 400}), folder / "ds", overwrite=True)
    images = [p.read_bytes() for p in sorted((folder / "ds").rglob("*.jpg"))]
    feature_throughput(images[:20], writer=True)  # warm-up: imports and lazy kernels
    plain = max(feature_throughput(images, writer=True) for _ in range(3))
    request = max(feature_throughput(images, writer=False) for _ in range(3))
    check_seconds(1000)  # warm-up: Evidently's imports
    checks = {rows: check_seconds(rows) for rows in (1_000, 10_000, 100_000)}
    triggers = trigger_latency(3, console)
    headline = {
        "images_per_s": round(plain, 1),
        "images_per_s_request_path": round(request, 1),
        "check_s_1k": round(checks[1_000][0], 2),
        "check_s_10k": round(checks[10_000][0], 2),
        "check_s_100k": round(checks[100_000][0], 2),
        "trigger_s": round(statistics.median(triggers), 2),
    }
    table = Table(title=f"monitoring benchmark ({available_cores()} cores)")
    for column in ("measure", "value", "target"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    table.add_row("features, images/s (decode, sample, statistics)", f"{plain:.0f}", ">= 200")
    table.add_row("request path only, images/s (decode, sample)", f"{request:.0f}", "")
    for rows, (seconds, status) in checks.items():
        table.add_row(f"check, {rows:,} rows ({status})", f"{seconds:.2f} s", "<= 10 s" if rows == 10_000 else "")
    table.add_row(
        f"trigger: event -> retraining Running (median of {len(triggers)})",
        f"{statistics.median(triggers):.1f} s (max {max(triggers):.1f})",
        "<= 15 s",
    )
    console.print(table)
    write_result(
        RESULTS,
        {
            **headline,
            "trigger_s_each": [round(t, 2) for t in triggers],
            "worker_poll_seconds": _worker_poll(),
            "host": host(),
        },
        console,
    )


def _worker_poll() -> float:
    from conveyor.settings import load_settings

    return load_settings(REPO / "params.yaml").orchestration.worker_poll_seconds


if __name__ == "__main__":
    main()
