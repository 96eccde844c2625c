"""When a drift verdict becomes an alert: the `conveyor.drift.detected` event, which starts a retraining.

Rules:
- Only "drift" may alert; "no drift" and "insufficient data" never do.
- Cooldown: no alert within `monitor.cooldown_hours` of the last alert (for any version). The retraining that alert
  started needs time, and until the new champion serves, the window still holds the traffic that alerted.
- De-duplication: one alert per model version and set of drifted features per `monitor.dedupe_hours`; a version
  that keeps drifting the same way is not retrained again and again on the same evidence.
- Every check is an MLflow run in the monitoring experiment; an alert is a run tagged `conveyor.drift.alert=emitted`
  (set only after the event was accepted). The history lives with the registry, not on one machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from mlflow.tracking import MlflowClient

from conveyor.settings import MonitorSettings
from monitoring.drift import DriftResult

ALERT_TAG = "conveyor.drift.alert"
EMITTED = "emitted"
FEATURES_TAG = "conveyor.drift.features"
VERSION_TAG = "conveyor.model_version"
MODEL_TAG = "conveyor.model_name"


@dataclass(frozen=True)
class PastAlert:
    at: datetime
    model_version: str
    features: frozenset[str]


@dataclass(frozen=True)
class AlertDecision:
    alert: bool
    reason: str


def past_alerts(client: MlflowClient, experiment: str, model_name: str, since: datetime) -> list[PastAlert]:
    """Alerts recorded in the monitoring experiment since `since`, newest first."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    runs = client.search_runs(
        [found.experiment_id],
        filter_string=(
            f"tags.`{ALERT_TAG}` = '{EMITTED}' and tags.`{MODEL_TAG}` = '{model_name}' "
            f"and attributes.start_time >= {int(since.timestamp() * 1000)}"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=200,
    )
    return [
        PastAlert(
            datetime.fromtimestamp(run.info.start_time / 1000, UTC),
            run.data.tags.get(VERSION_TAG, ""),
            frozenset(f for f in run.data.tags.get(FEATURES_TAG, "").split(",") if f),
        )
        for run in runs
    ]


def decide(
    result: DriftResult, model_version: str, history: Sequence[PastAlert], policy: MonitorSettings, now: datetime
) -> AlertDecision:
    if result.status != "drift":
        return AlertDecision(False, result.status)
    cooldown = timedelta(hours=policy.cooldown_hours)
    recent = [a for a in history if now - a.at < cooldown]
    if recent:
        until = recent[0].at + cooldown
        return AlertDecision(
            False, f"cooldown: the last alert was at {recent[0].at:%Y-%m-%d %H:%M} UTC, next after {until:%H:%M}"
        )
    dedupe = timedelta(hours=policy.dedupe_hours)
    features = frozenset(result.drifted)
    for past in history:
        if now - past.at < dedupe and past.model_version == model_version and past.features == features:
            return AlertDecision(
                False, f"duplicate: v{model_version} alerted on the same features at {past.at:%Y-%m-%d %H:%M} UTC"
            )
    return AlertDecision(True, f"drift on v{model_version}: {', '.join(result.drifted)}")
