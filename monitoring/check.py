"""`conveyor drift`: one drift check, end to end, and what it leaves behind.

Current data (a prediction-log window, or a folder) -> the serving version's reference profile -> Evidently's
verdict -> the alert policy. Left behind: the Evidently HTML and JSON (`.conveyor/monitoring/reports/<time>/`), an
MLflow run in the monitoring experiment (tagged with the model version, the verdict and the alert decision, the
reports as artifacts), and Prometheus gauges (`.conveyor/monitoring/drift.prom`, served on the server's /metrics).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from rich.console import Console

from conveyor.paths import ProjectPaths
from conveyor.settings import Settings
from conveyor.tracking import Tracker, ensure_experiment, metric_name
from monitoring import alerts, current, drift
from monitoring.reference import load_reference
from serving import source
from serving.server import DRIFT_METRICS_FILE, model_cache, prediction_log_source


@dataclass(frozen=True)
class CheckOptions:
    source: Path | None = None  # a folder of images instead of the prediction log
    model: str | None = None  # the version to check against (default: the one that served the window / champion)
    hours: float | None = None  # default monitor.window_hours
    last: int | None = None  # default monitor.window_records


@dataclass
class CheckOutcome:
    model_name: str
    model_version: str
    result: drift.DriftResult
    data: current.CurrentData
    decision: alerts.AlertDecision
    report_dir: Path
    mlflow_run_id: str
    mlflow_run_url: str | None
    checked_at: datetime

    def payload(self) -> dict[str, Any]:
        """What the drift event carries: enough to act on without opening the report."""
        return {
            "model_name": self.model_name,
            "model_version": self.model_version,
            "drifted_share": round(self.result.drifted_share, 4),
            "drifted_features": self.result.drifted,
            "current_rows": self.result.current_rows,
            "reference_batch": self.result.reference_batch,
            "mlflow_run_id": self.mlflow_run_id,
            "report": str(self.report_dir / "report.html"),
        }


def run_check(paths: ProjectPaths, settings: Settings, options: CheckOptions, console: Console) -> CheckOutcome:
    monitor = settings.monitor
    client = Tracker.client_for(paths)
    name = settings.registry.model_name
    if options.source is not None:
        version = source.resolve_version(client, name, options.model or settings.serve.model)
        files = source.fetch(client, version, model_cache(paths))
        loaded = source.load(files, settings.serve.runtime, 1, settings.serve.conf, embeddings=monitor.embeddings)
        data = current.from_folder(options.source, loaded.detectors[0], loaded.embedder, console)
        data.model_version = str(version.version)
    else:
        wanted = str(source.resolve_version(client, name, options.model).version) if options.model else None
        data = current.from_log(
            prediction_log_source(paths, settings.serve),
            options.hours or monitor.window_hours,
            options.last or monitor.window_records,
            wanted,
        )
        assert data.model_version is not None
        version = client.get_model_version(name, data.model_version)
    profile = load_reference(client, paths, version)
    result = drift.check(profile, data.records, monitor)
    now = datetime.now(UTC)
    history = alerts.past_alerts(
        client, monitor.experiment, name, now - timedelta(hours=max(monitor.cooldown_hours, monitor.dedupe_hours))
    )
    decision = alerts.decide(result, str(version.version), history, monitor, now)
    report_dir = paths.monitoring / "reports" / now.strftime("%Y%m%dT%H%M%S%fZ")
    write_reports(report_dir, result, data, str(version.version), decision)
    run_id, url = log_check(client, paths, settings, str(version.version), result, data, decision, report_dir)
    write_gauges(paths.monitoring / DRIFT_METRICS_FILE, name, str(version.version), result, now)
    return CheckOutcome(name, str(version.version), result, data, decision, report_dir, run_id, url, now)


def write_reports(
    folder: Path, result: drift.DriftResult, data: current.CurrentData, version: str, decision: alerts.AlertDecision
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if result.snapshot is not None:
        result.snapshot.save_html(str(folder / "report.html"))
        result.snapshot.save_json(str(folder / "report.json"))
    summary = {
        **result.to_json(),
        "model_version": version,
        "source": data.source,
        "left_out_other_versions": data.other_versions,
        "unreadable": data.unreadable,
        "alert": decision.alert,
        "alert_reason": decision.reason,
    }
    (folder / "summary.json").write_text(json.dumps(summary, indent=2, default=str))


def log_check(
    client: MlflowClient,
    paths: ProjectPaths,
    settings: Settings,
    version: str,
    result: drift.DriftResult,
    data: current.CurrentData,
    decision: alerts.AlertDecision,
    report_dir: Path,
) -> tuple[str, str | None]:
    """One MLflow run per check in the monitoring experiment: the verdict as tags and metrics, reports as artifacts."""
    from mlflow.entities import Metric, RunTag

    experiment_id = ensure_experiment(client, paths, settings.monitor.experiment)
    name = settings.registry.model_name
    tags = {
        alerts.MODEL_TAG: name,
        alerts.VERSION_TAG: version,
        "conveyor.drift.status": result.status,
        alerts.FEATURES_TAG: ",".join(result.drifted),
        alerts.ALERT_TAG: "pending" if decision.alert else f"none ({decision.reason})"[:250],
        "conveyor.drift.source": data.source[:250],
        "conveyor.drift.reference_batch": result.reference_batch,
    }
    run = client.create_run(experiment_id, run_name=f"drift v{version}", tags=tags)
    now = int(datetime.now(UTC).timestamp() * 1000)
    metrics = [
        Metric("drifted_share", result.drifted_share, now, 0),
        Metric("current_rows", result.current_rows, now, 0),
        Metric("reference_rows", result.reference_rows, now, 0),
    ]
    metrics += [Metric(metric_name(f"score/{f.name}"), f.score, now, 0) for f in result.features]
    client.log_batch(run.info.run_id, metrics=metrics, tags=[RunTag(k, v) for k, v in tags.items()])
    client.log_artifacts(run.info.run_id, str(report_dir), "drift")
    client.set_terminated(run.info.run_id)
    uri = client.tracking_uri
    url = f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run.info.run_id}" if uri.startswith("http") else None
    return run.info.run_id, url


def mark_alert_emitted(client: MlflowClient, run_id: str, event_id: str) -> None:
    """Recorded only after the event was accepted: the cooldown and de-duplication read this tag."""
    client.set_tag(run_id, alerts.ALERT_TAG, alerts.EMITTED)
    client.set_tag(run_id, "conveyor.drift.event_id", event_id)


def write_gauges(path: Path, model_name: str, version: str, result: drift.DriftResult, at: datetime) -> None:
    """The last check as Prometheus gauges, in the text format the server appends to its /metrics."""
    from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

    registry = CollectorRegistry()
    labels = {"model": model_name, "version": version}
    Gauge(
        "conveyor_drift_share", "Share of drifted features in the last drift check", list(labels), registry=registry
    ).labels(**labels).set(result.drifted_share)
    Gauge("conveyor_drift_detected", "1 when the last drift check found drift", list(labels), registry=registry).labels(
        **labels
    ).set(1.0 if result.status == "drift" else 0.0)
    Gauge(
        "conveyor_drift_current_rows", "Rows in the last drift check's current window", list(labels), registry=registry
    ).labels(**labels).set(result.current_rows)
    Gauge("conveyor_drift_last_check_timestamp_seconds", "When the last drift check ran", registry=registry).set(
        at.timestamp()
    )
    score = Gauge(
        "conveyor_drift_feature_score",
        "Drift score per feature (p-value, distance or ROC AUC)",
        ["feature", "method"],
        registry=registry,
    )
    drifted = Gauge("conveyor_drift_feature_drifted", "1 when the feature drifted", ["feature"], registry=registry)
    for feature in result.features:
        score.labels(feature.name, feature.method).set(feature.score)
        drifted.labels(feature.name).set(1.0 if feature.drifted else 0.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(path), registry)  # written to a temporary file and renamed: a scrape never sees half
