"""The monitoring loop end to end, against a real MLflow server, a real Prefect server with a worker, and the real
server (`conveyor serve`): `conveyor demo drift`'s steps, with assertions on what each left behind.

v1 is Conveyor's demo checkpoint registered without a profile (an "old version"): the check refuses with a clear
message, `conveyor profile --model 1` computes the profile on the data it was trained on. Then the control
(traffic like the training data: no drift, no event, no retraining), the shifted traffic (drift, an event, the
automation's retraining with reason=drift through every gate, a new champion, a hot swap), and the same shifted
traffic again (no drift against the new version's profile). The scheduled deployments that `conveyor deploy`
declares are checked here too, and the retraining is the run through a worker.
"""

from __future__ import annotations

import inspect
import subprocess
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient
from rich.console import Console

from conveyor.paths import ProjectPaths
from conveyor.settings import load_settings
from monitoring import alerts, drift
from pipelines import registry
from tests.conftest import make_project
from tests.flow_support import RARE_CRON, conveyor, flow_params, servers_env
from tests.monitoring_support import drifted, estimated, register_old_version

pytestmark = pytest.mark.slow


def drift_params(name: str, pool: str) -> dict[str, Any]:
    params = flow_params(name)
    params["synth"]["counts"] = {"train": 32, "val": 8, "test": 16}
    params["monitor"].update({"min_samples": 20, "experiment": f"monitoring-{name}"})
    params["serve"] = {"poll_seconds": 2, "prediction_log": {"flush_seconds": 1}}
    params["orchestration"] = {
        "work_pool": pool,
        "worker_poll_seconds": 2,
        "cron": "15 4 * * 2",
        "on_overlap": "reject",
    }
    return params


