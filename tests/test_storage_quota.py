"""A full bucket. The stack's store (nanio) has no quotas, so these run on OpenStack Swift from Debian with its
container quotas (`tests/swift_support.py`), a real store.

- The DVC remote's bucket is smaller than the data; the push is the training flow's own push task. It fails saying
  the remote is full (and is not retried), is not recorded as done, leaves only whole objects behind; once the quota
  is raised the next push completes and a fresh clone pulls the exact data version from the bucket.
- The bucket behind a real MLflow server (`--artifacts-destination s3://...`) is full: the stage fails naming the
  artifact, the run and the server, the run ends FAILED with what was stored before listed and nothing of the
  refused file; with room again, a re-run stores it whole.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from prefect.states import Failed

from conveyor import storage
from conveyor.net import free_port
from conveyor.tracking import ArtifactStoreError, Tracker
from flows import training
from pipelines import dvc_repo
from pipelines.data import dir_md5
from tests.conftest import base_env, start_mlflow_server, stop_tree
from tests.flow_support import make_flow_project
from tests.swift_support import SwiftStore, missing_programs, swift_store

BUCKET = "conveyor-team"


@pytest.fixture(scope="module")
def swift(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SwiftStore]:
    missing = missing_programs()
    if missing:
        pytest.skip(f"OpenStack Swift is not installed ({', '.join(missing)}; `make test` installs Debian's swift)")
    with swift_store(tmp_path_factory.mktemp("swift")) as store:
        yield store


def _dvc(project: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["dvc", *args], cwd=project, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"dvc {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result


def test_full_bucket_fails_the_push_clearly_and_a_rerun_completes(
    swift: SwiftStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project, _ = make_flow_project(tmp_path)
    key, secret = swift.credentials
    env = base_env(AWS_ACCESS_KEY_ID=key, AWS_SECRET_ACCESS_KEY=secret)
    for name, value in (("AWS_ACCESS_KEY_ID", key), ("AWS_SECRET_ACCESS_KEY", secret)):
        monkeypatch.setenv(name, value)
    assert storage.ensure_bucket(BUCKET, swift.endpoint, swift.credentials)
    _dvc(project, env, "remote", "add", "--default", "team", f"s3://{BUCKET}/dvc")
    _dvc(project, env, "remote", "modify", "team", "endpointurl", swift.endpoint)
    subprocess.run(["git", "commit", "-qam", "the team's remote"], cwd=project, check=True)
    cached = [path for path in (project / ".dvc/cache/files/md5").rglob("*") if path.is_file()]
    data_bytes = sum(path.stat().st_size for path in cached)
    swift.set_quota(BUCKET, data_bytes // 3)

    with pytest.raises(dvc_repo.RemoteFullError) as refused:
        training.push.fn(str(project))
    message = str(refused.value)
    assert f"DVC remote 'team' (s3://{BUCKET}/dvc) is full" in message and "raise the quota" in message, message
    assert "Upload exceeds quota" in message  # the store's own words follow
    # Prefect's retry condition: a store that is full is not retried (a lost connection still is).
    assert not training.retry_unless_remote_full(training.push, None, Failed(data=refused.value))
    assert training.retry_unless_remote_full(training.push, None, Failed(data=RuntimeError("timeout")))
    assert not (project / ".conveyor/last-push").exists()  # the failed push is not one

    # What did land is whole: every object's bytes hash to its name (DVC's content addressing).
    s3 = storage.client(swift.endpoint, credentials=swift.credentials)
    landed = storage.list_keys(storage.S3Location(BUCKET, "dvc"), s3=s3)
    assert 0 < len(landed) < len(cached), f"{len(landed)} of {len(cached)} objects landed"
    for name in landed:
        body = s3.get_object(Bucket=BUCKET, Key=name)["Body"].read()
        assert hashlib.md5(body).hexdigest() == "".join(name.split("/")[-2:]).removesuffix(".dir"), name
    assert "in sync" not in _dvc(project, env, "status", "--cloud").stdout

    swift.set_quota(BUCKET, data_bytes * 2)  # the team raises the quota
    training.push.fn(str(project))
    assert (project / ".conveyor/last-push").read_text() == dvc_repo.pushed_state(project)
    assert "Cache and remote 'team' are in sync" in _dvc(project, env, "status", "--cloud").stdout

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True)
    _dvc(clone, env, "pull", "data.dvc")  # the stages never ran here: only the data version
    assert dir_md5(clone / "data") == dir_md5(project / "data")


def test_only_a_lack_of_space_is_called_full() -> None:
    remote = {"name": "team", "url": "s3://conveyor-team/dvc"}
    lost = "ERROR: failed to transfer 'ab12' - Could not connect to the endpoint URL\nERROR: 3 files failed to upload"
    assert type(dvc_repo.push_failure(lost, remote)) is RuntimeError
    disk = "ERROR: failed to transfer 'ab12' - [Errno 28] No space left on device\nERROR: 1 file failed to upload"
    full = dvc_repo.push_failure(disk, {"name": "nas", "url": "/mnt/nas/dvc"})
    assert isinstance(full, dvc_repo.RemoteFullError)
    assert "DVC remote 'nas' (/mnt/nas/dvc) is full: 1 file was refused" in str(full)
    assert "No space left on device" in str(full)


def test_full_bucket_behind_the_mlflow_server_fails_the_stage_clearly(swift: SwiftStore, tmp_path: Path) -> None:
    bucket = "conveyor-artifacts"
    storage.ensure_bucket(bucket, swift.endpoint, swift.credentials)
    swift.set_quota(bucket, 20_000)
    key, secret = swift.credentials
    server = start_mlflow_server(
        tmp_path,
        port := free_port(),
        f"s3://{bucket}/mlflow",
        MLFLOW_S3_ENDPOINT_URL=swift.endpoint,
        AWS_ACCESS_KEY_ID=key,
        AWS_SECRET_ACCESS_KEY=secret,
    )
    try:
        client = MlflowClient(uri := f"http://127.0.0.1:{port}")
        experiment = client.create_experiment("full-bucket")
        report, weights = tmp_path / "report.md", tmp_path / "best.pt"
        report.write_text("gate: passed")
        weights.write_bytes(os.urandom(50_000))  # more than the bucket has room for

        run = client.create_run(experiment).info.run_id
        tracker = Tracker(client, run)
        with pytest.raises(ArtifactStoreError) as refused, tracker.stage("train"):
            tracker.log_artifact(report, "gate")
            tracker.log_artifact(weights, "weights")
        message = str(refused.value)
        assert f"could not store artifact 'weights/best.pt' of MLflow run {run} on {uri}" in message, message
        assert "full bucket" in message and "raise its quota" in message, message
        assert client.get_run(run).info.status == "FAILED"
        assert [artifact.path for artifact in client.list_artifacts(run)] == ["gate"]  # the refused file is not there
        assert "Upload exceeds quota" in (tmp_path / "server.log").read_text()  # the server's log has the store's words

        swift.set_quota(bucket, None)  # room again: the re-run stores the file whole
        again = client.create_run(experiment).info.run_id
        tracker = Tracker(client, again)
        with tracker.stage("train"):
            tracker.log_artifact(weights, "weights")
        assert client.get_run(again).info.status == "FINISHED"
        stored = mlflow.artifacts.download_artifacts(
            run_id=again, artifact_path="weights/best.pt", dst_path=str(tmp_path / "back"), tracking_uri=uri
        )
        assert Path(stored).read_bytes() == weights.read_bytes()
    finally:
        stop_tree(server)
