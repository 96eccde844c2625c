"""`conveyor serve` for real: a server process on a registered model in a real MLflow server, called with real
clients (urllib, tritonclient over HTTP and gRPC), scraped by a real Prometheus, fuzzed by schemathesis.

One server for the module, started before any champion exists, so the tests run in order: not ready → ready on
the first promotion → predictions agree across clients → bad input → hot swap under load → rollback → a version
that fails to load → metrics in Prometheus → the prediction log → fuzzing.
"""

from __future__ import annotations

import io
import itertools
import json
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from conveyor.net import free_port
from conveyor.paths import ProjectPaths
from pipelines import registry
from tests.conftest import stop_tree, wait_http
from tests.serving_support import NAMES, RunningServer, export_checkpoint, register, start_server

pytestmark = pytest.mark.slow

MAX_IMAGE_BYTES = 2_000_000
SERVE_PARAMS = {
    "max_image_bytes": MAX_IMAGE_BYTES,
    "max_image_pixels": 1_000_000,
    "max_batch_size": 4,
    "prediction_log": {"flush_seconds": 0.5, "keep_frames": 1.0},
}


@pytest.fixture(scope="session")
def serving_artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return export_checkpoint(tmp_path_factory.mktemp("serving-export"))


@pytest.fixture(scope="session")
def test_images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A few synthetic defect images (the generator Conveyor's demo data comes from), 320 and 480x360 px."""
    from conveyor.settings import SynthSettings
    from pipelines.synth import generate

    root = tmp_path_factory.mktemp("serving-images")
    settings = SynthSettings(seed=11, image_size=320, counts={"train": 0, "val": 0, "test": 6})
    generate(settings, root)
    images = sorted((root / "images" / "test").glob("*.jpg"))
    wide = root / "wide.png"  # a non-square PNG: boxes must come back in its own pixels
    Image.open(images[0]).resize((480, 360)).save(wide)
    return [*images, wide]


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, mlflow_server: str, serving_artifacts: dict[str, str]
) -> Iterator[RunningServer]:
    name = f"served-{uuid.uuid4().hex[:8]}"
    client = MlflowClient(mlflow_server)
    register(client, name, serving_artifacts)  # v1, not yet champion
    register(client, name, serving_artifacts)  # v2
    running = start_server(tmp_path_factory.mktemp("serve"), mlflow_server, name, SERVE_PARAMS)
    yield running
    stop_tree(running.process)


@pytest.fixture
def client(mlflow_server: str) -> MlflowClient:
    return MlflowClient(mlflow_server)