def test_drift_is_detected_retrained_promoted_and_swapped(
    tmp_path: Path, mlflow_server: str, prefect_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.automations import Automation
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, DeploymentFilter, DeploymentFilterName
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from stack.drift_demo import DemoSizes, run_demo

    name = f"drift-{uuid.uuid4().hex[:8]}"
    pool = f"pool-{uuid.uuid4().hex[:6]}"
    project = make_project(tmp_path / "project", drift_params(name, pool))
    env = servers_env(mlflow_server, prefect_server)
    conveyor(project, env, "data", "synth")
    subprocess.run(["git", "add", "-A"], cwd=project, check=True)
    subprocess.run(["git", "commit", "-qm", "data"], cwd=project, check=True)
    client = MlflowClient(mlflow_server)
    register_old_version(client, name, project, tmp_path / "export")

    # An old version has no profile: the check says so and how to make one; then it is made on demand.
    refused = conveyor(project, env, "drift", "--source", str(project / "data/images/test"), check=False)
    assert refused.returncode == 1
    # Expected errors go to stderr, as every command's do (conveyor.cli.common.friendly_errors).
    assert "has no reference profile" in refused.stderr and "conveyor profile --model 1" in refused.stderr
    # It is profiled on the validated images of its data (the manifest the train stage reads, not every file in data/).
    missing = conveyor(project, env, "profile", "--model", "1", check=False)
    assert missing.returncode == 1 and "run the validate stage first (`conveyor validate`)" in missing.stderr
    conveyor(project, env, "validate")
    conveyor(project, env, "profile", "--model", "1")
    # A folder of images is no device's traffic: checked, but no gauges (a `device="folder"` series stayed on the
    # server's /metrics for good).
    conveyor(project, env, "drift", "--source", str(project / "data/images/test"))
    assert not (project / ".conveyor/monitoring/gauges").exists()
    assert "monitoring/profile/profile.parquet" in {
        a.path for a in client.list_artifacts(str(client.get_model_version(name, "1").run_id), "monitoring/profile")
    }

    for key, value in {"MLFLOW_TRACKING_URI": mlflow_server, "PREFECT_API_URL": prefect_server}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(project)
    paths = ProjectPaths(project)
    sizes = DemoSizes(batch={"train": 24, "val": 8, "test": 8}, traffic=40, timeout_s=900)
    result = run_demo(paths, load_settings(paths.params), Console(width=160), sizes, open_browser=False)

    assert [p.name for p in result.phases] == [
        "champion",
        "deploy",
        "control traffic",
        "control check",
        "new camera traffic",
        "new camera check",
        "shifted traffic",
        "data add",
        "drift check",
        "retraining",
        "no retraining",
        "hot swap",
        "shifted traffic again",
        "check after retraining",
    ]
    control = result.phase("control check").details
    assert control["status"] == "no drift" and not control["alert"], control["message"]
    # The new camera: the inputs drifted (the frames' size), the estimate says the model is not hurt: an alert that
    # retrains nothing.
    camera = result.phase("new camera check").details
    assert camera["status"] == "drift" and camera["alert"] and camera["alert_action"] == "alert", camera["message"]
    assert "geometry" in camera["drifted_groups"] and "frames" in camera["message"]
    assert camera["estimate"]["cost_low"] < 0.03, camera["estimate"]
    found = result.phase("drift check").details
    assert found["status"] == "drift" and found["alert"] and found["alert_action"] == "retrain", found["message"]
    assert found["model_version"] == "1" and found["estimate"]["cost_low"] >= 0.03, found["estimate"]
    assert {"exposure & colour", "focus & noise"} <= set(found["drifted_groups"]), found["drifted_groups"]
    assert "exposure & colour: " in found["message"] and "focus & noise: " in found["message"]  # each in words
    assert any(line.startswith("conveyor_drift_detected{") and line.endswith(" 1.0") for line in found["gauges"])
    assert any(line.startswith("conveyor_drift_retrain{") and line.endswith(" 1.0") for line in found["gauges"])
    emitted = client.search_runs(
        [client.get_experiment_by_name(f"monitoring-{name}").experiment_id],  # type: ignore[union-attr]
        filter_string="tags.`conveyor.drift.alert` = 'emitted'",
        order_by=["attributes.start_time ASC"],
    )
    assert [r.data.tags["conveyor.drift.action"] for r in emitted] == ["alert", "retrain"]
    assert {r.data.tags["conveyor.model_version"] for r in emitted} == {"1"}
    check_run = emitted[-1]
    assert float(check_run.data.metrics["estimate/cost_low"]) >= 0.03
    assert "drift/report.html" in {a.path for a in client.list_artifacts(check_run.info.run_id, "drift")}

    retraining = result.phase("retraining").details
    assert retraining["parameters"]["reason"] == "drift" and retraining["parameters"]["warm_start"] == "champion"
    # The automation passed its event (a template it renders): the next checks read this run's end by it.
    assert retraining["parameters"]["drift_event"] == check_run.data.tags[alerts.EVENT_TAG]
    assert result.phase("no retraining").outcome.startswith("the automation ignored the alert-only event")
    champion = registry.current_champion(client, name)
    assert champion is not None and str(champion.version) == retraining["version"] == "2"
    assert registry.gates_passed(champion)
    assert client.get_model_version(name, "2").tags["conveyor.prefect_flow_run_id"] == retraining["flow_run"]
    after = result.phase("check after retraining").details
    assert after["model_version"] == "2" and after["status"] == "no drift", after["message"]
    assert after["reference_batch"].startswith("add-")  # the conditions the retraining learned
    assert result.report is not None and result.report.is_file()
    # The same check by hand, as a person would run it: one table, the verdict, where the report is.
    by_hand = conveyor(project, {**env, "COLUMNS": "200"}, "drift", "--last", "40")
    assert f"{name} v2: no drift" in by_hand.stdout and "alert: no (no drift)" in by_hand.stdout
    assert "focus & noise" in by_hand.stdout and "performance (label-free)" in by_hand.stdout
    assert "report.html" in by_hand.stdout
    # v2's lineage names the check whose alert asked for it, and where its report is.
    lineage = conveyor(project, {**env, "COLUMNS": "300"}, "lineage", "2").stdout
    assert f"drift check {check_run.info.run_id} of server" in lineage, lineage
    assert f"runs:/{check_run.info.run_id}/drift/report.html" in lineage, lineage

    with temporary_settings(updates={PREFECT_API_URL: prefect_server}), get_client(sync_client=True) as prefect:
        training = prefect.read_deployment_by_name("conveyor-training/scheduled-training")
        assert [s.schedule.cron for s in training.schedules] == ["15 4 * * 2"]  # type: ignore[union-attr]
        assert training.work_pool_name == pool
        assert training.global_concurrency_limit is not None and training.global_concurrency_limit.limit == 1
        assert training.concurrency_options is not None
        assert training.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.CANCEL_NEW
        monitoring = prefect.read_deployment_by_name("conveyor-monitoring/drift-check")
        assert [s.schedule.cron for s in monitoring.schedules] == [RARE_CRON]  # type: ignore[union-attr]
        automation = Automation.read(name=f"conveyor: retrain {name} on drift")
        assert not inspect.isawaitable(automation)
        assert automation.trigger.expect == {"conveyor.drift.detected"}
        assert automation.trigger.match.model_dump().get("conveyor.drift.action") == "retrain"
        # The control and the alert-only event triggered nothing: one drift retraining in all, the one the shifted
        # traffic caused.
        runs = prefect.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["scheduled-training"]))
        )
        drift_runs = [r for r in runs if r.parameters.get("reason") == "drift" and r.work_pool_name == pool]
        assert [str(r.id) for r in drift_runs] == [retraining["flow_run"]]
        artifacts = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["conveyor-training-summary"]))
        )
        assert any(str(a.flow_run_id) == retraining["flow_run"] and "Gate report" in str(a.data) for a in artifacts)


