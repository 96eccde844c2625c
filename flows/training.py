"""The training flow: the dvc.yaml stages as coarse Prefect tasks, then registration and promotion, then push.

The DAG is defined once, in dvc.yaml: each task runs `dvc repro --single-item <stage>`, so a stage whose inputs did
not change is a no-op here exactly as under `dvc repro`. Only one training run at a time per project (a file lock,
which the OS releases if the process dies) and per deployment (Prefect's concurrency limit).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.exceptions import CancelledRun, TerminationSignal
from prefect.runtime import flow_run
from prefect.settings import PREFECT_API_URL
from prefect.states import Cancelled, State
from pydantic import Field

import conveyor  # noqa: F401  (offline switches first)
from conveyor import open_records
from conveyor.errors import TEMPORARY_FAILURE, ConveyorError, without_credentials
from conveyor.paths import ProjectPaths, exclusive, tracking_uri, write_atomically
from conveyor.settings import Settings, load_settings
from conveyor.tracking import FLOW_RUN_ENV, MAX_REASON
from flows import TRAINING_FLOW, decisions, repair
from pipelines import dvc_repo
from pipelines.warm_start import clear_earlier_warm_start, set_warm_start

# MLflow (3.4 s to import here) and the pipeline modules load inside the tasks: a run triggered by a drift event is
# Running (and visible as such) that much sooner.


_DVC_COMMAND_STATUS = re.compile(r"failed to run: .*, exited with (-?\d+)")


class TrainingBusyError(ConveyorError, RuntimeError):
    """Another training run holds this project and the policy is to reject, not wait."""


def pipeline_stages(paths: ProjectPaths) -> list[str]:
    """Stage names in dvc.yaml order (the file lists them in dependency order)."""
    spec = yaml.safe_load((paths.root / "dvc.yaml").read_text())
    return list(spec["stages"])


@contextmanager
def training_lock(paths: ProjectPaths, on_overlap: str) -> Iterator[None]:
    def busy() -> None:
        if on_overlap == "reject":
            raise TrainingBusyError(
                "another training run, or a change of its data (conveyor data add, import, synth), is in "
                f"progress in {paths.root} (orchestration.on_overlap: reject)"
            )
        get_run_logger().info("another training run or a data change is in progress in this project: waiting for it")

    with exclusive(paths.training_lock, busy):
        yield


def _stage_env(flow_run_id: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("COLUMNS", "120")  # the stages' tables, read in the Prefect UI, not a narrow pipe
    if flow_run_id:
        env[FLOW_RUN_ENV] = flow_run_id  # lineage: the train stage tags its MLflow run with it
    return env


@task(name="preflight")
def preflight(root: str, found_by: str) -> tuple[str, list[str]]:
    """Fail at once, before anything is written, if the tracking server is unreachable; close what a killed run left
    open; then get the data and ask DVC once which stages are stale (a stage subprocess costs ~1 s even when it has
    nothing to do)."""
    from dvc.repo import Repo

    from conveyor.tracking import check_reachable
    from pipelines import data as data_step

    paths = ProjectPaths(Path(root))
    settings = load_settings(paths.params)
    check_reachable(tracking_uri(paths))
    if settings.orchestration.push:
        dvc_repo.check_remote_storage(paths.root)
    md5 = data_step.ensure_data_version(paths, settings.synth)
    holders = dvc_repo.dvc_lock_holders(paths.root)
    if holders:
        get_run_logger().info(
            "DVC's lock is held by PID %s (an interrupted run's stage going away): waiting for it to exit",
            ", ".join(str(process.pid) for process in holders),
        )
        data_step.wait_for_dvc_lock(paths.root)
    # Under the project lock, a process of this project that left a record open is gone or going: give it seconds.
    for line in repair.close_abandoned(paths, f"training flow run {found_by}", wait_seconds=10.0):
        get_run_logger().warning(line)
    with Repo(root) as repo:
        stale = sorted({name.split(":")[-1] for name in repo.status()})
    if stale:  # stages will run and import MLflow anyway: a no-op run does not pay the ~3 s for this look
        for line in repair.close_runs_of_ended_flow_runs(paths, f"training flow run {found_by}"):
            get_run_logger().warning(line)
    get_run_logger().info("data version %s; stale stages: %s", md5, ", ".join(stale) or "none")
    return md5, stale


@task(name="stage")
def run_stage(root: str, stage: str, flow_run_id: str | None, force: bool = False) -> float:
    """One dvc.yaml stage (skipped by DVC when its inputs did not change); its output becomes this task's log."""
    logger = get_run_logger()
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", "--single-item", *(["--force"] if force else []), stage],
        cwd=root,
        env=_stage_env(flow_run_id),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    stage_error = ""  # the stage command's own "error: ..." line (conveyor's CLI prints one for expected failures)
    command_status: int | None = None  # the stage command's exit status, as DVC reports it
    try:
        for line in process.stdout:
            if line.strip():
                logger.info(line.rstrip())
            if line.startswith("error:"):
                stage_error = line.strip()
            elif exited := _DVC_COMMAND_STATUS.search(line):  # DVC's "failed to run: CMD, exited with N"
                command_status = int(exited[1])
        process.wait()
    except TerminationSignal:
        # SIGTERM reached the flow's process only (Kubernetes and systemd signal the main process): pass it on to the
        # stage's command, which closes its MLflow run as stopped; DVC then exits on its own and releases its lock.
        logger.warning("SIGTERM: stopping stage %s", stage)
        open_records.stop_descendants(process)
        for line in process.stdout:  # what the stage said while it stopped: a pipe's worth at most, read once it ended
            if line.strip():
                logger.info(line.rstrip())
        return Cancelled(message=f"stage {stage} stopped by SIGTERM")  # type: ignore[return-value]
    if process.returncode != 0:
        failed = f"stage '{stage}' failed (exit {process.returncode})"
        said = stage_error.removeprefix("error:").strip()
        if said and command_status != TEMPORARY_FAILURE:
            # The stage's own words for a failure that is not a server's hiccup (invalid data, a bad parameter):
            # trying it again would fail the same way.
            raise StageRefusedError(f"{failed}: {said}")
        raise RuntimeError(f"{failed}: {said}" if said else f"{failed}; its output is in this task's log")
    return time.perf_counter() - started