def post_images(server: RunningServer, images: list[Path], auth: bool = True) -> tuple[int, dict[str, Any]]:
    boundary = uuid.uuid4().hex
    body = io.BytesIO()
    for path in images:
        body.write(f"--{boundary}\r\nContent-Disposition: form-data; name=files; filename={path.name}\r\n".encode())
        body.write(b"Content-Type: application/octet-stream\r\n\r\n" + path.read_bytes() + b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    return post_raw(server, "/predict", body.getvalue(), f"multipart/form-data; boundary={boundary}", auth)


def post_raw(
    server: RunningServer, path: str, body: bytes, content_type: str, auth: bool = True
) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": content_type, **(server.headers() if auth else {})}
    request = urllib.request.Request(server.url + path, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, {**json.loads(response.read()), "_headers": response.headers}
    except urllib.error.HTTPError as exc:
        return exc.code, {**json.loads(exc.read() or b"{}"), "_headers": exc.headers}


def boxes(found: list[dict[str, Any]]) -> list[tuple[int, float, list[float]]]:
    return [(d["class_id"], d["confidence"], d["box"]) for d in found]


def assert_same_detections(a: list[dict[str, Any]], b: list[dict[str, Any]], tol: float = 0.05) -> None:
    assert len(a) == len(b), (a, b)
    for (ca, sa, ba), (cb, sb, bb) in zip(boxes(a), boxes(b), strict=True):
        assert ca == cb and abs(sa - sb) < 1e-3 and np.allclose(ba, bb, atol=tol), (a, b)


# --- in order: the server's life -----------------------------------------------------------------------------------


def test_live_but_not_ready_without_champion_then_ready_on_promotion(
    server: RunningServer, client: MlflowClient, test_images: list[Path]
) -> None:
    assert server.get("/v2/health/live", auth=False) == (200, {"live": True})
    status, body = server.get("/v2/health/ready", auth=False)
    assert status == 503 and "champion" in body["reason"] and body["ready"] is False
    status, body = post_images(server, test_images[:1])
    assert status == 503 and "not ready" in body["error"] and body["_headers"]["Retry-After"] == "1"
    # A model's readiness with a version was Triton's own, which said ready with nothing loaded.
    for route in (f"/v2/models/{server.name}/ready", f"/v2/models/{server.name}/versions/1/ready"):
        status, body = server.get(route)
        assert status == 503 and body["ready"] is False, (route, body)

    registry.promote(client, server.name, "1", reason="first champion", actor="user:test")
    server.wait_version("1")
    status, body = post_images(server, test_images[:1])
    assert status == 200 and body["model"] == {"name": server.name, "version": "1"}


def test_predict_matches_evaluation_code_and_both_triton_clients(
    server: RunningServer, test_images: list[Path], serving_artifacts: dict[str, str]
) -> None:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    from pipelines.inference import Detector, ModelCard, decode_image
    from pipelines.runtimes import OpenVinoRuntime
    from serving.model import detections_from_outputs

    status, body = post_images(server, test_images)
    assert status == 200, body
    assert body["_headers"]["X-Model-Version"] == "1"
    served = [image["detections"] for image in body["images"]]
    assert sum(len(d) for d in served) > 0, "the demo checkpoint finds defects in demo images"
    wide = body["images"][-1]
    assert (wide["width"], wide["height"]) == (480, 360)
    assert all(0 <= d["box"][0] <= d["box"][2] <= 480 and 0 <= d["box"][3] <= 360 for d in wide["detections"])

    # In-process, the same detector code on the same export: what /predict returned, exactly.
    card = ModelCard.load(Path(serving_artifacts["metadata"]))
    detector = Detector(OpenVinoRuntime(Path(serving_artifacts["openvino"])), card)
    local = detector.detect([decode_image(p.read_bytes()) for p in test_images])
    for found, mine in zip(served, local, strict=True):
        assert_same_detections(found, [d.to_json() for d in mine])

    data = np.array([[p.read_bytes()] for p in test_images[:3]], dtype=object)
    # HTTP (binary tensor extension) through the API's /v2, with the bearer token.
    http = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    metadata = http.get_model_metadata(server.name, headers=server.headers())
    assert metadata["inputs"][0]["name"] == "image" and metadata["conveyor"]["version"] == "1"
    tensor = httpclient.InferInput("image", [3, 1], "BYTES")
    tensor.set_data_from_numpy(data, binary_data=True)
    outputs = [httpclient.InferRequestedOutput(n, binary_data=True) for n in ("detections", "num_detections")]
    result = http.infer(server.name, [tensor], outputs=outputs, headers=server.headers())
    over_http = detections_from_outputs(result.as_numpy("detections"), result.as_numpy("num_detections"), card.names)
    # The client's request compression: the API inflates the body (against the body limit: Triton would inflate it
    # without one) and passes it on plain; an answer asked for compressed comes back decoded, as the client reads it.
    for compression in ("gzip", "deflate"):
        packed = http.infer(
            server.name, [tensor], outputs=outputs, headers=server.headers(),
            request_compression_algorithm=compression, response_compression_algorithm=compression,
        )  # fmt: skip
        assert (packed.as_numpy("num_detections") == result.as_numpy("num_detections")).all()
    # gRPC, straight to Triton, with its access token header.
    grpc = grpcclient.InferenceServerClient(server.grpc)
    token = {"triton-grpc-protocol-triton-access-token": server.token}
    assert grpc.get_model_metadata(server.name, headers=token).inputs[0].datatype == "BYTES"
    gtensor = grpcclient.InferInput("image", [3, 1], "BYTES")
    gtensor.set_data_from_numpy(data)
    gresult = grpc.infer(server.name, [gtensor], headers=token)
    over_grpc = detections_from_outputs(gresult.as_numpy("detections"), gresult.as_numpy("num_detections"), card.names)
    assert [v.decode() for v in gresult.as_numpy("model_version").reshape(-1)] == ["1", "1", "1"]
    for i in range(3):
        assert_same_detections(over_http[i], served[i])
        assert_same_detections(over_grpc[i], served[i])

    # The preprocessed-tensor model: FP32 letterboxed input, boxes in input pixels.
    from pipelines.runtimes import load_images

    ttensor = grpcclient.InferInput("images", [1, 3, 320, 320], "FP32")
    ttensor.set_data_from_numpy(load_images(test_images[:1], 320))
    tresult = grpc.infer(server.name + "_preprocessed", [ttensor], headers=token)
    assert_same_detections(
        detections_from_outputs(tresult.as_numpy("detections"), tresult.as_numpy("num_detections"), card.names)[0],
        served[0],
    )


def test_token_guards_everything_but_health(server: RunningServer, test_images: list[Path]) -> None:
    status, body = post_images(server, test_images[:1], auth=False)
    assert status == 401 and "bearer token" in body["error"]
    assert server.get("/metrics", auth=False)[0] == 401
    assert server.get(f"/v2/models/{server.name}", auth=False)[0] == 401
    assert server.get("/v2/health/ready", auth=False)[0] == 200
    # A wrong token, the right one under another scheme, or without one: refused as no token is.
    for wrong in ("Bearer not-the-token", f"Basic {server.token}", server.token, f"Bearer {server.token}x"):
        for method, path in (("GET", "/metrics"), ("GET", f"/v2/models/{server.name}"), ("POST", "/predict")):
            request = urllib.request.Request(server.url + path, headers={"Authorization": wrong}, method=method)
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, data=b"" if method == "POST" else None, timeout=30)
            assert refused.value.code == 401, (wrong, path)


def test_the_serving_token_infers_but_cannot_load_a_model(server: RunningServer) -> None:
    """The serving token opened Triton's administrative extensions too, through /v2 and on the gRPC port: a client
    could load a model with its own model.py (code run on the server), or unload the one served while the API still
    said ready. They take PyTriton's own random token now; the API does not pass them on."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    grpc = grpcclient.InferenceServerClient(server.grpc)
    token = {"triton-grpc-protocol-triton-access-token": server.token}
    assert grpc.get_model_metadata(server.name, headers=token).name == server.name  # what the token is for
    assert grpc.get_model_config(server.name, headers=token).config.name == server.name
    for refused in (
        lambda: grpc.unload_model(server.name, headers=token),
        lambda: grpc.load_model("another", headers=token),
        lambda: grpc.get_model_repository_index(headers=token),
        lambda: grpc.get_log_settings(headers=token),
        lambda: grpc.get_inference_statistics(headers=token),
    ):
        with pytest.raises(InferenceServerException, match="restricted"):
            refused()
    with pytest.raises(InferenceServerException, match="restricted"):
        grpc.get_model_metadata(server.name)  # and nothing without the token
    for path in ("/v2/repository/models/another/load", f"/v2/repository/models/{server.name}/unload"):
        status, answer = post_raw(server, path, b"{}", "application/json")
        assert status == 404 and "not served here" in answer["error"], answer
    assert grpc.is_model_ready(server.name, headers=token)


def _bomb_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (2000, 2000)).save(buffer, "PNG")  # 4 Mpx in a few kB: over the 1 Mpx limit
    return buffer.getvalue()


def _multipart(*parts: tuple[str, str | None, bytes]) -> tuple[bytes, str]:
    """A multipart body of (field name, file name or None for a text field, content) parts."""
    boundary = "conveyor-test-boundary"
    body = b"".join(
        f"--{boundary}\r\nContent-Disposition: form-data; name={name}{f'; filename={filename}' if filename else ''}"
        f"\r\n\r\n".encode()
        + content
        + b"\r\n"
        for name, filename, content in parts
    )
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


BAD_UPLOADS: dict[str, tuple[bytes, str, int, str]] = {
    "non-image bytes": (b"this is not an image" * 10, "image/jpeg", 400, "not a JPEG or PNG"),
    "zero-byte body": (b"", "image/jpeg", 400, "empty body"),
    "decompression bomb": (_bomb_png(), "image/png", 400, "over the limit of 1000000"),
    "wrong content type": (b"{}", "application/json", 415, "content type 'application/json'"),
    "body over the size limit": (b"\xff\xd8\xff" + b"0" * 2_100_000, "image/jpeg", 413, "over the limit"),
    "malformed multipart": (
        b"--b\r\nContent-Disposition: form-data\r\n\r\nno end", "multipart/form-data; boundary=b", 400,
        "could not read the multipart body",
    ),
    "a text field": (*_multipart(("note", None, b"hello")), 400, "form field 'note' is text"),
    "no file parts": (*_multipart(), 400, "no images in the multipart body"),
    "more files than max_images_per_request": (
        *_multipart(*[("files", f"{n}.jpg", b"x") for n in range(33)]), 400, "Too many files",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_upload_is_a_clear_4xx_and_serving_goes_on(
    server: RunningServer, test_images: list[Path], case: str
) -> None:
    body, content_type, expected, message = BAD_UPLOADS[case]
    status, answer = post_raw(server, "/predict", body, content_type)
    assert status == expected and message in answer["error"], answer
    assert post_images(server, test_images[:1])[0] == 200


def test_truncated_jpeg_is_refused(server: RunningServer, test_images: list[Path], tmp_path: Path) -> None:
    data = test_images[0].read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) * 2 // 3])
    status, answer = post_images(server, [cut])
    assert status == 400 and "cut.jpg" in answer["error"] and "truncated" in answer["error"].lower()


# Each refusal names what was wrong (Triton's words, passed through): the input, its shape, its type, the model.
V2_BAD: dict[str, tuple[str, dict[str, Any], int, str]] = {
    "wrong tensor name": (
        "{name}",
        {"inputs": [{"name": "img", "shape": [1, 1], "datatype": "BYTES", "data": ["x"]}]},
        400,
        "unexpected inference input 'img'",
    ),
    "wrong shape": (
        "{name}",
        {"inputs": [{"name": "image", "shape": [1, 2, 3], "datatype": "BYTES", "data": ["x"]}]},
        400,
        "unexpected shape for input 'image'",
    ),
    "wrong datatype": (
        "{name}",
        {"inputs": [{"name": "image", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]},
        400,
        "data-type is 'FP32'",
    ),
    "unknown model": (
        "no-such-model",
        {"inputs": [{"name": "image", "shape": [1, 1], "datatype": "BYTES", "data": ["x"]}]},
        404,
        "unknown model 'no-such-model'",
    ),
}


@pytest.mark.parametrize("case", list(V2_BAD))
def test_bad_v2_request_is_a_4xx(server: RunningServer, test_images: list[Path], case: str) -> None:
    model, request, expected, said = V2_BAD[case]
    path = f"/v2/models/{model.format(name=server.name)}/infer"
    status, answer = post_raw(server, path, json.dumps(request).encode(), "application/json")
    assert status == expected and said in answer.get("error", ""), answer
    assert post_images(server, test_images[:1])[0] == 200


def test_v2_body_over_the_limit_is_a_413(server: RunningServer, test_images: list[Path]) -> None:
    """One v2 request is one batch at most: max_batch_size images' worth (it was /predict's 32 images' worth, 640 MB
    by default, held twice when gzipped)."""
    limit = MAX_IMAGE_BYTES * SERVE_PARAMS["max_batch_size"]  # type: ignore[operator]
    status, answer = post_raw(server, f"/v2/models/{server.name}/infer", b"{" + b" " * limit + b"}", "application/json")
    assert status == 413 and "over the limit" in answer["error"]
    assert post_images(server, test_images[:1])[0] == 200


def test_a_chunked_multipart_body_over_the_limit_is_a_413(server: RunningServer, test_images: list[Path]) -> None:
    """A chunked upload has no Content-Length to refuse up front: it is counted as it arrives and refused as soon
    as it passes the limit (it was spooled whole, then refused image by image with a 400)."""
    import http.client
    import urllib.parse

    limit = MAX_IMAGE_BYTES * 32  # max_images_per_request's default
    boundary = "conveyor-test-boundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="big.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    address = urllib.parse.urlsplit(server.url)
    connection = http.client.HTTPConnection(address.hostname or "127.0.0.1", address.port, timeout=120)
    connection.putrequest("POST", "/predict")
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}", "Transfer-Encoding": "chunked"}
    for key, value in {**headers, **server.headers()}.items():
        connection.putheader(key, value)
    connection.endheaders()
    chunk = b"\xff" * (1 << 20)
    try:
        connection.send(b"%x\r\n%s\r\n" % (len(head), head))
        for _ in range(limit // len(chunk) + 2):
            connection.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        connection.send(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered before the body ended
    response = connection.getresponse()
    assert response.status == 413 and "over the limit" in json.loads(response.read())["error"]
    connection.close()
    assert post_images(server, test_images[:1])[0] == 200


def test_v2_non_image_bytes_fail_only_that_image(server: RunningServer, test_images: list[Path]) -> None:
    """A garbage image in a v2 batch gets its own error output; the good image beside it is still detected."""
    import tritonclient.grpc as grpcclient

    grpc = grpcclient.InferenceServerClient(server.grpc)
    tensor = grpcclient.InferInput("image", [2, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[b"garbage"], [test_images[0].read_bytes()]], dtype=object))
    result = grpc.infer(server.name, [tensor], headers={"triton-grpc-protocol-triton-access-token": server.token})
    errors = [e.decode() for e in result.as_numpy("error").reshape(-1)]
    assert "not a JPEG or PNG" in errors[0] and errors[1] == ""
    assert result.as_numpy("num_detections").reshape(-1)[1] > 0


class Load:
    """Clients posting images in a loop; every answer is recorded (status and the version that answered)."""

    def __init__(self, server: RunningServer, images: list[Path], clients: int = 4) -> None:
        self.server, self.images = server, images
        self.results: list[tuple[int, str]] = []
        self.raw: list[tuple[int, dict[str, Any]]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(i,)) for i in range(clients)]

    def _loop(self, i: int) -> None:
        n = 0
        while not self._stop.is_set() and n < 2000:
            status, body = post_images(self.server, [self.images[(i + n) % len(self.images)]])
            if status != 200 and len(self.raw) < 50:
                self.raw.append((status, body))
            self.results.append((status, body.get("model", {}).get("version", body.get("error", ""))))
            n += 1

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)


def test_hot_swap_and_rollback_under_load_lose_no_request(
    server: RunningServer, client: MlflowClient, test_images: list[Path]
) -> None:
    with Load(server, test_images) as load:
        time.sleep(1)
        registry.promote(client, server.name, "2", reason="better model", actor="user:test")
        server.wait_version("2")
        time.sleep(1)
    statuses = Counter(status for status, _ in load.results)
    versions = Counter(version for _, version in load.results)
    assert statuses == {200: len(load.results)}, statuses
    assert set(versions) == {"1", "2"}, versions

    with Load(server, test_images) as load:
        time.sleep(1)
        registry.rollback(client, server.name, reason="v2 misses dents", actor="user:test")
        server.wait_version("1")
        time.sleep(1)
    assert Counter(status for status, _ in load.results) == {200: len(load.results)}
    assert {version for _, version in load.results} == {"1", "2"}


def test_version_that_fails_to_load_leaves_the_old_one_serving(
    server: RunningServer, client: MlflowClient, serving_artifacts: dict[str, str], test_images: list[Path]
) -> None:
    broken = {k: v for k, v in serving_artifacts.items() if k != "openvino"}  # nothing for the OpenVINO runtime
    version = register(client, server.name, broken)
    registry.promote(client, server.name, version, reason="broken on purpose", actor="user:test", force=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status, body = server.get(f"/v2/models/{server.name}")
        if (body["conveyor"]["last_error"] or "").startswith(f"v{version} failed to load"):
            break
        time.sleep(0.5)
    assert "no 'openvino' artifact" in body["conveyor"]["last_error"], body["conveyor"]
    assert body["conveyor"]["version"] == "1"
    status, answer = post_images(server, test_images[:1])
    assert status == 200 and answer["model"]["version"] == "1"
    metrics = server.get("/metrics")[1]
    assert "conveyor_model_load_failures_total 1.0" in metrics or "conveyor_model_load_failures_total 2.0" in metrics
    registry.rollback(client, server.name, reason="undo the broken version", actor="user:test")


def test_prometheus_scrapes_the_metrics(server: RunningServer, tmp_path: Path, test_images: list[Path]) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("Prometheus is not installed (`make test` installs Debian's `prometheus` where it can)")
    for _ in range(3):
        assert post_images(server, test_images[:2])[0] == 200
    port = free_port()
    (tmp_path / "token").write_text(server.token)
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: conveyor\n"
        f"    authorization: {{credentials_file: {tmp_path / 'token'}}}\n"
        f"    static_configs: [{{targets: ['{server.url.removeprefix('http://')}']}}]\n"
    )
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/-/ready", 60, process)

        def query(expr: str) -> list[dict[str, Any]]:
            url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
            with urllib.request.urlopen(url, timeout=10) as response:
                return list(json.loads(response.read())["data"]["result"])

        deadline = time.monotonic() + 60
        expressions = [
            'conveyor_http_requests_total{route="/predict",status="200"}',
            "conveyor_batch_size_count",
            "conveyor_detections_total",
            'conveyor_model_info{version="1"}',
            "nv_inference_count",
        ]
        found: dict[str, list[dict[str, Any]]] = {}
        while time.monotonic() < deadline and len(found) < len(expressions):
            for expr in expressions:
                result = query(expr)
                if result:
                    found[expr] = result
            time.sleep(1)
        assert set(found) == set(expressions), f"missing in Prometheus: {set(expressions) - set(found)}"
        assert float(found[expressions[0]][0]["value"][1]) >= 3
        assert {r["metric"]["class_name"] for r in found["conveyor_detections_total"]} <= {"scratch", "dent", "stain"}

        # Every panel of the Grafana dashboard (infra/grafana) shows data from this server. The drift panels read
        # the gauges a drift check leaves for the server's /metrics: written here by the drift check's own writer
        # from a constructed result (the drift computation itself is tested in test_monitoring).
        from monitoring.check import write_gauges
        from monitoring.drift import EXPOSURE, DriftResult, FeatureDrift, GroupDrift
        from tests.monitoring_support import outcome_of
        from tests.test_infra import grafana_queries

        checked = DriftResult(
            "no drift",
            "constructed for the dashboard test",
            40,
            100,
            "all",
            [FeatureDrift("brightness", EXPOSURE, "K-S, Wasserstein", 0.4, 1.0, 0.3, False, 0.5, 0.5)],
            [GroupDrift(EXPOSURE, False, 0.4, "brightness", "")],
        )
        paths = ProjectPaths(server.project)
        write_gauges(paths.drift_gauges, outcome_of(checked, server.name, "1", paths.monitoring))
        missing = set(grafana_queries("1m"))
        deadline = time.monotonic() + 60
        while missing and time.monotonic() < deadline:
            missing = {expr for expr in missing if not query(expr)}
            if missing:
                time.sleep(1)
        assert not missing, f"dashboard queries with no data: {sorted(missing)}"
    finally:
        stop_tree(process)


def test_prediction_log_records_what_the_model_saw(server: RunningServer, test_images: list[Path]) -> None:
    from pipelines.features import (
        EMBEDDING,
        IMAGE_FEATURES,
        PREDICTION_FEATURES,
        SCORE_BOX,
        SCORE_CLASS,
        SCORE_CONFIDENCE,
    )
    from pipelines.prediction_log import read_log

    assert post_images(server, test_images)[0] == 200
    directory = server.project / ".conveyor" / "predictions"
    deadline = time.monotonic() + 30
    frame = read_log(directory).records
    while time.monotonic() < deadline and len(frame) < len(test_images):
        time.sleep(0.5)
        frame = read_log(directory).records
    assert len(frame) >= len(test_images)
    expected = {
        "time",
        "model_version",
        *IMAGE_FEATURES,
        *PREDICTION_FEATURES,
        "class_counts",
        EMBEDDING,
        SCORE_CONFIDENCE,
        SCORE_CLASS,
        SCORE_BOX,
    }
    assert expected <= set(frame.columns)
    assert frame["brightness"].between(1, 254).all() and (frame["sharpness"] > 0).all()
    assert (frame["noise"] > 0).all() and (frame["width"] > 0).all()
    assert (frame["aspect"] - frame["width"] / frame["height"]).abs().max() < 1e-9
    # The served model's features output (what its detection head sees, pooled): one vector per image, from the same
    # inference, the same length for every record; and every detection's score from the floor up, served ones first.
    assert {len(v) for v in frame[EMBEDDING]} == {448}
    assert all(
        len(c) == len(k) and len(c) >= n
        for c, k, n in zip(frame[SCORE_CONFIDENCE], frame[SCORE_CLASS], frame["detections"], strict=True)
    )
    # and their boxes, as fractions of the frame (the estimate tells dust on the lens from defects by them)
    boxes = [np.asarray(b).reshape(-1, 4) for b in frame[SCORE_BOX]]
    assert [len(b) for b in boxes] == [len(c) for c in frame[SCORE_CONFIDENCE]] and sum(len(b) for b in boxes) > 0
    assert all(((b >= -0.01) & (b <= 1.01)).all() and (b[:, 2:] > b[:, :2]).all() for b in boxes)
    assert set(frame["model_version"]) >= {"1"}
    # keep_frames 1.0: every served image is also kept, byte for byte, where `conveyor label select` reads them.
    from labelling.select import frames_from_log

    kept = frames_from_log(directory)
    sent = {p.read_bytes() for p in test_images}
    assert len(kept) >= len(test_images) and sent <= {p.read_bytes() for p in kept}


def test_label_select_reads_the_frames_the_server_kept(server: RunningServer, tmp_path: Path) -> None:
    """`conveyor label select` with the registry's champion, on the frames kept by the test above."""
    from tests.conftest import base_env, run_cmd

    env = base_env(MLFLOW_TRACKING_URI=server.tracking_uri)
    out = tmp_path / "selection"
    result = run_cmd(["conveyor", "label", "select", "--count", "2", "--out", str(out)], server.project, env)
    assert "prediction log" in result.stdout and "label import" in result.stdout
    record = json.loads((out / "selection.json").read_text())
    assert record["model"].endswith("v1") and len(record["frames"]) == 2
    tasks = json.loads((out / "tasks.json").read_text())
    assert len(tasks) == 2 and all((out / "images" / t["data"]["image"].rsplit("/", 1)[1]).is_file() for t in tasks)


