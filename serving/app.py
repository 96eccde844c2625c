"""The server's HTTP face: the image API (`POST /predict`), the Open Inference Protocol under `/v2` (passed through
to Triton unchanged, binary tensors included), health, and `/metrics`.

Every inference, from `/predict` or `/v2`, goes through Triton: one batching queue, one set of counters. This layer
adds what Triton does not do: image uploads as JSON detections, readiness that means "a model is loaded", a bearer
token, `Retry-After` when the queue is full, and the served version and last load error in `/v2/models/{name}`.
Bad input is a 4xx JSON error naming the problem; nothing from a request is unpickled or loaded as a model.

`create_app` puts a `ServerState` on `app.state.server` (configuration, model slot, counters, and the Triton clients
the lifespan opens) and includes four routers, in this order: health, the image API, the protocol (its catch-all
last, so the routes above it win), metrics. The bearer-token check and the request counters are one middleware.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import time
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import httpx
import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import generate_latest

from pipelines.inference import ImageError, ImageLimits, check_image_bytes
from serving.metrics import ServingMetrics
from serving.model import IMAGE_INPUT, detections_from_outputs
from serving.swap import ModelSlot
from serving.triton import INFERENCE_FAILED, NOT_READY, TENSOR_SUFFIX, TritonPorts

HEALTH_ROUTES = ("/v2/health/live", "/v2/health/ready")
IMAGE_TYPES = ("image/jpeg", "image/png", "application/octet-stream")
RETRY_AFTER_SECONDS = "1"
# Triton's version of each bound model: PyTriton binds one, whatever registry version the slot holds.
TRITON_VERSION = "1"
INFER_TIMEOUT_SECONDS = 120.0  # one /predict batch through Triton (queue included)
TRACEBACK = "Traceback (most recent call last)"
BACKEND_LOST = (
    "Triton, the inference server under this API, has exited; this server stops, for its supervisor to restart it"
)
# Triton checks restricted gRPC protocols against this metadata key (its prefix + PyTriton's token header).
GRPC_TOKEN_HEADER = "triton-grpc-protocol-triton-access-token"
# Headers that describe one hop of a connection, not the message: never passed through a proxy.
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}
# Bodies are passed on decoded: a request's here (`_read_v2_body`), an answer's by httpx. Their Content-Encoding no
# longer holds.
RESPONSE_HOP_HEADERS = HOP_HEADERS | {"content-encoding"}
REQUEST_DROPPED_HEADERS = RESPONSE_HOP_HEADERS | {"authorization"}  # Triton gets its own token instead
# What `/v2/{path}` passes to Triton: the protocol's routes (server metadata; a model's metadata, readiness,
# inference, with or without a version) and Triton's model-config extension, which tritonclient reads. Nothing else:
# Triton's administrative extensions (model repository, shared memory, logging, trace, statistics) can load a model,
# that is, run code on this machine.
FORWARDED_ROUTE = re.compile(r"models/(?P<name>[^/]+)(?:/versions/[0-9]+)?(?:/(?P<verb>infer|ready|config))?")


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@dataclass(frozen=True)
class ApiConfig:
    model_name: str
    ports: TritonPorts
    limits: ImageLimits
    max_images: int
    max_batch_size: int
    token: str | None
    # Gauges written by others for the same scrape (the drift check's `drift.prom`), appended when present.
    extra_metrics: Path | None = None


@dataclass
class ServerState:
    """What the handlers share (`app.state.server`): the configuration, the model slot, the counters, and the
    clients to Triton, which exist only while the app's lifespan runs."""

    config: ApiConfig
    slot: ModelSlot
    metrics: ServingMetrics
    grpc_client: Any = None  # tritonclient.grpc.aio.InferenceServerClient (imported lazily: it is heavy)
    http_client: httpx.AsyncClient | None = None
    # Whether Triton (and PyTriton's model processes) still run: without them nothing is served, whatever the slot.
    backend_alive: Callable[[], bool] = lambda: True
    names: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        self.names = frozenset({self.config.model_name, self.config.model_name + TENSOR_SUFFIX})

    @property
    def grpc_url(self) -> str:
        ports = self.config.ports
        return f"{'127.0.0.1' if ports.grpc_host in ('0.0.0.0', '::') else ports.grpc_host}:{ports.grpc}"

    @property
    def triton_http(self) -> str:
        return f"http://127.0.0.1:{self.config.ports.http}"

    @property
    def triton_metrics(self) -> str:
        return f"http://127.0.0.1:{self.config.ports.metrics}/metrics"

    @property
    def http(self) -> httpx.AsyncClient:
        if self.http_client is None:
            raise RuntimeError("the app's lifespan has not started: no HTTP client to Triton")
        return self.http_client

    def not_ready_reason(self) -> str | None:
        """Why nothing can be served now (the whole reason: it may quote a registry's address), or None."""
        if not self.backend_alive():
            return BACKEND_LOST
        return None if self.slot.current is not None else self.slot.state.reason

    def require_ready(self) -> None:
        reason = self.not_ready_reason()
        if reason is not None:
            raise ApiError(503, f"not ready: {reason}", {"Retry-After": RETRY_AFTER_SECONDS})

    def require_known(self, name: str) -> None:
        if name not in self.names:
            raise ApiError(404, f"unknown model '{name}': this server serves {sorted(self.names)}")

    def forward_headers(self, request_headers: dict[str, str]) -> dict[str, str]:
        headers = {k: v for k, v in request_headers.items() if k.lower() not in REQUEST_DROPPED_HEADERS}
        if self.config.token:
            headers["triton-access-token"] = self.config.token
        return headers


