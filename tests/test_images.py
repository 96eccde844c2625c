"""The images of infra/docker, built by `make images` (podman) and run as a team runs them: `make test-images`.

The server image serves the registry's champion from a real MLflow server on the host, with the bearer token, to
Triton's own clients over HTTP and gRPC and to `/predict`, as uid 10001 on a read-only root filesystem with a
volume for `.conveyor/`; it reports live before any champion exists (ready only after), and a SIGTERM stops it in
under 10 s without failing a request it accepted. The worker image runs Conveyor's CLI with its DVC and Prefect, and
runs the training deployment against the host's Prefect and MLflow servers. infra/compose.yaml comes up with
podman-compose (PostgreSQL and MinIO stood in for), and a training run started from the host reaches its model
server.

Not part of `make test`: the two images take about 15 minutes to build here and 12 GB of disk (uv.lock's torch is
the CUDA build). Run with `make test-images`; the tests fail (never skip) when the images are missing.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from prefect.client.schemas.objects import FlowRun

from conveyor import storage
from conveyor.net import free_port, port_free, wait_until
from conveyor.scaffold import REPO
from pipelines import registry
from serving.app import GRPC_TOKEN_HEADER
from stack.images import PODMAN, POSTGRES_STAND_IN, ULIMITS
from tests.conftest import VENV_BIN, nanio_store
from tests.flow_support import flow_run_state
from tests.serving_support import export_checkpoint, register

pytestmark = pytest.mark.images
SERVER_IMAGE = "localhost/conveyor-server:latest"
MODEL = "conveyor-defect-detector"  # what the image's params.yaml serves: this session's MLflow server registers it
HOST_FROM_CONTAINER = "10.0.2.2"  # slirp4netns' address of the host's loopback (allow_host_loopback=true)
WORKER_IMAGE = "localhost/conveyor-worker:latest"
INFRA_COMPOSE = REPO / "infra" / "compose.yaml"


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {result.stderr[-3000:]}")
    return result


def require(image: str) -> None:
    assert podman("image", "exists", image, check=False).returncode == 0, f"{image} missing: run `make images`"


@dataclass
class Container:
    name: str
    url: str
    grpc: str
    token: str
    model: str = MODEL  # the image's params.yaml: registry.model_name

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def status(self, path: str) -> int:
        request = urllib.request.Request(self.url + path, headers=self.headers())
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    def logs(self) -> str:
        """The container's output without Triton's start-up tables."""
        lines = _logs(self.name, tail=None).splitlines()
        return "\n".join(line for line in lines if not line.startswith(("I1", "+", "|", "W1", "E1")))[-4000:]


def run_server(name: str, mlflow_server: str, token: str, *extra: str) -> tuple[int, int]:
    """The server image as shipped (its CMD, ports 8080 and 8081 inside), on a network of its own with the ports
    published on the host's loopback; the host's MLflow server is reached through slirp4netns' gateway to it."""
    port, grpc_port = free_port(), free_port()
    registry_uri = mlflow_server.replace("127.0.0.1", HOST_FROM_CONTAINER)
    podman(
        "run", "--detach", "--name", name, *ULIMITS,
        "--network", "slirp4netns:allow_host_loopback=true",
        "--publish", f"127.0.0.1:{port}:8080", "--publish", f"127.0.0.1:{grpc_port}:8081",
        "--read-only", "--tmpfs", "/tmp", *extra,
        "--env", f"MLFLOW_TRACKING_URI={registry_uri}", "--env", f"CONVEYOR_SERVE_TOKEN={token}",
        SERVER_IMAGE,
    )  # fmt: skip
    return port, grpc_port


@pytest.fixture
def server_container(mlflow_server: str, tmp_path: Path) -> Iterator[Container]:
    """The server image, read-only, its state on a named volume, no champion yet."""
    require(SERVER_IMAGE)
    name = f"conveyor-test-{uuid.uuid4().hex[:8]}"
    token = uuid.uuid4().hex
    podman("volume", "create", name)
    try:
        port, grpc_port = run_server(name, mlflow_server, token, "--volume", f"{name}:/app/.conveyor")
        container = Container(name, f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}", token)
        wait_until(lambda: container.status("/v2/health/live") == 200, 180, "the container to answer")
        yield container
    finally:
        podman("rm", "--force", "--time", "5", name, check=False)
        podman("volume", "rm", "--force", name, check=False)


