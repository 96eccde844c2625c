"""Where a registered model came from, which models a data version produced, and the run's record: the files a run
would commit to git (dvc.lock, params.yaml, data.dvc, metrics/), kept with its MLflow run so that a run whose working
tree is gone (a Kubernetes pod) can be checked out again anywhere."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from conveyor.errors import ConveyorError, without_credentials
from conveyor.paths import ProjectPaths
from conveyor.tracking import FLOW_RUN_TAG, STAGE_COMMIT_TAG
from pipelines import dvc_repo, registry
from pipelines.registry import ModelRefError, resolve

RUN_RECORD = "lineage"  # the artifact folder of a training run that holds its record
DRIFT_EVENT_TAG = "conveyor.drift_event_id"  # on a training run a drift alert asked for: that alert's event
# Tags of a drift check's MLflow run that lineage reads (monitoring.alerts writes them under its own names).
CHECK_EVENT_TAG = "conveyor.drift.event_id"  # the event its alert emitted
CHECK_DEVICE_TAG = "conveyor.drift.device"  # whose window: "server", an edge runner's name, or "folder"
CHECK_GROUPS_TAG = "conveyor.drift.groups"


@dataclass(frozen=True)
class Lineage:
    model: str
    version: str
    aliases: list[str]
    rows: list[tuple[str, str]]


def _run_of(client: MlflowClient, version: ModelVersion, error: type[Exception], what: str) -> Run:
    """The version's MLflow run; one deleted and removed by `mlflow gc` is named (it was MLflow's traceback)."""
    try:
        return client.get_run(str(version.run_id))
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise  # a server that does not answer
        raise error(
            f"{version.name} v{version.version}: its MLflow run {version.run_id} no longer exists (deleted, then "
            f"removed by `mlflow gc`), and {what} with it. The version's own tags keep its data version "
            f"({version.tags.get('conveyor.data_md5', 'unknown')}) and commit "
            f"({version.tags.get('conveyor.git_commit', 'unknown')})"
        ) from exc


def _later_commits(tags: dict[str, str]) -> str:
    """The stages that made the version's files at another commit than its training's (export code fixed and run
    again into the run, say), by commit; "same as training" when every stage ran the training's code, "-" for a run
    from before stages recorded their commits."""
    prefix = STAGE_COMMIT_TAG.format("")
    trained = tags.get(STAGE_COMMIT_TAG.format("train"), tags.get("conveyor.git_commit", ""))
    by_commit: dict[str, list[str]] = {}
    for key, commit in tags.items():
        if key.startswith(prefix) and commit != trained:
            by_commit.setdefault(commit, []).append(key.removeprefix(prefix))
    if not by_commit:
        return "same as training" if any(key.startswith(prefix) for key in tags) else "-"
    return "; ".join(f"{', '.join(sorted(stages))} at {commit}" for commit, stages in sorted(by_commit.items()))


def lineage(
    client: MlflowClient, paths: ProjectPaths, default_name: str, ref: str, monitoring_experiment: str | None = None
) -> Lineage:
    version = resolve(client, default_name, ref)
    if not version.run_id:
        raise ModelRefError(f"{version.name} v{version.version} was not registered from a run: no lineage")
    run = _run_of(client, version, ModelRefError, "its lineage")
    tags = {**run.data.tags, **version.tags}
    md5 = tags.get("conveyor.data_md5", "unknown")
    params = run.data.params
    train_params = ", ".join(
        f"{k.removeprefix('train.')}={v}"
        for k, v in sorted(params.items())
        if k.startswith("train.") and k != "train.extra"
    )
    exports = sorted({a.path for a in client.list_artifacts(run.info.run_id, "export")} - {"export/export.json"})
    rows = [
        (
            "data version",
            md5
            + (
                " (data/ differed from data.dvc: no recorded version; `dvc add data` before training records it)"
                if tags.get("conveyor.data_recorded") == "false"
                else ""
            ),
        ),
        ("data location", dvc_repo.remote_location(paths.root, md5) if md5 != "unknown" else "-"),
        (
            "git commit",
            f"{tags.get('conveyor.git_commit', 'unknown')}"
            f"{' (uncommitted changes)' if tags.get('conveyor.git_dirty') == 'true' else ''}",
        ),
        ("later stages' commit", _later_commits(tags)),
        ("params hash", tags.get("conveyor.params_hash", "-")),
        ("train params", train_params or "-"),
        (
            "MLflow run",
            f"{run.info.run_id} (experiment {run.info.experiment_id}) on {without_credentials(client.tracking_uri)}",
        ),
        ("Prefect flow run", tags.get(FLOW_RUN_TAG, "-")),
        ("asked for by", _asked_for_by(client, tags.get(DRIFT_EVENT_TAG), monitoring_experiment)),
        (
            "gates",
            "passed"
            if tags.get("conveyor.gates.passed") == "true"
            else f"failed: {tags.get('conveyor.gates.failed', 'not gated')}",
        ),
        ("gate report", f"runs:/{run.info.run_id}/gate/report.md"),
        (
            "run record",
            f"runs:/{run.info.run_id}/{RUN_RECORD} (dvc.lock, params.yaml, data.dvc, metrics/): "
            "`conveyor lineage --restore` writes it here"
            if client.list_artifacts(run.info.run_id, RUN_RECORD)
            else "- (registered before runs kept one)",
        ),
        ("test mAP50-95", f"{run.data.metrics.get('test/mAP50-95', float('nan')):.3f}"),
        ("exports", ", ".join(exports) or "-"),
        ("model source", str(version.source)),
    ]
    return Lineage(version.name, str(version.version), list(version.aliases), rows)


def _asked_for_by(client: MlflowClient, event: str | None, experiment: str | None) -> str:
    """The drift check whose alert started this run (its MLflow run and report), or "-" for a run nobody's alert
    started (a schedule, a person)."""
    if not event:
        return "-"
    found = client.get_experiment_by_name(experiment) if experiment else None
    runs = (
        client.search_runs([found.experiment_id], filter_string=f"tags.`{CHECK_EVENT_TAG}` = '{event}'", max_results=1)
        if found
        else []
    )
    if not runs:
        return f"drift event {event} (its check is not in the monitoring experiment)"
    check = runs[0]
    device = check.data.tags.get(CHECK_DEVICE_TAG, "?")
    groups = check.data.tags.get(CHECK_GROUPS_TAG, "") or "-"
    return f"drift check {check.info.run_id} of {device} ({groups}): runs:/{check.info.run_id}/drift/report.html"


def versions_for_data(client: MlflowClient, name: str, md5: str) -> list[ModelVersion]:
    return [v for v in registry.versions(client, name) if v.tags.get("conveyor.data_md5") == md5]


class RunRecordError(ConveyorError, RuntimeError):
    """A run record that cannot be restored, or that would overwrite uncommitted work."""


def run_record_files(root: Path) -> list[Path]:
    """What a finished run would commit to git, relative to the project: the stage versions (dvc.lock), the params
    they ran with, the data version and the DVC metrics (kept in git, not in DVC's cache)."""
    found = [Path(name) for name in ("dvc.lock", "params.yaml", "data.dvc") if (root / name).is_file()]
    return found + sorted(path.relative_to(root) for path in (root / "metrics").glob("*.json"))


def log_run_record(client: MlflowClient, run_id: str, root: Path) -> list[Path]:
    """The run's record into its MLflow run, under lineage/ (logged again, it replaces the files)."""
    files = run_record_files(root)
    for relative in files:
        folder = Path(RUN_RECORD, relative).parent.as_posix()
        client.log_artifact(run_id, str(root / relative), folder)
    return files


def restore_run_record(
    client: MlflowClient, paths: ProjectPaths, default_name: str, ref: str, force: bool = False
) -> tuple[ModelVersion, list[Path]]:
    """The version's run record written into the project, so that `dvc pull` (or `dvc checkout`) brings back its
    exact data and stage outputs. Refuses, writing nothing, where a file it would replace has uncommitted changes."""
    version = resolve(client, default_name, ref)
    if not version.run_id:
        raise RunRecordError(f"{version.name} v{version.version} was not registered from a run: no run record")
    _run_of(client, version, RunRecordError, "its run record")
    if not client.list_artifacts(version.run_id, RUN_RECORD):
        raise RunRecordError(
            f"{version.name} v{version.version} (run {version.run_id}) has no run record: it was registered "
            "before Conveyor kept one with the run"
        )
    with tempfile.TemporaryDirectory(prefix="conveyor-record-") as staging:
        folder = Path(client.download_artifacts(version.run_id, RUN_RECORD, staging))
        files = sorted(path.relative_to(folder) for path in folder.rglob("*") if path.is_file())
        if not force:
            replaced = [
                f
                for f in files
                if (paths.root / f).is_file() and (paths.root / f).read_bytes() != (folder / f).read_bytes()
            ]
            changed = _uncommitted(paths.root, replaced)
            if changed:
                raise RunRecordError(
                    f"{', '.join(changed)} {'has' if len(changed) == 1 else 'have'} uncommitted changes that the run "
                    "record would replace: commit or stash them first (or --force)"
                )
        for relative in files:
            target = paths.root / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / relative, target)
    return version, files


def _uncommitted(root: Path, files: list[Path]) -> list[str]:
    """Those of `files` that differ from the last commit, untracked ones included (all of them outside git)."""
    if not files:
        return []
    names = [str(f) for f in files]
    result = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all", "--", *names],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:  # not a git repo: nothing else keeps these files, so replacing them would lose them
        return names
    return sorted({line[3:].strip() for line in result.stdout.splitlines() if line.strip()})