async def _server(request: Request) -> ServerState:
    """The handlers' dependency (async: FastAPI would run a plain function in its thread pool on every request)."""
    server: ServerState = request.app.state.server
    return server


Server = Annotated[ServerState, Depends(_server)]


def create_app(
    config: ApiConfig, slot: ModelSlot, metrics: ServingMetrics, backend_alive: Callable[[], bool] = lambda: True
) -> FastAPI:
    app = FastAPI(
        title="Conveyor model server",
        description="YOLO detections over HTTP: POST /predict with images, or the Open Inference Protocol under /v2.",
        version="1",
        lifespan=_lifespan,
        # The routers' own routes, in order: `/v2/{path:path}` would otherwise answer for the health routes. Not
        # `include_router`: FastAPI (0.150) adds a router as one lazy entry of `app.routes`, which then no longer
        # lists the paths that tools read (tests/test_infra.py checks the probes against them).
        routes=[route for router in (health, images, protocol, metrics_routes) for route in router.routes],
    )
    app.state.server = ServerState(config, slot, metrics, backend_alive=backend_alive)
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]  # Starlette types it for Exception
    app.middleware("http")(_observe)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    import tritonclient.grpc.aio as grpcclient

    server: ServerState = app.state.server
    server.grpc_client = grpcclient.InferenceServerClient(server.grpc_url)
    server.http_client = httpx.AsyncClient(base_url=server.triton_http, timeout=60)
    try:
        yield
    finally:
        await server.grpc_client.close()
        await server.http_client.aclose()


async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)


async def _observe(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    """The bearer token (health excepted), then the request counters, errors included."""
    server: ServerState = request.app.state.server
    started = time.perf_counter()
    route = _route_label(request.url.path)
    try:
        if server.config.token and request.url.path not in HEALTH_ROUTES:
            _check_token(request, server.config.token)
        response = await call_next(request)
    except ApiError as exc:
        response = JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)
    except Exception:  # a bug: counted as the 500 it becomes, then left to the server's handler
        server.metrics.requests.labels(route, "500").inc()
        server.metrics.request_seconds.labels(route).observe(time.perf_counter() - started)
        raise
    server.metrics.requests.labels(route, str(response.status_code)).inc()
    server.metrics.request_seconds.labels(route).observe(time.perf_counter() - started)
    return response


# --- health -----------------------------------------------------------------------------------------------------

health = APIRouter(tags=["health"])


@health.get("/v2/health/live")
async def live(server: Server) -> JSONResponse:
    """Live while Triton runs: a server whose Triton died answered every request with an error and stayed live, so
    its supervisor (Kubernetes' liveness probe) never restarted it. The process also exits then (serving/server.py)."""
    if not server.backend_alive():
        return JSONResponse({"live": False, "reason": BACKEND_LOST}, status_code=503)
    return JSONResponse({"live": True})


