"""Benchmark: per-stage wall time of the pipeline and raw runtime latency, side by side in one run.

    python -m bench.pipeline                 # quick profile: real 320 px model, few images and epochs
    python -m bench.pipeline --profile demo  # the repository's params.yaml (the full demo training)

Runs the stages one by one in a throwaway project (embedded MLflow), times a no-op `dvc repro`, then measures
PyTorch, ONNX Runtime and OpenVINO on the exported models at batch 1 and 8 (median and p95 of repeated runs).
Latency depends on the architecture and input size, not on how long the model trained, so the quick profile's
latency table holds for the demo model too. Results are printed and written to bench/results/pipeline-PROFILE.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

import conveyor  # noqa: F401  (offline switches before the ML imports)
from bench.record import host, write_result
from conveyor.lineage import cpu_model
from conveyor.paths import ProjectPaths, available_cores
from conveyor.scaffold import REPO, create_project
from flows.training import pipeline_stages
from pipelines import runtimes

PROFILES: dict[str, dict[str, Any]] = {
    "quick": {
        "synth": {"counts": {"train": 32, "val": 8, "test": 16}},
        "train": {"epochs": 2, "close_mosaic": 0},
        "export": {"latency": {"warmup": 2, "runs": 5}},
    },
    "demo": {},
}


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def stage_times(project: Path, env: dict[str, str], console: Console) -> dict[str, float]:
    conveyor_bin = str(Path(sys.executable).parent / "conveyor")
    times = {"data synth": _run([conveyor_bin, "data", "synth"], project, env)}
    for stage in pipeline_stages(ProjectPaths(project)):  # dvc.yaml's order, as the flow runs them
        console.print(f"stage {stage} ...")
        times[stage] = _run([conveyor_bin, stage], project, env)
    # Record the stages in dvc.lock (`dvc commit`), then time what a user sees when nothing changed.
    _run([sys.executable, "-m", "dvc", "commit", "--force"], project, env)
    noop = [_run([sys.executable, "-m", "dvc", "repro"], project, env) for _ in range(3)]
    times["dvc repro (no-op, median of 3)"] = statistics.median(noop)
    return times


def latency_rows(project: Path, runs: int, console: Console) -> list[dict[str, Any]]:
    export = json.loads((project / "artifacts/export/export.json").read_text())
    imgsz = int(export["imgsz"])
    images = sorted((project / "data/images/test").glob("*.jpg"))[:8]
    batch8 = runtimes.load_images(images, imgsz)
    candidates: list[tuple[str, Any]] = [
        ("PyTorch (eager, fused)", lambda: runtimes.TorchRuntime(project / "artifacts/train/weights/best.pt"))
    ]
    exports = export["exports"]
    if "onnx" in exports:
        candidates.append(("ONNX Runtime, static", lambda: runtimes.OnnxRuntime(project / exports["onnx"]["path"])))
    if "onnx_dynamic" in exports:
        candidates.append(
            ("ONNX Runtime, dynamic", lambda: runtimes.OnnxRuntime(project / exports["onnx_dynamic"]["path"]))
        )
    if "openvino" in exports:
        candidates.append(("OpenVINO", lambda: runtimes.OpenVinoRuntime(project / exports["openvino"]["path"])))
    rows: list[dict[str, Any]] = []
    for label, factory in candidates:
        runtime = factory()
        for batch in (1, 8):
            if runtime.max_batch is not None and batch > runtime.max_batch:
                rows.append({"runtime": label, "batch": batch, "note": "static batch 1"})
                continue
            console.print(f"latency {label} batch {batch} ...")
            latency = runtimes.measure_latency(runtime, np.ascontiguousarray(batch8[:batch]), warmup=3, runs=runs)
            rows.append(
                {
                    "runtime": label,
                    "batch": batch,
                    "median_ms": latency.median_ms,
                    "p95_ms": latency.p95_ms,
                    "per_image_ms": latency.per_image_ms,
                    "precision": str(getattr(runtime, "precision", "fp32")),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--runs", type=int, default=30, help="timed runs per latency cell")
    args = parser.parse_args()
    console = Console(width=120)  # the tables are the point: do not wrap them in a log
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    with tempfile.TemporaryDirectory(prefix="conveyor-bench-") as tmp:
        project = create_project(Path(tmp) / "project", PROFILES[args.profile])
        times = stage_times(project, env, console)
        rows = latency_rows(project, args.runs, console)
        params = (project / "params.yaml").read_text()

    machine = f"{cpu_model()}, {available_cores()} cores"
    stage_table = Table(title=f"pipeline stages, profile '{args.profile}' ({machine})")
    stage_table.add_column("stage")
    stage_table.add_column("wall s", justify="right")
    for stage, seconds in times.items():
        stage_table.add_row(stage, f"{seconds:.1f}")
    latency_table = Table(title=f"raw inference latency, median of {args.runs} runs")
    for column in ("runtime", "precision", "batch", "median ms", "p95 ms", "ms / image"):
        latency_table.add_column(column, justify="left" if column in ("runtime", "precision") else "right")
    for row in rows:
        if "note" in row:
            latency_table.add_row(row["runtime"], "-", str(row["batch"]), "-", "-", row["note"])
        else:
            latency_table.add_row(
                row["runtime"],
                row["precision"],
                str(row["batch"]),
                f"{row['median_ms']:.1f}",
                f"{row['p95_ms']:.1f}",
                f"{row['per_image_ms']:.1f}",
            )
    console.print(stage_table)
    console.print(latency_table)
    write_result(
        REPO / "bench" / "results" / f"pipeline-{args.profile}.json",  # one per profile: the latest run, committed
        {
            "profile": args.profile,
            "host": host(),
            "date": time.strftime("%Y-%m-%d"),
            "stages_s": times,
            "latency": rows,
            "params": params,
        },
        console,
    )


if __name__ == "__main__":
    main()
