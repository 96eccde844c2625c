"""Crash consistency: faults in the middle of a training run, against real servers. After each, the records say what
happened (MLflow, Prefect, `conveyor status`), nothing half-written is taken as complete, and the next run completes.
(A SIGKILL mid-training and SIGTERM are in test_flow.py; a kill between any two registry writes in test_registry.py.)
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client

from conveyor.net import free_port
from tests.conftest import start_mlflow_server, stop_tree
from tests.flow_support import (
    champion_version,
    conveyor,
    flow_run_state,
    make_flow_project,
    servers_env,
    set_params,
    wait_for,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def flow_project(tmp_path: Path) -> tuple[Path, str]:
    return make_flow_project(tmp_path)


def kill_tree(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL a process group started with start_new_session (a crash: nothing of it runs on)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def start_run(project: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("w") as out:
        return subprocess.Popen(
            ["conveyor", "run"], cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def test_mlflow_server_lost_then_restarted_during_training(
    flow_project: tuple[Path, str], prefect_server: str, tmp_path: Path
) -> None:
    """The tracking server dies mid-training. Gone for good (the client's retries cut to one): the stage fails within
    seconds with an error naming the server, and the run's record stays for the next run to close. Restarted within
    MLflow's own retries (3, backing off 1, 2 and 4 s): training carries on and every epoch is in the run."""
    project, name = flow_project
    store = tmp_path / "mlflow"
    store.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(store, port)
    client = MlflowClient(url)
    try:
        set_params(project, train={"epochs": 30})
        log = tmp_path / "lost.log"
        run = start_run(project, servers_env(url, prefect_server, MLFLOW_HTTP_REQUEST_MAX_RETRIES="1"), log)
        try:
            wait_for(lambda: "epoch   1/30" in log.read_text(), 600, "the run to be training")
            lost_run = json.loads((project / "artifacts/train/run.json").read_text())["run_id"]
            kill_tree(server)
            assert run.wait(timeout=300) == 1, log.read_text()[-5000:]
        finally:
            if run.poll() is None:
                kill_tree(run)
        text = log.read_text()
        assert f"lost the MLflow tracking server {url} during stage train" in text, text[-5000:]
        # The stage's one retry found the server still down before starting: the run's last word says so.
        assert text.rstrip().endswith(f"MLflow tracking server {url} is unreachable ([Errno 111] Connection refused)")

        server = start_mlflow_server(store, port)
        assert client.get_run(lost_run).info.status == "RUNNING"  # nobody could close it while the server was down

        set_params(project, train={"epochs": 3})
        log = tmp_path / "restarted.log"
        run = start_run(project, servers_env(url, prefect_server), log)
        try:
            wait_for(lambda: "epoch   1/3" in log.read_text(), 600, "the next run to be training")
            kill_tree(server)
            server = start_mlflow_server(store, port)  # ~5 s down
            assert run.wait(timeout=900) == 0, log.read_text()[-5000:]
        finally:
            if run.poll() is None:
                kill_tree(run)
        finished_run = json.loads((project / "artifacts/train/run.json").read_text())["run_id"]
        assert finished_run != lost_run
        lost = client.get_run(lost_run)
        assert lost.info.status == "FAILED", lost.data.tags
        assert "failed (lost the tracking server during stage train)" in lost.data.tags["conveyor.ended_by"]
        finished = client.get_run(finished_run)
        assert finished.info.status == "FINISHED"
        steps = {m.step for m in client.get_metric_history(finished_run, "metrics/mAP50-95")}
        assert steps == set(range(1, 4)), f"epochs logged: {sorted(steps)}"
        assert champion_version(client, name) is not None
    finally:
        stop_tree(server)


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []


@pytest.fixture
def small_disk(flow_project: tuple[Path, str]) -> Iterator[Path]:
    """The project's artifacts/ on a 30 MB filesystem of its own (tmpfs): room for training's outputs (~13 MB, more
    while it writes checkpoints), not for the exports as well (~21 MB). Needs root (mount); skipped elsewhere."""
    artifacts = flow_project[0] / "artifacts"
    artifacts.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=30m", "tmpfs", str(artifacts)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here to fill: {mounted.stderr.strip() or 'mount failed'}")
    try:
        yield artifacts
    finally:
        subprocess.run(["umount", "-l", str(artifacts)], check=False)


