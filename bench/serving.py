"""Benchmark: the server against the raw runtime, side by side in one run, one table.

    python -m bench.serving            # or: make bench-serving

Same image, same runtime (OpenVINO, the serving default) throughout:
- raw: in-process decode + `Detector.detect` (letterbox, runtime, NMS), no server;
- `/predict` (HTTP image upload), v2 infer over REST (tritonclient.http, binary tensors, through the API) and over
  gRPC (tritonclient.grpc, straight to Triton);
at concurrency 1, 8 and 32 (threads, each with its own client), for three server configurations: dynamic batching
on (max batch 8) and off (max batch 1) with one model instance, and batching on with two instances (workers 2).
Each cell runs a fixed number of requests (bounded in time too) to loopback only. The load generator shares the
machine's cores with the server: on 2 cores, client threads compete with the model, which the numbers include.

Prints the table and writes bench/results/serving.json with the headline keys the serving issue asks for:
`p50_ratio_c1` (served p50 at concurrency 1 / raw p50), `batching_gain_c8` (requests/s with batching / without, at
concurrency 8, /predict) and `errors` (failed requests over the whole run).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
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
from pipelines import registry
from tests.conftest import base_env, stop_tree, wait_http
from tests.serving_support import RunningServer, export_checkpoint, register, start_server

RESULTS = REPO / "bench" / "results" / "serving.json"
CONCURRENCY = (1, 8, 32)
CONFIGS: dict[str, dict[str, Any]] = {
    "batching, 1 worker": {"max_batch_size": 8, "workers": 1},
    "no batching, 1 worker": {"max_batch_size": 1, "workers": 1},
    "batching, 2 workers": {"max_batch_size": 8, "workers": 2},
}


@dataclass
class Cell:
    config: str
    path: str
    concurrency: int
    requests: int
    errors: int
    p50_ms: float
    p99_ms: float
    rps: float


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def drive(
    factory: Callable[[], Callable[[], bool]], concurrency: int, requests: int, max_seconds: float
) -> tuple[list[float], int, float]:
    """`requests` calls spread over `concurrency` threads, each with its own client from `factory`; latencies in
    ms, errors, and wall seconds."""
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    per_thread = max(1, requests // concurrency)
    deadline = time.monotonic() + max_seconds

    def worker(call: Callable[[], bool]) -> None:
        nonlocal errors
        for _ in range(per_thread):
            if time.monotonic() > deadline:
                return
            started = time.perf_counter()
            ok = call()
            elapsed = (time.perf_counter() - started) * 1000
            with lock:
                latencies.append(elapsed)
                errors += 0 if ok else 1

    threads = [threading.Thread(target=worker, args=(factory(),)) for _ in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, errors, time.perf_counter() - started


def clients(server: RunningServer, image: bytes) -> dict[str, Callable[[], Callable[[], bool]]]:
    """Per protocol, a factory of one thread's request function (each thread has its own client)."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    data = np.array([[image]], dtype=object)
    token = {"triton-grpc-protocol-triton-access-token": server.token}

    def predict() -> Callable[[], bool]:
        def call() -> bool:
            request = urllib.request.Request(
                server.url + "/predict", data=image, headers={"Content-Type": "image/jpeg", **server.headers()}
            )
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    response.read()
                    return response.status == 200
            except OSError:
                return False

        return call

    def v2_rest() -> Callable[[], bool]:
        client = httpclient.InferenceServerClient(server.url.removeprefix("http://"), connection_timeout=60)
        tensor = httpclient.InferInput("image", [1, 1], "BYTES")
        tensor.set_data_from_numpy(data, binary_data=True)

        def call() -> bool:
            try:
                client.infer(server.name, [tensor], headers=server.headers())
                return True
            except Exception:
                return False

        return call

    def v2_grpc() -> Callable[[], bool]:
        client = grpcclient.InferenceServerClient(server.grpc)
        tensor = grpcclient.InferInput("image", [1, 1], "BYTES")
        tensor.set_data_from_numpy(data)

        def call() -> bool:
            try:
                client.infer(server.name, [tensor], headers=token)
                return True
            except Exception:
                return False

        return call

    return {"/predict": predict, "v2 REST": v2_rest, "v2 gRPC": v2_grpc}


def raw_latency(artifacts: dict[str, str], image: bytes, runs: int) -> list[float]:
    from pipelines.inference import Detector, ModelCard, decode_image
    from pipelines.runtimes import OpenVinoRuntime

    detector = Detector(OpenVinoRuntime(Path(artifacts["openvino"])), ModelCard.load(Path(artifacts["metadata"])))
    detector.warm_up()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        detector.detect([decode_image(image)])
        times.append((time.perf_counter() - started) * 1000)
    return times