@health.get("/v2/health/ready")
async def ready(server: Server) -> JSONResponse:
    reason = server.not_ready_reason()
    if reason is not None or server.slot.current is None:
        return JSONResponse({"ready": False, "reason": public_reason(reason or "")}, status_code=503)
    return JSONResponse({"ready": True, "model": server.config.model_name, "version": server.slot.current.version})


def public_reason(reason: str) -> str:
    """What the open health route says of why the server is not ready: the reason's first words, without the error
    it quotes (a registry's address, a bucket, a cache path); the whole of it is at /v2/models/{name}, behind the
    token."""
    cut = min((i for i in (reason.find(" ("), reason.find(": ")) if i >= 0), default=len(reason))
    return reason[:cut] + ("; the details: GET /v2/models/{name} with the token" if cut < len(reason) else "")


# --- the image API ----------------------------------------------------------------------------------------------

images = APIRouter(tags=["predict"])


@images.post(
    "/predict",
    openapi_extra={
        "requestBody": {
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                    }
                },
                "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
                "image/png": {"schema": {"type": "string", "format": "binary"}},
            },
            "required": True,
        }
    },
)
async def predict(request: Request, server: Server) -> JSONResponse:
    """Images (multipart `files`, or one image as the body) → detections per image, boxes in image pixels."""
    config = server.config
    uploads = await _read_uploads(request, config)
    # Headers only, but in a thread: the event loop also answers the health probes.
    sizes = await asyncio.to_thread(_image_sizes, uploads, config.limits)
    server.require_ready()
    chunks = [uploads[i : i + config.max_batch_size] for i in range(0, len(uploads), config.max_batch_size)]
    results = await asyncio.gather(
        *(_infer(server.grpc_client, config.model_name, chunk, config.token) for chunk in chunks)
    )
    found_images: list[dict[str, Any]] = []
    versions = set()
    for chunk, (table, counts, chunk_versions, errors) in zip(chunks, results, strict=True):
        for (filename, _), rows, count, version, error in zip(
            chunk, table, np.asarray(counts).reshape(-1), chunk_versions, errors, strict=True
        ):
            if error:
                raise ApiError(400, f"{filename}: {error}")
            # Named by the classes of the version that answered (a hot swap may land between inference and here).
            found = detections_from_outputs(rows[None], np.asarray([count]), server.slot.names(version))[0]
            versions.add(version)
            found_images.append({"index": len(found_images), "filename": filename, "detections": found})
    for image, (width, height) in zip(found_images, sizes, strict=True):
        image["width"], image["height"] = width, height
    version = ",".join(sorted(versions))
    return JSONResponse(
        {"model": {"name": config.model_name, "version": version}, "images": found_images},
        headers={"X-Model-Name": config.model_name, "X-Model-Version": version},
    )


# --- the Open Inference Protocol (Triton's, passed through) -----------------------------------------------------

protocol = APIRouter(tags=["v2"])


@protocol.get("/v2")
@protocol.get("/v2/", include_in_schema=False)  # the protocol's specification writes it with the slash
async def server_metadata(server: Server) -> Response:
    """The server's name, version and protocol extensions (Triton's). Routed here, not through the catch-all below:
    `/v2` would otherwise be redirected to `/v2/`, which Triton does not know."""
    return await _forward(server, "GET", "", b"", None, {})


@protocol.post("/v2/repository/index")
async def repository_index(server: Server) -> list[dict[str, str]]:
    """The models this server serves and their state. Triton's own index lists its model repository, which
    PyTriton leaves empty (its models are bound in process), so a client that lists models would see none."""
    slot = server.slot
    status = {"state": "READY"} if slot.ready else {"state": "UNAVAILABLE", "reason": slot.state.reason}
    return [{"name": name, "version": TRITON_VERSION, **status} for name in sorted(server.names)]


