"""Export the trained model (ONNX static and dynamic batch, OpenVINO, optional FP16/INT8, TensorRT on a GPU) and
measure each export against the PyTorch model: max abs difference of raw outputs on the same inputs, ΔmAP50-95 on
the test split with identical evaluation settings, and per-image latency. ONNX and OpenVINO exports get a second
output, `features` (what the detection head sees, pooled: `pipelines/model_features.py`), checked against PyTorch
on the same inputs (`features_rel_diff`; the gate holds it to `gates.features_max_rel_diff`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from conveyor.errors import ConveyorError
from conveyor.lineage import cpu_model
from conveyor.paths import ProjectPaths
from conveyor.settings import ExportSettings, Settings
from conveyor.tables import FoldingTable
from conveyor.tracking import Tracker
from conveyor.yolo import load_yolo
from pipelines import model_features, runtimes
from pipelines.dataset_view import materialize
from pipelines.evaluate import Evaluation, evaluate_checkpoint, trained_imgsz


@dataclass(frozen=True)
class Variant:
    """One exported artifact: a directory of its own, so exports never overwrite each other."""

    name: str
    format: str  # Ultralytics' export format
    dynamic: bool = False
    quantize: int | None = None

    def directory(self, root: Path) -> Path:
        return root / self.name


VARIANTS: dict[str, Variant] = {
    "onnx": Variant("onnx", "onnx"),
    "onnx_dynamic": Variant("onnx_dynamic", "onnx", dynamic=True),
    "onnx_fp16": Variant("onnx_fp16", "onnx", quantize=16),
    "onnx_int8": Variant("onnx_int8", "onnx", quantize=8),
    # OpenVINO with a dynamic batch: one artifact serves single frames and batches.
    "openvino": Variant("openvino", "openvino", dynamic=True),
    # Post-training INT8 with NNCF, calibrated on the val split (Ultralytics' recipe: mixed preset, head kept float).
    "openvino_int8": Variant("openvino_int8", "openvino", dynamic=True, quantize=8),
    "tensorrt": Variant("tensorrt", "engine"),
    "tensorrt_fp16": Variant("tensorrt_fp16", "engine", quantize=16),
}


@dataclass
class ExportResult:
    name: str
    path: str  # relative to the project root
    size_mb: float
    max_abs_diff: float
    features_rel_diff: float | None  # None: this export has no features output (TensorRT)
    map50_95: float
    delta_map50_95: float
    latency_ms: float  # median per image, batch 1
    latency_p95_ms: float
    precision: str


@dataclass
class ExportReport:
    imgsz: int
    pytorch_map50_95: float
    pytorch_latency_ms: float
    pytorch_latency_p95_ms: float
    parity_images: int
    exports: dict[str, ExportResult] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    host: str = ""  # where the latencies were measured (`measured_on`): the gate's latency budget is judged by it

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def measured_on() -> str:
    """The hardware this stage's latencies are measured on: the CPU, and the GPU where one runs TensorRT."""
    import torch

    return cpu_model() + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "")


def wanted_variants(cfg: ExportSettings) -> list[Variant]:
    names: list[str] = []
    for fmt in cfg.formats:
        names.append(fmt)
        if fmt == "onnx" and cfg.fp16:
            names.append("onnx_fp16")
        if fmt == "onnx" and cfg.int8:
            names.append("onnx_int8")
        if fmt == "openvino" and cfg.int8:
            names.append("openvino_int8")
        if fmt == "tensorrt" and cfg.fp16:
            names.append("tensorrt_fp16")
    return [VARIANTS[n] for n in names]


