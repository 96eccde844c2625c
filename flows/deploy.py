"""Declare Conveyor's Prefect objects: the training deployment (cron from params.yaml, one run at a time), the
monitoring deployment (monitor.schedule), and the automation that answers a drift event by running the training
deployment with reason=drift and a warm start from the champion. All on a process work pool: a worker
(`conveyor worker`) picks the runs up; no Docker, the code runs from this checkout. Re-running `conveyor deploy`
updates them in place."""

from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass, field
from typing import Any

from conveyor.errors import ConveyorError
from conveyor.paths import ProjectPaths
from conveyor.settings import ConfigError, Settings
from flows import MONITORING_FLOW, TRAINING_FLOW

ENTRYPOINT = "flows/training.py:training_flow"
MAX_DUPLICATES = 100  # automations of one name `remove_automation` deletes at most
DEPLOYMENT_TAG = "conveyor"  # on both deployments, so on their runs


def model_tag(settings: Settings) -> str:
    """The tag of one project's deployments, so of their runs: its zombie automation matches this one. Projects share
    a team's Prefect server, each with its own heartbeat settings; one automation for every Conveyor run let the
    project deployed last crash another's runs by its own window, or switch their detection off."""
    return f"{DEPLOYMENT_TAG}.model.{settings.registry.model_name}"


MONITORING_ENTRYPOINT = "flows/drift_check.py:monitoring_flow"


class PrefectServerMissingError(ConveyorError, RuntimeError):
    """A deployment lives on a Prefect server, and none is configured."""


@dataclass(frozen=True)
class DeploymentInfo:
    id: str
    name: str  # flow/deployment, as run_deployment wants it
    work_pool: str
    cron: str
    timezone: str
    on_overlap: str
    monitoring: str = ""  # flow/deployment of the drift check
    monitoring_cron: str = ""
    automation: str | None = None  # the drift -> retraining automation's name (None: monitor.retrain_on_drift off)
    zombie_automation: str | None = None  # marks flow runs that stopped sending heartbeats Crashed (None: off)
    removed: list[str] = field(default_factory=list)  # this project's deployments under names params.yaml no longer has


def require_server() -> str:
    api = os.environ.get("PREFECT_API_URL")
    if not api:
        raise PrefectServerMissingError(
            "PREFECT_API_URL is not set: start a server (`conveyor server`) and "
            "`export PREFECT_API_URL=http://127.0.0.1:4200/api`"
        )
    return api


