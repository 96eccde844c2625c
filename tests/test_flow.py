"""The training flow against a real Prefect server and a real MLflow server.

A good model comes from warm-starting on a checkpoint trained by Conveyor's own demo run (tests/assets, 5 MB);
a deliberately weaker one is trained from scratch for one epoch. Covers: first run promotes; a weaker model is
rejected by the regression gate and the champion does not move; a forced promotion and a rollback, all recorded;
the pyfunc predicts; lineage; an unreachable MLflow server;
overlapping runs (rejected, or waiting); a run killed mid-training, after which the next run completes cleanly.
(The scheduled deployments and a run through a worker are in test_monitoring.py: its retraining is one.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from conveyor.net import free_port
from conveyor.scaffold import REPO
from pipelines import registry
from tests.conftest import VENV_BIN, base_env
from tests.flow_support import (
    CHECKPOINT,
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


def test_promote_reject_force_rollback(flow_project: tuple[Path, str], mlflow_server: str, prefect_server: str) -> None:
    project, name = flow_project
    env = servers_env(mlflow_server, prefect_server)
    client = MlflowClient(mlflow_server)

    first = conveyor(project, env, "run")
    assert "v1 is the new champion" in first.stdout, first.stdout[-4000:]
    assert champion_version(client, name) == "1"
    v1 = client.get_model_version(name, "1")
    assert v1.run_id is not None
    assert v1.tags["conveyor.gates.passed"] == "true"
    assert v1.tags["conveyor.prefect_flow_run_id"] not in ("", "-")
    score_v1 = client.get_run(v1.run_id).data.metrics["test/mAP50-95"]
    # The commit each stage ran at, on the version its files became (a stage run again later is told apart).
    stage_commits = {k: v for k, v in v1.tags.items() if k.startswith("conveyor.stage_commit.")}
    stages = {"train", "evaluate", "export", "gate"}  # the stages that log into the run
    assert {k.removeprefix("conveyor.stage_commit.") for k in stage_commits} == stages, v1.tags
    assert all(c.startswith(v1.tags["conveyor.git_commit"]) for c in stage_commits.values()), stage_commits
    assert score_v1 > 0.1, "the warm-started model should detect defects"

    # The champion predicts through the registry's pyfunc.
    import mlflow

    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    images = sorted((project / "data/images/test").glob("*.jpg"))[:3]
    detections = model.predict(pd.DataFrame({"image": [str(p) for p in images]}))
    assert list(detections.columns) == ["image_index", "class_id", "class_name", "confidence", "x0", "y0", "x1", "y1"]
    assert len(detections) > 0 and set(detections["class_name"]) <= {"scratch", "dent", "stain"}

    # What a reviewer sees in the MLflow UI: the runs table (classic training, a saved view), the version's review
    # summary, the alias history in words.
    experiment = client.get_experiment(client.get_run(v1.run_id).info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(experiment.tags["mlflow.sharedViewState.conveyor-review"])
    assert "metrics.`test/recall/scratch`" in view["selectedColumns"]
    description = v1.description or ""
    assert description.startswith("**Gates PASSED**, compared with no champion.")
    for expected in (
        "| scratch |",
        "| openvino |",
        "| mAP50-95 |",
        yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"],
    ):
        assert expected in description
    assert "| champion | none → v1 | promote |" in (client.get_registered_model(name).description or "")

    # A second run with nothing changed is a no-op that keeps the champion: DVC is asked once, MLflow not at all.
    again = conveyor(project, env, "run")
    assert "v1 already decided (champion then: v1)" in again.stdout
    assert "stage train: up to date (dvc status)" in again.stdout + again.stderr
    assert "registry not consulted" in again.stdout + again.stderr
    assert len(registry.versions(client, name)) == 1
    status = conveyor(project, {**env, "COLUMNS": "200"}, "status").stdout
    assert "every stage is up to date" in status and f"{name} v1: test mAP50" in status
    assert "data/ matches it" in status and "Completed (manual" in status

    # A deliberately weaker model (from scratch, one epoch) fails the regression gate.
    set_params(project, train={"weights": None})
    second = conveyor(project, env, "run")
    assert "v2 failed gates: no regression vs champion" in second.stdout
    assert champion_version(client, name) == "1"
    aliases = registry.aliases_by_version(client, name)
    assert aliases == {"1": ["champion"], "2": ["challenger"]}
    report = json.loads((project / "artifacts/gate/report.json").read_text())
    assert report["failed"] == ["no regression vs champion"] and report["champion_version"] == "1"
    gate_artifacts = {a.path for a in client.list_artifacts(str(client.get_model_version(name, "2").run_id), "gate")}
    assert "gate/report.md" in gate_artifacts

    # A human may override, with a reason; then roll back.
    refused = conveyor(project, env, "promote", "2", "--reason", "try it", check=False)
    assert refused.returncode == 1 and "did not pass its gates" in refused.stderr + refused.stdout
    conveyor(project, env, "promote", "2", "--force", "--reason", "line 4 needs the new model now")
    assert champion_version(client, name) == "2"
    conveyor(project, env, "rollback", "--reason", "v2 misses scratches")
    assert champion_version(client, name) == "1"
    champion_moves = [
        (m.from_version, m.to_version, m.kind) for m in registry.history(client, name) if m.alias == registry.CHAMPION
    ]
    assert champion_moves == [(None, "1", "promote"), ("1", "2", "force"), ("2", "1", "rollback")]
    history = conveyor(project, {**env, "COLUMNS": "250"}, "history").stdout
    assert "line 4 needs the new model now" in history and "v2 misses scratches" in history

    lineage = conveyor(project, {**env, "COLUMNS": "200"}, "lineage", f"models:/{name}@champion").stdout
    data_md5 = yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"]
    assert data_md5 in lineage and v1.run_id in lineage and v1.tags["conveyor.prefect_flow_run_id"] in lineage
    assert ".dvc-remote/files/md5/" in lineage
    by_data = conveyor(project, {**env, "COLUMNS": "200"}, "lineage", "--data", data_md5).stdout
    assert v1.run_id in by_data

    # v1's run record (what its run would have committed) brings its exact state back. This project's dvc.lock and
    # params.yaml are v2's and were never committed: refused, nothing written; then forced, and DVC checks out v1's
    # outputs from its cache: the weights are v1's, byte for byte.
    assert f"runs:/{v1.run_id}/lineage" in lineage
    params_v2 = (project / "params.yaml").read_text()
    refused = conveyor(project, env, "lineage", "1", "--restore", check=False)
    assert refused.returncode == 1 and "uncommitted changes" in refused.stderr, refused.stderr
    assert "params.yaml" in refused.stderr and (project / "params.yaml").read_text() == params_v2
    restored = conveyor(project, {**env, "COLUMNS": "300"}, "lineage", "1", "--restore", "--force").stdout
    assert all(f in restored for f in ("dvc.lock", "params.yaml", "data.dvc", "metrics/evaluate.json")), restored
    assert yaml.safe_load((project / "params.yaml").read_text())["train"]["weights"] == str(CHECKPOINT)
    subprocess.run(["dvc", "checkout", "-q"], cwd=project, env=env, check=True)
    dvc_status = subprocess.run(["dvc", "status"], cwd=project, env=env, capture_output=True, text=True, check=True)
    assert "up to date" in dvc_status.stdout, dvc_status.stdout
    weights_v1 = client.download_artifacts(v1.run_id, "weights/best.pt", str(project.parent))
    assert Path(weights_v1).read_bytes() == (project / "artifacts/train/weights/best.pt").read_bytes()


def test_unreachable_mlflow_fails_at_once_and_writes_nothing(
    flow_project: tuple[Path, str], prefect_server: str
) -> None:
    project, _ = flow_project
    dead = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = conveyor(project, servers_env(dead, prefect_server), "run", check=False)
    assert result.returncode != 0
    assert f"MLflow tracking server {dead} is unreachable" in result.stdout + result.stderr
    assert time.monotonic() - started < 60
    assert not (project / "artifacts").exists()  # no stage ran, nothing half-registered


def test_overlap_kill_and_recovery(flow_project: tuple[Path, str], mlflow_server: str, prefect_server: str) -> None:
    """A runs; B is rejected; C waits; A is killed mid-training; C then completes cleanly, the champion only ever
    points at gated versions, and A's MLflow run and Prefect flow run say that A died."""
    project, name = flow_project
    env = servers_env(mlflow_server, prefect_server)
    client = MlflowClient(mlflow_server)
    set_params(project, train={"epochs": 30})  # long enough to be killed mid-training
    logs = project.parent
    a_log = (logs / "a.log").open("w")
    a = subprocess.Popen(
        ["conveyor", "run"], cwd=project, env=env, stdout=a_log, stderr=subprocess.STDOUT, start_new_session=True
    )
    c: subprocess.Popen[bytes] | None = None
    try:
        wait_for(lambda: "epoch   1/30" in (logs / "a.log").read_text(), 600, "A to be training")
        a_mlflow_run = json.loads((project / "artifacts/train/run.json").read_text())["run_id"]
        a_markers = list((project / ".conveyor/open").glob("prefect-flow-run-*.json"))
        assert len(a_markers) == 1, a_markers  # A's flow run, marked open by A's process
        a_flow_run = json.loads(a_markers[0].read_text())["record_id"]

        set_params(project, orchestration={"on_overlap": "reject"})
        b = conveyor(project, env, "run", check=False)
        assert b.returncode == 1 and "another training run, or a change of its data" in b.stdout + b.stderr

        set_params(project, orchestration={"on_overlap": "wait"}, train={"epochs": 1})
        c_log = (logs / "c.log").open("w")
        c = subprocess.Popen(
            ["conveyor", "run"], cwd=project, env=env, stdout=c_log, stderr=subprocess.STDOUT, start_new_session=True
        )
        wait_for(lambda: "waiting for it" in (logs / "c.log").read_text(), 120, "C to wait")
        assert c.poll() is None

        os.killpg(a.pid, signal.SIGKILL)  # the machine dies mid-training
        a.wait(timeout=30)
        assert c.wait(timeout=900) == 0, (logs / "c.log").read_text()[-5000:]
    finally:
        for process in (a, c):
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
        a_log.close()
    assert "is the new champion" in (logs / "c.log").read_text()
    for move in registry.history(client, name):
        if move.alias == registry.CHAMPION:
            assert registry.gates_passed(client.get_model_version(name, move.to_version))
    champion = registry.current_champion(client, name)
    assert champion is not None and registry.gates_passed(champion)
    assert json.loads((project / "artifacts/train/run.json").read_text())["run_id"] == champion.run_id

    # The killed run's records say it died (issue: crash consistency), closed by C's preflight under the project lock.
    killed = client.get_run(a_mlflow_run)
    assert killed.info.status == "KILLED" and killed.info.end_time is not None
    assert "was gone when training flow run" in killed.data.tags["conveyor.ended_by"]
    assert client.get_run(str(champion.run_id)).info.status == "FINISHED"
    assert flow_run_state(prefect_server, a_flow_run) == "CRASHED"
    assert not list((project / ".conveyor/open").glob("*.json"))  # C closed what it opened


