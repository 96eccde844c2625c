"""When a drift verdict becomes an alert, and whether the alert retrains: the `conveyor.drift.detected` event.

Rules:
- Only "drift" may alert; "no drift" and "insufficient data" never do.
- The action follows the harm: the event asks for a retraining (`action: retrain`) when the estimated mAP50-95 cost
  of the window reaches `monitor.retrain_cost` beyond doubt (the lower end of its 90 % interval: a window of 40
  images estimates mAP to about ±0.05, so its point estimate alone would retrain on noise), or when this version's
  drift persisted `monitor.retrain_after` checks in a row (whatever the estimate says: a change that lasts deserves
  data from it). Otherwise the inputs changed and the model is not measurably hurt: the event only alerts
  (`action: alert`), and nobody retrains.
- Without a performance estimate (a version profiled before calibration existed, a log without confidences) there is
  no event at all: the check says why and how to fix it, rather than retraining or staying silent on a guess.
- Cooldown: no retraining alert within `monitor.cooldown_hours` of the last one (for any version). The retraining
  it started needs time, and until the new champion serves, the window still holds the traffic that alerted. A
  retraining that never retrained (turned away under `orchestration.on_overlap: reject`, by the deployment's
  concurrency limit or the project's lock; Failed; Crashed) holds neither the cooldown nor the de-duplication: the
  next check asks again (`without_failed_retrainings`).
- Checks are per device (the server's window, each edge runner's): persistence counts one device's checks; the
  cooldown and the de-duplication are per model, whichever device alerted (one retraining serves them all).
- De-duplication: one alert per model version, action and set of drifted groups per `monitor.dedupe_hours`; a
  version that keeps drifting the same way is not alerted again and again on the same evidence.
- Every check is an MLflow run in the monitoring experiment; an alert is a run tagged `conveyor.drift.alert=emitted`
  (set only after the event was accepted). The history lives with the registry, not on one machine.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from mlflow.tracking import MlflowClient

from conveyor.settings import MonitorSettings
from monitoring.drift import DriftResult
from monitoring.estimate import WindowEstimate
from pipelines.lineage_report import CHECK_DEVICE_TAG as DEVICE_TAG
from pipelines.lineage_report import CHECK_EVENT_TAG as EVENT_TAG  # the retraining it started carries it too
from pipelines.lineage_report import CHECK_GROUPS_TAG as GROUPS_TAG

ALERT_TAG = "conveyor.drift.alert"
# A check by hand decides as the flow would, and sends nothing: the monitoring deployment sends the events.
NOT_SENT = "not sent (a check by hand: the monitoring deployment sends the events that retrain)"
EMITTED = "emitted"
# The monitoring flow's check decided to alert, and its event is being sent: EMITTED once recorded. One that stays
# pending (the tracking server failed between the two) was sent if Prefect has the retraining it asked for.
PENDING = "pending"
EVENT_NAMESPACE = uuid.UUID("5f1c0d2e-7b7e-4b8e-9a56-3c0f2f0e1d21")  # of the drift events' ids (`event_id`)
ACTION_TAG = "conveyor.drift.action"
STATUS_TAG = "conveyor.drift.status"
VERSION_TAG = "conveyor.model_version"
MODEL_TAG = "conveyor.model_name"
# The time span of a check's window (its first and last record, Unix seconds): persistence counts windows that do not
# overlap, so a check run again by hand over the same records, or an hourly check of a 24 h window, is not a new one.
WINDOW_START_TAG = "conveyor.drift.window_start"
WINDOW_END_TAG = "conveyor.drift.window_end"
PERSISTENCE_LOOKBACK = 500  # checks read back to find `retrain_after` windows that do not overlap
Action = Literal["retrain", "alert"]


def event_id(check_run_id: str) -> uuid.UUID:
    """The drift event's id, from its check's MLflow run: a retried emit sends the same event, which Prefect's
    triggers count once (a new id each try had started one retraining per try)."""
    return uuid.uuid5(EVENT_NAMESPACE, check_run_id)


@dataclass(frozen=True)
class PastAlert:
    at: datetime
    model_version: str
    groups: frozenset[str]
    action: str
    event_id: str = ""
    recorded: bool = True  # False: its check never recorded the event as sent (PENDING)


@dataclass(frozen=True)
class AlertDecision:
    alert: bool
    reason: str
    action: Action | None = None


def past_alerts(client: MlflowClient, experiment: str, model_name: str, since: datetime) -> list[PastAlert]:
    """Alerts recorded in the monitoring experiment since `since`, newest first: those sent, and those whose
    sending was never recorded (PENDING: `failed_retrainings` keeps only those Prefect has a retraining for)."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    runs = [
        run
        for state in (EMITTED, PENDING)
        for run in client.search_runs(
            [found.experiment_id],
            filter_string=(
                f"tags.`{ALERT_TAG}` = '{state}' and tags.`{MODEL_TAG}` = '{model_name}' "
                f"and attributes.start_time >= {int(since.timestamp() * 1000)}"
            ),
            max_results=200,
        )
    ]
    runs.sort(key=lambda run: run.info.start_time, reverse=True)
    return [
        PastAlert(
            datetime.fromtimestamp(run.info.start_time / 1000, UTC),
            run.data.tags.get(VERSION_TAG, ""),
            frozenset(g for g in run.data.tags.get(GROUPS_TAG, "").split(",") if g),
            run.data.tags.get(ACTION_TAG, "retrain"),
            run.data.tags.get(EVENT_TAG) or str(event_id(run.info.run_id)),
            run.data.tags.get(ALERT_TAG) == EMITTED,
        )
        for run in runs
    ]


