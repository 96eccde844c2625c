"""MLflow tracking shared by the stages: one run per pipeline run, opened by train, resumed by evaluate and export.

Default store: embedded (SQLite file and artifact folder in the project). MLFLOW_TRACKING_URI switches to a server.
Unlike Ultralytics' own MLflow callback, a tracking failure here stops the stage: a run that was not logged
must not look like one that was.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conveyor import open_records
from conveyor.errors import ConveyorError, without_credentials
from conveyor.lineage import cpu_model, data_used, git_state
from conveyor.paths import ProjectPaths, available_cores, error_chain, write_atomically
from conveyor.paths import tracking_uri as tracking_uri  # re-exported; lives there to import without MLflow
from conveyor.settings import Settings

if TYPE_CHECKING:  # MLflow takes ~3 s to import: only what talks to the store imports it
    from mlflow.tracking import MlflowClient

TAG_PREFIX = "conveyor."
STAGE_COMMIT_TAG = TAG_PREFIX + "stage_commit.{}"  # the git commit each stage last ran at, in the run
# The Prefect flow run a training ran in: on its MLflow run (from the train stage) and on the version it registered.
FLOW_RUN_TAG = f"{TAG_PREFIX}prefect_flow_run_id"
# The flow run whose stage holds the run now ("-": a stage run by hand). Evaluate, export and gate may run in a later
# flow run than the one that trained: `conveyor status` judges a RUNNING run by this one, not by FLOW_RUN_TAG.
STAGE_FLOW_RUN_TAG = f"{TAG_PREFIX}stage_flow_run_id"
FLOW_RUN_ENV = "CONVEYOR_FLOW_RUN_ID"  # set by the Prefect flow for its stages
_ILLEGAL = re.compile(r"[^A-Za-z0-9_\-. /:]")
TRAIN_STAGE = "train"  # the stage that opens a pipeline run (its `stage_seconds/train` says it finished)
STAGE_SECONDS = "stage_seconds/{}"  # a stage's time, logged only when it finished
# A promotion's reason, in characters: the registry history's tag value (MLflow: 5000 on PostgreSQL) holds it and more.
MAX_REASON = 1000
_MAX_BATCH = 1000  # MLflow's log_batch limit for metrics per call


class TrackingUnavailableError(ConveyorError, RuntimeError):
    """The tracking server cannot be reached (transient), or the tracking setup is wrong; the message names the URI."""


class UnfinishedTrainingError(ConveyorError, RuntimeError):
    """A later stage asked to continue a run whose training failed or was stopped."""


class ArtifactStoreError(ConveyorError, RuntimeError):
    """The tracking server answers, but an artifact could not be stored (its bucket full, a store the server cannot
    reach); the message names the artifact, the run and the server."""


# A proxying MLflow server (`--artifacts-destination`) answers 5xx when its store refuses an upload; the client's
# retries then end with urllib3's "too many 500 error responses", and the store's own words are in the server's log.
_PROXY_REFUSED = re.compile(r"mlflow-artifacts/artifacts/.*too many 5\d\d error responses", re.DOTALL)


def artifact_store_refusal(error: BaseException) -> str | None:
    """What to tell a person when `error` is an artifact store refusing an upload, or None for other errors: boto3's
    own error when this client writes to S3 itself, or a proxying server's 5xx on its artifact route."""
    for cause in error_chain(error):
        text = str(cause)
        if type(cause).__name__ == "S3UploadFailedError":  # the store's words, e.g. EntityTooLarge / QuotaExceeded
            return f"the artifact store refused the upload: {text.splitlines()[0][:500]}"
        if _PROXY_REFUSED.search(text):
            return (
                "the MLflow server answers but its artifact store refused the upload (HTTP 5xx after retries): most "
                "often a full bucket (its quota) or a store the server cannot reach; the server's log has the store's "
                "words (`conveyor stack status` names it for the local stack)"
            )
    return None


