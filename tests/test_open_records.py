"""Markers of records a process holds open, and which of them a dead process left (conveyor.open_records)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from conveyor import open_records, processes
from conveyor.paths import ProjectPaths
from conveyor.scaffold import REPO
from tests.conftest import base_env, run_cmd

MARK_AND_EXIT = """
import sys
from pathlib import Path
from conveyor import open_records
from conveyor.paths import ProjectPaths
open_records.mark_open(ProjectPaths(Path(sys.argv[1])), sys.argv[2], sys.argv[3], sys.argv[4], "stage train")
"""


def _mark_from_a_process_that_exits(root: Path, kind: str, record_id: str, endpoint: str = "http://x") -> None:
    subprocess.run([sys.executable, "-c", MARK_AND_EXIT, str(root), kind, record_id, endpoint], cwd=REPO, check=True)


def test_a_dead_process_marker_is_abandoned_a_live_one_and_our_own_are_not(tmp_path: Path) -> None:
    paths = ProjectPaths(tmp_path)
    _mark_from_a_process_that_exits(tmp_path, open_records.MLFLOW_RUN, "dead-run")
    open_records.mark_open(paths, open_records.MLFLOW_RUN, "own-run", "http://x", "stage evaluate")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live_marker = tmp_path / ".conveyor/open/mlflow-run-live-run.json"
        record = json.loads((tmp_path / ".conveyor/open/mlflow-run-own-run.json").read_text())
        started = psutil.Process(live.pid).create_time()
        own = {**record, "record_id": "live-run", "pid": live.pid}
        # The PID now belongs to another process than the one that wrote the marker (reuse): another identity.
        live_marker.write_text(json.dumps({**own, "pid_started": 0.0, "identity": "another-boot:1"}))
        found = {record.record_id for _, record in open_records.abandoned(paths, open_records.MLFLOW_RUN)}
        assert found == {"dead-run", "live-run"}

        # Its own identity, with psutil's start time 5 s off, as after the wall clock was stepped (NTP, a VM
        # resumed): create_time is computed from the boot time the clock gives. Read by it, a live training was
        # closed as KILLED.
        identity = processes.identity(live.pid)
        assert identity
        live_marker.write_text(json.dumps({**own, "pid_started": started - 5, "identity": identity}))
        found = {record.record_id for _, record in open_records.abandoned(paths, open_records.MLFLOW_RUN, 0.3)}
        assert found == {"dead-run"}  # alive after the wait: never judged dead
        assert open_records.abandoned(paths, open_records.PREFECT_FLOW_RUN) == []

        # A marker written before identities were kept: its start time, with a second's slack.
        legacy = {k: v for k, v in own.items() if k != "identity"}
        live_marker.write_text(json.dumps({**legacy, "pid_started": started}))
        assert {r.record_id for _, r in open_records.abandoned(paths, open_records.MLFLOW_RUN)} == {"dead-run"}
        live_marker.write_text(json.dumps({**legacy, "pid_started": started - 5}))
        assert "live-run" in {r.record_id for _, r in open_records.abandoned(paths, open_records.MLFLOW_RUN)}
    finally:
        live.kill()
        live.wait()


def test_markers_of_another_host_are_left_and_a_torn_marker_is_dropped(tmp_path: Path) -> None:
    paths = ProjectPaths(tmp_path)
    _mark_from_a_process_that_exits(tmp_path, open_records.PREFECT_FLOW_RUN, "elsewhere")
    marker = tmp_path / ".conveyor/open/prefect-flow-run-elsewhere.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "host": "another-machine"}))
    torn = tmp_path / ".conveyor/open/prefect-flow-run-torn.json"
    torn.write_text('{"kind": "prefect-fl')
    assert open_records.abandoned(paths, open_records.PREFECT_FLOW_RUN) == []
    assert marker.is_file() and not torn.exists()


def test_holding_removes_the_marker_on_return_and_on_error(tmp_path: Path) -> None:
    paths = ProjectPaths(tmp_path)
    folder = tmp_path / ".conveyor/open"
    with open_records.holding(paths, open_records.PREFECT_FLOW_RUN, "ok", "http://x", "training flow"):
        assert [p.name for p in folder.iterdir()] == ["prefect-flow-run-ok.json"]
    assert not list(folder.iterdir())
    with (
        pytest.raises(ValueError, match=r"^a stage failed$"),  # passed on, neither swallowed nor replaced
        open_records.holding(paths, open_records.PREFECT_FLOW_RUN, "fails", "http://x", "training flow"),
    ):
        assert [p.name for p in folder.iterdir()] == ["prefect-flow-run-fails.json"]
        raise ValueError("a stage failed")
    assert not list(folder.iterdir())  # a failure is reported by the live process itself


STOPPED_WHILE_CLOSING = """
import sys, time
from pathlib import Path
from mlflow.tracking import MlflowClient
from conveyor import open_records
from conveyor.paths import ProjectPaths
from conveyor.tracking import Tracker

client = MlflowClient(sys.argv[2])
tracker = Tracker(client, sys.argv[3], ProjectPaths(Path(sys.argv[1])))
real_set_tag = client.set_tag
def slow_set_tag(*args, **kwargs):  # a server slow to answer: the second SIGTERM lands while the run is being closed
    print("closing", flush=True)
    time.sleep(2)
    return real_set_tag(*args, **kwargs)
client.set_tag = slow_set_tag
try:
    with tracker.stage("train"):
        print("working", flush=True)
        time.sleep(60)
except open_records.StopRequested:
    sys.exit(open_records.StopRequested.exit_code)
