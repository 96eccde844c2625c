"""A registered model version, fetched from the registry and opened on a runtime, ready to detect.

`open_version` is the one path from a reference (`@champion`, `models:/NAME/3`, a version) to a model ready to
detect: resolve, fetch, load. The registry version carries everything serving needs as pyfunc artifacts (see
`pipelines/promotion.py`): the ONNX and OpenVINO exports, the PyTorch weights and `metadata.json` (class names, input
size, thresholds). Versions are downloaded once into a local cache keyed by name and version; a partial download
never becomes a cache entry. Serving, monitoring, labelling and the benchmarks all open versions here.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from conveyor.errors import ConveyorError
from conveyor.paths import ProjectPaths, available_cores
from conveyor.settings import Settings
from pipelines import runtimes
from pipelines.inference import Detector, ModelCard
from pipelines.registry import resolve


class RuntimeUnavailableError(ConveyorError, RuntimeError):
    """The configured runtime cannot run here (for example TensorRT without a GPU); the message says why."""


@dataclass(frozen=True)
class ModelFiles:
    """A version's files on local disk."""

    name: str
    version: str
    root: Path
    card: ModelCard
    artifacts: dict[str, Path]  # metadata, weights, onnx, openvino

    def artifact(self, key: str) -> Path:
        if key not in self.artifacts:
            raise FileNotFoundError(
                f"{self.name} v{self.version} has no '{key}' artifact (it has {sorted(self.artifacts)})"
            )
        return self.artifacts[key]


@dataclass(frozen=True)
class LoadedModel:
    name: str
    version: str
    runtime: str
    detectors: list[Detector]  # one per worker instance
    loaded_at: float
    load_seconds: float

    @property
    def card(self) -> ModelCard:
        return self.detectors[0].card


def default_ref(model_name: str, ref: str | None) -> str:
    return ref or f"models:/{model_name}@champion"


def resolve_version(client: MlflowClient, model_name: str, ref: str | None) -> ModelVersion:
    """The version a reference names now (raises ModelRefError when it names none, e.g. no champion yet)."""
    return resolve(client, model_name, default_ref(model_name, ref))


def fetch(client: MlflowClient, version: ModelVersion, cache: Path) -> ModelFiles:
    """The version's pyfunc model directory, from the cache or downloaded into it."""
    import mlflow

    target = cache / version.name / str(version.version)
    if not (target / "MLmodel").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".download-", dir=cache))
        try:
            mlflow.set_tracking_uri(client.tracking_uri)  # models:/ URIs resolve through the process-wide URI
            source = version.source or f"models:/{version.name}/{version.version}"
            mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(staging))
            if not (staging / "MLmodel").is_file():
                raise FileNotFoundError(f"{version.name} v{version.version}: no MLmodel in {source}")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)  # complete or absent: never half a model in the cache
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return read_model_dir(target, version.name, str(version.version))


STALE_DOWNLOAD_SECONDS = 3600  # a `.download-*` folder this old was left by a download killed halfway


def prune(cache: Path, name: str, keep: set[str]) -> list[Path]:
    """Remove the cached versions of `name` other than `keep`, and downloads a kill cut short; returns what went.
    Each champion was downloaded into the cache for good: on Kubernetes it shares a 5 GiB emptyDir with the
    prediction log, and the pod was evicted after enough promotions. A version whose files a process still has open
    (loaded models are in memory) is unaffected; one asked for again is downloaded again."""
    removed = []
    for folder in sorted((cache / name).glob("*")) if (cache / name).is_dir() else []:
        if folder.is_dir() and folder.name not in keep:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    for partial in cache.glob(".download-*") if cache.is_dir() else []:
        try:
            stale = time.time() - partial.stat().st_mtime > STALE_DOWNLOAD_SECONDS
        except FileNotFoundError:  # another process's download, finished meanwhile
            continue
        if stale:
            shutil.rmtree(partial, ignore_errors=True)
            removed.append(partial)
    return removed