def start_mlflow(root: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        env=base_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", 120, process)
    return process, url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=160, help="requests per cell (at least one per thread)")
    parser.add_argument("--max-seconds", type=float, default=30, help="time bound per cell")
    args = parser.parse_args()
    console = Console()
    from mlflow.tracking import MlflowClient

    from pipelines.synth import generate

    cells: list[Cell] = []
    with tempfile.TemporaryDirectory(prefix="conveyor-bench-serving-") as tmp:
        root = Path(tmp)
        artifacts = export_checkpoint(root / "export")
        from conveyor.settings import SynthSettings

        generate(SynthSettings(seed=5, counts={"train": 0, "val": 0, "test": 1}), root / "images")
        image = next((root / "images" / "images" / "test").glob("*.jpg")).read_bytes()

        raw = raw_latency(artifacts, image, 100)
        raw_p50 = statistics.median(raw)
        cells.append(Cell("in-process", "raw decode + detect", 1, len(raw), 0, raw_p50, percentile(raw, 0.99),
                          1000 / statistics.mean(raw)))  # fmt: skip
        mlflow, url = start_mlflow(root / "mlflow")
        try:
            name = f"bench-{uuid.uuid4().hex[:6]}"
            client = MlflowClient(url)
            version = register(client, name, artifacts)
            registry.promote(client, name, version, reason="benchmark", actor="bench")
            for config, serve in CONFIGS.items():
                console.print(f"[bold]{config}[/]: starting the server ...")
                server = start_server(root / config.replace(" ", "-").replace(",", ""), url, name, serve)
                try:
                    server.wait_version(version)
                    factories = clients(server, image)
                    for path, factory in factories.items():
                        for c in CONCURRENCY:
                            drive(factory, c, max(24, 2 * c), 15)  # warm-up: connections, caches, batch shapes
                            latencies, errors, seconds = drive(factory, c, max(args.requests, c), args.max_seconds)
                            cell = Cell(config, path, c, len(latencies), errors, statistics.median(latencies),
                                        percentile(latencies, 0.99), len(latencies) / seconds)  # fmt: skip
                            cells.append(cell)
                            console.print(
                                f"  {path:10} c={c:<3} p50 {cell.p50_ms:6.1f} ms  p99 {cell.p99_ms:6.1f} ms  "
                                f"{cell.rps:6.1f} req/s  errors {errors}"
                            )
                finally:
                    stop_tree(server.process)
        finally:
            stop_tree(mlflow)

    def find(config: str, path: str, c: int) -> Cell:
        return next(x for x in cells if (x.config, x.path, x.concurrency) == (config, path, c))

    headline = {
        "p50_ratio_c1": round(find("batching, 1 worker", "/predict", 1).p50_ms / raw_p50, 3),
        "p50_ratio_c1_grpc": round(find("batching, 1 worker", "v2 gRPC", 1).p50_ms / raw_p50, 3),
        "batching_gain_c8": round(
            find("batching, 1 worker", "/predict", 8).rps / find("no batching, 1 worker", "/predict", 8).rps, 3
        ),
        "batching_gain_c8_grpc": round(
            find("batching, 1 worker", "v2 gRPC", 8).rps / find("no batching, 1 worker", "v2 gRPC", 8).rps, 3
        ),
        "batching_gain_c32": round(
            find("batching, 1 worker", "/predict", 32).rps / find("no batching, 1 worker", "/predict", 32).rps, 3
        ),
        "workers_gain_c8": round(
            find("batching, 2 workers", "/predict", 8).rps / find("batching, 1 worker", "/predict", 8).rps, 3
        ),
        "errors": sum(cell.errors for cell in cells),
    }
    table = Table(title=f"serving benchmark (OpenVINO, {available_cores()} cores; raw p50 {raw_p50:.1f} ms)")
    for column in ("configuration", "path", "concurrency", "requests", "p50 ms", "p99 ms", "req/s", "errors"):
        table.add_column(column, justify="left" if column in ("configuration", "path") else "right")
    for cell in cells:
        table.add_row(cell.config, cell.path, str(cell.concurrency), str(cell.requests), f"{cell.p50_ms:.1f}",
                      f"{cell.p99_ms:.1f}", f"{cell.rps:.1f}", str(cell.errors))  # fmt: skip
    console.print(table)
    console.print(headline)
    write_result(
        RESULTS,
        {
            **headline,
            "host": host(),
            "raw_p50_ms": round(raw_p50, 2),
            "cells": [asdict(cell) for cell in cells],
        },
        console,
    )


if __name__ == "__main__":
    main()