NEVER_RECORDED = "unsent: its check failed while sending it, and no retraining answered it"
# Prefect's message when a deployment's concurrency limit (orchestration.on_overlap: reject) turns a run away.
TURNED_AWAY = "Deployment concurrency limit reached."


def _never_retrained(state: Any) -> str | None:
    """How a retraining's run ended without retraining, or None: Failed (our lock turned it away as busy, or it
    broke), Crashed, or Cancelled by the deployment's concurrency limit before it started. Any other Cancelled run
    was stopped on purpose (a person, SIGTERM): it holds the cooldown. So does a Failed or Crashed run that
    registered a version (`failed_retrainings` asks the registry)."""
    kind = state.type.value
    if kind in ("FAILED", "CRASHED"):
        return kind.lower()
    if kind == "CANCELLED" and TURNED_AWAY in (state.message or ""):
        return "turned away (the training deployment's concurrency limit)"
    return None


def failed_retrainings(
    history: Sequence[PastAlert], deployment: str, registered: Callable[[str], bool] = lambda flow_run_id: False
) -> dict[str, str]:
    """The retrain alerts of `history` whose retraining never retrained, {event id: how it ended}: the runs of the
    training deployment that the drift automation started with `drift_event` = the alert's event. Empty where
    Prefect is not configured or does not answer: without that knowledge every alert holds, as before.

    A run that failed after it registered a version (its DVC push refused by a full remote) retrained: it holds
    (`registered(flow run id)`), or every hourly check would start another retraining until the remote had room."""
    asked = {a.event_id for a in history if a.action == "retrain" and a.event_id}
    unrecorded = {a.event_id for a in history if not a.recorded}
    if not asked and not unrecorded:
        return {}
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        return {event: NEVER_RECORDED for event in unrecorded}  # no Prefect to have sent them to
    try:
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment])),
                sort=FlowRunSort.EXPECTED_START_TIME_DESC,
                limit=200,
            )
    except Exception:  # Prefect away or refusing: unknown, so every recorded alert holds (the check goes on)
        return {event: NEVER_RECORDED for event in unrecorded}
    ended: dict[str, Any] = {}
    for run in runs:  # newest first: an event's newest run tells how its retraining ended
        if run.state is not None:
            ended.setdefault(str(run.parameters.get("drift_event")), run)
    never = {
        event: how
        for event, run in ended.items()
        if event in asked and (how := _never_retrained(run.state)) and not registered(str(run.id))
    }
    # A check that failed between sending its event and recording it: sent if a retraining answered it.
    return never | {event: NEVER_RECORDED for event in unrecorded if event not in ended}


