"""The monitoring flow: a drift check (`conveyor drift`) per device with records in the window (the server, each
edge runner that ships its log), and on an alert the Prefect event that closes the loop.

`conveyor deploy` schedules it (monitor.schedule) and creates the automation that answers the event
`conveyor.drift.detected` with the resource label `conveyor.drift.action: retrain` by running the training
deployment with reason=drift and a fine-tune from the champion. An event with `action: alert` (inputs changed, the
model is not measurably hurt) is only recorded: Prefect's event feed, the MLflow check run, the gauges. Nothing here
polls or retrains by itself: the event and the automation are Prefect's.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from pydantic import Field

import conveyor  # noqa: F401  (offline switches first)
from conveyor.paths import ProjectPaths
from conveyor.settings import load_settings
from flows import MONITORING_FLOW

if TYPE_CHECKING:
    from monitoring.check import CheckOutcome

DRIFT_EVENT = "conveyor.drift.detected"
ACTION_LABEL = "conveyor.drift.action"  # a resource label of the event: "retrain" or "alert"
PAYLOAD_KEYS = (
    "model_name",
    "model_version",
    "device",
    "action",
    "drifted_groups",
    "deciding",
    "drifted_features",
    "estimated_map50_95",
    "estimated_cost",
    "estimate_interval",
    "current_rows",
    "mlflow_run_id",
)


def model_resource(model_name: str) -> str:
    """The event's resource id; the automation matches on it."""
    return f"conveyor.model.{model_name}"


@task(name="devices in the window")
def window_devices(root: str, hours: float | None) -> list[str]:
    """The devices with records in the window, the server first; the server alone when the log is empty (its
    check then says why)."""
    from monitoring.current import NoCurrentDataError, devices_in_log

    paths = ProjectPaths(Path(root))
    settings = load_settings(paths.params)
    log = settings.serve.prediction_log
    try:
        found = devices_in_log(
            paths.prediction_log_source(log.directory, log.s3), hours or settings.monitor.window_hours
        )
    except NoCurrentDataError:
        found = {}
    get_run_logger().info("records in the window: %s", found or "none")
    return list(found) or ["server"]


@task(name="drift check", task_run_name="drift check {device}")
def drift_check(root: str, hours: float | None, last: int | None, device: str = "server") -> dict[str, Any]:
    from rich.console import Console

    from monitoring.check import CheckOptions, run_check

    paths = ProjectPaths(Path(root))
    settings = load_settings(paths.params)
    outcome = run_check(
        paths, settings, CheckOptions(hours=hours, last=last, device=device, sends_events=True), Console(width=120)
    )
    logger = get_run_logger()
    logger.info("%s v%s: %s (%s)", device, outcome.model_version, outcome.result.status, outcome.result.message)
    if outcome.data.other_versions:
        logger.info("left out, served by other versions: %s", outcome.data.other_versions)
    return {
        **outcome.payload(),
        "status": outcome.result.status,
        "message": outcome.result.message,
        "alert": outcome.decision.alert,
        "alert_reason": outcome.decision.reason,
        "mlflow_run_url": outcome.mlflow_run_url,
        "markdown": summary_markdown(outcome),
    }


@task(name="emit drift event", retries=2, retry_delay_seconds=2)
def emit_drift_event(root: str, result: dict[str, Any]) -> str:
    from prefect.events import emit_event

    from monitoring.alerts import event_id

    event = emit_event(
        id=event_id(result["mlflow_run_id"]),
        event=DRIFT_EVENT,
        resource={
            "prefect.resource.id": model_resource(result["model_name"]),
            "prefect.resource.name": result["model_name"],
            "conveyor.model.version": str(result["model_version"]),
            "conveyor.device": str(result["device"]),
            ACTION_LABEL: str(result["action"]),  # the automation retrains only on action "retrain"
        },
        payload={k: result[k] for k in PAYLOAD_KEYS},
    )
    if event is None:
        raise RuntimeError("Prefect did not accept the drift event (no API to send it to: set PREFECT_API_URL)")
    get_run_logger().warning(
        "drift on v%s seen by %s (%s; estimated cost %s): event %s emitted, action %s",
        result["model_version"],
        result["device"],
        "; ".join(result["deciding"]),
        result["estimated_cost"],
        event.id,
        result["action"],
    )
    return str(event.id)