"""


def test_a_second_sigterm_while_the_run_is_closed_does_not_leave_it_open(project: Path, mlflow_server: str) -> None:
    """Supervisors repeat SIGTERM (systemd to every process of the unit, a user pressing twice): the first stops the
    stage, and one that arrives while the stage is ending its MLflow run must not kill it half way."""
    client = MlflowClient(mlflow_server)
    run_id = client.create_run(client.create_experiment(f"stop-{uuid.uuid4().hex[:8]}")).info.run_id
    stage = subprocess.Popen(
        [sys.executable, "-c", STOPPED_WHILE_CLOSING, str(project), mlflow_server, run_id],
        cwd=REPO,
        env=base_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert stage.stdout is not None
    try:
        assert stage.stdout.readline().strip() == "working"
        stage.send_signal(signal.SIGTERM)
        assert stage.stdout.readline().strip() == "closing"
        stage.send_signal(signal.SIGTERM)
        assert stage.wait(timeout=60) == open_records.StopRequested.exit_code, stage.stdout.read()
    finally:
        stage.kill()
    ended = client.get_run(run_id)
    assert ended.info.status == "KILLED", ended.data.tags
    assert "stopped by SIGTERM" in ended.data.tags["conveyor.ended_by"]
    assert not list((project / ".conveyor/open").glob("*.json"))


def test_conveyor_status_closes_a_run_left_running_by_a_dead_process(project: Path, mlflow_server: str) -> None:
    """`conveyor status` against a real MLflow server: a RUNNING run whose stage process died is ended KILLED and
    listed; a RUNNING run of a live process (no marker of a dead one) is left alone."""
    client = MlflowClient(mlflow_server)
    experiment = client.create_experiment(f"status-{uuid.uuid4().hex[:8]}")
    dead = client.create_run(experiment).info.run_id
    alive = client.create_run(experiment).info.run_id
    _mark_from_a_process_that_exits(project, open_records.MLFLOW_RUN, dead, mlflow_server)
    env = base_env(MLFLOW_TRACKING_URI=mlflow_server, COLUMNS="200")
    out = run_cmd(["conveyor", "status"], cwd=project, env=env).stdout
    assert "Left open by a run that died" in out and f"MLflow run {dead}: was RUNNING" in out, out
    assert client.get_run(dead).info.status == "KILLED"
    assert "was gone when conveyor status looked" in client.get_run(dead).data.tags["conveyor.ended_by"]
    assert client.get_run(alive).info.status == "RUNNING"
    assert not list((project / ".conveyor/open").glob("*.json"))
    again = run_cmd(["conveyor", "status"], cwd=project, env=env).stdout
    assert "Left open by a run that died" not in again  # nothing left to close


def test_objects_a_killed_push_cut_short_in_a_folder_remote_are_sent_again(tmp_path: Path) -> None:
    """A SIGKILL during `dvc push` left a `.dir` object empty at its final name in a folder remote, and every later
    push failed on it; the push step removes such leftovers first (found by test_faults' killed push)."""
    from pipelines.dvc_repo import remove_partial_objects

    project = tmp_path / "project"
    project.mkdir()
    env = base_env()
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=project, env=env, check=True)
    subprocess.run(["dvc", "remote", "add", "-d", "-q", "local", "../remote"], cwd=project, env=env, check=True)
    assert remove_partial_objects(project) == []  # nothing pushed yet
    cache = project / ".dvc" / "cache" / "files" / "md5" / "77"
    remote = tmp_path / "remote" / "files" / "md5" / "77"
    cache.mkdir(parents=True)
    remote.mkdir(parents=True)
    (cache / "18b4.dir").write_text('[{"md5": "977d", "relpath": "report.json"}]')
    (remote / "18b4.dir").write_bytes(b"")  # cut short by the kill
    (cache / "aaaa").write_bytes(b"whole")
    (remote / "aaaa").write_bytes(b"whole")  # sent whole: kept
    assert remove_partial_objects(project) == [remote / "18b4.dir"]
    assert not (remote / "18b4.dir").exists() and (remote / "aaaa").read_bytes() == b"whole"


def test_a_later_stage_refuses_a_run_whose_training_failed(
    project: Path, mlflow_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """run.json is written when training opens its run. After a training that failed, evaluating by hand would have
    recorded the weights left on disk (an earlier training's) in the failed run and marked it FINISHED."""
    from conveyor.tracking import TRAIN_STAGE, RunRecord, Tracker, UnfinishedTrainingError

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    paths = ProjectPaths(project)
    client = MlflowClient(mlflow_server)
    experiment = client.create_experiment(f"resume-{uuid.uuid4().hex[:8]}")

    def opened_run() -> Tracker:
        run_id = client.create_run(experiment).info.run_id
        paths.run_record.parent.mkdir(parents=True, exist_ok=True)
        RunRecord(run_id, experiment, mlflow_server).save(paths.run_record)
        return Tracker(client, run_id, paths)

    failed = opened_run()
    with pytest.raises(ValueError, match="out of memory"), failed.stage(TRAIN_STAGE):
        raise ValueError("out of memory")
    with pytest.raises(UnfinishedTrainingError, match=rf"training of run {failed.run_id} did not finish.*FAILED"):
        Tracker.resume(paths)
    assert client.get_run(failed.run_id).info.status == "FAILED"  # left as it ended

    finished = opened_run()
    with finished.stage(TRAIN_STAGE):
        pass
    assert Tracker.resume(paths).run_id == finished.run_id