def test_a_redeploy_removes_every_automation_of_its_name_and_a_drift_event_id_is_its_check(
    prefect_server: str,
) -> None:
    """Two deploys at once can each create the automation; re-deploying must remove both (Automation.read returns
    the first only, so one stayed for good and every drift event retrained twice). A retried emit must send the same
    event (its id is the check's), or Prefect counts one retraining per try."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.events.actions import DoNothing
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.deploy import remove_automation
    from monitoring.alerts import event_id

    name = f"conveyor: duplicated {uuid.uuid4().hex[:8]}"
    with temporary_settings({PREFECT_API_URL: prefect_server}):
        for _ in range(2):
            Automation(
                name=name,
                trigger=EventTrigger(expect={"x"}, posture=Posture.Reactive, threshold=1, within=timedelta(0)),
                actions=[DoNothing()],
            ).create()
        remove_automation(name)
        with pytest.raises(ValueError, match="not found"):
            Automation.read(name=name)  # type: ignore[unused-coroutine]  # sync context: the automation itself
    assert event_id("run-1") == event_id("run-1") != event_id("run-2")


def test_a_retraining_that_failed_holds_neither_the_cooldown_nor_the_deduplication(prefect_server: str) -> None:
    """A retrain alert whose retraining never retrained no longer holds the cooldown or the de-duplication: the next
    check asks again, saying why. Turned away by the training deployment's concurrency limit (on_overlap: reject; the
    state is Prefect's own, from its orchestration), Failed (the project's lock turned it away, or it broke), or
    Crashed. A retraining still running, one stopped on purpose, one Prefect has no run for, one that failed after it
    registered a version (its push refused by a full remote: a retraining every hour until the remote had room), and
    an alert-only alert hold as before; without Prefect to ask, every alert holds."""
    from datetime import UTC, datetime, timedelta

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy, ConcurrencyOptions, State
    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings
    from prefect.states import Cancelled, Completed, Crashed, Failed, Pending, Running

    from conveyor.net import free_port
    from conveyor.settings import MonitorSettings

    deployment = f"training-{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)

    def alert(hours_ago: float, event: str, action: str = "retrain") -> alerts.PastAlert:
        return alerts.PastAlert(now - timedelta(hours=hours_ago), "3", frozenset({drift.FOCUS}), action, event)

    history = [alert(1, "limit"), alert(1, "busy"), alert(2, "broken")]
    history += [alert(3, "running"), alert(4, "stopped"), alert(5, "lost"), alert(1, "only", "alert")]
    history += [alert(1, "registered")]
    # Checks that failed between sending their event and recording it: one a retraining answered, one none did.
    history += [replace(alert(2, "unrecorded-answered"), recorded=False), replace(alert(2, "unsent"), recorded=False)]
    with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
        with get_client(sync_client=True) as client:
            deployment_id = client.create_deployment(
                client.create_flow_from_name("conveyor-training"),
                deployment,
                concurrency_limit=1,  # as `conveyor deploy` makes it under on_overlap: reject
                concurrency_options=ConcurrencyOptions(collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
            )

            def run_for(event: str) -> Any:
                return client.create_flow_run_from_deployment(
                    deployment_id, parameters={"reason": "drift", "drift_event": event}
                )

            running = run_for("running")
            steps: list[State] = [Pending(), Running()]
            for step in steps:  # through Prefect's orchestration: the run takes the deployment's one slot
                taken = client.set_flow_run_state(running.id, step).state
                assert taken is not None and taken.type == step.type
            turned_away: State | None = client.set_flow_run_state(run_for("limit").id, Pending()).state
            assert turned_away is not None and turned_away.type.value == "CANCELLED"
            assert turned_away.message == alerts.TURNED_AWAY  # Prefect's own words, which the check reads
            ends: dict[str, State] = {
                "busy": Failed(message="another training run is in progress (orchestration.on_overlap: reject)"),
                "broken": Crashed(),
                "stopped": Cancelled(message="stopped by SIGTERM in stage train"),
                "only": Failed(),  # not a retrain alert's: never asked about
                "registered": Failed(message="DVC remote 'team' is full"),
                "unrecorded-answered": Completed(),
            }
            flow_runs = {}
            for event, state in ends.items():
                flow_runs[event] = str(run_for(event).id)
                client.set_flow_run_state(flow_runs[event], state, force=True)
        failed = alerts.failed_retrainings(history, deployment, lambda run_id: run_id == flow_runs["registered"])
    assert failed == {
        "limit": "turned away (the training deployment's concurrency limit)",
        "busy": "failed",
        "broken": "crashed",
        "unsent": alerts.NEVER_RECORDED,
    }
    kept, note = alerts.without_failed_retrainings(history, failed)
    assert [a.event_id for a in kept] == ["running", "stopped", "lost", "only", "registered", "unrecorded-answered"]
    assert "ended turned away" in note and "ended failed" in note and "ended crashed" in note

    policy = MonitorSettings(cooldown_hours=6, dedupe_hours=24)
    found, cost = drifted(drift.FOCUS), estimated(0.1)
    never = history[:3]
    assert alerts.decide(found, "3", never, [], cost, policy, now).reason.startswith("cooldown")
    asked_again = alerts.decide(found, "3", alerts.without_failed_retrainings(never, failed)[0], [], cost, policy, now)
    assert asked_again.alert and asked_again.action == "retrain"
    earlier = [alert(10, "busy")]  # past the cooldown, within the de-duplication: same version, groups and action
    assert alerts.decide(found, "3", earlier, [], cost, policy, now).reason.startswith("duplicate")
    assert alerts.decide(found, "3", alerts.without_failed_retrainings(earlier, failed)[0], [], cost, policy, now).alert
    for holding in (alert(3, "running"), alert(4, "stopped"), alert(5, "lost")):
        held = alerts.without_failed_retrainings([holding], failed)[0]
        assert not alerts.decide(found, "3", held, [], cost, policy, now).alert

    unsent = {"unrecorded-answered": alerts.NEVER_RECORDED, "unsent": alerts.NEVER_RECORDED}
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert alerts.failed_retrainings(history, deployment) == unsent  # no Prefect: every recorded alert holds
    nobody = f"http://127.0.0.1:{free_port()}/api"
    with temporary_settings(updates={PREFECT_API_URL: nobody, PREFECT_CLIENT_MAX_RETRIES: 0}):
        assert alerts.failed_retrainings(history, deployment) == unsent  # Prefect does not answer: the same