class StageRefusedError(ConveyorError, RuntimeError):
    """A stage's command ended with its own error, one that trying again would not change: not retried."""


def retry_unless_refused(task: Any, task_run: Any, state: State) -> bool:
    """Prefect's retry condition for a stage: retry a crash or a server that did not answer, not a refusal."""
    return not isinstance(state.data, StageRefusedError)


@task(name="register and promote")
def register_and_promote(
    root: str, flow_run_id: str | None, reason: str, drift_event: str | None = None
) -> dict[str, Any]:
    from conveyor.tracking import Tracker
    from pipelines import lineage_report, promotion, registry
    from pipelines.gate import GateReport

    paths = ProjectPaths(Path(root))
    settings = load_settings(paths.params)
    tracker = Tracker.resume(paths)
    if drift_event:  # lineage: the drift check whose alert asked for this run (`conveyor lineage` names it)
        tracker.client.set_tag(tracker.run_id, lineage_report.DRIFT_EVENT_TAG, drift_event)
    # Before the version exists: a registered version always has its run's record (a pod's working tree is gone
    # after the run; `conveyor lineage --restore` brings the record back anywhere).
    lineage_report.log_run_record(tracker.client, tracker.run_id, paths.root)
    actor = f"prefect:flow-run/{flow_run_id}" if flow_run_id else registry.default_actor()
    report = GateReport.load(paths.gate / "report.json")
    version, new = promotion.register(paths, settings, tracker.client, tracker.run_id, report, flow_run_id, actor)
    try:
        outcome = promotion.decide(tracker.client, settings, version, new, report, actor, reason)
    except promotion.StaleGateError as stale:
        get_run_logger().warning("%s; re-running the gate against the current champion", stale)
        if isinstance(run_stage.fn(root, "gate", flow_run_id, force=True), State):
            # Stopped (SIGTERM) while the gate re-ran: nothing is decided on a report it may not have finished.
            raise CancelledRun("stage gate (re-run against the current champion)") from None
        lineage_report.log_run_record(tracker.client, tracker.run_id, paths.root)  # the gate's new lock entry
        report = GateReport.load(paths.gate / "report.json")
        version = promotion.record_verdict(tracker.client, settings.registry.model_name, version, paths, report)
        outcome = promotion.decide(tracker.client, settings, version, new, report, actor, reason)
    get_run_logger().info(outcome.message)
    return {
        **outcome.__dict__,
        "gates_passed": report.passed,
        "failed_gates": report.failed,
        "run_id": tracker.run_id,
        "report_markdown": report.to_markdown(),
    }