def _is_tracking_failure(error: BaseException) -> bool:
    """An error from talking to the tracking server (MLflow's retries exhausted, the connection refused)."""
    from mlflow.exceptions import MlflowException
    from requests.exceptions import RequestException

    return isinstance(error, MlflowException | RequestException | TrackingUnavailableError)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]


def is_embedded(uri: str) -> bool:
    return uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri


# The URI schemes MLflow's tracking store takes (a database's `+driver` aside).
TRACKING_SCHEMES = frozenset({"http", "https", "sqlite", "postgresql", "mysql", "mssql", "file", "databricks"})


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail at once, naming the URI, when a tracking server does not answer its health check, or when the embedded
    store's file is not an SQLite database (SQLAlchemy's DatabaseError traceback; a folder by that name was retried
    for two minutes first)."""
    if uri.startswith("sqlite:///"):
        _check_sqlite(Path(uri.removeprefix("sqlite:///")))
        return
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else ""
    if scheme and scheme not in TRACKING_SCHEMES:  # a typo (`htp://`) was MLflow's KeyError traceback
        raise TrackingUnavailableError(
            f"MLFLOW_TRACKING_URI={uri!r} is not a tracking URI: http(s)://HOST:PORT for a server, sqlite:///PATH or "
            "postgresql://... for a database"
        )
    if not uri.startswith(("http://", "https://")):
        return
    shown = without_credentials(uri)
    status = None
    try:
        with urllib.request.urlopen(_health_request(uri), timeout=timeout) as response:
            if response.status == 200:
                return
            problem, status = f"HTTP {response.status}", response.status
    except urllib.error.HTTPError as exc:
        problem, status = str(exc.reason), exc.code
    except (urllib.error.URLError, OSError) as exc:
        problem = str(getattr(exc, "reason", exc))
    except (http.client.InvalidURL, ValueError) as exc:  # a port that is not a number (`:5000x`)
        raise TrackingUnavailableError(f"MLFLOW_TRACKING_URI={shown!r} is not a URL: {exc}") from None
    # Down, or answering 5xx, it may be back on the next try; a refusal (401: the password) will not change by itself.
    transient = status is None or status >= 500
    raise TrackingUnavailableError(f"MLflow tracking server {shown} is unreachable ({problem})", transient=transient)


def _health_request(uri: str) -> urllib.request.Request:
    """The server's /health, with the URI's user and password (`http://user:pw@host`, which MLflow's client sends
    as basic auth) as a header: left in the URL, urllib read them as part of the host name, and a server that was up
    was said to be unreachable."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username is None:
        return urllib.request.Request(f"{uri.rstrip('/')}/health")
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    netloc += f":{parts.port}" if parts.port else ""
    url = urllib.parse.urlunsplit((parts.scheme, netloc, f"{parts.path.rstrip('/')}/health", "", ""))
    user = urllib.parse.unquote(parts.username)
    password = urllib.parse.unquote(parts.password or "")
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return urllib.request.Request(url, headers={"Authorization": f"Basic {token}"})


def _check_sqlite(path: Path) -> None:
    import sqlite3

    if not path.exists():
        return  # MLflow creates it
    problem = "a folder" if path.is_dir() else None
    if problem is None:
        try:  # read-only, by a file: URI (as_uri escapes '%', '?' and '#' in the path)
            with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
                db.execute("PRAGMA schema_version").fetchone()
        except sqlite3.DatabaseError as exc:
            # Only a file that is not a database, or a damaged one: a busy writer or a permission problem is
            # MLflow's to report, in its own words.
            if "not a database" in str(exc) or "malformed" in str(exc):
                problem = str(exc)
    if problem is not None:
        raise TrackingUnavailableError(
            f"the embedded MLflow store {path} is not an SQLite database ({problem}): move it away to start an "
            "empty one, or set MLFLOW_TRACKING_URI to your server"
        )


# MLflow 3's UI opens an experiment without this tag on its GenAI overview (traces, judges); with it, on the runs
# table and charts. The value is the one the UI's own "experiment type" switch writes.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
CLASSIC_TRAINING = "custom_model_development"