def export_variant(weights: Path, variant: Variant, imgsz: int, out_root: Path, calibration: Path) -> Path:
    """Export one variant into its own directory and return the artifact (file or model directory)."""
    target = variant.directory(out_root)
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    staged = target / "model.pt"  # Ultralytics writes exports next to the checkpoint
    shutil.copyfile(weights, staged)
    try:
        model = load_yolo(str(staged))
        kwargs: dict[str, Any] = {"format": variant.format, "imgsz": imgsz, "dynamic": variant.dynamic}
        if variant.format == "onnx":
            kwargs["simplify"] = True
        if variant.quantize is not None:
            kwargs["quantize"] = variant.quantize
            if variant.quantize == 8:
                kwargs["data"] = str(calibration)  # INT8 calibrates on real images
        if variant.format == "engine":
            kwargs["device"] = 0
        exported = Path(model.export(**kwargs))
        layers = model_features.head_inputs(model.model)
        if variant.format == "onnx":
            model_features.add_to_onnx(exported, layers)
        elif variant.format == "openvino":
            model_features.add_to_openvino(exported, layers)
    finally:
        staged.unlink(missing_ok=True)
    return exported


def _unavailable_reason(variant: Variant) -> str | None:
    if variant.format == "engine":
        return runtimes.tensorrt_unavailable_reason()
    return None


def _size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(f.stat().st_size for f in files) / 1e6


def run(paths: ProjectPaths, settings: Settings, console: Console | None = None) -> ExportReport:
    """The export stage, logged into the training run."""
    tracker = Tracker.resume(paths)
    with tracker.stage("export"):
        return _export(paths, settings, tracker, console or Console())


class ExportInputError(ConveyorError, ValueError):
    """The export has nothing to be checked on (an empty test split)."""


def _export(paths: ProjectPaths, settings: Settings, tracker: Tracker, console: Console) -> ExportReport:
    cfg = settings.export
    weights = paths.train / "weights" / "best.pt"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing: run the train stage first (`conveyor train`)")
    imgsz = trained_imgsz(weights)
    view = materialize(
        paths.validation / "manifest.json", paths.data, paths.scratch / "views" / "export", ("test", "val")
    )
    test_images = sorted((view.parent / "images" / "test").rglob("*.*"))[: cfg.parity_images]
    if not test_images:
        raise ExportInputError("the test split has no images: nothing to measure export parity on")
    inputs = runtimes.load_images(test_images, imgsz)

    shutil.rmtree(paths.export, ignore_errors=True)
    # With the exports it describes: a stage that fails from here must not leave the last run's figures for `dvc
    # metrics show` (and git) to read as this model's.
    (paths.metrics / "export.json").unlink(missing_ok=True)
    paths.export.mkdir(parents=True)
    reference_runtime = runtimes.TorchRuntime(weights)
    reference, reference_features = reference_runtime.infer_with_features(inputs)
    assert reference_features is not None
    reference_latency = runtimes.measure_latency(reference_runtime, inputs[:1], cfg.latency.warmup, cfg.latency.runs)

    def score(model: Path, name: str) -> Evaluation:
        """mAP on the test split with identical settings for every runtime (batch 1: static exports need it)."""
        save_dir = paths.scratch / "export-eval" / name
        return evaluate_checkpoint(model, view, "test", settings.evaluate, save_dir, imgsz=imgsz, batch=1, plots=False)

    reference_eval = score(weights, "pytorch")
    report = ExportReport(
        imgsz=imgsz,
        pytorch_map50_95=reference_eval.map50_95,
        pytorch_latency_ms=reference_latency.per_image_ms,
        pytorch_latency_p95_ms=reference_latency.p95_ms,
        parity_images=len(inputs),
        host=measured_on(),
    )

    for variant in wanted_variants(cfg):
        reason = _unavailable_reason(variant)
        if reason:
            report.skipped[variant.name] = reason
            console.print(f"[yellow]skipped[/] {variant.name}: {reason}")
            continue
        console.print(f"exporting {variant.name} ...")
        artifact = export_variant(weights, variant, imgsz, paths.export, view)
        runtime = runtimes.open_runtime(variant.format, artifact, variant.name)
        parity = runtimes.compare(runtime, reference, reference_features, inputs)
        latency = runtimes.measure_latency(runtime, inputs[:1], cfg.latency.warmup, cfg.latency.runs)
        with runtimes.openvino_f32():  # scored in the precision it is served in
            evaluation = score(artifact, variant.name)
        report.exports[variant.name] = ExportResult(
            name=variant.name,
            path=artifact.relative_to(paths.root).as_posix(),
            size_mb=round(_size_mb(artifact), 2),
            max_abs_diff=parity.max_abs_diff,
            features_rel_diff=parity.features_rel_diff,
            map50_95=evaluation.map50_95,
            delta_map50_95=evaluation.map50_95 - reference_eval.map50_95,
            latency_ms=latency.per_image_ms,
            latency_p95_ms=latency.p95_ms,
            # The variant's own (an fp16 ONNX keeps fp32 inputs and outputs; a TensorRT engine does not say), else
            # what the runtime computes in.
            precision={16: "fp16", 8: "int8"}.get(variant.quantize or 0) or str(getattr(runtime, "precision", "fp32")),
        )
        tracker.log_artifact(variant.directory(paths.export), f"export/{variant.name}")

    (paths.export / "export.json").write_text(json.dumps(report.to_json(), indent=2))
    paths.metrics.mkdir(parents=True, exist_ok=True)
    (paths.metrics / "export.json").write_text(json.dumps(dvc_metrics(report), indent=2) + "\n")
    tracker.log_metrics(metrics_for_tracking(report))
    tracker.set_tags({f"conveyor.export.{name}": f"skipped: {why}" for name, why in report.skipped.items()})
    tracker.log_artifact(paths.export / "export.json", "export")
    print_report(report, console)
    return report