@task(name="record drift event", retries=3, retry_delay_seconds=2)
def record_drift_event(root: str, result: dict[str, Any], emitted: str) -> None:
    """On the check's MLflow run, which the cooldown and de-duplication read: a task of its own, so that a tracking
    server that hiccups retries this, not the event."""
    from conveyor.tracking import Tracker
    from monitoring.check import mark_alert_emitted

    mark_alert_emitted(Tracker.client_for(ProjectPaths(Path(root))), result["mlflow_run_id"], emitted)


@flow(name=MONITORING_FLOW)
def monitoring_flow(
    project_dir: str | None = None,
    # Checked when the run starts (and in the deployment's schema): hours <= 0 made an empty window, a Completed run
    # that checked nothing; last=-5 dropped the window's first 5 records.
    hours: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None,
    last: Annotated[int, Field(ge=1)] | None = None,
    devices: list[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Check the serving model's recent traffic for drift, one device's window at a time; emit
    `conveyor.drift.detected` when the policy says so.

    project_dir: the Conveyor project (default: the working directory's).
    hours, last: the window (default monitor.window_hours / monitor.window_records).
    devices: whose records ("server", edge runners' names); default every device with records in the window.
    """
    paths = ProjectPaths.discover(Path(project_dir) if project_dir else None)
    root = str(paths.root)
    results: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    checked = devices or window_devices(root, hours)
    for device in checked:
        # One device's check that fails (its bundle's profile gone, its records expired since they were listed) must
        # not leave the devices after it unchecked every hour: each is checked, and the run fails at the end.
        try:
            result = drift_check(root, hours, last, device)
            if result["alert"]:
                result["event_id"] = emit_drift_event(root, result)
                record_drift_event(root, result, result["event_id"])
            create_markdown_artifact(
                result["markdown"], key=artifact_key(device), description=f"Conveyor drift check ({device})"
            )
        except Exception as exc:
            failed[device] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            get_run_logger().error("drift check of %s failed: %s", device, failed[device])
            continue
        results[device] = {k: v for k, v in result.items() if k != "markdown"}
    if failed:
        raise DeviceChecksFailedError(
            f"the drift check failed for {len(failed)} of {len(checked)} devices "
            f"({'; '.join(f'{device}: {why}' for device, why in failed.items())}); "
            f"checked: {', '.join(results) or 'none'}"
        )
    return results


class DeviceChecksFailedError(RuntimeError):
    """Some devices' checks failed; the others ran, and their results are recorded."""


def artifact_key(device: str) -> str:
    """Prefect artifact keys are lowercase letters, digits and dashes; the server's keeps its old key."""
    if device == "server":
        return "conveyor-drift-check"
    return "conveyor-drift-check-" + "".join(c if c.isalnum() else "-" for c in device.lower())


def summary_markdown(outcome: CheckOutcome) -> str:
    result = outcome.result
    link = (
        f"[MLflow run]({outcome.mlflow_run_url})" if outcome.mlflow_run_url else f"MLflow run `{outcome.mlflow_run_id}`"
    )
    rows = "\n".join(
        f"| {g.group} | {'**drift**' if g.drifted else 'ok'} | {g.strength:.2f} | {g.feature} | "
        f"{g.words if g.drifted else ''} |"
        for g in result.groups
    )
    found = outcome.estimate.estimate
    estimate = (
        f"estimated mAP50-95 {found.map50_95:.3f} ({found.low:.3f} to {found.high:.3f}), cost {found.cost:+.3f}"
        if found is not None
        else f"no estimate ({outcome.estimate.reason})"
    )
    skipped = "".join(f"- skipped {name}: {why}\n" for name, why in result.skipped.items())
    return (
        f"## Drift check of {outcome.model_name} v{outcome.model_version} ({outcome.data.device}): {result.status}\n\n"
        f"- {result.message}\n- current: {outcome.data.source} ({result.current_rows} rows)\n"
        f"- performance: {estimate}\n"
        f"- alert: {outcome.decision.action if outcome.decision.alert else 'no'} ({outcome.decision.reason})\n"
        f"- report: {link}, artifact `drift/report.html`; local {outcome.report_dir / 'report.html'}\n"
        f"{skipped}\n| group | verdict | strength | deciding feature | what changed |\n|---|---|---|---|---|\n{rows}\n"
    )
