"""`conveyor drift`: one drift check, end to end, and what it leaves behind.

Current data (a prediction-log window, or a folder) -> the serving version's reference profile -> the verdict per
group of features (Evidently's statistics) and the label-free performance estimate -> the alert policy (alert or
retrain). Left behind: a report (`.conveyor/monitoring/reports/<time>/`: `report.html` with the verdict, the groups
in words and the estimate, Evidently's own `evidently.html` and JSON, `summary.json`), an MLflow run in the
monitoring experiment (tagged with the model version, the verdict, the deciding groups and the alert decision; the
estimate and every score as metrics; the reports as artifacts), and Prometheus gauges
(`.conveyor/monitoring/drift.prom`, served on the server's /metrics).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from rich.console import Console

from conveyor.paths import ProjectPaths
from conveyor.settings import MonitorSettings, Settings
from conveyor.tracking import Tracker, ensure_experiment, metric_name
from monitoring import alerts, current, drift
from monitoring.estimate import WindowEstimate, described, estimate_window
from pipelines import model_source as source
from pipelines.prediction_log import SERVER_DEVICE
from pipelines.profile import Profile
from pipelines.reference import load_reference
from pipelines.registry import registered_by_flow_run


@dataclass(frozen=True)
class CheckOptions:
    source: Path | None = None  # a folder of images instead of the prediction log
    model: str | None = None  # the version to check against (default: the one that served the window / champion)
    hours: float | None = None  # default monitor.window_hours
    last: int | None = None  # default monitor.window_records
    device: str = SERVER_DEVICE  # whose log records: the server's, or an edge runner's (its --device name)
    # The monitoring flow sends the alert's event; a check by hand (`conveyor drift`) does not.
    sends_events: bool = False


@dataclass
class CheckOutcome:
    model_name: str
    model_version: str
    result: drift.DriftResult
    estimate: WindowEstimate
    data: current.CurrentData
    decision: alerts.AlertDecision
    report_dir: Path
    mlflow_run_id: str
    mlflow_run_url: str | None
    checked_at: datetime

    def payload(self) -> dict[str, Any]:
        """What the drift event carries: enough to act on without opening the report."""
        estimate = self.estimate.estimate
        return {
            "model_name": self.model_name,
            "model_version": self.model_version,
            "device": self.data.device,
            "action": self.decision.action,
            "drifted_groups": self.result.drifted_groups,
            "deciding": [g.summary() for g in self.result.groups if g.drifted],
            "drifted_features": self.result.drifted,
            "estimated_map50_95": None if estimate is None else round(estimate.map50_95, 4),
            "estimated_cost": None if estimate is None else round(estimate.cost, 4),
            "estimate_interval": None if estimate is None else [round(estimate.low, 4), round(estimate.high, 4)],
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
        opened = source.open_version(paths, settings, options.model, client=client)
        version = opened.version
        data = current.from_folder(options.source, opened.detector, console)
        data.model_version = str(version.version)
    else:
        wanted = str(source.resolve_version(client, name, options.model).version) if options.model else None
        data = current.from_log(
            paths.prediction_log_source(settings.serve.prediction_log.directory, settings.serve.prediction_log.s3),
            options.hours or monitor.window_hours,
            options.last or monitor.window_records,
            wanted,
            device=options.device,
            max_records=monitor.max_window_records,
        )
        assert data.model_version is not None
        version = client.get_model_version(name, data.model_version)
    profile = load_reference(client, paths, version, settings.serve.conf)
    result, estimate = judge(profile, data.records, monitor, str(version.version))
    now = datetime.now(UTC)
    history = alerts.past_alerts(
        client, monitor.experiment, name, now - timedelta(hours=max(monitor.cooldown_hours, monitor.dedupe_hours))
    )
    earlier = alerts.recent_statuses(
        client,
        monitor.experiment,
        name,
        str(version.version),
        monitor.retrain_after - 1,
        data.device,
        window_of(data.records),
    )
    # Only a drift verdict can alert: a quiet window does not ask Prefect how earlier retrainings ended.
    ended = (
        alerts.failed_retrainings(
            history,
            settings.orchestration.deployment,
            functools.partial(registered_by_flow_run, client, name),
        )
        if result.status == "drift"
        else {}
    )
    history, failed = alerts.without_failed_retrainings(history, ended)
    decision = alerts.decide(result, str(version.version), history, earlier, estimate, monitor, now)
    if failed and decision.alert:
        decision = replace(decision, reason=f"{decision.reason} ({failed}: asked again)")
    report_dir = paths.monitoring / "reports" / now.strftime("%Y%m%dT%H%M%S%fZ")
    outcome = CheckOutcome(name, str(version.version), result, estimate, data, decision, report_dir, "", None, now)
    write_reports(outcome)
    outcome.mlflow_run_id, outcome.mlflow_run_url = log_check(client, paths, settings, outcome, options.sends_events)
    if data.device != current.FOLDER_DEVICE:  # a folder is no device: its gauges stayed on /metrics for good
        write_gauges(paths.drift_gauges, outcome, stale_after=timedelta(hours=monitor.window_hours))
    return outcome


def judge(
    profile: Profile, records: Any, monitor: MonitorSettings, version: str, report: bool = True
) -> tuple[drift.DriftResult, WindowEstimate]:
    """The verdict on a window: the groups of features, the performance estimate, and the estimate as a group."""
    result = drift.check(profile, records, monitor, report=report)
    estimate = estimate_window(profile, records, version, result.reference_batch)
    add_performance_group(result, estimate, monitor.retrain_cost)
    return result, estimate


def window_of(records: Any) -> tuple[float, float] | None:
    """The window's first and last record time (Unix seconds); None for a folder of images, whose records have no
    time."""
    if records is None or "time" not in records or not len(records):
        return None
    times = records["time"]
    return times.min().timestamp(), times.max().timestamp()


def window_span(records: Any) -> dict[str, str]:
    """`window_of` as the check run's tags (none without one)."""
    window = window_of(records)
    if window is None:
        return {}
    return {alerts.WINDOW_START_TAG: f"{window[0]:.3f}", alerts.WINDOW_END_TAG: f"{window[1]:.3f}"}