def test_sigterm_is_a_clean_stop(flow_project: tuple[Path, str], mlflow_server: str, prefect_server: str) -> None:
    """SIGTERM to the run's main process only (as Kubernetes or systemd send it) mid-training: the stage is stopped,
    its MLflow run ends KILLED saying so, the Prefect flow run ends Cancelled (not Crashed), within seconds, and
    nothing is left running or marked open."""
    project, _ = flow_project
    env = servers_env(mlflow_server, prefect_server)
    client = MlflowClient(mlflow_server)
    set_params(project, train={"epochs": 30})
    log = project.parent / "run.log"
    with log.open("w") as out:
        run = subprocess.Popen(
            ["conveyor", "run"], cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            wait_for(lambda: "epoch   1/30" in log.read_text(), 600, "the run to be training")
            mlflow_run = json.loads((project / "artifacts/train/run.json").read_text())["run_id"]
            markers = list((project / ".conveyor/open").glob("prefect-flow-run-*.json"))
            assert len(markers) == 1, markers
            flow_run_id = json.loads(markers[0].read_text())["record_id"]
            stage_processes = psutil.Process(run.pid).children(recursive=True)
            assert stage_processes, "the stage runs in processes of its own"

            os.kill(run.pid, signal.SIGTERM)
            stopped = time.monotonic()
            assert run.wait(timeout=120) == 143, log.read_text()[-5000:]
            took = time.monotonic() - stopped
        finally:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
    text = log.read_text()
    assert "what it had open is closed as stopped" in text, text[-3000:]  # the stage's own word, in the flow's log
    assert took < 60, f"the stop took {took:.0f} s"
    _, alive = psutil.wait_procs(stage_processes, timeout=5)
    assert not alive, f"left running: {[p.pid for p in alive]}"
    ended = client.get_run(mlflow_run)
    left_open = {path.name: path.read_text() for path in (project / ".conveyor/open").glob("*.json")}
    said = f"tags {ended.data.tags}; left open {left_open}; the run's output:\n{text[-4000:]}"
    assert ended.info.status == "KILLED" and ended.info.end_time is not None, said
    assert "stopped by SIGTERM" in ended.data.tags["conveyor.ended_by"], said
    assert flow_run_state(prefect_server, flow_run_id) == "CANCELLED"
    assert not list((project / ".conveyor/open").glob("*.json"))


def test_flow_code_is_importable_without_prefect_server() -> None:
    """The flow module imports cleanly (the deployment's entrypoint is loaded by file path by the worker)."""
    result = subprocess.run(
        [sys.executable, "-c", "import flows.training, flows.deploy"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=base_env(),
    )
    assert result.returncode == 0, result.stderr
    assert (VENV_BIN / "prefect").exists()


def test_flow_parameters_are_checked_when_a_run_starts() -> None:
    """Prefect checks them against the signature before the flow's body runs (a deployment's schema carries them
    too). A reason too long for the registry's history was refused at promotion, after the whole training; the
    monitoring flow took hours <= 0 (a Completed run that checked nothing) and last=-5 (the window's first 5 records
    dropped)."""
    from prefect.exceptions import ParameterTypeError

    from conveyor.tracking import MAX_REASON
    from flows.drift_check import monitoring_flow
    from flows.training import training_flow

    refused: dict[Any, list[dict[str, Any]]] = {
        training_flow: [{"reason": "x" * (MAX_REASON + 1)}, {"reason": ""}],
        monitoring_flow: [{"hours": 0}, {"hours": -3}, {"hours": float("inf")}, {"last": 0}, {"last": -5}],
    }
    for flow, cases in refused.items():
        for parameters in cases:
            with pytest.raises(ParameterTypeError):
                flow.validate_parameters(parameters)
    assert training_flow.validate_parameters({"reason": "new camera on line 7"})["reason"] == "new camera on line 7"
    assert monitoring_flow.validate_parameters({"hours": 0.5, "last": 40}) == {
        "project_dir": None,
        "hours": 0.5,
        "last": 40,
        "devices": None,
    }
