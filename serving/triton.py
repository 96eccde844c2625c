"""Triton Inference Server (through PyTriton) around the served model: the Open Inference Protocol over HTTP and
gRPC, dynamic batching with a bounded queue, one model instance per worker, and Triton's Prometheus metrics.

Why PyTriton (measured, see docs/serving.md): it resolves in one environment with Prefect 3.8 and MLflow 3, while
MLServer needs FastAPI < 0.116; tritonclient's binary tensors work over both protocols (MLServer's REST rejects them);
and a cluster runs the same `ServedModel` in Triton's Python backend.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import secrets
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from serving.model import IMAGE_INPUT, OUTPUTS, TENSOR_INPUT, NoModelError, ServedModel

LOG = logging.getLogger("conveyor.serving")
# The start of what a client reads when a batch failed on the server (the API in front maps it to 500, not 400).
INFERENCE_FAILED = "inference failed on the server"
NOT_READY = "not ready: no model is loaded (GET /v2/health/ready says why)"
TRITON_EXIT_SECONDS = 5  # Triton's wait for its requests in flight when it stops
MAX_QUEUE_SECONDS = 60.0  # a request's sent_at older than this is not the API's: left out of the queue's time

TENSOR_SUFFIX = "_preprocessed"
# Triton's administrative extensions: loading a model (code, through the Python backend), shared memory, logs, traces,
# statistics. Only PyTriton holds their token (random at each start): it binds the models through the repository API.
ADMIN_PROTOCOLS = ["shared-memory", "model-repository", "statistics", "trace", "logging"]
# What a client with the serving token may call directly on the gRPC port (health is open, as in the API in front).
CLIENT_PROTOCOLS = ["inference", "metadata", "model-config"]


@dataclass(frozen=True)
class TritonPorts:
    http: int  # internal: the API in front proxies /v2 here
    grpc: int  # public: tritonclient.grpc talks to it directly
    metrics: int  # internal: appended to the API's /metrics
    grpc_host: str


def _python_backend_library_path() -> None:
    """Triton's Python backend stub links libpython; left alone it may load the system's copy, which breaks a
    different interpreter build's stdlib. Put this interpreter's library directory first (PyTriton passes the
    environment to the server)."""
    libdir = sysconfig.get_config_var("LIBDIR")
    current = os.environ.get("LD_LIBRARY_PATH", "")
    if libdir and not current.startswith(str(libdir)):
        os.environ["LD_LIBRARY_PATH"] = f"{libdir}:{current}" if current else str(libdir)


def start_triton(
    model_name: str,
    instances: list[ServedModel],
    ports: TritonPorts,
    *,
    max_batch_size: int,
    max_queue_delay_ms: float,
    max_queue_size: int,
    access_token: str | None,
) -> Any:
    """Start Triton with the image model and the preprocessed-tensor model bound; returns the running server."""
    from pytriton.model_config import DynamicBatcher, ModelConfig, QueuePolicy, Tensor
    from pytriton.model_config.common import TimeoutAction
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    _python_backend_library_path()
    triton = Triton(
        config=TritonConfig(
            http_address="127.0.0.1",
            http_port=ports.http,
            grpc_address=ports.grpc_host,
            grpc_port=ports.grpc,
            metrics_address="127.0.0.1",
            metrics_port=ports.metrics,
            allow_cpu_metrics=True,
            exit_timeout_secs=TRITON_EXIT_SECONDS,
            log_verbose=0,
        ),
        security_config=TritonSecurityConfig(
            access_token=secrets.token_urlsafe(32), restricted_endpoints=list(ADMIN_PROTOCOLS)
        ),
    )
    if access_token:  # clients must send `triton-access-token` (gRPC metadata; the HTTP API checks a bearer token)
        _restrict_for_clients(triton, access_token)

    # Always through the dynamic batcher: with max_batch_size 1 it does not batch, but its queue stays bounded.
    config = ModelConfig(
        batching=True,
        max_batch_size=max_batch_size,
        batcher=DynamicBatcher(
            max_queue_delay_microseconds=int(max_queue_delay_ms * 1000) if max_batch_size > 1 else 0,
            default_queue_policy=QueuePolicy(
                timeout_action=TimeoutAction.REJECT, max_queue_size=max_queue_size, allow_timeout_override=True
            ),
        ),
    )
    outputs = [Tensor(name=o.name, dtype=o.dtype, shape=o.shape) for o in OUTPUTS]

    def image_fn(served: ServedModel) -> Any:
        @_failing_without_traceback
        def infer(requests: list[Any]) -> list[dict[str, np.ndarray]]:
            sent = [_sent_at(r) for r in requests]
            return served.execute_images([r[IMAGE_INPUT] for r in requests], sent)

        return infer

    def tensor_fn(served: ServedModel) -> Any:
        @_failing_without_traceback
        def infer(requests: list[Any]) -> list[dict[str, np.ndarray]]:
            return served.execute_tensors([r[TENSOR_INPUT] for r in requests])

        return infer

    triton.bind(
        model_name=model_name,
        infer_func=[image_fn(s) for s in instances],
        inputs=[Tensor(name=IMAGE_INPUT, dtype=bytes, shape=(1,))],
        outputs=outputs,
        config=config,
        strict=False,
    )
    triton.bind(
        model_name=model_name + TENSOR_SUFFIX,
        infer_func=[tensor_fn(s) for s in instances],
        inputs=[Tensor(name=TENSOR_INPUT, dtype=np.float32, shape=(3, -1, -1))],
        outputs=outputs,
        config=config,
        strict=False,
    )
    triton.run()
    return triton


def _restrict_for_clients(triton: Any, token: str) -> None:
    """The clients' token for inference, metadata and model configuration, as a rule of its own beside the
    administrative one PyTriton wrote with its token. With one token for both (PyTriton's one rule), anyone who may
    infer could load a model, that is, run code on this machine. Triton takes a restriction flag once per rule;
    PyTriton writes a single rule, and its config writer repeats a list value as repeated flags."""
    from pytriton.triton import TRITON_ACCESS_HEADER

    config = triton._triton_server_config  # PyTriton has no API for a second rule
    rule = f"{','.join(CLIENT_PROTOCOLS)}:{TRITON_ACCESS_HEADER}={token}"
    for flag in ("grpc-restricted-protocol", "http-restricted-api"):
        config[flag] = [config[flag], rule]


class InferenceFailure(Exception):
    """What a client reads when a batch failed on the server: this message and no more. PyTriton answers a failed
    request with its exception formatted with the traceback (`traceback.format_exception` of `__traceback__`), so
    every client, a direct gRPC one included, read the server's files, lines and the error's own text (a cache path,
    a registry URL). The traceback is logged here; this exception shows PyTriton none."""

    @property  # read by traceback.format_exception only; the interpreter keeps its own
    def __traceback__(self) -> None:
        return None

    @__traceback__.setter
    def __traceback__(self, _: Any) -> None:
        pass


def _failing_without_traceback(infer: Callable[[list[Any]], Any]) -> Callable[[list[Any]], Any]:
    @functools.wraps(infer)
    def answered(requests: list[Any]) -> Any:
        try:
            return infer(requests)
        except NoModelError:
            raise InferenceFailure(NOT_READY) from None
        except Exception as exc:
            LOG.exception("inference failed on a batch of %d requests", len(requests))
            raise InferenceFailure(
                f"{INFERENCE_FAILED} ({type(exc).__name__}): the server's log has the details"
            ) from None

    return answered


def _sent_at(request: Any) -> float | None:
    """When the API in front sent the request (its `sent_at` parameter): the queue's time. Any client may set it, so a
    value that is not a recent time (not finite, in the future, over a minute old) is not one."""
    value = (getattr(request, "parameters", None) or {}).get("sent_at")
    try:
        sent = float(value) if value is not None else None
    except (TypeError, ValueError):
        return None
    if sent is None or not math.isfinite(sent) or not 0 <= time.time() - sent <= MAX_QUEUE_SECONDS:
        return None
    return sent