def test_schemathesis_finds_no_server_error(server: RunningServer) -> None:
    import schemathesis
    from hypothesis import given, settings

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json", headers=server.headers())
    failures: list[str] = []
    cases: Counter[str] = Counter()  # generated cases sent, per operation
    for result in schema.get_all_operations():
        operation = result.ok()  # type: ignore[union-attr]

        # No health check suppressed: the schema's cases filter nothing and stay small, and with deadline=None
        # generation may take its time; a check that fires says something about the schema.
        @settings(max_examples=25, deadline=None, database=None)
        @given(case=operation.as_strategy())
        def fuzz(case: Any) -> None:
            cases[case.operation.label] += 1
            response = case.call(headers=server.headers(), timeout=30)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:200]}")

        fuzz()
    varied = [label for label, n in cases.items() if n > 1]
    assert len(cases) >= 8, cases  # every route of the API was called
    assert len(varied) >= 4 and all(cases[label] >= 20 for label in varied), cases  # of max_examples=25
    assert not failures, "\n".join(failures[:10])
    assert post_raw(server, "/predict", b"x", "image/png")[0] == 400  # and it still answers


OIP_SPEC = Path(__file__).parent / "assets" / "oip" / "open_inference_rest.yaml"


def oip_schema(names: list[str], version: str) -> dict[str, Any]:
    """The specification as schemathesis reads it. Two changes, each the specification's own words:
    - its paths write parameters as `${MODEL_NAME}`, OpenAPI as `{MODEL_NAME}`;
    - "the model name and (optionally) version must be available in the URL": each versioned route is also tested
      without its version.
    The model name and version are the served ones (a made-up name is a 404, which the specification leaves out)."""

    raw = yaml.safe_load(OIP_SPEC.read_text())
    pinned = {"MODEL_NAME": names, "MODEL_VERSION": [version]}
    paths: dict[str, Any] = {}
    for template, item in raw["paths"].items():
        path = template.replace("${", "{")
        for parameter in item.get("parameters", []):
            parameter["schema"] = {"type": "string", "enum": pinned[parameter["name"]]}
        paths[path] = item
        if "/versions/{MODEL_VERSION}" in path:
            unversioned = yaml.safe_load(yaml.safe_dump(item))
            unversioned["parameters"] = [p for p in unversioned["parameters"] if p["name"] != "MODEL_VERSION"]
            for operation in ("get", "post"):
                if operation in unversioned:
                    unversioned[operation]["operationId"] += "-unversioned"
            paths[path.replace("/versions/{MODEL_VERSION}", "")] = unversioned
    raw["paths"] = paths
    return dict(raw)


