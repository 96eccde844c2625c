"""After the gate: register this run's model as a version (alias `challenger`), and make it champion only if every
gate passed and the champion it was compared with is still the champion."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from conveyor.lineage import data_version
from conveyor.paths import ProjectPaths
from conveyor.scaffold import REPO
from conveyor.settings import Settings
from conveyor.tracking import Tracker
from pipelines import registry
from pipelines.gate import GateReport

PYFUNC_REQUIREMENTS = ["ultralytics", "onnxruntime", "opencv-python", "pandas", "numpy"]
DESCRIPTION_LIMIT = 5000  # MLflow's description column (VARCHAR(5000) on PostgreSQL)


@dataclass(frozen=True)
class PromotionOutcome:
    version: str
    newly_registered: bool
    promoted: bool
    champion: str | None
    message: str


def _serving_bundle(paths: ProjectPaths, settings: Settings, staging: Path) -> dict[str, str]:
    """What serving needs, as pyfunc artifacts: ONNX and OpenVINO exports, PyTorch weights, class names, input size
    and preprocessing."""
    export = json.loads((paths.export / "export.json").read_text())
    manifest = json.loads((paths.validation / "manifest.json").read_text())
    staging.mkdir(parents=True, exist_ok=True)
    metadata = {
        "names": manifest["names"],
        "imgsz": export["imgsz"],
        "preprocessing": "letterbox to imgsz x imgsz (gray 114 padding), BGR->RGB, CHW, float32 / 255",
        "output": "raw (1, 4 + classes, anchors): cx, cy, w, h in input pixels, then class scores; NMS iou "
        f"{settings.evaluate.iou}",
        "conf": 0.25,
        "iou": settings.evaluate.iou,
    }
    (staging / "metadata.json").write_text(json.dumps(metadata, indent=2))
    artifacts = {"metadata": str(staging / "metadata.json"), "weights": str(paths.train / "weights" / "best.pt")}
    exports = export["exports"]
    onnx_name = "onnx_dynamic" if "onnx_dynamic" in exports else "onnx"
    if onnx_name not in exports:
        raise FileNotFoundError("the pyfunc serves the ONNX export, and export produced none (add onnx to formats)")
    artifacts["onnx"] = str(paths.root / exports[onnx_name]["path"])
    if "openvino" in exports:
        artifacts["openvino"] = str(paths.root / exports["openvino"]["path"])
    if (paths.artifacts / "profile").is_dir():
        artifacts["profile"] = str(paths.artifacts / "profile")  # the drift check's reference for this version
    int8 = exports.get("openvino_int8")
    # INT8 is served only if it keeps the accuracy: the same parity limit as every served export.
    if int8 is not None and abs(float(int8["delta_map50_95"])) <= settings.gates.parity_max_delta:
        artifacts["openvino_int8"] = str(paths.root / int8["path"])
    return artifacts


def register(
    paths: ProjectPaths, settings: Settings, tracker: Tracker, report: GateReport, flow_run_id: str | None, actor: str
) -> tuple[ModelVersion, bool]:
    """This run's model as a registry version (idempotent: a run is registered once), with alias challenger."""
    client = tracker.client
    name = settings.registry.model_name
    registry.ensure_registered_model(client, name)
    existing = registry.version_for_run(client, name, tracker.run_id)
    if existing is not None:
        return existing, False
    staging = paths.scratch / "pyfunc"
    shutil.rmtree(staging, ignore_errors=True)
    artifacts = _serving_bundle(paths, settings, staging)
    run = client.get_run(tracker.run_id)
    tags = {
        **report.tags(),
        "conveyor.data_md5": data_version(paths.data_dvc).md5,
        "conveyor.git_commit": run.data.tags.get("conveyor.git_commit", "unknown"),
        "conveyor.prefect_flow_run_id": flow_run_id or "-",
        "conveyor.run_id": tracker.run_id,
    }
    version = log_model_version(client, name, tracker.run_id, artifacts, tags)
    client.update_model_version(name, str(version.version), description=review_summary(paths, report))
    registry.move_alias(
        client,
        name,
        registry.CHALLENGER,
        str(version.version),
        kind="register",
        reason=f"registered by run {tracker.run_id}",
        actor=actor,
    )
    return client.get_model_version(name, str(version.version)), True


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def review_summary(paths: ProjectPaths, report: GateReport) -> str:
    """What a reviewer needs at a glance, as the version's description (Markdown in the MLflow UI): the gate verdict
    and table, the data version, test metrics per class, the exports with latency and parity."""
    verdict = "PASSED" if report.passed else f"FAILED ({', '.join(report.failed)})"
    counts = _read_json(paths.validation / "report.json").get("counts", {})
    images = ", ".join(f"{split} {c.get('accepted', 0)}" for split, c in counts.items())
    lines = [
        f"**Gates {verdict}**, compared with "
        f"{f'champion v{report.champion_version}' if report.champion_version else 'no champion'}.",
        f"Data `{data_version(paths.data_dvc).md5}` ({images} images); MLflow run `{report.challenger_run_id}`.",
        "",
    ]
    evaluation = _read_json(paths.metrics / "evaluate.json")
    if evaluation:
        lines += [
            f"**{evaluation['split'].capitalize()} metrics**: mAP50 {evaluation['mAP50']:.3f}, "
            f"mAP50-95 {evaluation['mAP50-95']:.3f}, precision {evaluation['precision']:.3f}, "
            f"recall {evaluation['recall']:.3f}",
            "",
            "| class | AP50-95 | recall |",
            "|---|---|---|",
        ]
        for name, result in evaluation.get("per_class", {}).items():
            cells = ("not in split", "-") if result is None else (f"{result['AP50-95']:.3f}", f"{result['recall']:.3f}")
            lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
        lines.append("")
    export = _read_json(paths.export / "export.json")
    if export:
        lines += [
            "| export | ms/image | max abs diff | ΔmAP50-95 |",
            "|---|---|---|---|",
            f"| pytorch | {export['pytorch_latency_ms']:.1f} | - | - |",
        ]
        for name, r in export.get("exports", {}).items():
            lines.append(f"| {name} | {r['latency_ms']:.1f} | {r['max_abs_diff']:.2g} | {r['delta_map50_95']:+.4f} |")
        lines += [f"| {name} | skipped: {why} | | |" for name, why in export.get("skipped", {}).items()]
        lines.append("")
    text = "\n".join(lines) + "\n" + report.to_markdown().replace("### Gate report", "**Gate report**", 1)
    return text if len(text) <= DESCRIPTION_LIMIT else text[: DESCRIPTION_LIMIT - 40] + "\n\n(cut: see the gate report)"