@protocol.get("/v2/models/{name}/ready")
@protocol.get("/v2/models/{name}/versions/{version}/ready", include_in_schema=False)
async def model_ready(name: str, server: Server, version: str | None = None) -> Response:
    """From the model slot, with or without a version: Triton's own answer (always ready: PyTriton's models are bound
    whether or not a champion is loaded) said ready for a version while the route without one said not."""
    server.require_known(name)
    if version is not None and version != TRITON_VERSION:  # a version Triton does not have: its own answer
        return await _forward(server, "GET", f"models/{name}/versions/{version}/ready", b"", None, {})
    reason = server.not_ready_reason()
    if reason is not None:
        return JSONResponse({"name": name, "ready": False, "reason": reason}, status_code=503)
    return JSONResponse({"name": name, "ready": True})


@protocol.get("/v2/models/{name}")
async def model_metadata(name: str, server: Server) -> Response:
    """Triton's model metadata, plus `conveyor`: the registry version served, its state and the last load error."""
    server.require_known(name)
    try:
        upstream = await server.http.get(f"/v2/models/{name}", headers=server.forward_headers(request_headers={}))
        body = upstream.json()
    except httpx.HTTPError as exc:
        raise ApiError(503, f"Triton is not answering: {exc}", {"Retry-After": RETRY_AFTER_SECONDS}) from None
    except ValueError:  # JSONDecodeError
        raise ApiError(502, f"Triton's model metadata is not JSON (status {upstream.status_code})") from None
    if not isinstance(body, dict):
        raise ApiError(502, f"Triton's model metadata is not a JSON object (status {upstream.status_code})")
    body["conveyor"] = server.slot.describe()
    return JSONResponse(body, status_code=upstream.status_code)


@protocol.api_route(
    "/v2/{path:path}",
    methods=["GET", "POST"],
    openapi_extra={
        "requestBody": {
            "content": {"application/json": {"schema": {"type": "object"}}},
            "required": False,
        }
    },
)
async def v2_passthrough(path: str, request: Request, server: Server) -> Response:
    """The rest of the protocol (infer with JSON or binary tensors, the versioned routes), forwarded to Triton."""
    route = FORWARDED_ROUTE.fullmatch(path)
    infer = route is not None and route["verb"] == "infer"
    if (path and route is None) or request.method != ("POST" if infer else "GET"):
        raise ApiError(
            404 if route is None and path else 405,
            f"{request.method} /v2/{path[:80]} is not served here: the Open Inference Protocol's routes are (server "
            "and model metadata, readiness, inference), not Triton's administrative extensions",
        )
    if route is not None:
        server.require_known(route["name"])
    if infer:
        server.require_ready()
    # One request is one batch at most (max_batch_size images or tensors): /predict's image count is not its bound.
    body = await _read_v2_body(request, server.config.limits.max_bytes * server.config.max_batch_size)
    if infer and not body:
        # Triton answers an empty inference request with 200 and an empty binary body: refuse it here, by name.
        raise ApiError(400, "an inference request needs a body: the protocol's JSON inference request object")
    return await _forward(server, request.method, path, body, request.query_params, dict(request.headers))


async def _forward(
    server: ServerState, method: str, path: str, body: bytes, params: Any, request_headers: dict[str, str]
) -> Response:
    """One request passed to Triton's `/v2/{path}` and its answer passed back. Triton answers 500 both for a request
    it could not parse (the client's: 400 here) and for a batch that failed in the model (the server's: 500)."""
    try:
        upstream = await server.http.request(
            method,
            f"/v2/{path}" if path else "/v2",
            content=body,
            params=params,
            headers=server.forward_headers(request_headers),
        )
    except (httpx.InvalidURL, UnicodeError, ValueError) as exc:
        raise ApiError(400, f"malformed request path /v2/{path[:80]!r}: {exc}") from None
    except httpx.HTTPError as exc:
        raise ApiError(503, f"Triton is not answering: {exc}", {"Retry-After": RETRY_AFTER_SECONDS}) from None
    headers = {k: v for k, v in upstream.headers.items() if k.lower() not in RESPONSE_HOP_HEADERS}
    if upstream.status_code == 503:
        headers["Retry-After"] = RETRY_AFTER_SECONDS
    status, content = upstream.status_code, upstream.content
    if status >= 500 and status != 503:
        content = _without_traceback(content)
        status = _failure_status(content.decode(errors="replace"))
        if status == 503:
            headers["Retry-After"] = RETRY_AFTER_SECONDS
    return Response(content, status_code=status, headers=headers)