def retry_unless_remote_full(task: Any, task_run: Any, state: State) -> bool:
    """Prefect's retry condition for the push: retry a store that hiccuped, not one that is full."""
    return not isinstance(state.data, dvc_repo.RemoteFullError)


@task(name="push to DVC remote", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_unless_remote_full)
def push(root: str) -> None:
    """Data and every cached stage output to the default DVC remote, so the run can be reproduced elsewhere.
    Skipped when nothing changed since the last successful push (the record lives in .conveyor/)."""

    paths = ProjectPaths(Path(root))
    state = dvc_repo.pushed_state(paths.root)
    record = paths.scratch / "last-push"
    if record.is_file() and record.read_text() == state:
        get_run_logger().info("dvc push: nothing new since the last successful push")
        return
    for partial in dvc_repo.remove_partial_objects(paths.root):
        get_run_logger().warning("removed %s from the DVC remote: cut short by an earlier push; sent again", partial)
    result = dvc_repo.dvc(Path(root), "push", check=False)
    if result.returncode != 0:
        raise dvc_repo.push_failure(result.stderr, dvc_repo.default_remote(paths.root))
    write_atomically(record, state)


def summary_markdown(
    settings: Settings, md5: str, stage_seconds: dict[str, float], outcome: dict[str, Any], tracking: str, reason: str
) -> str:
    champion = f"v{outcome['champion']}" if outcome["champion"] else "none"
    stage_rows = "\n".join(f"| {stage} | {seconds:.1f} |" for stage, seconds in stage_seconds.items())
    return (
        f"## Conveyor training run ({reason})\n\n"
        f"- data version: `{md5}`\n"
        f"- MLflow run: `{outcome['run_id']}` on {tracking}\n"
        f"- model: {settings.registry.model_name} v{outcome['version']}"
        f"{' (new)' if outcome['newly_registered'] else ''}\n"
        f"- outcome: **{outcome['message']}**; champion: {champion}\n\n"
        f"| stage | seconds |\n|---|---|\n{stage_rows}\n\n{outcome['report_markdown']}"
    )


