"""`make gpu-check` (bench/gpu.py): the GPU path in one command.

Without a CUDA device (this machine, CI) it must refuse in one line before installing or starting anything. Its
steps (build, parity gate, serve, benchmark, results) run here with ONNX Runtime standing in for TensorRT: only the
engine build and TensorRT's own numbers need the GPU.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from bench.gpu import EXIT_REFUSED, detections_agree
from conveyor.scaffold import REPO
from pipelines.runtimes import tensorrt_unavailable_reason
from tests.conftest import VENV_BIN, base_env


def test_make_gpu_check_refuses_in_one_line_without_a_gpu() -> None:
    if tensorrt_unavailable_reason() is None:
        pytest.skip("this machine can run TensorRT: `make gpu-check` runs for real here")
    result = subprocess.run(
        ["make", "--no-print-directory", "-s", "gpu-check"], cwd=REPO, env=base_env(), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    # make's own closing line ("make: *** [Makefile:N: gpu-check] Error 2", make[1] under `make test`) aside.
    own = [
        line for line in (result.stdout + result.stderr).splitlines() if not re.match(r"make(\[\d+\])?: \*\*\*", line)
    ]
    assert result.returncode != 0
    assert own == [
        "gpu-check refused: no CUDA device here (torch sees none): run it on the GPU machine that will serve"
    ]
    direct = subprocess.run([VENV_BIN / "python", "-m", "bench.gpu"], cwd=REPO, capture_output=True, text=True)
    assert direct.returncode == EXIT_REFUSED and direct.stdout == "" and len(direct.stderr.splitlines()) == 1


@pytest.mark.slow
def test_gpu_check_steps_run_with_a_cpu_runtime_standing_in(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    result = subprocess.run(
        [VENV_BIN / "python", "-m", "bench.gpu", "--runtime", "onnx", "--images", "8", "--requests", "8",
         "--max-seconds", "10", "--out", str(out)],
        cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    found = json.loads(out.read_text())
    assert found["stand_in"] and found["runtime"] == "onnx" and found["artifact"] == "onnx_dynamic"
    gates = {gate["gate"]: gate["passed"] for gate in found["parity"]["gates"]}
    assert gates == {"parity onnx_dynamic": True, "features parity onnx_dynamic": True}
    assert (
        found["parity"]["max_abs_diff"] < 0.05
        and abs(found["parity"]["map50_95"] - found["parity"]["pytorch_map50_95"]) < 0.01
    )
    assert found["served_agreement"] >= 0.95 and found["errors"] == 0 and found["ok"]
    cells = {(c["runtime"], c["path"], c["concurrency"]) for c in found["serving"] if c["requests"] > 0}
    assert cells == {(r, p, c) for r in ("onnx", "openvino") for p in ("/predict", "v2 gRPC") for c in (1, 8)}
    latency = found["latency_ms"]
    assert set(latency) == {"onnx", "openvino"} and min(latency.values()) > 0
    assert found["speedup_vs_openvino"] == pytest.approx(latency["openvino"] / latency["onnx"], abs=0.002)
    assert "served detections agree" in result.stdout  # the table a person reads


def box(class_id: int, x: float) -> dict[str, object]:
    return {"class_id": class_id, "box": [x, 10.0, x + 20.0, 30.0]}


def test_detections_agree_one_to_one_by_class_and_overlap() -> None:
    assert detections_agree([], []) == 1.0
    assert detections_agree([box(0, 10)], [box(0, 11)]) == 1.0
    assert detections_agree([box(0, 10)], [box(1, 10)]) == 0.0  # same place, another class
    assert detections_agree([box(0, 10)], [box(0, 25)]) == 0.0  # IoU 0.14
    assert detections_agree([box(0, 10), box(0, 10)], [box(0, 10)]) == 0.5  # one match each, of the larger set
    assert detections_agree([box(0, 10)], []) == 0.0