def _failure_status(said: str) -> int:
    """The status of a request Triton failed: the model's failure on the server (500), no model loaded (503), or a
    request Triton could not take (400: its parser answers 500 too)."""
    if NOT_READY in said:
        return 503
    return 500 if INFERENCE_FAILED in said else 400


def _client_words(error: str) -> str:
    """An error as a client may read it: without a Python traceback (the server's files and paths). A failure of the
    model is said in Conveyor's words alone (Triton's Python backend wraps them in its own traceback)."""
    for words in (INFERENCE_FAILED, NOT_READY):
        if words in error:
            return error[error.index(words) :].splitlines()[0]
    if TRACEBACK not in error:
        return error
    return error[: error.index(TRACEBACK)].rstrip(" :\n") or "the server failed on this request"


def _without_traceback(body: bytes) -> bytes:
    try:
        answer = json.loads(body)
    except ValueError:
        return body
    error = answer.get("error") if isinstance(answer, dict) else None
    if not isinstance(error, str) or TRACEBACK not in error:
        return body
    answer["error"] = _client_words(error)
    return json.dumps(answer).encode()


# --- metrics ----------------------------------------------------------------------------------------------------

metrics_routes = APIRouter(tags=["metrics"])


@metrics_routes.get("/metrics")
async def metrics_page(server: Server) -> Response:
    """Conveyor's metrics, the last drift check's gauges, then Triton's (`nv_inference_*`), in Prometheus' text
    format."""
    ours = generate_latest(server.metrics.registry).decode()
    extra = server.config.extra_metrics
    if extra is not None and extra.is_file():
        ours += extra.read_text()
    try:
        triton = (await server.http.get(server.triton_metrics, timeout=2)).text
    except httpx.HTTPError as exc:
        triton = f"# triton metrics unavailable: {exc}\n"
    return Response(ours + triton, media_type="text/plain; version=0.0.4; charset=utf-8")


# --- helpers ----------------------------------------------------------------------------------------------------


def _check_token(request: Request, token: str) -> None:
    given = request.headers.get("authorization", "")
    scheme, _, value = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
        raise ApiError(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})


def _route_label(path: str) -> str:
    if path in ("/predict", "/metrics", *HEALTH_ROUTES):
        return path
    if path.startswith("/v2/models/") and path.endswith("/infer"):
        return "/v2/models/{name}/infer"
    if path.startswith("/v2/models/"):
        return "/v2/models/{name}"
    return "/v2" if path.startswith("/v2") else "other"