def metrics_for_tracking(report: ExportReport) -> dict[str, float]:
    out = {
        "latency_ms/pytorch": report.pytorch_latency_ms,
        "latency_ms_p95/pytorch": report.pytorch_latency_p95_ms,
        "export/pytorch/mAP50-95": report.pytorch_map50_95,
    }
    for name, r in report.exports.items():
        out |= {
            f"export/{name}/max_abs_diff": r.max_abs_diff,
            **({f"export/{name}/features_rel_diff": r.features_rel_diff} if r.features_rel_diff is not None else {}),
            f"export/{name}/mAP50-95": r.map50_95,
            f"export/{name}/delta_mAP50-95": r.delta_map50_95,
            f"export/{name}/size_mb": r.size_mb,
            f"latency_ms/{name}": r.latency_ms,
            f"latency_ms_p95/{name}": r.latency_p95_ms,
        }
    return out


def dvc_metrics(report: ExportReport) -> dict[str, Any]:
    return {
        "latency_ms_per_image": {
            "pytorch": round(report.pytorch_latency_ms, 2),
            **{name: round(r.latency_ms, 2) for name, r in report.exports.items()},
        },
        "parity": {
            name: {
                "max_abs_diff": float(f"{r.max_abs_diff:.3g}"),
                "features_rel_diff": None if r.features_rel_diff is None else float(f"{r.features_rel_diff:.3g}"),
                "delta_mAP50-95": round(r.delta_map50_95, 4),
            }
            for name, r in report.exports.items()
        },
        "skipped": report.skipped,
    }


def print_report(report: ExportReport, console: Console) -> None:
    table = FoldingTable(
        title=f"exports at {report.imgsz} px vs PyTorch (mAP50-95 {report.pytorch_map50_95:.3f}, "
        f"{report.pytorch_latency_ms:.1f} ms/image)"
    )
    for column in ("export", "precision", "size MB", "max |Δ| raw", "features Δ", "ΔmAP50-95", "ms/image", "p95 ms"):
        table.add_column(column, justify="left" if column == "export" else "right")
    for name, r in report.exports.items():
        table.add_row(
            name,
            r.precision,
            f"{r.size_mb:.1f}",
            f"{r.max_abs_diff:.2g}",
            "-" if r.features_rel_diff is None else f"{r.features_rel_diff:.1%}",
            f"{r.delta_map50_95:+.4f}",
            f"{r.latency_ms:.1f}",
            f"{r.latency_p95_ms:.1f}",
        )
    for name, why in report.skipped.items():
        table.add_row(name, "-", "-", "-", "-", "-", "-", f"skipped: {why}")
    console.print(table)