@flow(name=TRAINING_FLOW)
def training_flow(
    # Checked when the run starts (and in the deployment's schema): a reason too long for the registry's history was
    # refused at promotion, after the whole training.
    reason: Annotated[str, Field(min_length=1, max_length=MAX_REASON)] = "manual",
    warm_start: str | None = None,
    project_dir: str | None = None,
    drift_event: str | None = None,
) -> dict[str, Any]:
    """Train, evaluate, export, gate, register, promote if earned, push.

    reason: why this run happens (schedule, manual, drift): recorded with the promotion.
    warm_start: a local checkpoint, or "champion" for the current champion's weights; written to params.yaml's
        train.weights like any other parameter change (so DVC and the lineage see it).
    project_dir: the Conveyor project (default: the working directory's).
    drift_event: the drift event that asked for this run (the automation sets it; the drift check reads it back).
    """
    started = time.perf_counter()
    paths = ProjectPaths.discover(Path(project_dir) if project_dir else None)
    settings = load_settings(paths.params)
    logger = get_run_logger()
    run_id = flow_run.id
    root = str(paths.root)
    api = PREFECT_API_URL.value() or ""
    try:
        # Marked before the lock: a run killed while it waits also stays Running otherwise.
        with (
            open_records.holding(paths, open_records.PREFECT_FLOW_RUN, run_id, api, "training flow"),
            training_lock(paths, settings.orchestration.on_overlap),
        ):
            md5, stale = preflight(root, flow_run.name or run_id or "a training run")
            if warm_start:
                set_warm_start(paths, settings, warm_start)
                stale = pipeline_stages(paths)  # train.weights changed after DVC was asked
            elif clear_earlier_warm_start(paths, settings):
                logger.info(
                    "train.weights named an earlier run's warm start: put back to %s",
                    load_settings(paths.params).train.weights or "train.model",
                )
                stale = pipeline_stages(paths)
            stage_seconds: dict[str, float] = {}
            retries = settings.orchestration.stage_retries
            upstream_ran = False
            for stage in pipeline_stages(paths):
                if stage not in stale and not upstream_ran:
                    logger.info("stage %s: up to date (dvc status)", stage)
                    stage_seconds[stage] = 0.0
                    continue
                seconds: Any = run_stage.with_options(
                    name=f"stage {stage}",
                    retries=retries,
                    retry_delay_seconds=5,
                    retry_condition_fn=retry_unless_refused,
                )(root, stage, run_id)
                if isinstance(seconds, State):  # the stage was stopped: its task run is Cancelled, so is this run
                    raise CancelledRun(f"stage {stage}")
                stage_seconds[stage] = seconds
                upstream_ran = True
            decided = None if upstream_ran else decisions.previous_decision(paths)
            if decided is not None:
                logger.info(
                    "nothing changed since run %s was registered as v%s: registry not consulted",
                    decided["run_id"],
                    decided["version"],
                )
                outcome = decided
            else:
                outcome = register_and_promote(root, run_id, reason, drift_event)
                decisions.record_decision(paths, outcome)
            if settings.orchestration.push:
                push(root)
    except (TerminationSignal, CancelledRun) as stop:
        # SIGTERM (a stop: Kubernetes, systemd, `kill`): the running stage was stopped and closed its MLflow run as
        # KILLED; this flow run ends Cancelled, not Crashed. Prefect makes a returned state the run's final state,
        # and the caller of the flow gets CancelledRun.
        where = f" in {stop}" if isinstance(stop, CancelledRun) else ""
        message = f"stopped by SIGTERM{where}: nothing after it ran; `conveyor run` carries on from there"
        logger.warning(message)
        return Cancelled(message=message)  # type: ignore[return-value]
    flow_seconds = time.perf_counter() - started
    stages_total = sum(stage_seconds.values())
    # Orchestration overhead: everything that is not a pipeline stage (preflight and data check, registry, push,
    # Prefect's own bookkeeping).
    overhead = flow_seconds - stages_total
    timing = {"flow_seconds": flow_seconds, "stage_seconds": stage_seconds, "overhead_seconds": overhead}
    markdown = summary_markdown(settings, md5, stage_seconds, outcome, without_credentials(tracking_uri(paths)), reason)
    markdown += f"\nFlow {flow_seconds:.1f} s, of which stages {stages_total:.1f} s.\n"
    create_markdown_artifact(markdown, key="conveyor-training-summary", description="Conveyor training run")
    logger.info(
        "%s (flow %.1f s, stages %.1f s, overhead %.1f s)",
        outcome["message"],
        flow_seconds,
        stages_total,
        overhead,
    )
    return {**outcome, "data_md5": md5, **timing}