def test_the_open_inference_protocol_as_its_specification_says(server: RunningServer, client: MlflowClient) -> None:
    """schemathesis from the protocol's own OpenAPI document (tests/assets/oip): every route it documents, with and
    without a version, answers with a status and a body the document allows, for generated requests and for a real
    inference; and Triton's own HTTP client reads the server's metadata and its model index."""
    import schemathesis
    import tritonclient.http as httpclient
    from hypothesis import given, settings
    from schemathesis import checks

    from serving.triton import TENSOR_SUFFIX

    if server.get("/v2/health/ready", auth=False)[0] != 200:  # run on its own: no champion yet
        registry.promote(client, server.name, "1", reason="served for the protocol test", actor="user:test")
        server.wait_version("1")
    names = [server.name, server.name + TENSOR_SUFFIX]
    schema = schemathesis.openapi.from_dict(oip_schema(names, "1"))
    schema.config.update(base_url=server.url, headers=server.headers())
    failures: list[str] = []
    cases: Counter[str] = Counter()
    operations = {}
    for result in schema.get_all_operations():
        operation = result.ok()  # type: ignore[union-attr]
        operations[operation.label] = operation

        @settings(max_examples=20, deadline=None, database=None)
        @given(case=operation.as_strategy())
        def conforms(case: Any) -> None:
            cases[case.operation.label] += 1
            response = case.call(headers=server.headers(), timeout=30)
            try:
                # Excluded: "a schema-valid request is accepted". The document's inference_request admits any
                # tensors; only this model's (name, datatype, shape) can be, and the 400 for others is documented.
                case.validate_response(response, excluded_checks=[checks.positive_data_acceptance])
            except Exception as exc:  # schemathesis' FailureGroup: every check that failed, described
                failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}: {exc}"[:600])

        conforms()
    assert len(operations) == 9, sorted(operations)  # 2 health + server metadata + (3 model routes) × (with, without)
    assert all(n >= 1 for n in cases.values()) and len(cases) == 9, cases

    # A real inference, through the tensor model (JSON carries FP32 tensors, not image bytes), with and without a
    # version: a 200 whose body the specification's inference_response describes.
    tensor: dict[str, Any] = {
        "name": "images",
        "shape": [1, 3, 320, 320],
        "datatype": "FP32",
        "data": [0.5] * (3 * 320 * 320),
    }
    for label, operation in operations.items():
        if label.startswith("POST"):
            case = operation.Case(
                path_parameters={"MODEL_NAME": names[1], "MODEL_VERSION": "1"}, body={"inputs": [tensor]}
            )
            response = case.call(headers=server.headers(), timeout=60)
            assert response.status_code == 200, response.text[:300]
            case.validate_response(response)
            assert {o["name"] for o in response.json()["outputs"]} >= {"detections", "num_detections"}
    assert not failures, "\n".join(failures[:10])
    # What schemathesis found: an inference request with no body (Triton answered 200 and an empty binary body).
    status, answer = post_raw(server, f"/v2/models/{server.name}/versions/1/infer", b"", "application/json")
    assert status == 400 and "needs a body" in answer["error"], answer

    # Triton's HTTP client on what it calls its server metadata and its repository index.
    triton = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    try:
        metadata = triton.get_server_metadata(headers=server.headers())
        assert metadata["name"] and "version" in metadata and isinstance(metadata["extensions"], list)
        index = triton.get_model_repository_index(headers=server.headers())
        assert {(m["name"], m["state"]) for m in index} == {(n, "READY") for n in names}
    finally:
        triton.close()


