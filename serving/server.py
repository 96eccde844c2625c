"""`conveyor serve`: the registry's model behind Triton (gRPC), the HTTP API in front of it, and the watcher that
hot-swaps the model when its alias moves. Runs in the foreground until Ctrl-C or SIGTERM, then stops cleanly."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from conveyor.errors import ConveyorError
from conveyor.net import free_port, listen_problem
from conveyor.paths import ProjectPaths
from conveyor.settings import ServeSettings, Settings, described
from conveyor.tracking import Tracker
from pipelines.inference import ImageLimits
from pipelines.model_source import check_runtime
from pipelines.prediction_log import PredictionLog, s3_shipper
from serving import TOKEN_ENV
from serving.app import ApiConfig, create_app
from serving.metrics import ServingMetrics
from serving.model import ServedModel
from serving.swap import ModelSlot, RegistryWatcher
from serving.triton import TritonPorts, start_triton

LOG = logging.getLogger("conveyor.serving")


class StateNotWritableError(ConveyorError, OSError):
    """A folder the server writes (the prediction log, the model cache) is read-only; the message says what to mount."""


class PortInUseError(ConveyorError, RuntimeError):
    """A port the server needs is taken; the message names it."""


class BackendLostError(ConveyorError, RuntimeError):
    """Triton exited under the running server: the server stopped, for its supervisor to start it again."""

    def __init__(self) -> None:
        super().__init__(
            "Triton (the inference server under the API) exited: stopped serving; its log is above. Started again, "
            "the server comes back with the champion",
            transient=True,
        )


GRACEFUL_SHUTDOWN_SECONDS = 10  # requests in flight at SIGTERM; then Triton, the log, within the pod's 45 s
BACKEND_CHECK_SECONDS = 1.0


def _stop_when_backend_exits(server: Any, alive: Any, lost: threading.Event) -> None:
    """Until the API stops: when Triton is gone, the API stops too (exit 75, a temporary failure, so that Kubernetes
    or systemd starts the server again). Its health routes already answer 503 meanwhile."""
    while not server.should_exit:
        if not alive():
            LOG.error("Triton exited: stopping the API (the server exits 75, for its supervisor to restart it)")
            lost.set()
            server.should_exit = True
            return
        time.sleep(BACKEND_CHECK_SECONDS)


@dataclass(frozen=True)
class ServeOptions:
    """The command line's overrides of params.yaml's `serve` section."""

    model: str | None = None
    host: str | None = None
    port: int | None = None
    grpc_port: int | None = None
    workers: int | None = None
    runtime: str | None = None
    max_batch_size: int | None = None

    def apply(self, cfg: ServeSettings) -> ServeSettings:
        from pydantic import ValidationError

        given = {k: v for k, v in self.__dict__.items() if v is not None}
        try:
            return ServeSettings.model_validate({**cfg.model_dump(), **given})
        except ValidationError as exc:  # an option out of range: said like a bad params.yaml key
            raise described(exc, "conveyor serve's options over params.yaml serve") from None


def _check_port(host: str, port: int, what: str) -> None:
    problem = listen_problem(port, host)
    if problem is None:
        return
    if problem.startswith("port "):
        raise PortInUseError(f"{what} {problem}: pick another")
    raise PortInUseError(f"--host {problem}")  # it said "port fabrik-pc:8080 is not free"


def serve(paths: ProjectPaths, settings: Settings, options: ServeOptions) -> None:
    import uvicorn

    cfg = options.apply(settings.serve)
    check_runtime(cfg.runtime)
    _check_port(cfg.host, cfg.port, "HTTP")
    _check_port(cfg.host, cfg.grpc_port, "gRPC")
    token = os.environ.get(TOKEN_ENV) or None
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not token:
        LOG.warning("serving on %s without a token: set %s to require a bearer token", cfg.host, TOKEN_ENV)

    metrics = ServingMetrics()
    metrics.model_ready.set(0)
    slot = ModelSlot()
    limits = ImageLimits(cfg.max_image_bytes, cfg.max_image_pixels)
    log_cfg = cfg.prediction_log
    _check_writable(paths.model_cache, "the model cache")
    if log_cfg.enabled:
        _check_writable(
            paths.prediction_log_dir(log_cfg.directory),
            "the prediction log (serve.prediction_log)",
            ", or turn the prediction log off (serve.prediction_log.enabled: false)",
        )
    predlog = (
        PredictionLog(
            paths.prediction_log_dir(cfg.prediction_log.directory),
            log_cfg.queue_size,
            log_cfg.flush_seconds,
            log_cfg.keep_hours,
            keep_frames=log_cfg.keep_frames,
            on_written=metrics.log_written.inc,
            on_dropped=metrics.log_dropped.inc,
            shipper=s3_shipper(log_cfg.s3) if log_cfg.s3 else None,
        ).start()
        if log_cfg.enabled
        else None
    )
    name = settings.registry.model_name
    watcher = RegistryWatcher(
        lambda: Tracker.client_for(paths),
        name,
        cfg.model,
        paths.model_cache,
        cfg.runtime,
        cfg.workers,
        cfg.conf,
        cfg.poll_seconds,
        slot,
        metrics,
    )
    watcher.check()  # the current version, before the first request (or the reason there is none)
    ports = TritonPorts(http=free_port(), grpc=cfg.grpc_port, metrics=free_port(), grpc_host=cfg.host)
    instances = [ServedModel(slot, i, metrics, predlog, limits) for i in range(cfg.workers)]
    triton: Any = None
    lost = threading.Event()
    try:
        triton = start_triton(
            name,
            instances,
            ports,
            max_batch_size=cfg.max_batch_size,
            max_queue_delay_ms=cfg.max_queue_delay_ms,
            max_queue_size=cfg.max_queue_size,
            access_token=token,
        )
        watcher.start()
        app = create_app(
            ApiConfig(
                name,
                ports,
                limits,
                cfg.max_images_per_request,
                cfg.max_batch_size,
                token,
                extra_metrics=paths.drift_gauges,
            ),
            slot,
            metrics,
            # The watcher's last look, not a look per request: health probes and every inference read it.
            backend_alive=lambda: not lost.is_set(),
        )
        print(
            f"serving {name} ({slot.state.reason}) on http://{cfg.host}:{cfg.port} (/predict, /v2, /metrics) "
            f"and grpc {cfg.host}:{cfg.grpc_port}",
            flush=True,
        )
        api = uvicorn.Server(
            uvicorn.Config(
                app,
                host=cfg.host,
                port=cfg.port,
                log_level="warning",
                access_log=False,
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
            )
        )
        threading.Thread(
            target=_stop_when_backend_exits, args=(api, triton.is_alive, lost), name="triton-watch", daemon=True
        ).start()
        api.run()
    except KeyboardInterrupt:
        pass
    finally:
        # Within the pod's grace period: the watcher is told to stop but not waited for first (a model it is loading
        # held the stop up to a minute, and the log's last records were lost to the kill). Triton before the log: a
        # gRPC request served after the log closed was neither written nor counted.
        watcher.stop(timeout=0)
        if triton is not None:
            triton.stop()
        if predlog is not None:
            predlog.close()
        watcher.stop(timeout=5)
    if lost.is_set():
        raise BackendLostError()


def _check_writable(folder: Any, what: str, otherwise: str = "") -> None:
    """Before anything starts: a read-only root filesystem without a volume for the project's state is a clear
    error, not a traceback halfway through the start. `otherwise`: what else the user may do."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-check-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StateNotWritableError(
            f"{what} at {folder} is not writable ({exc.strerror}): mount a writable volume there (in the image: "
            f"/app/.conveyor){otherwise}"
        ) from None
