"""`conveyor status`: where the project stands, on one screen.

Data version and whether data/ is it; which stages `dvc status` says are stale; champion and challenger with their
test metrics; the last training flow run and its outcome; the scheduled deployment and its next run. Records a
killed run left open (an MLflow run RUNNING, a Prefect flow run Running; see conveyor.open_records) are closed
first. Each part is read on its own, and one that cannot be read (no Prefect server up, tracking unreachable) says
why instead of failing the whole screen. It never starts a server.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from rich.console import Group

from conveyor.paths import ProjectPaths
from conveyor.settings import Settings
from conveyor.tables import FoldingTable
from flows import TRAINING_FLOW


@dataclass
class ProjectStatus:
    data: list[tuple[str, str]] = field(default_factory=list)
    stages: list[tuple[str, str]] = field(default_factory=list)
    models: list[tuple[str, str]] = field(default_factory=list)
    orchestration: list[tuple[str, str]] = field(default_factory=list)
    repaired: list[tuple[str, str]] = field(default_factory=list)


def gather(paths: ProjectPaths, settings: Settings) -> ProjectStatus:
    status = ProjectStatus()
    for part, rows in (
        (_repair, status.repaired),  # first: the parts below then show the corrected records
        (_data, status.data),
        (_stages, status.stages),
        (_models, status.models),
        (_orchestration, status.orchestration),
    ):
        try:
            rows.extend(part(paths, settings))
        except Exception as exc:  # one unreadable part must not hide the others
            rows.append(("unavailable", f"{type(exc).__name__}: {exc}"))
    return status


def _repair(paths: ProjectPaths, settings: Settings) -> list[tuple[str, str]]:
    """Records a killed run of this project left open (MLflow RUNNING, Prefect Running), closed as what happened."""
    from flows.repair import close_abandoned, close_runs_of_ended_flow_runs

    rows = [("closed", line) for line in close_abandoned(paths, "conveyor status")]
    try:  # what the first closed is shown even when the second cannot ask (a tracking server that is down)
        rows += [("closed", line) for line in close_runs_of_ended_flow_runs(paths, "conveyor status")]
    except Exception as exc:
        rows.append(("unavailable", f"{type(exc).__name__}: {exc}"))
    return rows


def _data(paths: ProjectPaths, settings: Settings) -> list[tuple[str, str]]:
    from pipelines.data import data_status

    if not paths.data_dvc.is_file():
        return [("data.dvc", "none yet: `conveyor data synth` (the demo) or `conveyor data import DIR`")]
    state = data_status(paths)
    if state.in_sync:
        verdict = "data/ matches it"
    elif state.actual is None:
        verdict = "data/ is missing: `conveyor data pull`"
    else:
        verdict = f"data/ DIFFERS ({state.actual}): `dvc add data` to keep, `dvc checkout --force data.dvc` to drop"
    return [("data.dvc", f"{state.expected}; {verdict}")]


def _stages(paths: ProjectPaths, settings: Settings) -> list[tuple[str, str]]:
    from dvc.repo import Repo

    with Repo(str(paths.root)) as repo:
        stale: dict[str, Any] = repo.status()
    if not stale:
        return [("dvc status", "every stage is up to date (`make run` would only re-check)")]
    rows = []
    for stage, changes in stale.items():
        reasons = []
        for change in changes:
            if isinstance(change, dict):
                for kind, items in change.items():
                    listed = [f"{k} {v}" for k, v in items.items()]
                    more = f", and {len(listed) - 4} more" if len(listed) > 4 else ""
                    reasons.append(f"{kind}: {', '.join(listed[:4])}{more}")
            else:
                reasons.append(str(change))
        rows.append((stage.split(":")[-1], "; ".join(reasons) or "changed"))
    return rows


def _models(paths: ProjectPaths, settings: Settings) -> list[tuple[str, str]]:
    from conveyor.tracking import Tracker, check_reachable, tracking_uri
    from pipelines import registry

    uri = tracking_uri(paths)
    if uri.startswith("sqlite:") and not paths.mlflow_db.is_file():
        return [("champion", "none (no MLflow store yet)")]
    check_reachable(uri)
    client = Tracker.client_for(paths)
    name = settings.registry.model_name
    rows = []
    for alias in (registry.CHAMPION, registry.CHALLENGER):
        version = registry.version_by_alias(client, name, alias)
        if version is None:
            rows.append((alias, "none"))
            continue
        metrics = client.get_run(version.run_id).data.metrics if version.run_id else {}
        score = (
            f"test mAP50 {metrics['test/mAP50']:.3f}, mAP50-95 {metrics['test/mAP50-95']:.3f}"
            if "test/mAP50-95" in metrics
            else "no test metrics"
        )
        gates = "gates passed" if registry.gates_passed(version) else "gates FAILED"
        data = version.tags.get("conveyor.data_md5", "?")
        rows.append((alias, f"{name} v{version.version}: {score}; {gates}; data {data}"))
    moves = registry.history(client, name)
    if moves:
        last = moves[-1]
        rows.append(("last alias move", f"{last.at} {last.alias} -> v{last.to_version} ({last.kind}: {last.reason})"))
    return rows


def _orchestration(paths: ProjectPaths, settings: Settings) -> list[tuple[str, str]]:
    from flows import local_server

    api = os.environ.get("PREFECT_API_URL")
    if not api:
        server = local_server.find()
        if server is None:
            return [("Prefect", "no server up (`conveyor run` or `conveyor server start` starts the local one)")]
        api = server.api_url
    return _prefect_rows(paths, settings, api)


def _prefect_rows(paths: ProjectPaths, settings: Settings, api: str) -> list[tuple[str, str]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings

    rows = [("Prefect API", api)]
    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[TRAINING_FLOW])),
            sort=FlowRunSort.START_TIME_DESC,
            limit=50,
        )
        ours = [r for r in runs if r.parameters.get("project_dir") in (str(paths.root), None) and r.start_time]
        if ours:
            last = ours[0]
            state = last.state.name if last.state else "?"
            took = f", {last.total_run_time.total_seconds():.0f} s" if last.total_run_time else ""
            reason = last.parameters.get("reason", "manual")
            rows.append(
                (
                    "last training run",
                    f"{last.name}: {state} ({reason}, started {last.start_time:%Y-%m-%d %H:%M}{took})",
                )
            )
        else:
            rows.append(("last training run", "none recorded for this project"))
        try:
            deployment = client.read_deployment_by_name(f"{TRAINING_FLOW}/{settings.orchestration.deployment}")
        except ObjectNotFound:
            rows.append(("schedule", "not deployed (`conveyor deploy`)"))
            return rows
        crons = [getattr(s.schedule, "cron", str(s.schedule)) for s in deployment.schedules if s.active]
        upcoming = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))
            ),
            sort=FlowRunSort.EXPECTED_START_TIME_ASC,
            limit=1,
        )
        nxt = f"next run {upcoming[0].expected_start_time:%Y-%m-%d %H:%M %Z}" if upcoming else "no run scheduled yet"
        paused = " (PAUSED)" if deployment.paused else ""
        rows.append(("schedule", f"{deployment.name}: {', '.join(crons) or 'no active schedule'}{paused}; {nxt}"))
    return rows


def render(status: ProjectStatus) -> Group:
    tables = []
    for title, rows in (
        ("Data", status.data),
        ("Stages (dvc status)", status.stages),
        ("Models (registry)", status.models),
        ("Orchestration (Prefect)", status.orchestration),
        ("Left open by a run that died", status.repaired),
    ):
        if rows is status.repaired and not rows:
            continue  # shown only when there was something to close
        table = FoldingTable(title=title, show_header=False, title_justify="left", expand=False)
        table.add_column(style="bold", no_wrap=True)
        table.add_column()
        for key, value in rows:
            table.add_row(key, value)
        tables.append(table)
    return Group(*tables)