async def _limited_stream(request: Request, limit: int) -> AsyncGenerator[bytes, None]:
    """The request body as it arrives, refused with 413 as soon as it passes `limit` bytes."""
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limit:
            raise ApiError(413, f"body is over the limit of {limit} bytes")
        yield chunk


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes (never held whole beyond it)."""
    return b"".join([chunk async for chunk in _limited_stream(request, limit)])


def _image_sizes(uploads: list[tuple[str, bytes]], limits: ImageLimits) -> list[tuple[int, int]]:
    sizes = []
    for filename, data in uploads:
        try:
            sizes.append(check_image_bytes(data, limits))
        except ImageError as exc:
            raise ApiError(400, f"{filename}: {exc}") from None
    return sizes


async def _read_v2_body(request: Request, limit: int) -> bytes:
    """A /v2 request's body, decoded. tritonclient compresses requests when asked (gzip, or deflate: zlib's format);
    Triton would inflate a compressed body without any limit (300 MB from 0.3 MB), so it is inflated here, against
    the limit a plain body has, and passed on plain."""
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding in ("", "identity"):
        return await _read_body(request, limit)
    if encoding not in ("gzip", "deflate"):
        raise ApiError(415, f"Content-Encoding {encoding!r} is not accepted here: send gzip, deflate or none")
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    body = bytearray()
    try:
        async for chunk in _limited_stream(request, limit):
            body += inflater.decompress(chunk, limit + 1 - len(body))  # at most one byte past the limit
            if len(body) > limit:
                raise ApiError(413, f"body inflates past the limit of {limit} bytes ({encoding})")
        body += inflater.flush()
    except zlib.error as exc:
        raise ApiError(400, f"the body is not valid {encoding}: {exc}") from None
    if not inflater.eof:
        raise ApiError(400, f"the body is cut short: its {encoding} stream does not end")
    if len(body) > limit:
        raise ApiError(413, f"body inflates past the limit of {limit} bytes ({encoding})")
    return bytes(body)


async def _read_uploads(request: Request, config: ApiConfig) -> list[tuple[str, bytes]]:
    """The images of a /predict request, with the limits checked before anything large is held."""
    limit = config.limits.max_bytes * config.max_images
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"body of {length} bytes is over the limit of {limit}")
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        from starlette.formparsers import MultiPartParser

        # Starlette's own parser (what request.form() runs) over the body counted as it streams in: a chunked body
        # has no Content-Length to refuse up front, and max_part_size bounds only text fields, not files.
        try:
            form = await MultiPartParser(
                request.headers,
                _limited_stream(request, limit),
                max_files=config.max_images,
                max_part_size=config.limits.max_bytes,
            ).parse()
        except ApiError:
            raise
        except Exception as exc:  # malformed multipart, too many files or a part over the limit
            raise ApiError(400, f"could not read the multipart body: {exc}") from None
        uploads = []
        try:
            for key, value in form.multi_items():
                if isinstance(value, str):
                    raise ApiError(400, f"form field '{key}' is text: send images as file parts")
                uploads.append((value.filename or key, await value.read()))
        finally:
            await form.close()  # the spooled files (request.form() has Starlette close them; parsed here, we do)
        if not uploads:
            raise ApiError(400, "no images in the multipart body: send one or more file parts")
        return uploads
    if content_type in IMAGE_TYPES:
        return [("body", await _read_body(request, config.limits.max_bytes))]
    raise ApiError(
        415, f"content type '{content_type or 'none'}': send multipart/form-data with image files, or image/jpeg|png"
    )


async def _infer(
    client: Any, model_name: str, chunk: list[tuple[str, bytes]], token: str | None
) -> tuple[Any, Any, list[str], list[str]]:
    import tritonclient.grpc.aio as grpcclient
    from tritonclient.utils import InferenceServerException

    tensor = grpcclient.InferInput(IMAGE_INPUT, [len(chunk), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[data] for _, data in chunk], dtype=object))
    try:
        result = await client.infer(
            model_name,
            [tensor],
            parameters={"sent_at": json.dumps(time.time())},
            headers={GRPC_TOKEN_HEADER: token} if token else None,
            client_timeout=INFER_TIMEOUT_SECONDS,  # a hung model instance: an answer, and a server that can stop
        )
    except InferenceServerException as exc:
        said = _client_words(str(exc.message()))
        if "queue" in said.lower():  # Triton: "Exceeds maximum queue size"
            raise ApiError(503, f"server busy: {said}", {"Retry-After": RETRY_AFTER_SECONDS}) from None
        if exc.status() == "StatusCode.DEADLINE_EXCEEDED":
            raise ApiError(504, f"no answer from the model within {INFER_TIMEOUT_SECONDS} s") from None
        if said.startswith(NOT_READY):
            raise ApiError(503, said, {"Retry-After": RETRY_AFTER_SECONDS}) from None
        if exc.status() == "StatusCode.UNAVAILABLE":  # Triton not answering
            raise ApiError(503, f"not ready: {said}", {"Retry-After": RETRY_AFTER_SECONDS}) from None
        if said.startswith(INFERENCE_FAILED):
            raise ApiError(500, said) from None
        raise ApiError(502, f"inference failed: {said}") from None
    versions = [v.decode() for v in result.as_numpy("model_version").reshape(-1)]
    errors = [e.decode() for e in result.as_numpy("error").reshape(-1)]
    return result.as_numpy("detections"), result.as_numpy("num_detections"), versions, errors