def add_performance_group(result: drift.DriftResult, estimate: WindowEstimate, retrain_cost: float) -> None:
    """The estimate decides too: a cost whose whole interval is past `monitor.retrain_cost` is drift that matters,
    even where no input feature moved past its threshold (the model's own confidence saw it)."""
    found = estimate.estimate
    if found is None or result.status == "insufficient data":
        return
    low, high = found.cost_interval
    drifted = low >= retrain_cost
    words = (
        f"the model's confidence says it lost {found.cost:.3f} mAP50-95 ({low:.3f} to {high:.3f}) against its "
        "validation images"
    )
    group = drift.GroupDrift("performance", drifted, low / retrain_cost, "estimate", words)
    result.groups = sorted(
        [*result.groups, group], key=lambda g: (not g.drifted, -g.strength if g.strength == g.strength else 0)
    )
    if drifted and result.status != "drift":
        result.status = "drift"
        result.message = f"drift against reference batch '{result.reference_batch}': {group.summary()}"


def write_reports(outcome: CheckOutcome) -> None:
    """`report.html` (the verdict in words, the groups, the estimate, Evidently's report below), Evidently's own
    HTML and JSON, and `summary.json`."""
    folder, result, data = outcome.report_dir, outcome.result, outcome.data
    folder.mkdir(parents=True, exist_ok=True)
    if result.snapshot is not None:
        result.snapshot.save_html(str(folder / "evidently.html"))
        result.snapshot.save_json(str(folder / "evidently.json"))
    summary = {
        **result.to_json(),
        "model_version": outcome.model_version,
        "device": data.device,
        "estimate": outcome.estimate.to_json(),
        "source": data.source,
        "left_out_other_versions": data.other_versions,
        "unreadable": data.unreadable,
        "alert": outcome.decision.alert,
        "alert_action": outcome.decision.action,
        "alert_reason": outcome.decision.reason,
    }
    # Strict JSON: a constant feature's p-value is NaN, which json.dumps writes bare and strict parsers refuse.
    (folder / "summary.json").write_text(json.dumps(finite(summary), indent=2, default=str, allow_nan=False))
    (folder / "report.html").write_text(report_html(outcome))