def read_model_dir(root: Path, name: str, version: str) -> ModelFiles:
    mlmodel = yaml.safe_load((root / "MLmodel").read_text())
    declared = mlmodel.get("flavors", {}).get("python_function", {}).get("artifacts", {})
    artifacts = {key: root / spec["path"] for key, spec in declared.items()}
    if "metadata" not in artifacts:
        raise FileNotFoundError(f"{name} v{version} has no metadata artifact: was it registered by Conveyor?")
    return ModelFiles(name, version, root, ModelCard.load(artifacts["metadata"]), artifacts)


def check_runtime(runtime: str) -> None:
    """Refuse, with the reason, a runtime this machine cannot run (before anything is downloaded or served)."""
    if runtime == "tensorrt":
        reason = runtimes.tensorrt_unavailable_reason()
        if reason:
            raise RuntimeUnavailableError(f"cannot run on tensorrt: {reason}; use openvino or onnx")


def open_runtime(files: ModelFiles, runtime: str, threads: int | None = None) -> runtimes.Runtime:
    """The version's export for `runtime`; TensorRT builds its engine here, on the GPU that will run it."""
    if runtime in ("openvino", "openvino_int8"):
        if runtime not in files.artifacts:
            raise FileNotFoundError(
                f"{files.name} v{files.version} has no '{runtime}' artifact"
                + (" (export.int8 off, or it failed the parity gate)" if runtime == "openvino_int8" else "")
            )
        return runtimes.OpenVinoRuntime(files.artifact(runtime), runtime, threads=threads)
    if runtime == "onnx":
        return runtimes.OnnxRuntime(files.artifact("onnx"), threads=threads)
    if runtime == "tensorrt":
        check_runtime(runtime)
        return runtimes.TensorRTRuntime(build_engine(files))
    raise RuntimeUnavailableError(f"unknown runtime {runtime!r}: openvino, openvino_int8, onnx or tensorrt")


def build_engine(files: ModelFiles) -> Path:
    """A TensorRT engine from the version's weights, built once per machine and cached beside them."""
    from pipelines.export import VARIANTS, export_variant

    engine_dir = files.root / "tensorrt"
    existing = next(engine_dir.rglob("*.engine"), None) if engine_dir.is_dir() else None
    if existing is not None:
        return existing
    return export_variant(files.artifact("weights"), VARIANTS["tensorrt"], files.card.imgsz, files.root, Path())


def load(files: ModelFiles, runtime: str, workers: int, conf: float | None = None) -> LoadedModel:
    """Open one detector per worker (each with its share of the cores) and warm each up."""
    started = time.perf_counter()
    card = files.card if conf is None else ModelCard(**{**files.card.to_json(), "conf": conf})
    threads = max(1, available_cores() // workers)
    detectors = [Detector(open_runtime(files, runtime, threads), card) for _ in range(workers)]
    for detector in detectors:
        detector.warm_up()
    return LoadedModel(files.name, files.version, runtime, detectors, time.time(), time.perf_counter() - started)


@dataclass(frozen=True)
class OpenedVersion:
    """A registered version, its files, and the model opened on them."""

    version: ModelVersion
    files: ModelFiles
    model: LoadedModel

    @property
    def detector(self) -> Detector:
        return self.model.detectors[0]


def open_version(
    paths: ProjectPaths,
    settings: Settings,
    ref: str | None = None,
    *,
    client: MlflowClient | None = None,
    runtime: str | None = None,
) -> OpenedVersion:
    """The version `ref` names (default `serve.model`, then the champion), fetched into the project's model cache and
    opened on `runtime` (default `serve.runtime`) at `serve.conf`, with one detector: what a command outside the
    server (drift, labelling, a benchmark) detects with."""
    if client is None:
        from conveyor.tracking import Tracker

        client = Tracker.client_for(paths)
    version = resolve_version(client, settings.registry.model_name, ref or settings.serve.model)
    files = fetch(client, version, paths.model_cache)
    return OpenedVersion(version, files, load(files, runtime or settings.serve.runtime, 1, settings.serve.conf))


def profiling_runtime(files: ModelFiles, serving_runtime: str) -> str:
    """The runtime a version's drift reference is computed on: the serving export the profile stage uses
    (`gates.serving_runtime`) when the version has it, else ONNX. All run in f32, so a reference made on one host
    compares with another host's features."""
    return serving_runtime if serving_runtime in files.artifacts else "onnx"
