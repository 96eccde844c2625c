"""Inference runtimes behind one small interface: raw model outputs for a preprocessed batch.

Used for export parity (same inputs, compare raw outputs), latency measurement, the benchmark and serving.
Each runtime is given float32 NCHW input in [0, 1] (letterboxed RGB) and returns the model's first output.
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from conveyor.paths import available_cores


class Runtime(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def max_batch(self) -> int | None:
        """The largest batch the model accepts; None for any."""

    def infer(self, batch: np.ndarray) -> np.ndarray: ...


class TorchRuntime:
    """The PyTorch checkpoint, layers fused as the exporters fuse them."""

    def __init__(self, weights: Path) -> None:
        import torch

        from conveyor.yolo import load_yolo

        torch.set_num_threads(available_cores())
        self.name = "pytorch"
        self.max_batch: int | None = None
        self._torch = torch
        self._model = load_yolo(str(weights)).model.fuse().eval().float()  # type: ignore[union-attr]

    def infer(self, batch: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            out = self._model(self._torch.from_numpy(batch))
        first = out[0] if isinstance(out, list | tuple) else out
        return np.asarray(first.numpy())


class OnnxRuntime:
    def __init__(self, model: Path, name: str = "onnxruntime", threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or available_cores()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        self.name = name
        self._session = ort.InferenceSession(str(model), options, providers=providers)
        spec = self._session.get_inputs()[0]
        self._input = spec.name
        self.max_batch: int | None = spec.shape[0] if isinstance(spec.shape[0], int) else None
        self.precision = "fp16" if "float16" in spec.type else "fp32"

    def infer(self, batch: np.ndarray) -> np.ndarray:
        if self.precision == "fp16":
            batch = batch.astype(np.float16)
        return np.asarray(self._session.run(None, {self._input: batch})[0], dtype=np.float32)


class OpenVinoRuntime:
    """OpenVINO on the CPU at the hardware's default precision (bf16 with AMX or AVX512-BF16, else f32)."""

    def __init__(self, model_dir: Path, name: str = "openvino", threads: int | None = None) -> None:
        import openvino as ov

        xml = next(model_dir.glob("*.xml"), None)
        if xml is None:
            raise FileNotFoundError(f"no OpenVINO .xml model in {model_dir}")
        core = ov.Core()
        self.name = name
        model = core.read_model(xml)
        self.max_batch: int | None = None if model.inputs[0].get_partial_shape()[0].is_dynamic else 1
        self._compiled = core.compile_model(
            model, "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads or available_cores()}
        )
        hint = self._compiled.get_property("INFERENCE_PRECISION_HINT")
        self.precision = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)  # e.g. "bf16"

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self._compiled(batch)[0])


class TensorRTRuntime:
    """A TensorRT engine, through Ultralytics' backend (it owns the engine bindings)."""

    def __init__(self, engine: Path) -> None:
        import torch
        from ultralytics.nn.autobackend import AutoBackend

        self.name = "tensorrt"
        self.max_batch: int | None = 1
        self._torch = torch
        self._backend = AutoBackend(str(engine), device=torch.device("cuda:0"))

    def infer(self, batch: np.ndarray) -> np.ndarray:
        out = self._backend(self._torch.from_numpy(batch).to("cuda:0"))
        first = out[0] if isinstance(out, list | tuple) else out
        return np.asarray(first.float().cpu().numpy())


def open_runtime(fmt: str, artifact: Path, name: str | None = None) -> Runtime:
    """The runtime for an exported artifact: `fmt` is Ultralytics' export format (onnx, openvino, engine)."""
    if fmt == "onnx":
        return OnnxRuntime(artifact, name or "onnxruntime")
    if fmt == "openvino":
        return OpenVinoRuntime(artifact, name or "openvino")
    if fmt == "engine":
        return TensorRTRuntime(artifact)
    raise ValueError(f"no runtime for export format {fmt!r}")


def tensorrt_unavailable_reason() -> str | None:
    """Why a TensorRT engine cannot be built on this machine, or None when it can.

    An engine is specific to the GPU and TensorRT version that build it, so it is built where it will run.
    """
    if importlib.util.find_spec("tensorrt") is None:
        return "the 'tensorrt' Python module is not installed (NVIDIA's wheels; build engines on the serving GPU)"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device: TensorRT engines are built on the GPU that will run them"
    return None


def letterbox(images: Sequence[np.ndarray], imgsz: int) -> np.ndarray:
    """Letterboxed float32 NCHW RGB in [0, 1] from BGR frames, exactly as Ultralytics preprocesses for a square
    static input (the evaluation's preprocessing)."""
    from ultralytics.data.augment import LetterBox

    boxer = LetterBox((imgsz, imgsz), auto=False, stride=32)
    frames = []
    for image in images:
        boxed = boxer(image=image)
        assert isinstance(boxed, np.ndarray)
        frames.append(boxed[..., ::-1].transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(frames), dtype=np.float32) / 255.0


def load_images(paths: Sequence[Path], imgsz: int) -> np.ndarray:
    """Image files, letterboxed (see `letterbox`)."""
    import cv2

    frames = []
    for path in paths:
        image = cv2.imread(str(path))
        if image is None:
            raise ValueError(f"cannot read image {path}")
        frames.append(image)
    return letterbox(frames, imgsz)


@dataclass(frozen=True)
class Latency:
    median_ms: float
    p95_ms: float
    runs: int
    batch: int

    @property
    def per_image_ms(self) -> float:
        return self.median_ms / self.batch


def measure_latency(runtime: Runtime, batch: np.ndarray, warmup: int, runs: int) -> Latency:
    """Wall time of `runtime.infer` on one batch: median and p95 over `runs` after `warmup` calls."""
    for _ in range(warmup):
        runtime.infer(batch)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        runtime.infer(batch)
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    p95 = times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
    return Latency(statistics.median(times), p95, runs, len(batch))


def max_abs_diff(runtime: Runtime, reference: np.ndarray, inputs: np.ndarray) -> float:
    """Largest absolute difference between this runtime's raw outputs and the reference, image by image
    when the runtime takes one image at a time."""
    step = runtime.max_batch or len(inputs)
    outputs = np.concatenate([runtime.infer(inputs[i : i + step]) for i in range(0, len(inputs), step)])
    if outputs.shape != reference.shape:
        raise ValueError(f"{runtime.name}: output shape {outputs.shape} differs from the reference {reference.shape}")
    return float(np.max(np.abs(outputs - reference)))
