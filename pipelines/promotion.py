"""After the gate: register this run's model as a version (alias `challenger`), and make it champion only if every
gate passed and the champion it was compared with is still the champion."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from conveyor.errors import ConveyorError
from conveyor.lineage import data_version
from conveyor.paths import ProjectPaths, read_stage_output
from conveyor.scaffold import REPO
from conveyor.settings import Settings
from conveyor.tracking import FLOW_RUN_TAG, STAGE_COMMIT_TAG
from pipelines import registry
from pipelines.gate import GateReport

PYFUNC_REQUIREMENTS = ["ultralytics", "onnxruntime", "opencv-python", "pandas", "numpy"]
DESCRIPTION_LIMIT = 5000  # MLflow's description column (VARCHAR(5000) on PostgreSQL)
REGISTERED = "conveyor.registered"  # version tag, written last by `register`: description and challenger alias done
DECISION = "conveyor.decision"  # version tag, written after the decision was carried out: promoted | rejected


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
    export = read_stage_output(paths.export / "export.json", "export")
    manifest = read_stage_output(paths.validation / "manifest.json", "validate")
    staging.mkdir(parents=True, exist_ok=True)
    metadata = {
        "names": manifest["names"],
        "imgsz": export["imgsz"],
        "preprocessing": "letterbox to imgsz x imgsz (gray 114 padding), BGR->RGB, CHW, float32 / 255",
        "output": "raw (1, 4 + classes, anchors): cx, cy, w, h in input pixels, then class scores; NMS iou "
        f"{settings.evaluate.iou}",
        "conf": settings.serve.conf,  # the one threshold: every consumer of this version reads it from here
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
    paths: ProjectPaths,
    settings: Settings,
    client: MlflowClient,
    run_id: str,
    report: GateReport,
    flow_run_id: str | None,
    actor: str,
) -> tuple[ModelVersion, bool]:
    """This run's model as a registry version with alias challenger; `True` when this call created the version.

    Idempotent and resumable: a run is registered once, and a version a killed process left without its description
    or its challenger alias gets them now (the `conveyor.registered` tag is written last)."""
    name = settings.registry.model_name
    registry.ensure_registered_model(client, name)
    staging = paths.scratch / "pyfunc"
    shutil.rmtree(staging, ignore_errors=True)
    artifacts = _serving_bundle(paths, settings, staging)
    served = served_digest(artifacts)
    # The version of these very files: export or profile made again into this run (a fix to the export code, a new
    # serve.conf) is a new version, gated on its own files; the earlier one keeps its files and its verdict.
    version = registry.version_for_run(client, name, run_id, served)
    created = version is None
    if version is None:
        run = client.get_run(run_id)
        tags = {
            registry.SERVED_FILES: served,
            **report.tags(),
            # The run's own record of the data it trained on (data.dvc may name another by now).
            "conveyor.data_md5": run.data.tags.get("conveyor.data_md5") or data_version(paths.data_dvc).md5,
            "conveyor.data_recorded": run.data.tags.get("conveyor.data_recorded", "true"),
            "conveyor.git_commit": run.data.tags.get("conveyor.git_commit", "unknown"),
            # Each stage's commit as it made these files: the run's tags move on when a stage runs into it again.
            **{k: v for k, v in run.data.tags.items() if k.startswith(STAGE_COMMIT_TAG.format(""))},
            FLOW_RUN_TAG: flow_run_id or "-",
            "conveyor.run_id": run_id,
        }
        version = log_model_version(client, name, run_id, artifacts, tags)
    elif version.tags.get(REGISTERED) == "true":
        # These files registered by an earlier pass of this run: the gate may have run again on them since (new
        # thresholds, or another champion to compare with), and promote and lineage read the verdict on the version.
        return record_verdict(client, name, version, paths, report), False
    number = str(version.version)
    client.update_model_version(name, number, description=review_summary(paths, report))
    if not any(m.alias == registry.CHALLENGER and m.to_version == number for m in registry.history(client, name)):
        registry.move_alias(
            client,
            name,
            registry.CHALLENGER,
            number,
            kind="register",
            reason=f"registered by run {run_id}",
            actor=actor,
        )
    client.set_model_version_tag(name, number, REGISTERED, "true")
    return client.get_model_version(name, number), created


def record_verdict(
    client: MlflowClient, name: str, version: ModelVersion, paths: ProjectPaths, report: GateReport
) -> ModelVersion:
    """The gate's report as the version's verdict (tags) and review summary (description), where they differ. The
    decision already carried out stays (`conveyor.decision`): a champion is not demoted by a re-run gate, and a
    version rejected before that passes now is promoted by hand (`conveyor promote`), against its new verdict."""
    number = str(version.version)
    changed = False
    for key, value in report.tags().items():
        if version.tags.get(key) != value:
            client.set_model_version_tag(name, number, key, value)
            changed = True
    description = review_summary(paths, report)
    if (version.description or "") != description:
        client.update_model_version(name, number, description=description)
        changed = True
    return client.get_model_version(name, number) if changed else version


def served_digest(artifacts: dict[str, str]) -> str:
    """SHA-256 over every file a version would serve (each artifact's files by relative path, then content)."""
    digest = hashlib.sha256()
    for name in sorted(artifacts):
        root = Path(artifacts[name])
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for file in files:
            digest.update(f"{name}/{file.relative_to(root).as_posix() if file != root else ''}\0".encode())
            with file.open("rb") as handle:
                digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()


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
    """Promote the version if its gates passed, once: the `conveyor.decision` tag records that the decision was
    carried out, so a re-run never decides again, and a run killed before deciding is decided by the next."""
    name = settings.registry.model_name
    number = str(version.version)
    champion = registry.current_champion(client, name)
    champion_now = str(champion.version) if champion else None
    decided = version.tags.get(DECISION)
    if decided is None and any(
        m.alias == registry.CHAMPION and m.to_version == number for m in registry.history(client, name)
    ):
        decided = "promoted"  # a killed run promoted it and died before recording the decision
        client.set_model_version_tag(name, number, DECISION, decided)
    if decided is not None:
        champion_text = f"v{champion_now}" if champion_now else "none"
        return PromotionOutcome(
            number,
            newly_registered,
            False,
            champion_now,
            f"v{number} already decided ({decided}); champion {champion_text}",
        )
    if not report.passed:
        client.set_model_version_tag(name, number, DECISION, "rejected")
        return PromotionOutcome(
            number,
            newly_registered,
            False,
            champion_now,
            f"v{number} failed gates: {', '.join(report.failed)}; champion unchanged",
        )
    if champion_now != report.champion_version:
        # The champion moved after the gate compared against it: that comparison no longer holds.
        raise StaleGateError(champion_now, report.champion_version)
    registry.promote(
        client, name, number, reason=f"gates passed ({reason})", actor=actor, expected_champion=champion_now
    )
    client.set_model_version_tag(name, number, DECISION, "promoted")
    return PromotionOutcome(number, newly_registered, True, number, f"v{number} is the new champion")


class StaleGateError(ConveyorError, RuntimeError):
    def __init__(self, now: str | None, gated: str | None) -> None:
        super().__init__(f"the champion is v{now} but the gate compared against v{gated}: re-run the gate")
        self.now = now
        self.gated = gated