def ensure_work_pool(name: str) -> None:
    """A process work pool (idempotent). The server stores no job template unless given one."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client, contextlib.suppress(ObjectAlreadyExists):
        client.create_work_pool(
            WorkPoolCreate(name=name, type="process", base_job_template=ProcessWorker.get_default_base_job_template())
        )


def cron_of(key: str, cron: str, timezone: str) -> Any:
    """Prefect's schedule for a cron of params.yaml, checked by Prefect's own parser before anything is created (a
    bad one is refused naming its key; importing Prefect to check it at every settings load would cost ~0.8 s)."""
    from prefect.schedules import Cron

    try:
        return Cron(cron, timezone=timezone)
    except ValueError as exc:
        raise ConfigError(f"params.yaml: {key}: {cron!r} is not a cron Prefect accepts (e.g. '0 3 * * 1')") from exc


def refuse_anothers_deployment(flow_name: str, name: str, settings: Settings, key: str) -> None:
    """A deployment of this name that another project registered (another model's tag) is refused, not overwritten:
    Prefect keys deployments by flow and name, so the second project's `conveyor deploy` would take over the
    first's schedule, and the first's drift automation would retrain from the second's checkout."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            existing = client.read_deployment_by_name(f"{flow_name}/{name}")
        except ObjectNotFound:
            return
    tags = set(existing.tags or [])
    owners = sorted(
        t.removeprefix(f"{DEPLOYMENT_TAG}.model.") for t in tags if t.startswith(f"{DEPLOYMENT_TAG}.model.")
    )
    if owners and model_tag(settings) not in tags:
        raise ConfigError(
            f"the Prefect server already has the deployment {flow_name}/{name} of model {', '.join(owners)} "
            f"(project {(existing.parameters or {}).get('project_dir', '?')}): give this project's its own name "
            f"(params.yaml {key}, e.g. {name}-{settings.registry.model_name})"
        )


def remove_renamed_deployments(flow_name: str, keep: str, settings: Settings, project_dir: str) -> list[str]:
    """This project's deployments of `flow_name` under a name other than `keep`: the names params.yaml gave them
    before it was changed. Deleted (with their scheduled runs), and their names returned. Left in place, a renamed
    training deployment went on running on its old cron beside the new one, and a renamed drift check checked (and
    asked for retrainings) twice an hour. A deployment of this model from another checkout is left alone."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterTags, FlowFilter, FlowFilterName

    removed = []
    with get_client(sync_client=True) as client:
        found = client.read_deployments(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
            deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(all_=[model_tag(settings)])),
        )
        for deployment in found:
            if deployment.name != keep and (deployment.parameters or {}).get("project_dir") == project_dir:
                client.delete_deployment(deployment.id)
                removed.append(f"{flow_name}/{deployment.name}")
    return removed


def deploy(paths: ProjectPaths, settings: Settings) -> DeploymentInfo:
    from prefect import flow
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    require_server()
    cfg = settings.orchestration
    training_schedule, monitoring_schedule = (
        cron_of(key, value, cfg.timezone)
        for key, value in (("orchestration.cron", cfg.cron), ("monitor.schedule", settings.monitor.schedule))
    )
    refuse_anothers_deployment(TRAINING_FLOW, cfg.deployment, settings, "orchestration.deployment")
    refuse_anothers_deployment(MONITORING_FLOW, settings.monitor.deployment, settings, "monitor.deployment")
    ensure_work_pool(cfg.work_pool)
    strategy = ConcurrencyLimitStrategy.ENQUEUE if cfg.on_overlap == "wait" else ConcurrencyLimitStrategy.CANCEL_NEW
    source = flow.from_source(source=str(paths.root), entrypoint=ENTRYPOINT)
    assert not inspect.isawaitable(source)  # sync context: from_source returns the flow itself
    deployment_id = source.deploy(
        name=cfg.deployment,
        work_pool_name=cfg.work_pool,
        schedules=[training_schedule],
        parameters={"reason": "schedule", "project_dir": str(paths.root)},
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=strategy),
        tags=[DEPLOYMENT_TAG, model_tag(settings)],
        description="Scheduled Conveyor training: stages, gates, registry promotion, DVC push.",
        print_next_steps=False,
        ignore_warnings=True,
    )
    monitor = settings.monitor
    monitoring = flow.from_source(source=str(paths.root), entrypoint=MONITORING_ENTRYPOINT)
    assert not inspect.isawaitable(monitoring)
    monitoring.deploy(
        name=monitor.deployment,
        work_pool_name=cfg.work_pool,
        schedules=[monitoring_schedule],
        parameters={"project_dir": str(paths.root)},
        # One check at a time: a check started while another runs (a manual one beside the schedule) waits for it.
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        tags=[DEPLOYMENT_TAG, model_tag(settings)],
        description="Conveyor drift check of the serving model's recent traffic; emits conveyor.drift.detected.",
        print_next_steps=False,
        ignore_warnings=True,
    )
    removed = [
        *remove_renamed_deployments(TRAINING_FLOW, cfg.deployment, settings, str(paths.root)),
        *remove_renamed_deployments(MONITORING_FLOW, monitor.deployment, settings, str(paths.root)),
    ]
    automation = ensure_drift_automation(paths, settings, deployment_id) if monitor.retrain_on_drift else None
    if not monitor.retrain_on_drift:
        remove_automation(automation_name(settings))
    remove_automation(LEGACY_ZOMBIE_AUTOMATION)  # one for every project's runs, before automations were per model
    zombies = ensure_zombie_automation(settings) if cfg.heartbeat_seconds else None
    if not cfg.heartbeat_seconds:
        remove_automation(zombie_automation_name(settings))
    return DeploymentInfo(
        str(deployment_id),
        f"{TRAINING_FLOW}/{cfg.deployment}",
        cfg.work_pool,
        cfg.cron,
        cfg.timezone,
        cfg.on_overlap,
        f"{MONITORING_FLOW}/{monitor.deployment}",
        monitor.schedule,
        automation,
        zombies,
        removed,
    )


LEGACY_ZOMBIE_AUTOMATION = "conveyor: crash flow runs that stopped sending heartbeats"
FLOW_RUN_ENDS = ("Completed", "Failed", "Cancelled", "Crashed")


def ensure_zombie_automation(settings: Settings) -> str:
    """Prefect's own zombie detection (its docs: "detect zombie flows"): a flow run that sent a heartbeat and then
    neither another one nor an end state within `crashed_after_seconds` is marked Crashed. This is what tells the
    truth when a worker's machine dies with its runs (no process is left to say so, on any machine); a run killed on
    a live machine is also caught sooner by the worker itself and by the next run's preflight."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture

    cfg = settings.orchestration
    heartbeat = "prefect.flow-run.heartbeat"
    name = zombie_automation_name(settings)
    remove_automation(name)
    Automation(
        name=name,
        description=f"No heartbeat for {cfg.crashed_after_seconds} s (sent every {cfg.heartbeat_seconds} s by runs of "
        "`conveyor worker`): the run's process is gone.",
        trigger=EventTrigger(
            after={heartbeat},
            expect={heartbeat, *(f"prefect.flow-run.{end}" for end in FLOW_RUN_ENDS)},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            # This project's runs only (its deployments' tag): on a team's server, another project's runs may send
            # heartbeats less often, and this would mark them Crashed.
            match_related={"prefect.resource.role": "tag", "prefect.resource.id": f"prefect.tag.{model_tag(settings)}"},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=cfg.crashed_after_seconds),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {cfg.crashed_after_seconds} s: the flow run's process died (zombie "
                "detection, `conveyor deploy`)",
            )
        ],
    ).create()
    return name