# --- batch prediction and the edge bundle ------------------------------------------------------------------------


def test_batch_predict_writes_jsonl_and_resumes(server: RunningServer, test_images: list[Path], tmp_path: Path) -> None:
    from tests.conftest import base_env, run_cmd

    folder = tmp_path / "images"
    folder.mkdir()
    for image in test_images:
        shutil.copy(image, folder / image.name)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    env = base_env(MLFLOW_TRACKING_URI=server.tracking_uri)
    out = tmp_path / "out.jsonl"
    first = run_cmd(["conveyor", "predict", str(folder), "--out", str(out)], server.project, env)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == len(test_images) + 1 and "images/s" in first.stdout
    by_name = {Path(line["image"]).name: line for line in lines}
    assert "not a JPEG or PNG" in by_name["broken.jpg"]["error"]
    _, body = post_images(server, test_images)
    for image in body["images"]:
        assert_same_detections(by_name[image["filename"]]["detections"], image["detections"])

    # A crash mid-write leaves a torn last line: it is dropped and redone; finished images are skipped.
    torn = out.read_text().splitlines(keepends=True)
    out.write_text("".join(torn[:-1]) + torn[-1][:20])
    run_cmd(["conveyor", "predict", str(folder), "--out", str(out)], server.project, env)
    redone = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(json.dumps(x, sort_keys=True) for x in redone) == sorted(json.dumps(x, sort_keys=True) for x in lines)

    # A run where no image could be read fails (exit 1), with its error lines written.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.jpg").write_bytes(b"not a jpeg")
    none = subprocess.run(
        ["conveyor", "predict", str(broken), "--out", str(tmp_path / "none.jsonl")],
        cwd=server.project, env={**env, "COLUMNS": "200"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert none.returncode == 1 and "none of the 1 images could be read" in none.stdout, none.stdout + none.stderr
    assert "not a JPEG or PNG" in (tmp_path / "none.jsonl").read_text()


def test_edge_bundle_runs_without_conveyor(server: RunningServer, test_images: list[Path], tmp_path: Path) -> None:
    from importlib import metadata

    from conveyor.scaffold import REPO
    from tests.conftest import base_env, run_cmd

    env = base_env(MLFLOW_TRACKING_URI=server.tracking_uri)
    bundle = tmp_path / "bundle"
    run_cmd(["conveyor", "bundle", "@champion", "--out", str(bundle)], server.project, env)
    assert (tmp_path / "bundle.tar.gz").is_file()
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["version"] == "1" and "model/model.onnx" in manifest["sha256"]

    # A fresh virtualenv with only numpy, OpenCV and the runtimes: no torch, no Ultralytics, no Conveyor.
    venv = Path(tempfile.mkdtemp(prefix="edge-venv-", dir=tmp_path))
    uv = REPO / ".tools" / "bin" / "uv"
    run_cmd([str(uv), "venv", "-q", str(venv)], tmp_path, base_env())
    # The versions this environment has (uv.lock's), their dependencies too, so uv installs them from its cache and
    # a new release of a dependency on PyPI cannot change what this test runs.
    pins = [f"{p}=={metadata.version(p)}" for p in ("numpy", "opencv-python", "onnxruntime", "openvino")]
    constraints = tmp_path / "constraints.txt"
    installed = {d.metadata["Name"].lower(): d.version for d in metadata.distributions() if d.metadata["Name"]}
    constraints.write_text("".join(f"{name}=={version}\n" for name, version in sorted(installed.items())))
    python = str(venv / "bin" / "python")
    run_cmd([str(uv), "pip", "install", "-q", "--python", python, "-c", str(constraints), *pins], tmp_path, base_env())
    probe = run_cmd(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import importlib.util as u; print(*(u.find_spec(m) for m in ('torch', 'ultralytics', 'conveyor')))",
        ],
        tmp_path,
        {},
    )
    assert probe.stdout.split() == ["None", "None", "None"]
    status, served = post_images(server, test_images)
    assert status == 200
    from pipelines.inference import Detector, ModelCard, decode_image
    from pipelines.runtimes import OnnxRuntime

    onnx = Detector(OnnxRuntime(bundle / "model" / "model.onnx"), ModelCard.load(bundle / "model" / "metadata.json"))
    expected = {
        # The server runs OpenVINO: the edge's OpenVINO must give its detections.
        "openvino": [image["detections"] for image in served["images"]],
        # ONNX Runtime may differ from OpenVINO in the last digits: compare with Conveyor's own code on it.
        "onnx": [
            [d.to_json() for d in found] for found in onnx.detect([decode_image(p.read_bytes()) for p in test_images])
        ],
    }
    for runtime, wanted in expected.items():
        result = run_cmd(
            [
                str(venv / "bin" / "python"),
                str(bundle / "run.py"),
                "--verify",
                "--runtime",
                runtime,
                *map(str, test_images),
            ],
            tmp_path,
            {},
        )
        edge = [json.loads(line) for line in result.stdout.splitlines()]
        assert len(edge) == len(test_images)
        for line, found in zip(edge, wanted, strict=True):
            assert_same_detections(line["detections"], found)

    # serve.conf is the bundle's threshold: a bundle built at a higher one returns the server's detections above it.
    # The threshold is put in the widest gap between served confidences, so no detection sits on its edge.
    confidences = sorted({d["confidence"] for image in served["images"] for d in image["detections"]})
    gaps = [(b - a, (a + b) / 2) for a, b in itertools.pairwise(confidences)]
    assert gaps, "the test images give too few detections to test a threshold"
    threshold = round(max(gaps)[1], 4)
    params_file = server.project / "params.yaml"
    saved = params_file.read_text()
    try:
        params = yaml.safe_load(saved)
        params["serve"]["conf"] = threshold
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        strict = tmp_path / "strict-bundle"
        if threshold > params.get("edge", {}).get("reject", {}).get("min_confidence", 0.5):
            # The reject rule under the threshold the runner detects at is refused, naming both.
            refused = subprocess.run(
                ["conveyor", "bundle", "@champion", "--out", str(strict)],
                cwd=server.project, env=env, capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            assert refused.returncode == 1 and f"is under serve.conf {threshold}" in refused.stderr + refused.stdout
            params.setdefault("edge", {}).setdefault("reject", {})["min_confidence"] = threshold
            params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        run_cmd(["conveyor", "bundle", "@champion", "--out", str(strict)], server.project, env)
    finally:
        params_file.write_text(saved)
    assert json.loads((strict / "model" / "metadata.json").read_text())["conf"] == threshold
    result = run_cmd([str(venv / "bin" / "python"), str(strict / "run.py"), *map(str, test_images)], tmp_path, {})
    for line, image in zip([json.loads(x) for x in result.stdout.splitlines()], served["images"], strict=True):
        assert_same_detections(line["detections"], [d for d in image["detections"] if d["confidence"] >= threshold])

    (bundle / "model" / "metadata.json").write_text("{}")
    damaged = subprocess.run(
        [str(venv / "bin" / "python"), str(bundle / "run.py"), "--verify", str(test_images[0])],
        capture_output=True,
        text=True,
    )
    assert damaged.returncode != 0 and "bundle damaged: model/metadata.json" in damaged.stderr


def test_plain_triton_serves_the_same_model_code(
    server: RunningServer, test_images: list[Path], tmp_path: Path
) -> None:
    """The scaled-out path: `conveyor triton-repository` + a plain `tritonserver` (the binary PyTriton ships) runs
    `ServedModel` in Triton's own Python backend, and answers what `conveyor serve` answers."""
    import sys
    import sysconfig

    import pytriton
    import tritonclient.grpc as grpcclient

    from tests.conftest import base_env, run_cmd

    repository = tmp_path / "models"
    run_cmd(
        ["conveyor", "triton-repository", "models:/" + server.name + "/1", "--out", str(repository)],
        server.project,
        base_env(MLFLOW_TRACKING_URI=server.tracking_uri),
    )
    dist = Path(pytriton.__file__).parent / "tritonserver"
    backends = tmp_path / "backends"
    shutil.copytree(dist / "backends", backends)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    shutil.copy(dist / "python_backend_stubs" / version / "triton_python_backend_stub", backends / "python")
    http_port, grpc_port = free_port(), free_port()
    from pytriton.utils.distribution import get_libs_path

    libs = f"{sysconfig.get_config_var('LIBDIR')}:{get_libs_path()}"
    process = subprocess.Popen(
        [str(dist / "bin" / "tritonserver"), f"--model-repository={repository}", f"--backend-directory={backends}",
         f"--http-port={http_port}", f"--grpc-port={grpc_port}", "--allow-metrics=false", "--http-address=127.0.0.1",
         "--grpc-address=127.0.0.1"],
        env=base_env(LD_LIBRARY_PATH=libs),
        stdout=(tmp_path / "triton.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{http_port}/v2/health/ready", 120, process)
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        tensor = grpcclient.InferInput("image", [2, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[p.read_bytes()] for p in test_images[:2]], dtype=object))
        result = client.infer(server.name, [tensor])
        from serving.model import detections_from_outputs

        found = detections_from_outputs(result.as_numpy("detections"), result.as_numpy("num_detections"), NAMES)
        assert [v.decode() for v in result.as_numpy("model_version").reshape(-1)] == ["1", "1"]
        _, served = post_images(server, test_images[:2])
        for mine, theirs in zip(found, served["images"], strict=True):
            assert_same_detections(mine, theirs["detections"])
    except Exception:
        print((tmp_path / "triton.log").read_text(errors="replace")[-3000:])
        raise
    finally:
        stop_tree(process)


def test_full_queue_answers_503_with_retry_after(
    tmp_path: Path, mlflow_server: str, serving_artifacts: dict[str, str], test_images: list[Path]
) -> None:
    """A server with a one-request queue and no batching, hit by 12 clients at once: the overflow is turned away with
    503 + Retry-After (bounded memory), everything else is answered, and the server goes on serving."""
    client = MlflowClient(mlflow_server)
    name = f"queue-{uuid.uuid4().hex[:8]}"
    registry.promote(client, name, register(client, name, serving_artifacts), reason="queue test", actor="user:test")
    small = start_server(tmp_path, mlflow_server, name, {"max_batch_size": 1, "max_queue_size": 1})
    try:
        small.wait_version("1")
        with Load(small, test_images, clients=12) as load:
            time.sleep(6)
        statuses = Counter(status for status, _ in load.results)
        assert set(statuses) <= {200, 503} and statuses[503] > 0 and statuses[200] > 0, statuses
        busy = next(body for status, body in load.raw if status == 503)
        assert busy["_headers"]["Retry-After"] == "1" and "queue" in busy["error"]
        assert post_images(small, test_images[:1])[0] == 200
    finally:
        stop_tree(small.process)


def test_a_server_whose_triton_dies_is_not_live_and_exits(tmp_path: Path, mlflow_server: str) -> None:
    """Triton killed under the API (the OOM killer): the API stayed live and ready while every request failed, so
    Kubernetes' probes never restarted the pod. The server exits 75 (a temporary failure), saying why, for its
    supervisor to start it again (its health routes meanwhile: the test below)."""
    import psutil

    name = f"lost-{uuid.uuid4().hex[:8]}"
    running = start_server(tmp_path, mlflow_server, name)
    try:
        [triton] = [
            p for p in psutil.Process(running.process.pid).children(recursive=True) if p.name() == "tritonserver"
        ]
        triton.kill()
        assert running.process.wait(timeout=60) == 75, running.tail()
        assert "Triton (the inference server under the API) exited" in running.tail(), running.tail()
    finally:
        stop_tree(running.process)


def test_a_failure_on_the_server_is_a_5xx_without_its_traceback(tmp_path: Path) -> None:
    """A model that fails on a batch (its runtime out of memory): `/predict` and `/v2` answered 400, telling the
    client to fix its request, and every answer, a direct gRPC client's too, carried PyTriton's traceback with the
    server's files and the error's own text. Now a 500 (gRPC: INTERNAL) that names the error's type and nothing more,
    the traceback in the server's log. A request Triton itself refuses stays a 400. A client's `sent_at` that is not
    a recent time is not timed as the queue's. With Triton gone, live and ready say so. A real PyTriton, with the
    API in front in this process; the failing model is a stand-in (a real one does not fail on demand)."""

    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    import uvicorn
    from tritonclient.utils import InferenceServerException

    from pipelines.inference import ImageLimits, ModelCard
    from pipelines.model_source import LoadedModel
    from serving.app import ApiConfig, create_app
    from serving.metrics import ServingMetrics
    from serving.model import ServedModel
    from serving.swap import ModelSlot
    from serving.triton import TritonPorts, start_triton

    secret = "/srv/plant-7/model-cache/openvino/model.xml"

    class FailingDetector:
        card = ModelCard(names=["scratch"], imgsz=32)

        def run(self, images: list[Any], floor: float = 0.01) -> list[Any]:
            raise MemoryError(f"out of memory opening {secret}")

    slot, metrics, limits = ModelSlot(), ServingMetrics(), ImageLimits()
    slot.swap(LoadedModel("m", "3", "openvino", [FailingDetector()], time.time(), 0.1))  # type: ignore[list-item]
    ports = TritonPorts(http=free_port(), grpc=free_port(), metrics=free_port(), grpc_host="127.0.0.1")
    triton = start_triton("m", [ServedModel(slot, 0, metrics, None, limits)], ports,
                          max_batch_size=4, max_queue_delay_ms=0, max_queue_size=16, access_token=None)  # fmt: skip
    api = uvicorn.Server(uvicorn.Config(
        create_app(ApiConfig("m", ports, limits, 8, 4, None), slot, metrics, backend_alive=triton.is_alive),
        host="127.0.0.1", port=free_port(), log_level="warning",
    ))  # fmt: skip
    thread = threading.Thread(target=api.run, daemon=True)
    thread.start()
    url = f"127.0.0.1:{api.config.port}"
    png = io.BytesIO()
    Image.new("RGB", (64, 48)).save(png, format="PNG")

    def leaks(text: str) -> bool:  # the error's own text, or the server's code and where it runs from
        return secret in text or "/serving/" in text or "site-packages" in text

    try:
        wait_http(f"http://{url}/v2/health/live", 30)
        request = urllib.request.Request(
            f"http://{url}/predict", data=png.getvalue(), headers={"Content-Type": "image/png"}
        )
        with pytest.raises(urllib.error.HTTPError) as failed:
            urllib.request.urlopen(request, timeout=60)
        said = json.loads(failed.value.read())["error"]
        assert failed.value.code == 500 and said.startswith("inference failed on the server (MemoryError)"), said
        assert not leaks(said) and "Traceback" not in said, said

        image = httpclient.InferInput("image", [1, 1], "BYTES")
        image.set_data_from_numpy(np.array([[png.getvalue()]], dtype=object))
        with pytest.raises(InferenceServerException) as over_http:
            httpclient.InferenceServerClient(url).infer("m", [image])
        assert over_http.value.status() == "500" and "inference failed on the server" in str(over_http.value)
        assert not leaks(str(over_http.value)) and "Traceback" not in str(over_http.value), str(over_http.value)
        grpc_image = grpcclient.InferInput("image", [1, 1], "BYTES")
        grpc_image.set_data_from_numpy(np.array([[png.getvalue()]], dtype=object))
        direct = grpcclient.InferenceServerClient(f"127.0.0.1:{ports.grpc}")
        with pytest.raises(InferenceServerException) as over_grpc:
            direct.infer("m", [grpc_image], parameters={"sent_at": "-inf"})
        assert over_grpc.value.status() == "StatusCode.INTERNAL", over_grpc.value
        assert "inference failed on the server (MemoryError)" in str(over_grpc.value), str(over_grpc.value)
        # Direct to Triton: its Python backend's stub still adds a traceback of its own `model.py` (PyTriton's, in a
        # temporary folder), which no code here reaches; what was Conveyor's (files, lines, the error's text) is gone.
        assert not leaks(str(over_grpc.value)), str(over_grpc.value)
        # -inf was not a time: not observed (its inf had made the sum inf for the life of the process)
        # (/predict's own sent_at is the one observed)
        assert metrics.registry.get_sample_value("conveyor_queue_seconds_count") == 1.0
        assert (metrics.registry.get_sample_value("conveyor_queue_seconds_sum") or 0.0) < 60

        # Triton's own refusal of a request it cannot take is still the client's.
        wrong = {"inputs": [{"name": "img", "shape": [1, 1], "datatype": "BYTES", "data": ["x"]}]}
        request = urllib.request.Request(
            f"http://{url}/v2/models/m/infer", data=json.dumps(wrong).encode(), method="POST"
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=60)
        assert refused.value.code == 400, refused.value.read()

        slot.current = None  # no model: a 503 to retry, not a failure
        with pytest.raises(InferenceServerException) as unready:
            direct.infer("m", [grpc_image])
        assert "not ready" in str(unready.value) and not leaks(str(unready.value)), str(unready.value)

        triton.stop()  # Triton gone from under the API
        wait_for = time.monotonic() + 30
        while triton.is_alive() and time.monotonic() < wait_for:
            time.sleep(0.2)
        for route in ("/v2/health/live", "/v2/health/ready"):
            with pytest.raises(urllib.error.HTTPError) as gone:
                urllib.request.urlopen(f"http://{url}{route}", timeout=10)
            assert gone.value.code == 503 and "Triton" in json.loads(gone.value.read())["reason"], route
        page = urllib.request.urlopen(f"http://{url}/metrics", timeout=10).read().decode()
        assert 'conveyor_http_requests_total{route="/predict",status="500"} 1.0' in page
        assert 'conveyor_http_requests_total{route="/v2/models/{name}/infer",status="500"} 1.0' in page
    finally:
        api.should_exit = True
        thread.join(timeout=30)
        triton.stop()
