"""Repairing what a killed run left open, in both records: an MLflow run RUNNING, a Prefect flow run Running.

Two kinds of evidence (conveyor.open_records holds the markers): on this host, a marker whose process is gone
(`close_abandoned`: MLflow runs end KILLED or FAILED, the flow run Crashed); across hosts, an MLflow run whose owning
flow run has ended (`close_runs_of_ended_flow_runs`). The training flow's preflight and `conveyor status` run both.
A record whose server does not answer keeps its marker for the next look.
"""

from __future__ import annotations

from uuid import UUID

from prefect.settings import PREFECT_API_URL

from conveyor import open_records
from conveyor.paths import ProjectPaths, tracking_uri
from conveyor.settings import load_settings
from conveyor.tracking import FLOW_RUN_TAG, STAGE_FLOW_RUN_TAG, TAG_PREFIX, TrackingUnavailableError, check_reachable


def close_abandoned_runs(paths: ProjectPaths, found_by: str, wait_seconds: float = 0.0) -> list[str]:
    """MLflow runs of this project left RUNNING by a process that died (conveyor.open_records): ended as KILLED, with
    the tag `conveyor.ended_by` saying what was found. Returns a line per run handled; a server that does not answer
    leaves the marker for the next look."""
    found = open_records.abandoned(paths, open_records.MLFLOW_RUN, wait_seconds)
    if not found:
        return []
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    lines = []
    for path, record in found:
        try:
            check_reachable(record.endpoint)
            client = MlflowClient(record.endpoint)
            status = client.get_run(record.record_id).info.status
            if status == "RUNNING":
                ended = "FAILED" if record.failure else "KILLED"
                client.set_tag(record.record_id, f"{TAG_PREFIX}ended_by", open_records.crash_note(record, found_by))
                client.set_terminated(record.record_id, ended)
                lines.append(f"MLflow run {record.record_id}: was RUNNING, {record.process_text} is gone: now {ended}")
        except (TrackingUnavailableError, MlflowException) as exc:
            deleted = isinstance(exc, MlflowException) and exc.error_code == "RESOURCE_DOES_NOT_EXIST"
            if not deleted:  # the server is down or refuses: keep the marker for the next look
                lines.append(f"MLflow run {record.record_id} left open by a dead process; not closed yet: {exc}")
                continue
        path.unlink(missing_ok=True)
    return lines


def close_abandoned(paths: ProjectPaths, found_by: str, wait_seconds: float = 0.0) -> list[str]:
    """Close what a killed run of this project left open on this host (conveyor.open_records): its MLflow runs end as
    KILLED, its Prefect flow run as Crashed. A line per record handled. `wait_seconds` is for stage processes only
    (a flow run waiting for the project lock is alive and stays so)."""
    lines = close_abandoned_runs(paths, found_by, wait_seconds)
    found = open_records.abandoned(paths, open_records.PREFECT_FLOW_RUN)  # a waiting run is alive: no wait
    if not found:
        return lines
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import temporary_settings
    from prefect.states import Crashed

    for path, record in found:
        try:
            with (
                temporary_settings(updates={PREFECT_API_URL: record.endpoint}),
                get_client(sync_client=True) as client,
            ):
                run = client.read_flow_run(UUID(record.record_id))
                if run.state is not None and not run.state.is_final():
                    note = open_records.crash_note(record, found_by)
                    client.set_flow_run_state(run.id, Crashed(message=note), force=True)
                    lines.append(
                        f"Prefect flow run {run.name}: was {run.state.name}, {record.process_text} is gone: now Crashed"
                    )
        except ObjectNotFound:
            pass  # the run was deleted: nothing left to correct
        except Exception as exc:  # the server is down or moved: keep the marker for the next look
            lines.append(f"Prefect flow run {record.record_id} left open by a dead process; not closed yet: {exc}")
            continue
        path.unlink(missing_ok=True)
    return lines


def close_runs_of_ended_flow_runs(paths: ProjectPaths, found_by: str, api: str | None = None) -> list[str]:
    """MLflow runs of this project's experiment left RUNNING although the Prefect flow run that owns them (the tag
    `conveyor.stage_flow_run_id` of the flow run whose stage holds the run now, else `conveyor.prefect_flow_run_id`
    of the one that trained it) has ended: evidence that holds across machines, where the markers of
    `close_abandoned` hold for this host only (a worker's machine that died: Prefect's zombie detection crashed its
    flow run, and its MLflow run is closed here). A run whose flow run still runs is never touched."""
    from mlflow.tracking import MlflowClient

    from conveyor.tracking import TAG_PREFIX, check_reachable

    if api is None:
        from flows import local_server

        server = local_server.find()
        api = PREFECT_API_URL.value() or (server.api_url if server else None)
    if not api:
        return []
    uri = tracking_uri(paths)
    check_reachable(uri)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(load_settings(paths.params).tracking.experiment)
    if experiment is None:
        return []
    running = client.search_runs(
        [experiment.experiment_id], filter_string=f"attributes.status = 'RUNNING' and tags.`{FLOW_RUN_TAG}` LIKE '%'"
    )
    if not running:
        return []
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import temporary_settings

    lines = []
    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as prefect:
        for run in running:
            # A later flow run's stage (evaluate, export, gate run again) holds a run another flow run trained.
            owner = run.data.tags.get(STAGE_FLOW_RUN_TAG) or run.data.tags[FLOW_RUN_TAG]
            try:
                state = prefect.read_flow_run(UUID(owner)).state
            except (ObjectNotFound, ValueError):  # "-": a stage run by hand holds it; its marker tells
                continue
            if state is None or not state.is_final():
                continue
            ended = "FAILED" if state.is_failed() else "KILLED"
            note = (
                f"its Prefect flow run {owner} had ended {state.name} ({state.message or 'no message'}) "
                f"when {found_by} looked at {open_records.now_text()}"
            )
            client.set_tag(run.info.run_id, f"{TAG_PREFIX}ended_by", note[:5000])
            client.set_terminated(run.info.run_id, ended)
            lines.append(f"MLflow run {run.info.run_id}: was RUNNING, its flow run is {state.name}: now {ended}")
    return lines