def zombie_automation_name(settings: Settings) -> str:
    return f"conveyor: crash {settings.registry.model_name}'s flow runs that stopped sending heartbeats"


def automation_name(settings: Settings) -> str:
    return f"conveyor: retrain {settings.registry.model_name} on drift"


def remove_automation(name: str) -> None:
    from prefect.automations import Automation

    # Every one of that name: Automation.read returns the first only, and two deploys at once can each create one.
    for _ in range(MAX_DUPLICATES):
        try:
            existing = Automation.read(name=name)
        except ValueError:  # none (left)
            return
        assert not inspect.isawaitable(existing)  # sync context
        existing.delete()


def ensure_drift_automation(paths: ProjectPaths, settings: Settings, training_deployment_id: Any) -> str:
    """conveyor.drift.detected for this model with action "retrain" -> the training deployment, reason=drift,
    fine-tuned from the champion (an "alert" event starts nothing)."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.events.actions import RunDeployment
    from prefect.events.schemas.automations import EventTrigger, Posture

    from flows.drift_check import ACTION_LABEL, DRIFT_EVENT, model_resource

    name = automation_name(settings)
    remove_automation(name)  # re-deploying replaces it, never duplicates it
    Automation(
        name=name,
        description="A drift alert that asks for a retraining (its estimated cost reached monitor.retrain_cost, or "
        "drift persisted) starts a fine-tune from the champion that goes through every gate.",
        trigger=EventTrigger(
            expect={DRIFT_EVENT},
            match={"prefect.resource.id": model_resource(settings.registry.model_name), ACTION_LABEL: "retrain"},
            posture=Posture.Reactive,
            threshold=1,
            within=timedelta(0),
        ),
        actions=[
            RunDeployment(
                source="selected",
                deployment_id=training_deployment_id,
                parameters={
                    "reason": "drift",
                    "warm_start": "champion",
                    "project_dir": str(paths.root),
                    # Which alert asked: the next check reads this run's end (a failed one does not hold the cooldown).
                    # `| string`: Prefect renders a one-expression template through tojson, which refuses a UUID.
                    "drift_event": "{{ event.id | string }}",
                },
            )
        ],
    ).create()
    return name
