"""The GPU path in one command: `make gpu-check` (python -m bench.gpu).

On a machine with an NVIDIA GPU (`make gpu-check` first syncs uv.lock's `gpu` group: NVIDIA's TensorRT for the
locked torch's CUDA), with the demo checkpoint (tests/assets) and a labelled synthetic test split:
1. engine: a TensorRT engine built on this GPU, as the export stage builds one (`export.export_variant`);
2. parity gate: its raw outputs and its mAP50-95 against PyTorch's on the same images, judged by the pipeline's own
   gate (`gate.export_gates`, params.yaml's `gates.parity_max_delta`);
3. served: `conveyor serve --runtime tensorrt` against a local MLflow server, whose `/predict` and gRPC (tritonclient)
   answers must match the OpenVINO server's detections;
4. benchmark: raw runtime latency and served requests/s (/predict and gRPC, concurrency 1 and 8), side by side with
   OpenVINO on this machine's CPU, one table;
5. results in bench/results/gpu.json.

Without a CUDA device it refuses in one line (exit 2) and runs nothing. `--runtime onnx` runs the same steps with
ONNX Runtime standing in for TensorRT, on a CPU: what the tests run (tests/test_gpu_check.py), so every step but
the engine build itself is checked where no GPU is.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import urllib.request
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
from rich.console import Console
from rich.table import Table

import conveyor  # noqa: F401  (offline switches before the ML imports)
from bench.record import host, write_result
from conveyor.scaffold import REPO

if TYPE_CHECKING:
    from bench.serving import Cell

RESULTS = REPO / "bench" / "results" / "gpu.json"
# The runtime under test -> its export variant (what the registry version's files and the gate call it).
VARIANT = {"tensorrt": "tensorrt", "onnx": "onnx_dynamic"}
BASELINE = "openvino"  # the CPU serving default, measured beside it
CONCURRENCY = (1, 8)
EXIT_REFUSED = 2


def refuse(reason: str) -> NoReturn:
    """Not a machine this check can run on: one line, exit 2, nothing built or started."""
    print(f"gpu-check refused: {reason}", file=sys.stderr)
    raise SystemExit(EXIT_REFUSED)


def preflight(runtime: str, gpu_only: bool = False) -> None:
    """Refuse unless `runtime` can run here. `gpu_only`: a CUDA device is enough (`make gpu-check` asks this before
    it installs TensorRT, so a machine without a GPU downloads nothing)."""
    if runtime != "tensorrt":
        return
    import torch

    if not torch.cuda.is_available():
        refuse("no CUDA device here (torch sees none): run it on the GPU machine that will serve")
    from pipelines.runtimes import tensorrt_unavailable_reason

    reason = None if gpu_only else tensorrt_unavailable_reason()
    if reason:
        refuse(reason)


def detections_agree(ours: list[dict[str, Any]], theirs: list[dict[str, Any]], min_iou: float = 0.5) -> float:
    """The share of detections (of the larger set) matched one to one by class and IoU >= min_iou."""

    def iou(a: list[float], b: list[float]) -> float:
        width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = width * height
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return inter / union if union > 0 else 0.0

    if not ours and not theirs:
        return 1.0
    left = list(theirs)
    matched = 0
    for found in ours:
        best = max(
            (d for d in left if d["class_id"] == found["class_id"]),
            key=lambda d: iou(found["box"], d["box"]),
            default=None,
        )
        if best is not None and iou(found["box"], best["box"]) >= min_iou:
            matched += 1
            left.remove(best)
    return matched / max(len(ours), len(theirs))


def predict(url: str, token: str, image: bytes) -> list[dict[str, Any]]:
    request = urllib.request.Request(
        url + "/predict", data=image, headers={"Content-Type": "image/jpeg", "Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        detections: list[dict[str, Any]] = json.loads(response.read())["images"][0]["detections"]
    return detections


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", choices=sorted(VARIANT), default="tensorrt", help="onnx: the CPU stand-in")
    parser.add_argument("--gpu-only", action="store_true", help="only refuse or not: is there a CUDA device?")
    parser.add_argument("--images", type=int, default=32, help="labelled test images for the parity gate")
    parser.add_argument("--requests", type=int, default=160, help="requests per benchmark cell")
    parser.add_argument("--max-seconds", type=float, default=30, help="time bound per benchmark cell")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    preflight(args.runtime, args.gpu_only)
    if args.gpu_only:
        return
    run_check(args.runtime, args.images, args.requests, args.max_seconds, args.out)


def run_check(runtime: str, images: int, requests: int, max_seconds: float, out: Path) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    from bench.serving import Cell, clients, drive, percentile, start_mlflow
    from conveyor.settings import EvaluateSettings, SynthSettings, load_settings
    from pipelines import registry, runtimes
    from pipelines.evaluate import evaluate_checkpoint
    from pipelines.export import VARIANTS, export_variant
    from pipelines.gate import export_gates
    from pipelines.synth import generate
    from tests.conftest import stop_tree
    from tests.serving_support import CHECKPOINT, export_checkpoint, register, start_server

    console = Console()
    variant = VARIANTS[VARIANT[runtime]]
    imgsz = 320
    with tempfile.TemporaryDirectory(prefix="conveyor-gpu-check-") as tmp:
        root = Path(tmp)
        generate(SynthSettings(seed=21, counts={"train": 0, "val": 0, "test": images}), root / "data")
        data_yaml = root / "data" / "data.yaml"
        test_images = sorted((root / "data" / "images" / "test").glob("*.jpg"))

        # 1. The engine (or the stand-in's export), as the export stage makes it.
        console.print(f"[bold]1/4[/] building {variant.name} from {CHECKPOINT.name} ...")
        artifact = export_variant(CHECKPOINT, variant, imgsz, root / "export", data_yaml)
        model = runtimes.open_runtime(variant.format, artifact, variant.name)
        baseline_artifact = export_variant(CHECKPOINT, VARIANTS[BASELINE], imgsz, root / "export", data_yaml)
        baseline = runtimes.open_runtime("openvino", baseline_artifact, BASELINE)

        # 2. The parity gate: raw outputs on a few images, mAP50-95 on the labelled split, judged as the gate does.
        console.print(f"[bold]2/4[/] parity against PyTorch on {len(test_images)} labelled images ...")
        inputs = runtimes.load_images(test_images[:8], imgsz)
        reference, reference_features = runtimes.TorchRuntime(CHECKPOINT).infer_with_features(inputs)
        assert reference_features is not None
        parity = runtimes.compare(model, reference, reference_features, inputs)
        settings = EvaluateSettings()
        scores = {
            name: evaluate_checkpoint(path, data_yaml, "test", settings, root / "eval" / name, imgsz=imgsz, batch=1,
                                      plots=False).map50_95
            for name, path in (("pytorch", CHECKPOINT), (variant.name, artifact))
        }  # fmt: skip
        gates_cfg = load_settings(REPO / "params.yaml").gates.model_copy(update={"serving_formats": [variant.name]})
        exported = {
            "max_abs_diff": parity.max_abs_diff,
            "features_rel_diff": parity.features_rel_diff,
            "delta_map50_95": scores[variant.name] - scores["pytorch"],
        }
        gates = export_gates({"exports": {variant.name: exported}}, gates_cfg)

        latency = {
            name: runtimes.measure_latency(rt, inputs[:1], warmup=5, runs=50).per_image_ms
            for name, rt in ((runtime, model), (BASELINE, baseline))
        }

        # 3. Served by `conveyor serve --runtime ...` and by the OpenVINO server, from one registry version.
        console.print(f"[bold]3/4[/] serving with --runtime {runtime} beside --runtime {BASELINE} ...")
        cells: list[Cell] = []  # Cell.config: the runtime served
        agreement: list[float] = []
        mlflow, url = start_mlflow(root / "mlflow")
        servers = {}
        try:
            name = f"gpu-check-{uuid.uuid4().hex[:6]}"
            client = MlflowClient(url)
            version = register(client, name, export_checkpoint(root / "version"))
            registry.promote(client, name, version, reason="gpu-check", actor="bench")
            for served in (runtime, BASELINE):
                servers[served] = start_server(root / f"serve-{served}", url, name, {"runtime": served})
                servers[served].wait_version(version, timeout=600)  # a TensorRT engine builds at load: minutes
            for path in test_images[:8]:
                image = path.read_bytes()
                ours, theirs = (predict(s.url, s.token, image) for s in (servers[runtime], servers[BASELINE]))
                agreement.append(detections_agree(ours, theirs))

            # 4. The serving benchmark, both runtimes in this run.
            console.print("[bold]4/4[/] serving benchmark ...")
            image = test_images[0].read_bytes()
            for served, server in servers.items():
                factories = clients(server, image)
                for path_name in ("/predict", "v2 gRPC"):
                    for c in CONCURRENCY:
                        drive(factories[path_name], c, max(8, 2 * c), 15)  # warm-up
                        times, errors, seconds = drive(factories[path_name], c, max(requests, c), max_seconds)
                        cells.append(Cell(served, path_name, c, len(times), errors, statistics.median(times),
                                            percentile(times, 0.99), len(times) / seconds))  # fmt: skip
        finally:
            for server in servers.values():
                stop_tree(server.process)
            stop_tree(mlflow)

    passed = all(g.passed for g in gates)
    served_agreement = float(np.mean(agreement))
    errors = sum(cell.errors for cell in cells)
    result = {
        "runtime": runtime,
        "stand_in": runtime != "tensorrt",
        "device": device_name(runtime),
        "host": host(),
        "artifact": variant.name,
        "parity": {
            "max_abs_diff": parity.max_abs_diff,
            "features_rel_diff": parity.features_rel_diff,
            "map50_95": scores[variant.name],
            "pytorch_map50_95": scores["pytorch"],
            "gates": [asdict(g) for g in gates],
            "passed": passed,
        },
        "latency_ms": {name: round(ms, 3) for name, ms in latency.items()},
        "speedup_vs_openvino": round(latency[BASELINE] / latency[runtime], 3),
        "served_agreement": round(served_agreement, 4),
        "serving": [{"runtime": cell.config, **asdict(cell)} for cell in cells],
        "errors": errors,
        "ok": passed and served_agreement >= 0.95 and errors == 0,
    }
    show(console, result, cells)
    write_result(out, result, console)
    if not result["ok"]:
        raise SystemExit(1)
    return result


def device_name(runtime: str) -> str:
    if runtime == "tensorrt":
        import torch

        return str(torch.cuda.get_device_name(0))
    return f"CPU stand-in ({platform.machine()})"


def show(console: Console, result: dict[str, Any], cells: list[Cell]) -> None:
    gates = Table(title=f"gpu-check: {result['artifact']} on {result['device']}")
    for column in ("check", "threshold", "value", "passed"):
        gates.add_column(column)
    for gate in result["parity"]["gates"]:
        gates.add_row(gate["gate"], gate["threshold"], gate["value"], "yes" if gate["passed"] else "[red]no[/]")
    gates.add_row("served detections agree", ">= 95 %", f"{result['served_agreement']:.0%}",
                  "yes" if result["served_agreement"] >= 0.95 else "[red]no[/]")  # fmt: skip
    console.print(gates)
    table = Table(title="latency and serving, side by side (this run, this host)")
    for column in ("runtime", "path", "concurrency", "p50 ms", "p99 ms", "req/s", "errors"):
        table.add_column(column, justify="right" if column not in ("runtime", "path") else "left")
    for name, ms in result["latency_ms"].items():
        table.add_row(name, "raw, batch 1", "1", f"{ms:.2f}", "", f"{1000 / ms:.1f}", "")
    for cell in cells:
        table.add_row(cell.config, cell.path, str(cell.concurrency), f"{cell.p50_ms:.1f}", f"{cell.p99_ms:.1f}",
                      f"{cell.rps:.1f}", str(cell.errors))  # fmt: skip
    console.print(table)


if __name__ == "__main__":
    main()