def ensure_experiment(client: MlflowClient, paths: ProjectPaths, name: str) -> str:
    """The experiment's id, created when missing (artifacts in the project's folder on the embedded store), marked
    as classic model training for the UI."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None and experiment.lifecycle_stage == "deleted":
        # MLflow keeps a deleted experiment's name: runs cannot be created in it ("must be in the 'active' state",
        # a traceback), nor can a new one take the name.
        raise TrackingUnavailableError(
            f"the MLflow experiment {name!r} was deleted: restore it (`mlflow experiments restore --experiment-id "
            f"{experiment.experiment_id}`, or the MLflow UI), or set tracking.experiment to another name"
        )
    if experiment is not None:
        if EXPERIMENT_KIND_TAG not in experiment.tags:  # made by an older Conveyor; a user's choice is kept
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, CLASSIC_TRAINING)
        return str(experiment.experiment_id)
    location = paths.mlflow_artifacts.as_uri() if is_embedded(client.tracking_uri) else None
    tags = {EXPERIMENT_KIND_TAG: CLASSIC_TRAINING}
    return str(client.create_experiment(name, artifact_location=location, tags=tags))


# The MLflow UI restores a saved view (columns, sort order) from an experiment tag named by `viewStateShareKey` in
# the page's URL, the same tag its own "Share" button writes; `conveyor ui` opens that URL.
REVIEW_VIEW_KEY = "conveyor-review"


def set_review_view(client: MlflowClient, experiment_id: str, metrics: list[str], params: list[str]) -> None:
    """Save the runs-table view a reviewer wants: these metrics and params as columns, best mAP50-95 first."""
    columns = [
        "attributes.`Models`",
        *(f"metrics.`{name}`" for name in metrics),
        *(f"params.`{name}`" for name in params),
        f"tags.`{TAG_PREFIX}data_md5`",
    ]
    state = {
        "orderByKey": f"metrics.`{metrics[0]}`" if metrics else "attributes.start_time",
        "orderByAsc": False,
        "selectedColumns": columns,
        "columnOrder": columns,
        "runsHiddenMode": "SHOW_ALL",
    }
    client.set_experiment_tag(experiment_id, f"mlflow.sharedViewState.{REVIEW_VIEW_KEY}", json.dumps(state))


def review_url(ui: str, experiment_id: str) -> str:
    # workflowType: the sidebar's "Model training" side (the UI otherwise opens on its GenAI side).
    query = f"workflowType=machine_learning&viewStateShareKey={REVIEW_VIEW_KEY}"
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


def metric_name(name: str) -> str:
    """An MLflow-legal metric name: Ultralytics' 'metrics/mAP50-95(B)' becomes 'metrics/mAP50-95'."""
    return _ILLEGAL.sub("_", name.replace("(B)", ""))


def flatten(prefix: str, value: Any) -> dict[str, str]:
    """Nested settings as MLflow params: {'train': {'epochs': 3}} -> {'train.epochs': '3'}."""
    if isinstance(value, Mapping):
        out: dict[str, str] = {}
        for key, inner in value.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else str(key), inner))
        return out
    return {prefix: json.dumps(value) if isinstance(value, list | tuple) else str(value)}


