"""Register the training flow as a Prefect deployment: a cron schedule from params.yaml, on a process work pool,
one run at a time. A worker (`conveyor worker`) picks the runs up; no Docker, the code runs from this checkout."""

from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass

from conveyor.paths import ProjectPaths
from conveyor.settings import Settings

FLOW_NAME = "conveyor-training"
ENTRYPOINT = "flows/training.py:training_flow"


class PrefectServerMissingError(RuntimeError):
    """A deployment lives on a Prefect server, and none is configured."""


@dataclass(frozen=True)
class DeploymentInfo:
    id: str
    name: str  # flow/deployment, as run_deployment wants it
    work_pool: str
    cron: str
    timezone: str
    on_overlap: str


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


def deploy(paths: ProjectPaths, settings: Settings) -> DeploymentInfo:
    from prefect import flow
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.schedules import Cron

    require_server()
    cfg = settings.orchestration
    ensure_work_pool(cfg.work_pool)
    strategy = ConcurrencyLimitStrategy.ENQUEUE if cfg.on_overlap == "wait" else ConcurrencyLimitStrategy.CANCEL_NEW
    source = flow.from_source(source=str(paths.root), entrypoint=ENTRYPOINT)
    assert not inspect.isawaitable(source)  # sync context: from_source returns the flow itself
    deployment_id = source.deploy(
        name=cfg.deployment,
        work_pool_name=cfg.work_pool,
        schedules=[Cron(cfg.cron, timezone=cfg.timezone)],
        parameters={"reason": "schedule", "project_dir": str(paths.root)},
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=strategy),
        tags=["conveyor"],
        description="Scheduled Conveyor training: stages, gates, registry promotion, DVC push.",
        print_next_steps=False,
        ignore_warnings=True,
    )
    return DeploymentInfo(
        str(deployment_id), f"{FLOW_NAME}/{cfg.deployment}", cfg.work_pool, cfg.cron, cfg.timezone, cfg.on_overlap
    )
