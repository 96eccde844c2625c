"""Inference runtimes behind one small interface: raw model outputs for a preprocessed batch.

Used for export parity (same inputs, compare raw outputs), latency measurement, the benchmark and serving.
Each runtime is given float32 NCHW input in [0, 1] (letterboxed RGB) and returns the model's first output (`infer`),
or that and the model's `features` output when the export has one (`infer_with_features`; see
`pipelines/model_features.py`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import statistics
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from conveyor.paths import available_cores
from pipelines import model_features


class Runtime(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def max_batch(self) -> int | None:
        """The largest batch the model accepts; None for any."""

    def infer(self, batch: np.ndarray) -> np.ndarray: ...

    def infer_with_features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The first output and the `features` output [n, channels], or None when the model has none."""


class TorchRuntime:
    """The PyTorch checkpoint, layers fused as the exporters fuse them; its features are the reference the exported
    `features` outputs are checked against."""

    def __init__(self, weights: Path) -> None:
        import torch

        from conveyor.yolo import load_yolo

        torch.set_num_threads(available_cores())
        self.name = "pytorch"
        self.max_batch: int | None = None
        self._torch = torch
        self._model = load_yolo(str(weights)).model.fuse().eval().float()  # type: ignore[union-attr]
        self._maps: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._layers = model_features.head_inputs(self._model)
        for layer in self._layers:
            self._model.model[layer].register_forward_hook(
                lambda module, args, output, layer=layer: self._maps.__setitem__(layer, output)
            )

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.infer_with_features(batch)[0]

    def infer_with_features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        with self._lock, self._torch.inference_mode():  # the hooks keep the last call's maps: one call at a time
            out = self._model(self._torch.from_numpy(batch))
            features = model_features.pooled([self._maps[layer] for layer in self._layers])
        first = out[0] if isinstance(out, list | tuple) else out
        return np.asarray(first.numpy()), features


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
        names = [o.name for o in self._session.get_outputs()]
        self._outputs = [names[0]] + (
            [model_features.FEATURES_OUTPUT] if model_features.FEATURES_OUTPUT in names else []
        )

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.infer_with_features(batch)[0]

    def infer_with_features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if self.precision == "fp16":
            batch = batch.astype(np.float16)
        outputs = self._session.run(self._outputs, {self._input: batch})
        features = np.asarray(outputs[1], dtype=np.float32) if len(outputs) > 1 else None
        return np.asarray(outputs[0], dtype=np.float32), features


class OpenVinoRuntime:
    """OpenVINO on the CPU, in f32 on every host.

    OpenVINO's default on CPUs with AMX or AVX512-BF16 is bf16: about 30 % faster here (9.0 against 13.0 ms a 320 px
    image, Xeon with AMX), but the model's features output then moves by up to 14 % (relative L2, a fine-tuned
    checkpoint; 1.7 % the demo champion) and its detections by a little. A drift reference made on one host would
    then be compared with another host's features, and the parity gate would judge the host. f32 gives the same
    numbers on every CPU (3e-7 of PyTorch's).

    Its threads are not pinned to cores (OpenVINO pins them on Linux by default). A model server or a line PC shares
    its cores with other work, and a pinned thread cannot leave the core that work landed on: on 2 cores, the demo
    model took 52.3 ms per image pinned against 10.4 ms unpinned with one core busy, and 17.1 against 11.0 ms with
    another process's bursts of work; quiet, the two are alike. The latency gate's verdict on a model against itself
    moved by 0.02-0.03 (sd) pinned and by 0.001-0.002 unpinned (`make bench-gate`)."""

    def __init__(
        self, model_dir: Path, name: str = "openvino", threads: int | None = None, *, pin_threads: bool = False
    ) -> None:
        import openvino as ov

        xml = next(model_dir.glob("*.xml"), None)
        if xml is None:
            raise FileNotFoundError(f"no OpenVINO .xml model in {model_dir}")
        core = ov.Core()
        self.name = name
        model = core.read_model(xml)
        self.max_batch: int | None = None if model.inputs[0].get_partial_shape()[0].is_dynamic else 1
        self._compiled = core.compile_model(
            model,
            "CPU",
            {
                "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_NUM_THREADS": threads or available_cores(),
                "INFERENCE_PRECISION_HINT": "f32",
                "ENABLE_CPU_PINNING": pin_threads,
            },
        )
        hint = self._compiled.get_property("INFERENCE_PRECISION_HINT")
        self.precision = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)  # e.g. "bf16"
        self._features = next(
            (o for o in self._compiled.outputs if model_features.FEATURES_OUTPUT in o.get_names()), None
        )
        self._lock = threading.Lock()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.infer_with_features(batch)[0]

    def infer_with_features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        # The compiled model's call uses one infer request: two threads at once (the server's image and tensor
        # models share a worker's runtime) fail with "Infer Request is busy". One at a time; the outputs are copied
        # out before the next call reuses the request's buffers.
        with self._lock:
            outputs = self._compiled(batch)
            features = np.array(outputs[self._features]) if self._features is not None else None
            return np.array(outputs[0]), features