def without_failed_retrainings(history: Sequence[PastAlert], failed: dict[str, str]) -> tuple[list[PastAlert], str]:
    """`history` without the alerts whose retraining failed, and a note naming them (empty if none)."""
    dropped = [a for a in history if a.event_id in failed]
    note = "; ".join(
        f"the retraining asked for at {a.at:%Y-%m-%d %H:%M} UTC ended {failed[a.event_id]}" for a in dropped
    )
    return [a for a in history if a.event_id not in failed], note


def recent_statuses(
    client: MlflowClient,
    experiment: str,
    model_name: str,
    version: str,
    count: int,
    device: str,
    window: tuple[float, float] | None,
) -> list[str]:
    """The verdicts of this version's last `count` windows of one device before the current `window` (its first and
    last record time), newest first, each window ending before the next one began (for `monitor.retrain_after`:
    drift that persists on one camera over windows of its own records, not the same records checked again, nor the
    checks of several cameras interleaved). A check without a window's span (a folder of images) has no earlier
    windows, and is not counted as one."""
    found = client.get_experiment_by_name(experiment)
    if found is None or count <= 0 or window is None:
        return []
    runs = client.search_runs(
        [found.experiment_id],
        filter_string=(
            f"tags.`{MODEL_TAG}` = '{model_name}' and tags.`{VERSION_TAG}` = '{version}' "
            f"and tags.`{DEVICE_TAG}` = '{device}'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=PERSISTENCE_LOOKBACK,
    )
    statuses: list[str] = []
    earliest = window[0]  # where the last counted window began: the current one first
    for run in runs:
        try:
            start, end = float(run.data.tags[WINDOW_START_TAG]), float(run.data.tags[WINDOW_END_TAG])
        except (KeyError, ValueError):
            continue
        if end > earliest:
            continue  # overlaps a window already counted (or the current one)
        statuses.append(run.data.tags.get(STATUS_TAG, ""))
        earliest = start
        if len(statuses) == count:
            break
    return statuses


def decide(
    result: DriftResult,
    model_version: str,
    history: Sequence[PastAlert],
    earlier: Sequence[str],
    estimate: WindowEstimate,
    policy: MonitorSettings,
    now: datetime,
) -> AlertDecision:
    """`earlier`: the verdicts of this version's previous checks, newest first."""
    if result.status != "drift":
        return AlertDecision(False, result.status)
    if estimate.estimate is None:
        return AlertDecision(False, f"drift, but no performance estimate: {estimate.reason}")
    cost = estimate.estimate.cost
    least = estimate.estimate.cost_interval[0]
    persisted = policy.retrain_after <= 1 or (
        len(earlier) >= policy.retrain_after - 1 and all(s == "drift" for s in earlier[: policy.retrain_after - 1])
    )
    action: Action
    if least >= policy.retrain_cost:
        action, why = (
            "retrain",
            f"estimated cost {cost:.3f} (at least {least:.3f}) >= monitor.retrain_cost {policy.retrain_cost:.3f}",
        )
    elif persisted:
        action, why = "retrain", f"drift in {policy.retrain_after} checks in a row (monitor.retrain_after)"
    else:
        action, why = (
            "alert",
            f"inputs changed; estimated cost {cost:.3f} (at least {least:.3f}) is not beyond monitor.retrain_cost "
            f"{policy.retrain_cost:.3f}: no retraining",
        )
    if action == "retrain":
        cooldown = timedelta(hours=policy.cooldown_hours)
        recent = [a for a in history if a.action == "retrain" and now - a.at < cooldown]
        if recent:
            last, until = recent[0].at, recent[0].at + cooldown
            return AlertDecision(
                False,
                f"cooldown: the last retraining alert was at {last:%Y-%m-%d %H:%M} UTC, "
                f"next after {until:%Y-%m-%d %H:%M} UTC",
            )
    dedupe = timedelta(hours=policy.dedupe_hours)
    groups = frozenset(result.drifted_groups)
    for past in history:
        if (
            now - past.at < dedupe
            and past.model_version == model_version
            and past.groups == groups
            and past.action == action
        ):
            return AlertDecision(
                False,
                f"duplicate: v{model_version} alerted ({action}) on the same groups at {past.at:%Y-%m-%d %H:%M} UTC",
            )
    return AlertDecision(True, f"drift on v{model_version} ({', '.join(result.drifted_groups)}): {why}", action)