def log_model_version(
    client: MlflowClient, name: str, run_id: str, artifacts: dict[str, str], tags: dict[str, str]
) -> ModelVersion:
    """Log the pyfunc (with the serving artifacts) into the run and register it as a new version of `name`."""
    import mlflow

    from pipelines import pyfunc_model

    # log_model reads the process-wide tracking URI, not the client's.
    mlflow.set_tracking_uri(client.tracking_uri)
    run = client.get_run(run_id)
    logged = client.create_logged_model(experiment_id=run.info.experiment_id, name="model", source_run_id=run_id)
    info = mlflow.pyfunc.log_model(
        name="model",
        model_id=logged.model_id,
        python_model=pyfunc_model.__file__,
        artifacts=artifacts,
        # The model's own code travels with it, so it loads where Conveyor is not installed.
        code_paths=[str(REPO / "conveyor"), str(REPO / "pipelines")],
        pip_requirements=PYFUNC_REQUIREMENTS,  # explicit: inference would take seconds and guess
    )
    return client.create_model_version(name, source=info.model_uri, run_id=run_id, tags=tags, model_id=info.model_id)


def decide(
    client: MlflowClient,
    settings: Settings,
    version: ModelVersion,
    newly_registered: bool,
    report: GateReport,
    actor: str,
    reason: str,
) -> PromotionOutcome:
    name = settings.registry.model_name
    champion = registry.current_champion(client, name)
    champion_now = str(champion.version) if champion else None
    if not newly_registered:
        return PromotionOutcome(
            str(version.version),
            False,
            False,
            champion_now,
            f"already registered as v{version.version}; champion unchanged",
        )
    if not report.passed:
        return PromotionOutcome(
            str(version.version),
            True,
            False,
            champion_now,
            f"v{version.version} failed gates: {', '.join(report.failed)}; champion unchanged",
        )
    if champion_now != report.champion_version:
        # The champion moved after the gate compared against it: that comparison no longer holds.
        raise StaleGateError(champion_now, report.champion_version)
    registry.promote(client, name, str(version.version), reason=f"gates passed ({reason})", actor=actor)
    return PromotionOutcome(
        str(version.version), True, True, str(version.version), f"v{version.version} is the new champion"
    )


class StaleGateError(RuntimeError):
    def __init__(self, now: str | None, gated: str | None) -> None:
        super().__init__(f"the champion is v{now} but the gate compared against v{gated}: re-run the gate")
        self.now = now
        self.gated = gated
