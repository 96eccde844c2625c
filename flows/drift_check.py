"""The monitoring flow: one drift check (`conveyor drift`), and on an alert the Prefect event that closes the loop.

`conveyor deploy` schedules it (monitor.schedule) and creates the automation that answers the event
`conveyor.drift.detected` by running the training deployment with reason=drift and a warm start from the champion.
Nothing here polls or retrains by itself: the event and the automation are Prefect's.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

import conveyor  # noqa: F401  (offline switches first)
from conveyor.paths import ProjectPaths
from conveyor.settings import load_settings

if TYPE_CHECKING:
    from monitoring.check import CheckOutcome

DRIFT_EVENT = "conveyor.drift.detected"


def model_resource(model_name: str) -> str:
    """The event's resource id; the automation matches on it."""
    return f"conveyor.model.{model_name}"


@task(name="drift check")
def drift_check(root: str, hours: float | None, last: int | None) -> dict[str, Any]:
    from rich.console import Console

    from monitoring.check import CheckOptions, run_check

    paths = ProjectPaths(Path(root))
    settings = load_settings(paths.params)
    outcome = run_check(paths, settings, CheckOptions(hours=hours, last=last), Console(width=120))
    logger = get_run_logger()
    logger.info("v%s: %s (%s)", outcome.model_version, outcome.result.status, outcome.result.message)
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

    from conveyor.tracking import Tracker
    from monitoring.check import mark_alert_emitted

    event = emit_event(
        event=DRIFT_EVENT,
        resource={
            "prefect.resource.id": model_resource(result["model_name"]),
            "prefect.resource.name": result["model_name"],
            "conveyor.model.version": str(result["model_version"]),
        },
        payload={k: result[k] for k in ("model_name", "model_version", "drifted_share", "drifted_features")}
        | {"mlflow_run_id": result["mlflow_run_id"], "current_rows": result["current_rows"]},
    )
    if event is None:
        raise RuntimeError("Prefect did not accept the drift event (no API to send it to: set PREFECT_API_URL)")
    mark_alert_emitted(Tracker.client_for(ProjectPaths(Path(root))), result["mlflow_run_id"], str(event.id))
    get_run_logger().warning(
        "drift on v%s (%.0f%% of features: %s): event %s emitted",
        result["model_version"],
        100 * result["drifted_share"],
        ", ".join(result["drifted_features"]),
        event.id,
    )
    return str(event.id)


@flow(name="conveyor-monitoring")
def monitoring_flow(
    project_dir: str | None = None, hours: float | None = None, last: int | None = None
) -> dict[str, Any]:
    """Check the serving model's recent traffic for drift; emit `conveyor.drift.detected` when the policy says so.

    project_dir: the Conveyor project (default: the working directory's).
    hours, last: the window (default monitor.window_hours / monitor.window_records).
    """
    paths = ProjectPaths.discover(Path(project_dir) if project_dir else None)
    root = str(paths.root)
    result = drift_check(root, hours, last)
    if result["alert"]:
        result["event_id"] = emit_drift_event(root, result)
    create_markdown_artifact(result["markdown"], key="conveyor-drift-check", description="Conveyor drift check")
    return {k: v for k, v in result.items() if k != "markdown"}


def summary_markdown(outcome: CheckOutcome) -> str:
    result = outcome.result
    link = (
        f"[MLflow run]({outcome.mlflow_run_url})" if outcome.mlflow_run_url else f"MLflow run `{outcome.mlflow_run_id}`"
    )
    rows = "\n".join(
        f"| {f.name} | {f.method} | {f.score:.4g} | {f.threshold:.4g} | {'**drift**' if f.drifted else 'ok'} |"
        for f in result.features
    )
    skipped = "".join(f"- skipped {name}: {why}\n" for name, why in result.skipped.items())
    return (
        f"## Drift check of {outcome.model_name} v{outcome.model_version}: {result.status}\n\n"
        f"- {result.message}\n- current: {outcome.data.source} ({result.current_rows} rows)\n"
        f"- alert: {'yes' if outcome.decision.alert else 'no'} ({outcome.decision.reason})\n"
        f"- report: {link}, artifact `drift/report.html`; local {outcome.report_dir / 'report.html'}\n"
        f"{skipped}\n| feature | test | score | threshold | verdict |\n|---|---|---|---|---|\n{rows}\n"
    )