def test_disk_full_while_writing_artifacts_then_killed_during_dvc_push(
    flow_project: tuple[Path, str], small_disk: Path, mlflow_server: str, prefect_server: str, tmp_path: Path
) -> None:
    """Two faults in one project's life (one test, so that the second costs no pipeline run of its own).

    The disk fills up while the export stage writes its models. The run fails with an error naming where and how
    much is free; the stage is not recorded as done (dvc.lock), its MLflow run ends FAILED, and after space is freed
    the next run re-does export onward and promotes.

    That run is SIGKILLed the moment its push has put the first object on the DVC remote. The push is not recorded
    as done, the next run pushes the rest without re-running a stage, and a fresh clone pulls the exact data version
    and stage outputs: no object cut short by the kill is taken as complete."""
    from pipelines.data import dir_md5

    project, name = flow_project
    env = servers_env(mlflow_server, prefect_server)
    client = MlflowClient(mlflow_server)
    set_params(project, orchestration={"stage_retries": 0})  # a retry of the export fails the same way
    failed = conveyor(project, env, "run", check=False)
    text = failed.stdout + failed.stderr
    assert failed.returncode == 1, text[-5000:]
    assert f"stage 'export' failed (exit 255): disk full writing under {small_disk}/export" in text, text[-5000:]
    assert "MB free of 31 MB there" in text
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert "train" in lock and "export" not in lock  # the half-written exports are not current
    run_id = json.loads((project / "artifacts/train/run.json").read_text())["run_id"]
    assert client.get_run(run_id).info.status == "FAILED"
    assert champion_version(client, name) is None

    subprocess.run(["mount", "-o", "remount,size=200m", str(small_disk)], check=True)  # space freed
    remote = project / ".dvc-remote"  # the default remote, `local` (../.dvc-remote from .dvc/)
    assert not _files(remote)  # the failed run stopped before its push
    log = tmp_path / "killed.log"
    run = start_run(project, env, log)
    try:
        wait_for(lambda: bool(_files(remote)) or run.poll() is not None, 900, "the push to start", poll=0.01)
        kill_tree(run)
    finally:
        if run.poll() is None:
            kill_tree(run)
    text = log.read_text()
    at_kill = len(_files(remote))
    assert at_kill > 0, text[-5000:]
    # Registration comes before the push: this run re-did export onward, and promoted.
    assert "stage train: up to date" in text and "v1 is the new champion" in text, text[-5000:]
    assert "export" in yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert not (project / ".conveyor/last-push").exists()  # a push killed halfway is not a push

    again = conveyor(project, env, "run")
    assert "up to date" in again.stdout + again.stderr
    assert (project / ".conveyor/last-push").is_file()
    objects = [p for p in _files(remote) if not p.name.endswith(".tmp")]
    assert len(objects) > at_kill, "the kill came after the push had finished: nothing was tested"

    clone = tmp_path / "clone"
    subprocess.run(["git", "-C", str(project), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(project), "commit", "-qm", "trained"], check=True)  # dvc.lock names the outputs
    subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True)
    # The default remote is a folder inside the project: the clone (another machine, in effect) is pointed at it.
    subprocess.run(["dvc", "remote", "modify", "--local", "local", "url", str(remote)], cwd=clone, env=env, check=True)
    subprocess.run(["dvc", "pull", "-q"], cwd=clone, env=env, check=True, capture_output=True, timeout=300)
    data_md5 = yaml.safe_load((clone / "data.dvc").read_text())["outs"][0]["md5"]
    assert dir_md5(clone / "data") == data_md5
    status = subprocess.run(["dvc", "status"], cwd=clone, env=env, check=True, capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout  # every stage output pulled matches dvc.lock


def test_worker_machine_dies_mid_run(
    flow_project: tuple[Path, str], mlflow_server: str, prefect_server: str, tmp_path: Path
) -> None:
    """The worker and the training it started die together, as when their machine goes: no process is left, here or
    anywhere, to say so. Prefect's zombie detection (heartbeats from `conveyor worker`'s runs, the automation of
    `conveyor deploy`) marks the flow run Crashed; `conveyor status` closes its MLflow run."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    project, name = flow_project
    # Its own pool and deployments: the Prefect server is shared with the other test files.
    set_params(
        project,
        train={"epochs": 30},
        orchestration={"work_pool": f"pool-{name}", "deployment": f"train-{name}", "crashed_after_seconds": 45},
        monitor={"deployment": f"drift-{name}", "retrain_on_drift": False},
    )
    env = servers_env(mlflow_server, prefect_server)
    deployed = conveyor(project, {**env, "COLUMNS": "300"}, "deploy").stdout
    assert "no heartbeat for 45 s -> flow run Crashed" in deployed, deployed
    log = tmp_path / "worker.log"
    with log.open("w") as out:
        worker = subprocess.Popen(
            ["conveyor", "worker"], cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
            flow_run = run_deployment(f"conveyor-training/train-{name}", timeout=0, parameters={"reason": "test"})
        assert not inspect.isawaitable(flow_run)  # sync context
        wait_for(lambda: "epoch   1/30" in log.read_text(), 600, "the worker's run to be training")
        training = psutil.Process(worker.pid).children(recursive=True)
        for process in [psutil.Process(worker.pid), *training]:  # the machine goes: everything at once
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        worker.wait(timeout=30)
        psutil.wait_procs(training, timeout=30)
        died = time.monotonic()
        # The last heartbeat came at most 30 s before the kill; the automation fires 45 s after it, give or take the
        # server's evaluation (this project's own automation: another test file's deploy cannot change its window).
        wait_for(lambda: flow_run_state(prefect_server, str(flow_run.id)) == "CRASHED", 240, "the run to be Crashed")
        crashed_after = time.monotonic() - died
    finally:
        if worker.poll() is None:
            kill_tree(worker)
    with temporary_settings(updates={PREFECT_API_URL: prefect_server}), get_client(sync_client=True) as prefect:
        state = prefect.read_flow_run(flow_run.id).state
    assert state is not None and "no heartbeat" in (state.message or ""), state
    # Crashed by the window it names, on Prefect's own records: no sooner than N s after the run's last heartbeat (a
    # run that could still be alive is not crashed) and not long after (the server evaluates every 5 s).
    named = re.search(r"no heartbeat for (\d+) s", state.message or "")
    assert named is not None, state.message
    window = int(named.group(1))
    assert window == 45, state.message  # this project's window, not another project's on the same server
    query = {
        "filter": {
            "event": {"name": ["prefect.flow-run.heartbeat"]},
            "resource": {"id": [f"prefect.flow-run.{flow_run.id}"]},
        },
        "limit": 1,
    }
    request = urllib.request.Request(
        f"{prefect_server}/events/filter", data=json.dumps(query).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        [last_heartbeat] = json.loads(response.read())["events"]
    assert state.timestamp is not None
    silent = (state.timestamp - datetime.fromisoformat(last_heartbeat["occurred"])).total_seconds()
    assert window <= silent <= window + 20, f"Crashed {silent:.0f} s after the last heartbeat, window {window} s"
    assert crashed_after <= silent + 5, "a heartbeat came after the kill: something of the run lived on"

    # The worker's machine is gone with its project folder: no marker here tells of its MLflow run. The flow run's
    # state (Crashed, by Prefect) does, wherever `conveyor status` or the next run looks from.
    [marker] = (project / ".conveyor/open").glob("mlflow-run-*.json")
    mlflow_run = json.loads(marker.read_text())["record_id"]
    marker.unlink()
    status = conveyor(project, {**env, "COLUMNS": "200"}, "status").stdout
    assert f"MLflow run {mlflow_run}: was RUNNING, its flow run is Crashed: now KILLED" in status, status
    closed = MlflowClient(mlflow_server).get_run(mlflow_run)
    assert closed.info.status == "KILLED" and "conveyor status" in closed.data.tags["conveyor.ended_by"]
    assert "no heartbeat" in closed.data.tags["conveyor.ended_by"]


def test_each_project_has_its_own_zombie_automation(prefect_server: str) -> None:
    """Projects share a team's Prefect server, each with its own heartbeat window. One automation for every Conveyor
    run let the project deployed last crash another's runs by its window (45 s against runs that beat every 60 s), or
    turn their detection off (`heartbeat_seconds: 0`). Each project's automation matches its own deployments' tag."""
    from prefect.automations import Automation
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from conveyor.settings import Settings
    from flows.deploy import ensure_zombie_automation, model_tag, remove_automation, zombie_automation_name

    suffix = os.urandom(4).hex()
    fast, slow = (
        Settings.model_validate(
            {
                "registry": {"model_name": f"{label}-{suffix}"},
                "orchestration": {"heartbeat_seconds": beat, "crashed_after_seconds": after},
            }
        )
        for label, beat, after in (("fast", 30, 45), ("slow", 60, 180))
    )
    with temporary_settings({PREFECT_API_URL: prefect_server}):
        names = [ensure_zombie_automation(settings) for settings in (fast, slow)]
        assert names[0] != names[1]
        for settings, window in ((fast, 45), (slow, 180)):
            automation = Automation.read(name=zombie_automation_name(settings))
            assert not inspect.isawaitable(automation)  # sync context
            assert automation.trigger.within.total_seconds() == window
            related = automation.trigger.match_related
            assert not isinstance(related, list)
            assert related.model_dump()["prefect.resource.id"] == f"prefect.tag.{model_tag(settings)}"
        # `heartbeat_seconds: 0` in the fast project removes its automation only.
        remove_automation(zombie_automation_name(fast))
        with pytest.raises(ValueError, match="not found"):
            Automation.read(name=zombie_automation_name(fast))  # type: ignore[unused-coroutine]  # sync context
        kept = Automation.read(name=zombie_automation_name(slow))
        assert not inspect.isawaitable(kept)
        kept.delete()


def test_a_deployment_of_another_project_is_refused_not_taken_over(prefect_server: str) -> None:
    """Two projects on one Prefect server with the default deployment names: the second `conveyor deploy` updated the
    first's deployment in place (Prefect keys deployments by flow and name), so the first's schedule stopped and its
    drift automation retrained from the second's checkout. It is refused now, naming the owner and the setting."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from conveyor.settings import ConfigError, Settings
    from flows import TRAINING_FLOW
    from flows.deploy import model_tag, refuse_anothers_deployment

    suffix = os.urandom(4).hex()
    widgets, bolts = (
        Settings.model_validate({"registry": {"model_name": f"{label}-{suffix}"}}) for label in ("widgets", "bolts")
    )
    name = f"scheduled-training-{suffix}"
    with temporary_settings({PREFECT_API_URL: prefect_server}), get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name(TRAINING_FLOW)
        deployment = client.create_deployment(
            flow_id, name, parameters={"project_dir": "/srv/widgets"}, tags=["conveyor", model_tag(widgets)]
        )
        try:
            refuse_anothers_deployment(TRAINING_FLOW, name, widgets, "orchestration.deployment")  # its own: updated
            refuse_anothers_deployment(TRAINING_FLOW, f"{name}-bolts", bolts, "orchestration.deployment")  # free
            with pytest.raises(ConfigError) as refused:
                refuse_anothers_deployment(TRAINING_FLOW, name, bolts, "orchestration.deployment")
            said = str(refused.value)
            assert f"{TRAINING_FLOW}/{name} of model widgets-{suffix} (project /srv/widgets)" in said, said
            assert f"params.yaml orchestration.deployment, e.g. {name}-bolts-{suffix}" in said, said
        finally:
            client.delete_deployment(deployment)


def test_a_renamed_deployment_does_not_stay_scheduled_beside_the_new_one(prefect_server: str) -> None:
    """params.yaml's orchestration.deployment changed: `conveyor deploy` made the new one and left the old on its
    cron, so two trainings ran a week (and two drift checks an hour, each asking for a retraining). The project's
    old one is removed; another checkout's of the same model, and the new one, stay."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from conveyor.settings import Settings
    from flows import TRAINING_FLOW
    from flows.deploy import model_tag, remove_renamed_deployments

    suffix = os.urandom(4).hex()
    settings = Settings.model_validate({"registry": {"model_name": f"widgets-{suffix}"}})
    tags = ["conveyor", model_tag(settings)]
    with temporary_settings({PREFECT_API_URL: prefect_server}), get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name(TRAINING_FLOW)
        made = {
            name: client.create_deployment(flow_id, name, parameters={"project_dir": project}, tags=tags)
            for name, project in (
                (f"old-{suffix}", "/srv/widgets"),
                (f"new-{suffix}", "/srv/widgets"),
                (f"elsewhere-{suffix}", "/srv/widgets-2"),
            )
        }
        try:
            removed = remove_renamed_deployments(TRAINING_FLOW, f"new-{suffix}", settings, "/srv/widgets")
            assert removed == [f"{TRAINING_FLOW}/old-{suffix}"]
            left = {d.name for d in client.read_deployments() if d.name.endswith(suffix)}
            assert left == {f"new-{suffix}", f"elsewhere-{suffix}"}
            assert remove_renamed_deployments(TRAINING_FLOW, f"new-{suffix}", settings, "/srv/widgets") == []
        finally:
            for name, deployment in made.items():
                if name != f"old-{suffix}":
                    client.delete_deployment(deployment)


def test_conveyor_status_leaves_a_run_whose_stage_a_later_flow_run_holds(
    tmp_path: Path, mlflow_server: str, prefect_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A later flow run re-runs evaluate (or export, gate) in the run an earlier, finished flow run trained: the run
    was RUNNING with its training's flow run tag, and `conveyor status` ended it KILLED, saying that flow run had
    ended, while the stage ran. The stage names the flow run that holds it now; a stage run by hand names none."""
    import uuid

    from prefect import flow
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Completed, Running

    from conveyor.paths import ProjectPaths
    from conveyor.tracking import FLOW_RUN_ENV, FLOW_RUN_TAG, Tracker
    from flows import TRAINING_FLOW
    from flows.repair import close_runs_of_ended_flow_runs
    from tests.conftest import TINY_PARAMS, make_project

    experiment = f"stage-owner-{uuid.uuid4().hex[:8]}"
    paths = ProjectPaths(make_project(tmp_path / "project", {**TINY_PARAMS, "tracking": {"experiment": experiment}}))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)

    @flow(name=TRAINING_FLOW)
    def stand_in() -> None:  # only its name: the runs are made here, in the states the test needs
        pass

    with temporary_settings({PREFECT_API_URL: prefect_server}), get_client(sync_client=True) as prefect:
        trained = prefect.create_flow_run(stand_in, state=Completed())
        later = prefect.create_flow_run(stand_in, state=Running())
    client = MlflowClient(mlflow_server)
    run_id = client.create_run(client.create_experiment(experiment), tags={FLOW_RUN_TAG: str(trained.id)}).info.run_id
    client.set_terminated(run_id, "FINISHED")  # trained and evaluated by the first flow run

    def status_during_stage(flow_run: str | None) -> list[str]:
        if flow_run:
            monkeypatch.setenv(FLOW_RUN_ENV, flow_run)
        else:
            monkeypatch.delenv(FLOW_RUN_ENV, raising=False)
        with Tracker(client, run_id, paths).stage("evaluate"):
            assert client.get_run(run_id).info.status == "RUNNING"
            return close_runs_of_ended_flow_runs(paths, "conveyor status", prefect_server)

    assert status_during_stage(str(later.id)) == []  # the later, running flow run holds it
    assert status_during_stage(None) == []  # by hand: its own marker tells (`close_abandoned`), not Prefect
    assert (
        client.get_run(run_id).info.status == "FINISHED" and "conveyor.ended_by" not in client.get_run(run_id).data.tags
    )
    # A run whose holding flow run ended while it was RUNNING is still closed.
    monkeypatch.setenv(FLOW_RUN_ENV, str(trained.id))
    tracker = Tracker(client, run_id, paths)
    with pytest.raises(RuntimeError, match="killed"), tracker.stage("gate"):
        [line] = close_runs_of_ended_flow_runs(paths, "conveyor status", prefect_server)
        assert f"MLflow run {run_id}: was RUNNING, its flow run is Completed: now KILLED" == line
        raise RuntimeError("killed")