def finite(value: Any) -> Any:
    """`value` with every NaN or infinite float inside it (dicts, lists) as None: JSON's null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def report_html(outcome: CheckOutcome) -> str:
    from html import escape

    result = outcome.result
    found = outcome.estimate.estimate
    groups = "".join(
        f"<tr><td>{escape(g.group)}</td><td>{'<b>drift</b>' if g.drifted else 'ok'}</td>"
        f"<td>{g.strength:.2f}</td><td>{escape(g.feature)}</td><td>{escape(g.words) if g.drifted else ''}</td></tr>"
        for g in result.groups
    )
    features = "".join(
        f"<tr><td>{escape(f.group)}</td><td>{escape(f.name)}</td><td>{f.effect:.3g}</td><td>{f.threshold:.3g}</td>"
        f"<td>{f.p_value:.2g}</td><td>{f.reference_mean:.4g}</td><td>{f.current_mean:.4g}</td>"
        f"<td>{'<b>drift</b>' if f.drifted else 'ok'}</td></tr>"
        for f in result.features
    )
    if found is not None:
        estimate = f"{escape(described(found))}, {escape(outcome.estimate.reason)}"
    else:
        estimate = f"no estimate: {escape(outcome.estimate.reason)}"
    decision = outcome.decision
    action = f"{decision.action} ({escape(decision.reason)})" if decision.alert else f"none ({escape(decision.reason)})"
    evidently = (
        '<h2>Evidently</h2><iframe src="evidently.html" style="width:100%;height:1600px;border:0"></iframe>'
        if result.snapshot is not None
        else ""
    )
    title = f"Drift check v{escape(outcome.model_version)}"
    checked = f"{outcome.checked_at:%Y-%m-%d %H:%M:%S} UTC"
    header = "<tr><th>group</th><th>verdict</th><th>strength</th><th>deciding feature</th><th>what changed</th></tr>"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:.2em .8em;text-align:left}}
tr:nth-child(even){{background:#f4f4f4}}</style></head><body>
<h1>{escape(outcome.model_name)} v{escape(outcome.model_version)}: {escape(result.status)}</h1>
<p>{escape(result.message)}</p><p>{estimate}</p><p>alert: {action}</p>
<p>current: {escape(outcome.data.source)} ({result.current_rows} rows) against reference batch
'{escape(result.reference_batch)}' ({result.reference_rows} rows); checked {checked}</p>
<h2>Groups</h2><table>{header}
{groups}</table>
<h2>Features</h2><table><tr><th>group</th><th>feature</th><th>effect</th><th>threshold</th><th>p-value</th>
<th>reference mean</th><th>current mean</th><th>verdict</th></tr>{features}</table>
{"".join(f"<p>skipped {escape(k)}: {escape(v)}</p>" for k, v in result.skipped.items())}
{evidently}</body></html>
"""


def log_check(
    client: MlflowClient, paths: ProjectPaths, settings: Settings, outcome: CheckOutcome, sends_events: bool = False
) -> tuple[str, str | None]:
    """One MLflow run per check in the monitoring experiment: the verdict as tags and metrics, reports as artifacts.
    The alert tag is `pending` until the flow marks the event sent (`mark_alert_emitted`); a check that sends no
    event (by hand) says so, and neither counts for the cooldown or the de-duplication."""
    from mlflow.entities import Metric, RunTag

    result, decision, version = outcome.result, outcome.decision, outcome.model_version
    experiment_id = ensure_experiment(client, paths, settings.monitor.experiment)
    name = settings.registry.model_name
    tags = {
        alerts.MODEL_TAG: name,
        alerts.VERSION_TAG: version,
        alerts.DEVICE_TAG: outcome.data.device,
        alerts.STATUS_TAG: result.status,
        alerts.GROUPS_TAG: ",".join(result.drifted_groups),
        "conveyor.drift.features": ",".join(result.drifted)[:250],
        "conveyor.drift.deciding": "; ".join(g.summary() for g in result.groups if g.drifted)[:5000] or "-",
        alerts.ALERT_TAG: (
            (alerts.PENDING if sends_events else alerts.NOT_SENT)
            if decision.alert
            else f"none ({decision.reason})"[:250]
        ),
        alerts.ACTION_TAG: decision.action or "-",
        "conveyor.drift.source": outcome.data.source[:250],
        "conveyor.drift.reference_batch": result.reference_batch,
        "conveyor.estimate": outcome.estimate.reason[:5000],
        **window_span(outcome.data.records),
    }
    device = "" if outcome.data.device == SERVER_DEVICE else f" {outcome.data.device}"
    run = client.create_run(experiment_id, run_name=f"drift v{version}{device}", tags=tags)
    now = int(datetime.now(UTC).timestamp() * 1000)
    metrics = [
        Metric("drifted_groups", len(result.drifted_groups), now, 0),
        Metric("current_rows", result.current_rows, now, 0),
        Metric("reference_rows", result.reference_rows, now, 0),
    ]
    metrics += [Metric(metric_name(f"effect/{f.name}"), f.effect, now, 0) for f in result.features]
    metrics += [Metric(metric_name(f"group/{g.group}"), g.strength, now, 0) for g in result.groups]
    found = outcome.estimate.estimate
    if found is not None:
        low, high = found.cost_interval
        metrics += [
            Metric("estimate/mAP50-95", found.map50_95, now, 0),
            Metric("estimate/mAP50-95_low", found.low, now, 0),
            Metric("estimate/mAP50-95_high", found.high, now, 0),
            Metric("estimate/cost", found.cost, now, 0),
            Metric("estimate/cost_low", low, now, 0),
            Metric("estimate/cost_high", high, now, 0),
        ]
    client.log_batch(run.info.run_id, metrics=metrics, tags=[RunTag(k, v) for k, v in tags.items()])
    client.log_artifacts(run.info.run_id, str(outcome.report_dir), "drift")
    client.set_terminated(run.info.run_id)
    uri = client.tracking_uri
    url = f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run.info.run_id}" if uri.startswith("http") else None
    return run.info.run_id, url