@dataclass(frozen=True)
class RunRecord:
    """Written by train beside the weights, read by the later stages to log into the same run."""

    run_id: str
    experiment_id: str
    tracking_uri: str

    def save(self, path: Path) -> None:
        write_atomically(path, json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> RunRecord:
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run the train stage first (`conveyor train`)")
        try:
            return cls(**json.loads(path.read_text()))
        except (ValueError, TypeError, UnicodeDecodeError) as exc:
            raise TrackingUnavailableError(
                f"{path} is not the run record the train stage writes ({type(exc).__name__}): re-run training "
                "(`dvc repro --force train`) or restore it"
            ) from None


class Tracker:
    """A thin, explicit handle on one MLflow run (no global 'active run' state)."""

    def __init__(self, client: MlflowClient, run_id: str, paths: ProjectPaths | None = None) -> None:
        self.client = client
        self.run_id = run_id
        self.paths = paths  # where this process says it holds the run open (conveyor.open_records)

    @classmethod
    def start(cls, paths: ProjectPaths, settings: Settings, run_name: str) -> Tracker:
        uri = tracking_uri(paths)
        check_reachable(uri)
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        experiment_id = ensure_experiment(client, paths, settings.tracking.experiment)
        run = client.create_run(experiment_id, run_name=run_name, tags=lineage_tags(paths, settings))
        open_records.mark_open(paths, open_records.MLFLOW_RUN, run.info.run_id, uri, "stage train")  # RUNNING now
        tracker = cls(client, run.info.run_id, paths)
        # Without a password the URI may carry: the record is a stage output (pushed to the DVC remote).
        RunRecord(run.info.run_id, experiment_id, without_credentials(uri)).save(paths.run_record)
        return tracker

    @staticmethod
    def client_for(paths: ProjectPaths) -> MlflowClient:
        """A client on the project's tracking URI, after checking it answers."""
        uri = tracking_uri(paths)
        check_reachable(uri)
        from mlflow.tracking import MlflowClient

        return MlflowClient(uri)

    @classmethod
    def resume(cls, paths: ProjectPaths) -> Tracker:
        record = RunRecord.load(paths.run_record)
        uri = tracking_uri(paths)
        if without_credentials(uri) != without_credentials(record.tracking_uri):
            raise TrackingUnavailableError(
                f"the trained model's run {record.run_id} lives on {without_credentials(record.tracking_uri)}, but "
                f"the tracking URI is now {without_credentials(uri)}: set MLFLOW_TRACKING_URI back, or re-run "
                "training (`dvc repro --force train`)"
            )
        check_reachable(uri)
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        run = client.get_run(record.run_id)  # fails clearly if the run is gone
        if STAGE_SECONDS.format(TRAIN_STAGE) not in run.data.metrics:
            # run.json is written when training opens its run: after a training that failed or was stopped, the
            # weights on disk are not that run's, and a later stage would record them in it and mark it FINISHED.
            raise UnfinishedTrainingError(
                f"the training of run {record.run_id} did not finish (the run is {run.info.status}): the weights on "
                "disk are not that run's; re-run training (`conveyor train`, or `dvc repro train`) before this stage"
            )
        return cls(client, record.run_id, paths)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """A stage's work in this run: timed (`stage_seconds/<name>`), and the run's status says how it ended."""
        stage_tags = {STAGE_FLOW_RUN_TAG: os.environ.get(FLOW_RUN_ENV) or "-"}
        if self.paths is not None:
            uri = tracking_uri(self.paths)
            open_records.mark_open(self.paths, open_records.MLFLOW_RUN, self.run_id, uri, f"stage {name}")
            # The code this stage ran: later stages may run into the run after a new commit.
            git = git_state(self.paths.root)
            stage_tags[STAGE_COMMIT_TAG.format(name)] = git.commit + (" (uncommitted changes)" if git.dirty else "")
        self.set_tags(stage_tags)  # before it is RUNNING
        self.client.update_run(self.run_id, status="RUNNING")
        started = time.perf_counter()
        try:
            with open_records.sigterm_stops():
                try:
                    yield
                except open_records.StopRequested as stop:
                    self._end_stopped(str(stop))  # still in the block: a second SIGTERM is ignored now
                    raise
        except open_records.StopRequested:
            raise
        except BaseException as failure:
            if self._end("FAILED") is None or not _is_tracking_failure(failure):
                raise
            if self.paths is not None:  # the next look closes the run as FAILED, saying why
                uri = tracking_uri(self.paths)
                lost = f"lost the tracking server during stage {name}"
                open_records.mark_open(self.paths, open_records.MLFLOW_RUN, self.run_id, uri, f"stage {name}", lost)
            raise TrackingUnavailableError(
                f"lost the MLflow tracking server {without_credentials(self.client.tracking_uri)} during stage {name} "
                f"({_first_line(failure)}): run {self.run_id} stays open until the next run or `conveyor status` "
                "closes it; re-run when the server answers",
                transient=True,
            ) from failure
        self.log_metrics({STAGE_SECONDS.format(name): time.perf_counter() - started})
        self.client.set_terminated(self.run_id, "FINISHED")
        self._closed()

    def _end(self, status: str, note: str | None = None) -> str | None:
        """End the run after a failure or a stop, if the server answers now; None when it did, else why not (its
        marker then stays, and the next run's preflight or `conveyor status` closes it, rather than this process
        waiting out MLflow's retries for minutes and hiding the first error)."""
        try:
            check_reachable(self.client.tracking_uri)
            if note is not None:
                self.client.set_tag(self.run_id, f"{TAG_PREFIX}ended_by", note)
            self.client.set_terminated(self.run_id, status)
        except Exception as exc:
            return f"{type(exc).__name__}: {_first_line(exc)}"
        self._closed()
        return None

    def _end_stopped(self, reason: str, tries: int = 3, pause: float = 2.0) -> None:
        """End the run as KILLED after a stop. A stopped process has its grace period (Kubernetes gives 30 s), so a
        server that does not answer at once gets two more tries; if none closes it, say so on stderr."""
        note = open_records.stop_note(reason)
        for attempt in range(tries):
            failed = self._end("KILLED", note)
            if failed is None:
                return
            if attempt + 1 < tries:
                time.sleep(pause)
        sys.stderr.write(
            f"could not close MLflow run {self.run_id} as stopped ({failed}): the next run or `conveyor status` "
            "closes it\n"
        )

    def _closed(self) -> None:
        if self.paths is not None:
            open_records.mark_closed(self.paths, open_records.MLFLOW_RUN, self.run_id)

    def log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        batch = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(batch), 100):  # MLflow's limit for params per call
            self.client.log_batch(self.run_id, params=batch[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """All metrics in as few calls as MLflow allows (one per 1000), not one call per metric."""
        now = int(time.time() * 1000)
        from mlflow.entities import Metric

        batch = [Metric(metric_name(k), float(v), now, step) for k, v in metrics.items() if v is not None]
        for i in range(0, len(batch), _MAX_BATCH):
            self.client.log_batch(self.run_id, metrics=batch[i : i + _MAX_BATCH])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """A file or a folder into the run's artifacts; a store that refuses it is an ArtifactStoreError (the stage
        then fails and DVC does not record it: the local outputs stay, and a re-run logs them again)."""
        try:
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path)
            else:
                self.client.log_artifact(self.run_id, str(path), artifact_path)
        except Exception as failure:
            refusal = artifact_store_refusal(failure)
            if refusal is None:
                raise
            target = f"{artifact_path}/{path.name}" if artifact_path else path.name
            raise ArtifactStoreError(
                f"could not store artifact '{target}' of MLflow run {self.run_id} on "
                f"{without_credentials(self.client.tracking_uri)}: "
                f"{refusal}. Free space in the store or raise its quota, then re-run"
            ) from failure


def lineage_tags(paths: ProjectPaths, settings: Settings) -> dict[str, str]:
    data_md5, recorded = data_used(paths.data_dvc, paths.data)
    git = git_state(paths.root)
    tags = {
        f"{TAG_PREFIX}data_md5": data_md5,  # what data/ holds, which may not be what data.dvc names
        f"{TAG_PREFIX}data_recorded": str(recorded).lower(),
        f"{TAG_PREFIX}git_commit": git.commit,
        f"{TAG_PREFIX}git_dirty": str(git.dirty).lower(),
        f"{TAG_PREFIX}params_hash": settings.section_hash(),
        # A run repeats bit for bit on one machine, not across CPUs or thread counts (docs/pipeline.md,
        # "Reproducibility").
        f"{TAG_PREFIX}host.cpu": cpu_model(),
        f"{TAG_PREFIX}host.threads": str(available_cores()),
    }
    flow_run = os.environ.get(FLOW_RUN_ENV)
    if flow_run:
        tags[FLOW_RUN_TAG] = flow_run
    return tags