class TensorRTRuntime:
    """A TensorRT engine, through Ultralytics' backend (it owns the engine bindings)."""

    def __init__(self, engine: Path) -> None:
        import torch
        from ultralytics.nn.autobackend import AutoBackend

        self.name = "tensorrt"
        self.max_batch: int | None = 1
        self._torch = torch
        self._backend = AutoBackend(str(engine), device=torch.device("cuda:0"))
        self._lock = threading.Lock()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.infer_with_features(batch)[0]

    def infer_with_features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        # Ultralytics' TensorRT backend rebinds shared buffers on each call and returns them: two threads at once
        # (the server's image and tensor models share a worker's runtime) could read each other's outputs. One call
        # at a time, the outputs copied to the host before the next call reuses them.
        with self._lock:
            out = self._backend(self._torch.from_numpy(batch).to("cuda:0"))
            outputs = list(out) if isinstance(out, list | tuple) else [out]
            # The engine is built from the ONNX export, whose second output is `features` when it has one.
            features = np.asarray(outputs[1].float().cpu().numpy()) if len(outputs) > 1 else None
            return np.asarray(outputs[0].float().cpu().numpy()), features


@contextlib.contextmanager
def openvino_f32() -> Iterator[None]:
    """OpenVINO models compiled in this block run in f32, as Conveyor's runtimes run them. Ultralytics' backend (the
    export stage scores each export through its validator) compiles with a config of its own, and on a CPU with bf16
    (AVX-512 bf16, AMX) OpenVINO's default is then bf16: the parity gate's ΔmAP50-95 measured a precision nothing
    serves (raw outputs 12 apart against 2e-4 in f32, on the Zen 4 EPYC). OpenVINO takes the hint only per compile."""
    import openvino as ov

    original = ov.Core.compile_model

    def compile_f32(self: Any, model: Any, device_name: Any = None, config: Any = None, **kwargs: Any) -> Any:
        return original(self, model, device_name, {**(config or {}), "INFERENCE_PRECISION_HINT": "f32"}, **kwargs)

    ov.Core.compile_model = compile_f32
    try:
        yield
    finally:
        ov.Core.compile_model = original


def open_runtime(fmt: str, artifact: Path, name: str | None = None) -> Runtime:
    """The runtime for an exported artifact: `fmt` is Ultralytics' export format (onnx, openvino, engine)."""
    if fmt == "onnx":
        return OnnxRuntime(artifact, name or "onnxruntime")
    if fmt == "openvino":
        return OpenVinoRuntime(artifact, name or "openvino")
    if fmt == "engine":
        return TensorRTRuntime(artifact)
    raise ValueError(f"no runtime for export format {fmt!r}")


def open_serving_export(name: str, artifact: Path) -> Runtime:
    """A serving export by its export name (`gates.serving_runtime`: openvino, openvino_int8, onnx, onnx_dynamic),
    from its export.json path: the OpenVINO folder or the ONNX file."""
    return open_runtime("openvino" if name.startswith("openvino") else "onnx", artifact, name)


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


@dataclass(frozen=True)
class Parity:
    """How far a runtime's outputs are from the reference's on the same inputs."""

    max_abs_diff: float  # the detection output, in its own units (pixels, scores)
    features_rel_diff: float | None  # the features output: max |Δ| over the reference's max |value|; None: none


def compare(runtime: Runtime, reference: np.ndarray, reference_features: np.ndarray, inputs: np.ndarray) -> Parity:
    """Both outputs of `runtime` against the reference's, image by image when it takes one image at a time."""
    step = runtime.max_batch or len(inputs)
    pairs = [runtime.infer_with_features(inputs[i : i + step]) for i in range(0, len(inputs), step)]
    outputs = np.concatenate([raw for raw, _ in pairs])
    if outputs.shape != reference.shape:
        raise ValueError(f"{runtime.name}: output shape {outputs.shape} differs from the reference {reference.shape}")
    found = [features for _, features in pairs]
    features_diff = None
    if all(f is not None for f in found):
        features = np.concatenate([f for f in found if f is not None])
        if features.shape != reference_features.shape:
            raise ValueError(
                f"{runtime.name}: features output {features.shape} differs from the reference "
                f"{reference_features.shape}"
            )
        scale = float(np.max(np.abs(reference_features))) or 1.0
        features_diff = float(np.max(np.abs(features - reference_features))) / scale
    return Parity(float(np.max(np.abs(outputs - reference))), features_diff)