def test_a_read_only_container_without_a_volume_says_what_to_mount(mlflow_server: str) -> None:
    require(SERVER_IMAGE)
    name = f"conveyor-test-{uuid.uuid4().hex[:8]}"
    try:
        run_server(name, mlflow_server, "token")
        assert podman("wait", name, timeout=120).stdout.strip() == "1"
        logs = podman("logs", name).stderr + podman("logs", name).stdout
        assert "is not writable" in logs and "mount a writable volume there" in logs and "Traceback" not in logs
    finally:
        podman("rm", "--force", name, check=False)


def test_the_server_image_serves_the_champion_as_the_process_does(
    server_container: Container, mlflow_server: str, tmp_path: Path
) -> None:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    from conveyor.settings import SynthSettings
    from pipelines.synth import generate

    server = server_container
    # Live, not ready, before the registry has a champion; the image's health check says healthy all the same.
    assert server.status("/v2/health/ready") == 503
    assert podman("healthcheck", "run", server.name, check=False).returncode == 0, server.logs()
    # As uid 10001, on a read-only root filesystem.
    assert podman("exec", server.name, "id", "-u").stdout.strip() == "10001"
    denied = podman("exec", server.name, "touch", "/app/conveyor/x", check=False)
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr

    client = MlflowClient(mlflow_server)
    version = register(client, server.model, export_checkpoint(tmp_path / "export"))
    registry.promote(client, server.model, version, reason="container test", actor="user:test")
    wait_until(lambda: server.status("/v2/health/ready") == 200, 180, f"the champion to be served\n{server.logs()}")

    generate(SynthSettings(seed=11, counts={"train": 0, "val": 0, "test": 2}), tmp_path / "images")
    image = sorted((tmp_path / "images" / "images" / "test").glob("*.jpg"))[0].read_bytes()
    request = urllib.request.Request(
        server.url + "/predict", data=image, headers={"Content-Type": "image/jpeg", **server.headers()}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        served = json.loads(response.read())
    assert served["model"]["version"] == version and len(served["images"]) == 1
    data = np.array([[image]], dtype=object)
    http = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    tensor = httpclient.InferInput("image", [1, 1], "BYTES")
    tensor.set_data_from_numpy(data, binary_data=True)
    over_http = http.infer(server.model, [tensor], headers=server.headers())
    grpc = grpcclient.InferenceServerClient(server.grpc)
    gtensor = grpcclient.InferInput("image", [1, 1], "BYTES")
    gtensor.set_data_from_numpy(data)
    over_grpc = grpc.infer(server.model, [gtensor], headers={GRPC_TOKEN_HEADER: server.token})
    detections = len(served["images"][0]["detections"])
    assert int(over_http.as_numpy("num_detections")[0]) == detections == int(over_grpc.as_numpy("num_detections")[0])
    # The prediction log is on the volume: what the drift check reads.
    logged = podman("exec", server.name, "sh", "-c", "ls /app/.conveyor/predictions 2>/dev/null | head -1")
    wait_until(
        lambda: podman("exec", server.name, "sh", "-c", "ls /app/.conveyor/predictions").stdout.strip(),
        30,
        f"the prediction log on the volume ({logged.stdout!r})",
    )

    # SIGTERM under load: it stops within 10 s, and no request it accepted fails.
    outcomes: list[int] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                with urllib.request.urlopen(
                    urllib.request.Request(
                        server.url + "/predict", data=image, headers={"Content-Type": "image/jpeg", **server.headers()}
                    ),
                    timeout=30,
                ) as answer:
                    outcomes.append(answer.status)
            except urllib.error.HTTPError as exc:
                outcomes.append(exc.code)
            except OSError:  # refused: the server no longer accepts connections (not a failed request)
                time.sleep(0.05)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(3)
    started = time.monotonic()
    podman("kill", "--signal", "TERM", server.name)
    podman("wait", server.name, timeout=30)
    stopped = time.monotonic() - started
    stop.set()
    for thread in threads:
        thread.join(timeout=40)
    assert stopped < 10, f"SIGTERM took {stopped:.1f} s\n{server.logs()}"
    assert outcomes and all(code in (200, 503) for code in outcomes), sorted(set(outcomes))
    assert outcomes.count(200) >= 4


def tiny_training_params() -> dict[str, Any]:
    """The image's own params.yaml with a tiny training: 1 epoch at 96 px from scratch, no thresholds."""
    params: dict[str, Any] = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"].update({"epochs": 1, "imgsz": 96, "close_mosaic": 0})
    params["export"].update({"formats": ["onnx_dynamic", "openvino"], "parity_images": 4})
    params["export"]["latency"] = {"warmup": 1, "runs": 3}
    params["gates"].update({"min_map50_95": 0.0, "min_map50": 0.0, "min_class_recall": 0.0, "latency_ratio": 100.0})
    params["tracking"]["experiment"] = "image-tests"
    return params


def worker_params(model_name: str) -> str:
    """Tiny training, with this test's model, work pool and deployment names: nothing else on the servers is
    touched."""
    params = tiny_training_params()
    params["registry"]["model_name"] = model_name
    params["orchestration"].update({"work_pool": f"pool-{model_name}", "deployment": f"train-{model_name}"})
    params["monitor"]["deployment"] = f"drift-{model_name}"
    return yaml.safe_dump(params, sort_keys=False)


def test_the_worker_image_runs_the_training_deployment(mlflow_server: str, prefect_server: str, tmp_path: Path) -> None:
    """As infra/compose.yaml runs it: `conveyor deploy && exec conveyor worker` in the worker image, against the host's
    Prefect and MLflow servers and an S3 store (nanio) as the DVC remote. A run of its training deployment, started
    from the host, pulls the demo data, trains, gates, promotes and pushes, all inside the container."""
    require(WORKER_IMAGE)
    name = f"img-{uuid.uuid4().hex[:8]}"
    params = tmp_path / "params.yaml"
    params.write_text(worker_params(name))
    with nanio_store(tmp_path / "s3", "worker") as s3:
        keys = (s3["AWS_ACCESS_KEY_ID"], s3["AWS_SECRET_ACCESS_KEY"])
        storage.client(s3["AWS_ENDPOINT_URL"], credentials=keys).create_bucket(Bucket="team")
        endpoint = s3["AWS_ENDPOINT_URL"].replace("127.0.0.1", HOST_FROM_CONTAINER)
        podman(
            "run", "--detach", "--name", name, *ULIMITS, "--network", "slirp4netns:allow_host_loopback=true",
            "--volume", f"{params}:/app/params.yaml:ro",
            "--env", f"MLFLOW_TRACKING_URI={mlflow_server.replace('127.0.0.1', HOST_FROM_CONTAINER)}",
            "--env", f"PREFECT_API_URL={prefect_server.replace('127.0.0.1', HOST_FROM_CONTAINER)}",
            "--env", "CONVEYOR_DVC_REMOTE=s3://team/dvc", "--env", f"AWS_ENDPOINT_URL={endpoint}",
            "--env", f"AWS_ACCESS_KEY_ID={s3['AWS_ACCESS_KEY_ID']}",
            "--env", f"AWS_SECRET_ACCESS_KEY={s3['AWS_SECRET_ACCESS_KEY']}",
            WORKER_IMAGE, "sh", "-c", "conveyor deploy && exec conveyor worker",
        )  # fmt: skip
        try:
            flow_run = run_training(prefect_server, f"conveyor-training/train-{name}", name, lambda: _logs(name))
        finally:
            logs = _logs(name)
            podman("rm", "--force", "--time", "10", name, check=False)
        # The champion's run is the flow run's (lineage), trained in the container (its data version, no git there).
        client = MlflowClient(mlflow_server)
        champion = registry.current_champion(client, name)
        assert champion is not None and champion.version == "1" and champion.run_id, logs
        tags = client.get_run(champion.run_id).data.tags
        assert tags["conveyor.prefect_flow_run_id"] == str(flow_run.id), tags
        assert tags["conveyor.data_md5"] == yaml.safe_load((REPO / "data.dvc").read_text())["outs"][0]["md5"]
        # The demo data seeded the empty team remote (1201 files), and the run pushed its outputs beside it.
        pushed = storage.list_keys(storage.S3Location("team", "dvc"), s3["AWS_ENDPOINT_URL"], keys)
        assert len(pushed) > 1201, len(pushed)


def run_training(api: str, deployment: str, worker: str, logs: Callable[[], str]) -> FlowRun:
    """Once the worker container's `conveyor deploy` has registered `deployment`: a run of it started from the host,
    waited for, and COMPLETED (`logs` says why not)."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings

    def deployed() -> bool:
        _assert_running(worker)
        try:
            with get_client(sync_client=True) as client:
                client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            return False
        return True

    with temporary_settings(updates={PREFECT_API_URL: api}):
        wait_until(deployed, 300, f"`conveyor deploy` in {worker}\n{logs()}")
        flow_run = run_deployment(deployment, timeout=0, parameters={"reason": "test"})
    assert isinstance(flow_run, FlowRun)
    final = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
    wait_until(lambda: flow_run_state(api, str(flow_run.id)) in final, 900, "the run to end", 2)
    assert flow_run_state(api, str(flow_run.id)) == "COMPLETED", logs()
    return flow_run


def _assert_running(container: str) -> None:
    state = podman("inspect", "--format", "{{.State.Status}}", container, check=False).stdout.strip()
    assert state in ("running", "created", "configured", ""), f"{container} is {state}\n{_logs(container)}"


def _logs(container: str, tail: int | None = 5000) -> str:
    found = podman("logs", container, check=False)
    text = found.stdout + found.stderr
    return text[-tail:] if tail else text


def test_the_worker_image_runs_the_cli_with_its_tools() -> None:
    require(WORKER_IMAGE)
    found = podman("run", "--rm", "--network", "host", *ULIMITS, WORKER_IMAGE, "conveyor", "--help", timeout=300)
    assert "Usage: conveyor" in found.stdout and "serve" in found.stdout and "drift" in found.stdout, found.stdout
    tools = podman(
        "run", "--rm", "--network", "host", *ULIMITS, "--entrypoint", "sh", WORKER_IMAGE, "-c",
        "id -u && dvc --version && prefect version | head -1",
        timeout=300,
    )  # fmt: skip
    lines = tools.stdout.split()
    assert lines[0] == "10001" and lines[1].startswith("3.")


# --- infra/compose.yaml under podman-compose ------------------------------------------------------------------------

# Every service but Prometheus and Grafana, whose images no registry here serves. PostgreSQL and MinIO are stand-ins
# (an override file, written by the test): Debian's PostgreSQL behind the official image's entrypoint contract
# (`make images` builds it) and nanio, an S3 server from PyPI that the worker image carries.
COMPOSE_SERVICES = ["postgres", "minio", "bucket-init", "mlflow", "prefect-server", "worker", "model-server"]
COMPOSE_PORTS = (5000, 4200, 8080, 8081, 9001)  # what compose.yaml publishes on the host


class ComposeProject:
    """podman-compose with this host's podman flags. podman 4.3 cannot run health checks (it schedules them with
    systemd, which these hosts lack) and its dependency graph fails on a dependency's own dependencies, so `up`
    starts one service at a time, in compose's order, after waiting for each of its `depends_on` conditions as
    compose would: a health check run until it passes (what systemd's timer would run), a one-shot's exit code 0."""

    def __init__(self, name: str, files: list[Path], env_file: Path) -> None:
        self.name = name
        self.base = [str(VENV_BIN / "podman-compose"), "--podman-args", " ".join(PODMAN[1:]),
                     "--podman-run-args", " ".join(ULIMITS), "-p", name, "--env-file", str(env_file)]  # fmt: skip
        for file in files:
            self.base += ["-f", str(file)]
        self.config: dict[str, Any] = yaml.safe_load(self.compose("config").stdout)

    def compose(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*self.base, *args], capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise AssertionError(f"podman-compose {' '.join(args)}: {(result.stderr or result.stdout)[-3000:]}")
        return result

    def container(self, service: str) -> str:
        return f"{self.name}_{service}_1"

    def up(self, services: list[str]) -> None:
        for service in services:
            for dependency, rule in self.config["services"][service].get("depends_on", {}).items():
                self.wait_for(dependency, rule["condition"])
            self.compose("up", "--detach", "--no-deps", service)

    def wait_for(self, service: str, condition: str) -> None:
        name = self.container(service)
        if condition == "service_healthy":
            wait_until(lambda: self._healthy(name), 300, f"{service} to be healthy\n{_logs(name)}", interval=2)
        elif condition == "service_completed_successfully":
            code = podman("wait", name, timeout=300).stdout.strip()
            assert code == "0", f"{service} exited {code}\n{_logs(name)}"

    def _healthy(self, name: str) -> bool:
        _assert_running(name)
        return podman("healthcheck", "run", name, check=False, timeout=60).returncode == 0

    def logs(self) -> str:
        return "\n".join(f"--- {s}\n{_logs(self.container(s))[-1500:]}" for s in self.config["services"])


def compose_override(tmp_path: Path, params: Path) -> Path:
    """The stand-ins, and a tiny training (1 epoch at 96 px) so that the test's run takes a minute. `!override`
    (Compose Specification): the stand-in's health check replaces MinIO's `mc ready` instead of joining it."""
    path = tmp_path / "compose.podman.yaml"
    path.write_text(
        f"""services:
  postgres:
    image: {POSTGRES_STAND_IN}
  minio:
    image: conveyor-worker:local
    user: "0:0"  # the volume at /data is root's, as with MinIO's image
    entrypoint:
      - sh
      - -c
      - NANIO_ACCESS_KEY="$$MINIO_ROOT_USER" NANIO_SECRET_KEY="$$MINIO_ROOT_PASSWORD"
        exec nanio serve --host 0.0.0.0 --port 9000 --data-dir /data
    healthcheck: !override
      test: ["CMD", "python", "-c", "import socket; socket.create_connection(('127.0.0.1', 9000), 4)"]
      interval: 5s
      timeout: 5s
      retries: 30
  worker:
    volumes:
      - {params}:/app/params.yaml:ro
"""
    )
    return path


def test_compose_brings_the_stack_up_and_a_training_run_reaches_the_model_server(tmp_path: Path) -> None:
    """infra/compose.yaml as a team starts it (`compose up` with infra/.env filled in), the images of `make images`:
    the worker registers the deployments; a run of the training deployment, started from the host through the
    published Prefect port, trains, promotes and pushes to the S3 store; the model server, not ready until then,
    loads the champion by itself and answers /predict with the token."""
    import secrets

    from conveyor.settings import SynthSettings
    from pipelines.synth import generate

    for image in (WORKER_IMAGE, SERVER_IMAGE, POSTGRES_STAND_IN):
        require(image)
    for port in COMPOSE_PORTS:
        assert port_free(port), f"compose publishes 127.0.0.1:{port}, which something on this host holds"
    podman("tag", WORKER_IMAGE, "localhost/conveyor-worker:local")  # the names compose.yaml gives them
    podman("tag", SERVER_IMAGE, "localhost/conveyor-server:local")
    secret_keys = ("POSTGRES_PASSWORD", "MLFLOW_DB_PASSWORD", "PREFECT_DB_PASSWORD", "AWS_SECRET_ACCESS_KEY",
                   "CONVEYOR_SERVE_TOKEN", "GRAFANA_ADMIN_PASSWORD")  # fmt: skip
    env = {key: secrets.token_hex(12) for key in secret_keys} | {"S3_BUCKET": "conveyor", "AWS_ACCESS_KEY_ID": "team"}
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{key}={value}\n" for key, value in env.items()))
    params = tmp_path / "params.yaml"
    tiny = tiny_training_params()  # the image's model, pool and deployment names, as compose runs it
    params.write_text(yaml.safe_dump(tiny, sort_keys=False))
    model, deployment = tiny["registry"]["model_name"], f"conveyor-training/{tiny['orchestration']['deployment']}"

    project = ComposeProject(
        f"ctest{uuid.uuid4().hex[:6]}", [INFRA_COMPOSE, compose_override(tmp_path, params)], env_file
    )
    try:
        project.up(COMPOSE_SERVICES)
        server = Container(project.container("model-server"), "http://127.0.0.1:8080", "127.0.0.1:8081",
                           env["CONVEYOR_SERVE_TOKEN"], model)  # fmt: skip
        wait_until(lambda: server.status("/v2/health/live") == 200, 300, f"the model server\n{project.logs()}")
        assert server.status("/v2/health/ready") == 503  # no champion yet
        run_training("http://127.0.0.1:4200/api", deployment, project.container("worker"), project.logs)

        # The champion, its artifacts through the MLflow server (in the S3 store behind it), and the model server.
        client = MlflowClient("http://127.0.0.1:5000")
        champion = registry.current_champion(client, model)
        assert champion is not None and champion.version == "1" and champion.run_id
        import mlflow

        weights = mlflow.artifacts.download_artifacts(
            run_id=champion.run_id, artifact_path="weights/best.pt", tracking_uri=client.tracking_uri,
            dst_path=str(tmp_path / "download"),
        )  # fmt: skip
        assert Path(weights).stat().st_size > 1_000_000
        wait_until(lambda: server.status("/v2/health/ready") == 200, 300, f"the champion served\n{project.logs()}")
        generate(SynthSettings(seed=11, counts={"train": 0, "val": 0, "test": 1}), tmp_path / "images")
        frame = next((tmp_path / "images" / "images" / "test").glob("*.jpg")).read_bytes()
        request = urllib.request.Request(
            server.url + "/predict", data=frame, headers={"Content-Type": "image/jpeg", **server.headers()}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            assert json.loads(response.read())["model"]["version"] == "1"
        # DVC's remote in the S3 store, as the worker sees it: the demo data seeded (1201 files), and the run's outputs.
        count = "from conveyor import storage; print(len(storage.list_keys(storage.S3Location('conveyor', 'dvc'))))"
        pushed = podman("exec", project.container("worker"), "python", "-c", count)
        assert int(pushed.stdout.strip()) > 1201, pushed.stdout
    finally:
        logs = project.logs()
        project.compose("down", "--volumes", timeout=300)
        (tmp_path / "compose.log").write_text(logs)


def test_a_rebuild_removes_what_it_left_untagged_and_no_other_image(tmp_path: Path) -> None:
    """`make images` removes the image a tag named before and its build stage's layers (gigabytes a rebuild), but no
    untagged image that was there before it started: another project's build cache is not Conveyor's to prune."""
    from stack.images import remove_untagged_since, untagged_images

    tag = f"localhost/conveyor-prune-test-{uuid.uuid4().hex[:8]}"
    other = f"localhost/another-project-{uuid.uuid4().hex[:8]}"
    (tmp_path / "Dockerfile").write_text(
        "FROM scratch AS build\nCOPY part /part\nFROM scratch\nCOPY --from=build /part /b\n"
    )

    def build(name: str, content: str) -> str:
        (tmp_path / "part").write_text(content)
        podman("build", "--format", "docker", "--layers", "-t", name, str(tmp_path), timeout=120)
        return podman("image", "inspect", "--format", "{{.Id}}", name).stdout.strip()

    def exists(image: str) -> bool:
        return podman("image", "exists", image, check=False).returncode == 0

    as_found = untagged_images()
    try:
        others_old = build(other, f"another project's {uuid.uuid4()}")
        build(other, f"another project's rebuild {uuid.uuid4()}")  # its old image is now untagged: not ours
        assert exists(others_old)
        first = build(tag, f"ours {uuid.uuid4()}")
        before = untagged_images()
        assert any(others_old in image for image in before)
        second = build(tag, f"ours, rebuilt {uuid.uuid4()}")
        left = untagged_images() - before
        assert any(first in image for image in left), "the rebuild left nothing untagged: nothing was tested"

        assert remove_untagged_since(before) == []
        assert not exists(first) and exists(second)
        assert untagged_images() - before == set(), "a layer of the rebuild was left behind"
        assert exists(others_old), "another project's untagged image was removed"
    finally:  # the host as found
        podman("rmi", "--force", tag, other, check=False)
        remove_untagged_since(as_found)