def mark_alert_emitted(client: MlflowClient, run_id: str, event_id: str) -> None:
    """Recorded once the event was handed to Prefect (its events client sends it in the background, and resends
    what the server did not confirm); the cooldown and de-duplication read this tag."""
    client.set_tag(run_id, alerts.ALERT_TAG, alerts.EMITTED)
    client.set_tag(run_id, alerts.EVENT_TAG, event_id)


def write_gauges(path: Path, outcome: CheckOutcome, stale_after: timedelta | None = None) -> None:
    """The last check of each device as Prometheus gauges (label `device`), in the text format the server appends
    to its /metrics: this check's gauges replace its device's in `gauges/<device>.prom` beside `path`, and `path`
    is all devices' merged (one family per metric, as the text format requires). A device not checked for
    `stale_after` (a window: it sent nothing in one) is dropped: a retired camera said "drift" on the dashboard for
    good."""
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    result, at = outcome.result, outcome.checked_at
    registry = CollectorRegistry()
    device = outcome.data.device
    labels = {"model": outcome.model_name, "version": outcome.model_version, "device": device}

    def gauge(name: str, help_text: str, value: float) -> None:
        Gauge(name, help_text, list(labels), registry=registry).labels(**labels).set(value)

    gauge("conveyor_drift_detected", "1 when the last drift check found drift", 1.0 if result.status == "drift" else 0)
    gauge("conveyor_drift_groups", "Drifted groups of features in the last drift check", len(result.drifted_groups))
    gauge("conveyor_drift_current_rows", "Rows in the last drift check's current window", result.current_rows)
    gauge(
        "conveyor_drift_retrain",
        "1 when the last drift check asked for a retraining, 0 for an alert only or none",
        1.0 if outcome.decision.alert and outcome.decision.action == "retrain" else 0.0,
    )
    found = outcome.estimate.estimate
    if found is not None:
        gauge("conveyor_performance_estimate", "Estimated mAP50-95 of the last window (label-free)", found.map50_95)
        gauge("conveyor_performance_estimate_low", "Lower end of the estimate's interval", found.low)
        gauge("conveyor_performance_estimate_high", "Upper end of the estimate's interval", found.high)
        gauge("conveyor_performance_reference", "The same estimate on the version's validation images", found.reference)
        gauge(
            "conveyor_performance_validation",
            "True mAP50-95 of the version's validation split",
            found.validation_map50_95,
        )
        gauge("conveyor_performance_cost", "Estimated mAP50-95 lost against the validation split", found.cost)
    Gauge(
        "conveyor_drift_last_check_timestamp_seconds", "When the last drift check ran", ["device"], registry=registry
    ).labels(device).set(at.timestamp())
    group = Gauge(
        "conveyor_drift_group_strength",
        "Per group: the strongest feature's effect over its threshold (>= 1 with drift)",
        ["group", "device"],
        registry=registry,
    )
    group_drifted = Gauge(
        "conveyor_drift_group_drifted", "1 when the group drifted", ["group", "device"], registry=registry
    )
    for g in result.groups:
        group.labels(g.group, device).set(g.strength)
        group_drifted.labels(g.group, device).set(1.0 if g.drifted else 0.0)
    effect = Gauge(
        "conveyor_drift_feature_effect",
        "Per feature: the effect size (Wasserstein distance in reference standard deviations)",
        ["feature", "group", "device"],
        registry=registry,
    )
    drifted = Gauge(
        "conveyor_drift_feature_drifted", "1 when the feature drifted", ["feature", "device"], registry=registry
    )
    for feature in result.features:
        effect.labels(feature.name, feature.group, device).set(feature.effect)
        drifted.labels(feature.name, device).set(1.0 if feature.drifted else 0.0)
    per_device = path.parent / "gauges"
    per_device.mkdir(parents=True, exist_ok=True)
    _write_atomically(per_device / f"{device}.prom", generate_latest(registry))
    if stale_after is not None:
        for file in per_device.glob("*.prom"):
            with contextlib.suppress(FileNotFoundError):  # another check's, removed meanwhile
                if time.time() - file.stat().st_mtime > stale_after.total_seconds():
                    file.unlink()
    _write_atomically(path, merged_gauges(sorted(per_device.glob("*.prom"))))


def merged_gauges(files: list[Path]) -> bytes:
    """Several text-format files as one: each metric family once, with every file's samples."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Metric] = {}
    for file in files:
        for family in text_string_to_metric_families(file.read_text()):
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            merged.samples.extend(family.samples)

    class Merged:
        def collect(self) -> list[Metric]:
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Merged())
    return generate_latest(registry)


def _write_atomically(path: Path, content: bytes) -> None:
    """A scrape never sees half a file: written beside it, then renamed."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(content)
    temporary.replace(path)
