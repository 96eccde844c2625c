"""Registry rules against a real MLflow server: aliases, gated promotion, forced promotion, rollback, history."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from conveyor.paths import ProjectPaths
from conveyor.settings import load_settings
from pipelines import registry
from pipelines.registry import AliasMove, PromotionRefusedError, rollback_target


@pytest.fixture
def client(mlflow_server: str) -> MlflowClient:
    return MlflowClient(mlflow_server)


@pytest.fixture
def name() -> str:
    return f"model-{uuid.uuid4().hex[:8]}"


def new_version(client: MlflowClient, name: str, *, passed: bool, run_id: str | None = None) -> str:
    """A registry version the way the flow makes one (a logged model from a run), gate tags included."""
    experiment = client.get_experiment_by_name("registry-tests")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("registry-tests")
    run = client.get_run(run_id) if run_id else client.create_run(experiment_id)
    logged = client.create_logged_model(experiment_id=experiment_id, name="model", source_run_id=run.info.run_id)
    registry.ensure_registered_model(client, name)
    version = client.create_model_version(
        name,
        source=f"models:/{logged.model_id}",
        run_id=run.info.run_id,
        model_id=logged.model_id,
        tags={"conveyor.gates.passed": str(passed).lower(), "conveyor.gates.failed": "-" if passed else "mAP50-95"},
    )
    return str(version.version)


def test_gated_promotion_and_history(client: MlflowClient, name: str) -> None:
    v1 = new_version(client, name, passed=True)
    move = registry.promote(client, name, v1, reason="first model", actor="prefect:flow-run/abc")
    assert (move.from_version, move.to_version, move.kind) == (None, v1, "promote")
    champion = registry.current_champion(client, name)
    assert champion is not None and str(champion.version) == v1
    [recorded] = registry.history(client, name)
    assert recorded == move and recorded.actor == "prefect:flow-run/abc" and recorded.reason == "first model"


def test_a_version_is_found_by_the_flow_run_that_registered_it(client: MlflowClient, name: str) -> None:
    """The drift check asks it of a retraining whose run failed after registering (its push): it retrained."""
    from conveyor.tracking import FLOW_RUN_TAG

    version = new_version(client, name, passed=True)
    client.set_model_version_tag(name, version, FLOW_RUN_TAG, "flow-run-a")
    new_version(client, name, passed=True)  # another run's
    assert registry.registered_by_flow_run(client, name, "flow-run-a")
    assert not registry.registered_by_flow_run(client, name, "flow-run-b")
    assert not registry.registered_by_flow_run(client, f"{name}-other", "flow-run-a")


def test_failed_gates_refuse_promotion_unless_forced(client: MlflowClient, name: str) -> None:
    v1 = new_version(client, name, passed=True)
    registry.promote(client, name, v1, reason="good")
    v2 = new_version(client, name, passed=False)
    with pytest.raises(PromotionRefusedError, match=r"did not pass its gates \(mAP50-95\)"):
        registry.promote(client, name, v2, reason="I insist")
    assert str(registry.current_champion(client, name).version) == v1  # type: ignore[union-attr]
    move = registry.promote(client, name, v2, reason="hotfix for line 3", force=True, actor="user:alice")
    assert move.kind == "force" and move.from_version == v1
    assert registry.history(client, name)[-1].reason == "hotfix for line 3"
    # A version registered by hand (no gate tags at all) has passed nothing: refused as "not gated", forced only.
    experiment = client.get_experiment_by_name("registry-tests")
    assert experiment is not None
    run = client.create_run(experiment.experiment_id)
    logged = client.create_logged_model(
        experiment_id=experiment.experiment_id, name="model", source_run_id=run.info.run_id
    )
    registered = client.create_model_version(
        name, source=f"models:/{logged.model_id}", run_id=run.info.run_id, model_id=logged.model_id
    )
    by_hand = str(registered.version)
    with pytest.raises(PromotionRefusedError, match=r"did not pass its gates \(not gated\)"):
        registry.promote(client, name, by_hand, reason="it looks fine")
    assert str(registry.current_champion(client, name).version) == v2  # type: ignore[union-attr]


def test_a_reference_to_a_missing_version_is_not_a_server_that_is_down(
    client: MlflowClient, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that did not answer read "has no version 3", and sent people looking for a version that was there."""
    from conveyor.net import free_port

    new_version(client, name, passed=True)
    with pytest.raises(registry.ModelRefError, match="has no version 7"):
        registry.resolve(client, name, "7")
    for ref in ("@", "v", "1.5"):  # "@" said "has no version None"
        with pytest.raises(registry.ModelRefError, match=f"'{re.escape(ref)}' is not models:/NAME@alias"):
            registry.resolve(client, name, ref)
    assert registry.resolve(client, name, f"models:/{name}/1").version == "1"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    down = MlflowClient(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(MlflowException, match="Connection refused") as raised:
        registry.resolve(down, name, "1")
    assert not isinstance(raised.value, registry.ModelRefError)


def test_promotion_needs_a_reason_and_a_version(client: MlflowClient, name: str) -> None:
    v1 = new_version(client, name, passed=True)
    with pytest.raises(PromotionRefusedError, match="needs a reason"):
        registry.promote(client, name, v1, reason="  ")
    with pytest.raises(PromotionRefusedError, match="--reason is 120000 characters; at most 1000"):
        registry.promote(client, name, v1, reason="x" * 120_000)  # MLflow's "exceeds the maximum length" traceback
    with pytest.raises(PromotionRefusedError, match="at most 1000"):
        registry.rollback(client, name, reason="x" * 1001)
    with pytest.raises(PromotionRefusedError, match="has no version 99"):
        registry.promote(client, name, "99", reason="typo")
    with pytest.raises(PromotionRefusedError, match="'v' is not a version number"):  # said "has no version "
        registry.promote(client, name, "v", reason="typo")
    registry.promote(client, name, v1, reason="ok")
    with pytest.raises(PromotionRefusedError, match="already the champion"):
        registry.promote(client, name, v1, reason="again")


def test_rollback_walks_back_and_records_every_move(client: MlflowClient, name: str) -> None:
    v1, v2, v3 = (new_version(client, name, passed=True) for _ in range(3))
    for version in (v1, v2, v3):
        registry.promote(client, name, version, reason=f"promote {version}")
    first = registry.rollback(client, name, reason="v3 misses dents on line 2")
    assert (first.from_version, first.to_version, first.kind) == (v3, v2, "rollback")
    second = registry.rollback(client, name, reason="v2 too")
    assert (second.from_version, second.to_version) == (v2, v1)
    with pytest.raises(PromotionRefusedError, match="no earlier champion"):
        registry.rollback(client, name, reason="nothing left")
    champion_moves = [(m.from_version, m.to_version, m.kind) for m in registry.history(client, name)]
    assert champion_moves == [
        (None, v1, "promote"),
        (v1, v2, "promote"),
        (v2, v3, "promote"),
        (v3, v2, "rollback"),
        (v2, v1, "rollback"),
    ]


def test_a_rollback_the_edge_line_cannot_follow_moves_nothing(client: MlflowClient, name: str, tmp_path: Path) -> None:
    """`conveyor rollback` with an edge channel: a line that never ran the target refuses the rollback before the
    alias moves (it moved first, then said the channel had not, and the two disagreed)."""
    from serving import bundle

    v1, v2 = (new_version(client, name, passed=True) for _ in range(2))
    for version in (v1, v2):
        registry.promote(client, name, version, reason=f"promote {version}")
    channel = tmp_path / "channel"
    channel.mkdir()

    def line_follows(target: str) -> None:
        bundle.last_run_of(str(channel), "line-1", target)

    with pytest.raises(bundle.ChannelError, match=f"never ran v{v1}"):
        registry.rollback(client, name, reason="v2 misses dents", before_move=line_follows)
    champion = registry.current_champion(client, name)
    assert champion is not None and str(champion.version) == v2
    assert [m.kind for m in registry.history(client, name)] == ["promote", "promote"]


def test_a_promotion_made_while_another_moves_the_champion_is_withdrawn_and_both_stay_true(
    client: MlflowClient, name: str
) -> None:
    """Two promotions at once read the same history, picked the same sequence number, and one record overwrote the
    other: v3's promotion vanished, and v2's said it replaced v1. Here a second promotion lands (through the real
    server) right after the first recorded its move: the first is withdrawn, and the history holds v3's, true."""
    v1, v2, v3 = (new_version(client, name, passed=True) for _ in range(3))
    registry.promote(client, name, v1, reason="first")

    class Racing(MlflowClient):
        raced = False

        def set_registered_model_tag(self, model: str, key: str, value: str) -> None:
            super().set_registered_model_tag(model, key, value)
            if '"pending": true' in value and not Racing.raced:
                Racing.raced = True
                registry.promote(client, name, v3, reason="the other promotion")

    with pytest.raises(registry.ConcurrentMoveError, match=rf"moved to v{v3} by another promotion"):
        registry.promote(Racing(client.tracking_uri), name, v2, reason="this one")
    champion = registry.current_champion(client, name)
    assert champion is not None and str(champion.version) == v3
    moves = [(m.from_version, m.to_version) for m in registry.history(client, name)]
    assert moves == [(None, v1), (v1, v3)]
    assert not [
        k
        for k in client.get_registered_model(name).tags
        if '"pending": true' in client.get_registered_model(name).tags[k]
    ]
    # A decision against a champion that is no longer it, and versions typed another way.
    with pytest.raises(registry.ConcurrentMoveError, match=f"is v{v3}, not v{v1} as decided"):
        registry.promote(client, name, v2, reason="gated against v1", expected_champion=v1)
    assert registry.promote(client, name, f"0{v2}", reason="leading zero").to_version == v2
    with pytest.raises(PromotionRefusedError, match="is not a version number"):
        registry.promote(client, name, "３", reason="a full-width digit")


def test_a_promotion_by_hand_is_refused_when_the_champion_moves_after_its_checks(
    client: MlflowClient, name: str
) -> None:
    """`conveyor promote 2` read v1 as the champion (v2 was gated against it), a flow promoted v3 before the alias
    moved, and v2 went in over v3 as a plain promotion: the champion it was checked against is expected now."""
    v1, v2, v3 = (new_version(client, name, passed=True) for _ in range(3))
    registry.promote(client, name, v1, reason="first")
    client.set_model_version_tag(name, v2, registry.GATED_AGAINST, v1)

    class Racing(MlflowClient):
        reads = 0

        def get_model_version_by_alias(self, model: str, alias: str) -> Any:
            found = super().get_model_version_by_alias(model, alias)
            Racing.reads += 1
            if Racing.reads == 1:  # right after promote's own checks read the champion
                registry.promote(client, name, v3, reason="the flow's promotion")
            return found

    with pytest.raises(registry.ConcurrentMoveError, match=rf"is v{v3}, not v{v1}"):
        registry.promote(Racing(client.tracking_uri), name, v2, reason="by hand")
    champion = registry.current_champion(client, name)
    assert champion is not None and str(champion.version) == v3


def test_a_champion_without_its_weights_is_named_not_a_download_error(
    client: MlflowClient, name: str, tmp_path: Path
) -> None:
    """The gate re-scores the champion from its run's weights: a run without them was MLflow's "failed to download
    artifacts" (a crash of the gate stage, read like a server that is down); a version without a run the same."""
    v1 = new_version(client, name, passed=True)
    with pytest.raises(FileNotFoundError, match=rf"{name} v{v1}'s MLflow run \w+ has no weights/best.pt"):
        registry.download_weights(client, client.get_model_version(name, v1), tmp_path)
    by_hand = client.create_model_version(name, source="s3://models/by-hand", run_id=None)  # registered by hand
    with pytest.raises(FileNotFoundError, match="has no MLflow run to take its weights from"):
        registry.download_weights(client, by_hand, tmp_path)


def test_a_version_whose_run_was_garbage_collected_is_named_not_a_traceback(
    client: MlflowClient, name: str, tmp_path: Path
) -> None:
    """A run deleted in the MLflow UI and removed by `mlflow gc` (as a team's clean-up does) takes the version's
    lineage and run record with it: `conveyor lineage` and `--restore` were MLflow's RESOURCE_DOES_NOT_EXIST
    traceback. Real `mlflow gc` on the session server's store."""
    from pipelines.lineage_report import RunRecordError, lineage, restore_run_record
    from tests.conftest import MLFLOW_STORES

    v1 = new_version(client, name, passed=True)
    version = client.get_model_version(name, v1)
    client.delete_run(str(version.run_id))
    store = MLFLOW_STORES[client.tracking_uri]
    gc = subprocess.run(
        [sys.executable, "-m", "mlflow", "gc", "--backend-store-uri", f"sqlite:///{store}/mlflow.db",
         "--tracking-uri", client.tracking_uri, "--run-ids", str(version.run_id)],
        check=False, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert gc.returncode == 0, gc.stderr[-3000:]
    gone = rf"{name} v{v1}: its MLflow run {version.run_id} no longer exists \(deleted, then removed by `mlflow gc`\)"
    with pytest.raises(registry.ModelRefError, match=gone + ", and its lineage with it"):
        lineage(client, ProjectPaths(tmp_path), name, v1)
    with pytest.raises(RunRecordError, match=gone + ", and its run record with it"):
        restore_run_record(client, ProjectPaths(tmp_path), name, v1)


def test_lineage_names_the_commit_of_stages_that_ran_after_the_training(
    client: MlflowClient, name: str, tmp_path: Path
) -> None:
    """Export fixed and run again into a trained run (a new commit; train does not re-run): lineage named only the
    training's commit, clean, for files the later code made. Each stage's commit is a tag of the run, copied to the
    version its files became."""
    from conveyor.tracking import STAGE_COMMIT_TAG
    from pipelines.lineage_report import lineage

    v1 = new_version(client, name, passed=True)
    run_id = str(client.get_model_version(name, v1).run_id)
    for stage, commit in (("train", "aaa111"), ("evaluate", "aaa111"), ("export", "bbb222"), ("gate", "bbb222")):
        client.set_model_version_tag(name, v1, STAGE_COMMIT_TAG.format(stage), commit)
    client.set_tag(run_id, "conveyor.git_commit", "aaa111")
    rows = dict(lineage(client, ProjectPaths(tmp_path), name, v1).rows)
    assert rows["git commit"] == "aaa111" and rows["later stages' commit"] == "export, gate at bbb222"
    client.set_model_version_tag(name, v1, STAGE_COMMIT_TAG.format("export"), "aaa111")
    client.set_model_version_tag(name, v1, STAGE_COMMIT_TAG.format("gate"), "aaa111")
    assert dict(lineage(client, ProjectPaths(tmp_path), name, v1).rows)["later stages' commit"] == "same as training"


def test_a_deleted_experiment_is_named_not_a_traceback(client: MlflowClient, tmp_path: Path) -> None:
    """Deleted in the MLflow UI, the experiment keeps its name, and creating a run in it was MLflow's traceback ("must
    be in the 'active' state")."""
    from conveyor.tracking import TrackingUnavailableError, ensure_experiment

    experiment = f"deleted-{uuid.uuid4().hex[:8]}"
    experiment_id = client.create_experiment(experiment)
    client.delete_experiment(experiment_id)
    with pytest.raises(TrackingUnavailableError, match=rf"experiment '{experiment}' was deleted: restore it"):
        ensure_experiment(client, ProjectPaths(tmp_path), experiment)


def test_a_version_gated_against_another_champion_needs_force_by_hand(client: MlflowClient, name: str) -> None:
    """v3 passed its gates against v1; v2 became champion since. `conveyor promote 3` made it champion as a plain
    promotion, over a v2 it was never compared with."""
    v1, v2, v3 = (new_version(client, name, passed=True) for _ in range(3))
    registry.promote(client, name, v1, reason="first")
    client.set_model_version_tag(name, v3, registry.GATED_AGAINST, v1)
    client.set_model_version_tag(name, v2, registry.GATED_AGAINST, v1)
    registry.promote(client, name, v2, reason="gated against the champion it replaces")
    with pytest.raises(PromotionRefusedError, match=rf"passed its gates against v{v1}, but the champion is now v{v2}"):
        registry.promote(client, name, v3, reason="by hand")
    champion = registry.current_champion(client, name)
    assert champion is not None and str(champion.version) == v2
    assert registry.promote(client, name, v3, reason="we know", force=True).kind == "force"


def test_a_move_killed_after_the_alias_moved_stays_in_the_history_when_the_alias_moves_again(
    client: MlflowClient, name: str
) -> None:
    """v3's promotion killed after the alias moved, before the move was confirmed: it counted only while the alias
    stayed on v3. Promoting v4 then erased it, and the rollback from v4 went to v2."""
    v1, v2, v3, v4 = (new_version(client, name, passed=True) for _ in range(4))
    registry.promote(client, name, v1, reason="first")
    registry.promote(client, name, v2, reason="second")
    killed = registry.AliasMove(3, registry.CHAMPION, v2, v3, "2026-12-07T10:00:00+0000", "promote", "third", "test")
    client.set_registered_model_tag(name, *replace(killed, pending=True).to_tag())  # the move, as recorded first
    client.set_registered_model_alias(name, registry.CHAMPION, v3)  # the alias moved; then the kill
    registry.promote(client, name, v4, reason="fourth")
    assert [m.to_version for m in registry.history(client, name)] == [v1, v2, v3, v4]
    assert registry.rollback(client, name, reason="v4 misses dents").to_version == v3


def test_a_rollback_skips_a_version_deleted_from_the_registry(client: MlflowClient, name: str) -> None:
    """v2 deleted in the MLflow UI: the rollback from v3 was MLflow's traceback, and the champion stayed v3."""
    v1, v2, v3 = (new_version(client, name, passed=True) for _ in range(3))
    for version in (v1, v2, v3):
        registry.promote(client, name, version, reason=f"promote {version}")
    client.delete_model_version(name, v2)
    assert registry.rollback(client, name, reason="v3 misses dents").to_version == v1


def test_rollback_without_champion(client: MlflowClient, name: str) -> None:
    new_version(client, name, passed=True)
    with pytest.raises(PromotionRefusedError, match="no earlier champion"):
        registry.rollback(client, name, reason="why not")


def test_a_run_record_is_restored_whole_or_refused_with_nothing_written(
    client: MlflowClient, name: str, tmp_path: Path
) -> None:
    """The record of a version's run comes back file for file. A version without one, and a checkout whose files
    would be replaced without anything else keeping them (outside git), are refused by name and left as they were."""
    from pipelines.lineage_report import RunRecordError, log_run_record, restore_run_record

    ran = tmp_path / "ran"
    (ran / "metrics").mkdir(parents=True)
    for relative, text in {
        "dvc.lock": "schema: '2.0'\n",
        "params.yaml": "train:\n  epochs: 3\n",
        "data.dvc": "outs:\n- md5: ab.dir\n  path: data\n",
        "metrics/evaluate.json": '{"mAP50-95": 0.5}',
    }.items():
        (ran / relative).write_text(text)
    without = new_version(client, name, passed=True)
    with pytest.raises(RunRecordError, match=f"v{without} .*has no run record"):
        restore_run_record(client, ProjectPaths(tmp_path / "elsewhere"), name, without)

    version = new_version(client, name, passed=True)
    run_id = str(client.get_model_version(name, version).run_id)
    assert [str(f) for f in log_run_record(client, run_id, ran)] == [
        "dvc.lock", "params.yaml", "data.dvc", "metrics/evaluate.json"
    ]  # fmt: skip
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    _, files = restore_run_record(client, ProjectPaths(fresh), name, version)
    assert sorted(str(f) for f in files) == ["data.dvc", "dvc.lock", "metrics/evaluate.json", "params.yaml"]
    assert all((fresh / f).read_text() == (ran / f).read_text() for f in files)

    (fresh / "params.yaml").write_text("train:\n  epochs: 9\n")  # not in git: nothing else keeps it
    with pytest.raises(RunRecordError, match="uncommitted changes"):
        restore_run_record(client, ProjectPaths(fresh), name, version)
    assert (fresh / "params.yaml").read_text() == "train:\n  epochs: 9\n"
    restore_run_record(client, ProjectPaths(fresh), name, version, force=True)
    assert (fresh / "params.yaml").read_text() == (ran / "params.yaml").read_text()


def _move(seq: int, frm: str | None, to: str, kind: str = "promote") -> AliasMove:
    return AliasMove(seq, registry.CHAMPION, frm, to, "t", kind, "r", "a")


def test_rollback_target_never_returns_to_a_rolled_back_version() -> None:
    moves = [_move(1, None, "1"), _move(2, "1", "2"), _move(3, "2", "1", "rollback"), _move(4, "1", "3")]
    assert rollback_target(moves, "3") == "1"  # v2 was rolled back from: skipped
    assert rollback_target(moves, "1") is None
    assert rollback_target([], None) is None
    challenger_only = [AliasMove(1, registry.CHALLENGER, None, "1", "t", "register", "r", "a")]
    assert rollback_target(challenger_only, None) is None


def test_rollback_returns_to_the_previous_champion_after_a_re_promotion() -> None:
    # v1, v2, then v1 promoted again by hand: the champion before it is v2 (was "no earlier champion").
    assert rollback_target([_move(1, None, "1"), _move(2, "1", "2"), _move(3, "2", "1")], "1") == "2"
    # v1, v2, v3, then v2 forced back in: the previous champion is v3 (was v1, the first champion before v2).
    forced = [_move(1, None, "1"), _move(2, "1", "2"), _move(3, "2", "3"), _move(4, "3", "2", "force")]
    assert rollback_target(forced, "2") == "3"
    # Rolled back twice, to the first champion: nothing earlier is left.
    twice = [*forced[:3], _move(4, "3", "2", "rollback"), _move(5, "2", "1", "rollback")]
    assert rollback_target(twice, "1") is None
    # v2 rolled back from, fixed and promoted again, then v3: a rollback from v3 goes to v2, not to the older v1.
    again = [_move(1, None, "1"), _move(2, "1", "2"), _move(3, "2", "1", "rollback"), _move(4, "1", "2")]
    assert rollback_target([*again, _move(5, "2", "3")], "3") == "2"


class Killed(BaseException):
    """What the process dying looks like to the code under test: nothing catches it, nothing after it runs."""


class DyingClient:
    """An MlflowClient whose process dies just before its Nth write to the server (a simulated kill: a real SIGKILL
    cannot be aimed between two given REST calls). Reads pass through."""

    WRITES = ("create_", "set_", "update_", "delete_", "log_", "transition_")

    def __init__(self, client: MlflowClient, writes_before_death: int) -> None:
        self._client = client
        self._left = writes_before_death
        self.tracking_uri = client.tracking_uri

    def __getattr__(self, attr: str) -> Any:
        target = getattr(self._client, attr)
        if not attr.startswith(self.WRITES):
            return target

        def write(*args: Any, **kwargs: Any) -> Any:
            if self._left == 0:
                raise Killed(attr)
            self._left -= 1
            return target(*args, **kwargs)

        return write


@pytest.mark.parametrize("passed", [True, False], ids=["gates-passed", "gates-failed"])
def test_a_kill_anywhere_between_registration_and_promotion_leaves_the_registry_consistent(
    client: MlflowClient, name: str, project: Path, monkeypatch: pytest.MonkeyPatch, passed: bool
) -> None:
    """Kill the registry step before each of its writes in turn; the next run must carry on to the same end as an
    uninterrupted one: one version for the run, alias challenger on it, the champion moved only if the gates passed,
    every alias where its last recorded move says, nothing pending, no move recorded twice."""
    from conveyor.settings import load_settings
    from pipelines import promotion
    from pipelines.gate import GateReport

    (project / "data.dvc").write_text("outs:\n- md5: 0123456789abcdef0123456789abcdef.dir\n  path: data\n")
    paths = ProjectPaths(project)
    base = load_settings(paths.params)

    # promotion.log_model_version makes the same two writes through the client, with mlflow.pyfunc.log_model between
    # them: that one writes the run's artifacts through MLflow's fluent API (no kill point of DyingClient's, and
    # seconds for each of this loop's versions). The flow tests run the real one.
    def log_version(client: Any, model: str, run_id: str, artifacts: dict[str, str], tags: dict[str, str]) -> Any:
        run = client.get_run(run_id)
        logged = client.create_logged_model(experiment_id=run.info.experiment_id, name="model", source_run_id=run_id)
        return client.create_model_version(
            model, source=f"models:/{logged.model_id}", run_id=run_id, tags=tags, model_id=logged.model_id
        )

    monkeypatch.setattr(promotion, "_serving_bundle", lambda *args: {})
    monkeypatch.setattr(promotion, "log_model_version", log_version)

    def step(with_client: Any, settings: Any, run_id: str, report: GateReport) -> promotion.PromotionOutcome:
        version, new = promotion.register(paths, settings, with_client, run_id, report, None, "user:test")
        return promotion.decide(with_client, settings, version, new, report, "user:test", "test")

    writes = 0
    while True:
        model = f"{name}-{writes}"
        settings = base.model_copy(update={"registry": base.registry.model_copy(update={"model_name": model})})
        champion = new_version(client, model, passed=True)
        registry.promote(client, model, champion, reason="the line's current model", actor="user:test")
        experiment = client.get_experiment_by_name("registry-tests")
        assert experiment is not None
        run_id = client.create_run(experiment.experiment_id).info.run_id
        report = GateReport(passed=passed, challenger_run_id=run_id, champion_version=champion)

        try:
            step(DyingClient(client, writes), settings, run_id, report)
            finished = True
        except Killed:
            finished = False
        outcome = step(client, settings, run_id, report)  # the next run

        [version] = [v for v in registry.versions(client, model) if v.run_id == run_id]
        number = str(version.version)
        assert outcome.version == number
        aliases = client.get_registered_model(model).aliases
        assert str(aliases[registry.CHALLENGER]) == number
        assert str(aliases[registry.CHAMPION]) == (number if passed else champion), f"killed before write {writes}"
        moves = registry.history(client, model)
        assert not any(m.pending for m in moves)
        assert [m.seq for m in moves] == list(range(1, len(moves) + 1))
        for alias in (registry.CHALLENGER, registry.CHAMPION):
            assert [m for m in moves if m.alias == alias][-1].to_version == str(aliases[alias])
        to_new = [(m.alias, m.kind) for m in moves if m.to_version == number]
        assert to_new == [(registry.CHALLENGER, "register")] + ([(registry.CHAMPION, "promote")] if passed else [])
        decided = client.get_model_version(model, number).tags
        assert decided[promotion.DECISION] == ("promoted" if passed else "rejected")
        assert decided[promotion.REGISTERED] == "true"
        assert "already decided" in outcome.message or finished is False or writes == 0
        if finished:
            break
        writes += 1
    assert writes >= 8  # every write of registration and promotion was a kill point


def test_a_gate_run_again_is_the_versions_verdict(
    client: MlflowClient, name: str, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gate stage run again on a registered run (new thresholds in params.yaml: DVC re-runs only the gate) wrote
    its new verdict on the run, and the version kept the old one: a version that now fails was promoted by hand
    without --force, one that now passes was refused. The decision carried out before stays."""
    from conveyor.settings import load_settings
    from pipelines import promotion
    from pipelines.gate import GateReport, GateResult

    (project / "data.dvc").write_text("outs:\n- md5: 0123456789abcdef0123456789abcdef.dir\n  path: data\n")
    paths = ProjectPaths(project)
    base = load_settings(paths.params)
    settings = base.model_copy(update={"registry": base.registry.model_copy(update={"model_name": name})})
    monkeypatch.setattr(promotion, "_serving_bundle", lambda *args: {})
    monkeypatch.setattr(
        promotion,
        "log_model_version",
        lambda c, model, run_id, artifacts, tags: c.get_model_version(
            model, new_version(c, model, passed=True, run_id=run_id)
        ),
    )
    champion = new_version(client, name, passed=True)
    registry.promote(client, name, champion, reason="the line's current model")
    experiment = client.get_experiment_by_name("registry-tests")
    assert experiment is not None
    run_id = client.create_run(experiment.experiment_id).info.run_id
    recall = GateResult("min class recall", ">= 0.300", "0.410", True)
    passing = GateReport(passed=True, challenger_run_id=run_id, champion_version=champion, gates=[recall])
    version, new = promotion.register(paths, settings, client, run_id, passing, None, "user:test")
    assert new and registry.gates_passed(version)
    number = str(version.version)

    stricter = GateResult("min class recall", ">= 0.500", "0.410", False)
    failing = GateReport(passed=False, challenger_run_id=run_id, champion_version=champion, gates=[stricter])
    version, new = promotion.register(paths, settings, client, run_id, failing, None, "user:test")
    assert not new and not registry.gates_passed(version)
    assert version.tags["conveyor.gates.failed"] == "min class recall" and ">= 0.500" in (version.description or "")
    with pytest.raises(PromotionRefusedError, match="did not pass its gates"):
        registry.promote(client, name, number, reason="by hand")
    outcome = promotion.decide(client, settings, version, new, failing, "user:test", "test")
    assert "failed gates: min class recall" in outcome.message

    # Relaxed again: the verdict follows; the rejection carried out stays, and a person may now promote it.
    version, _ = promotion.register(paths, settings, client, run_id, passing, None, "user:test")
    assert registry.gates_passed(version) and version.tags[promotion.DECISION] == "rejected"
    assert registry.promote(client, name, number, reason="thresholds relaxed").kind == "promote"


def test_exports_made_again_into_a_registered_run_are_a_new_version(
    client: MlflowClient, name: str, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A version serves the files it was registered with. Export made again into the same run (the export code
    fixed, then `conveyor run`: export, profile and gate re-run, train does not) must not lend its new verdict to
    the old files: those are a new version of the run, gated on their own, and the old version keeps its verdict."""
    from conveyor.settings import load_settings
    from pipelines import promotion
    from pipelines.gate import GateReport

    (project / "data.dvc").write_text("outs:\n- md5: 0123456789abcdef0123456789abcdef.dir\n  path: data\n")
    paths = ProjectPaths(project)
    base = load_settings(paths.params)
    settings = base.model_copy(update={"registry": base.registry.model_copy(update={"model_name": name})})
    export = project / "model.onnx"
    monkeypatch.setattr(promotion, "_serving_bundle", lambda *args: {"onnx": str(export)})

    def log_version(c: Any, model: str, run_id: str, artifacts: dict[str, str], tags: dict[str, str]) -> Any:
        number = new_version(c, model, passed=True, run_id=run_id)
        for key, value in tags.items():
            c.set_model_version_tag(model, number, key, value)
        return c.get_model_version(model, number)

    monkeypatch.setattr(promotion, "log_model_version", log_version)
    experiment = client.get_experiment_by_name("registry-tests") or client.get_experiment(
        client.create_experiment("registry-tests")
    )
    run_id = client.create_run(experiment.experiment_id).info.run_id
    export.write_bytes(b"the export with the bug")
    failing = GateReport(passed=False, challenger_run_id=run_id, champion_version=None)
    first, created = promotion.register(paths, settings, client, run_id, failing, None, "user:test")
    assert created and not registry.gates_passed(first)
    again, created = promotion.register(paths, settings, client, run_id, failing, None, "user:test")
    assert not created and again.version == first.version  # the same files: the same version

    export.write_bytes(b"the export, fixed")
    passing = GateReport(passed=True, challenger_run_id=run_id, champion_version=None)
    fixed, created = promotion.register(paths, settings, client, run_id, passing, None, "user:test")
    assert created and fixed.version != first.version and registry.gates_passed(fixed)
    assert not registry.gates_passed(client.get_model_version(name, str(first.version)))  # its files failed
    assert fixed.tags[registry.SERVED_FILES] != first.tags[registry.SERVED_FILES]


@pytest.mark.parametrize("re_gate", ["passes", "fails", "stopped"], ids=lambda r: f"re-gate-{r}")
def test_a_champion_moved_after_the_gate_is_gated_again_before_the_decision(
    client: MlflowClient, name: str, project: Path, monkeypatch: pytest.MonkeyPatch, re_gate: str
) -> None:
    """The champion moves between the gate and the decision (another run promoted, or a person): the gate's comparison
    no longer holds. `decide` refuses without writing (StaleGateError); the flow's registry task runs the gate again
    against the new champion, re-tags and re-describes the version, and decides on the new verdict. Only the gate
    stage itself (a DVC subprocess that re-scores the champion) is replaced, by what it writes. A re-run stopped by
    SIGTERM (the stage's task ends Cancelled) decides nothing: the run is cancelled, on a report it may not have
    finished."""
    import logging
    from types import SimpleNamespace

    from prefect.exceptions import CancelledRun
    from prefect.states import Cancelled

    from conveyor import tracking
    from flows import training
    from pipelines import promotion
    from pipelines.gate import GateReport, GateResult
    from tests.flow_support import champion_version, set_params

    set_params(project, registry={"model_name": name})
    paths = ProjectPaths(project)
    paths.data_dvc.write_text("outs:\n- md5: 0123456789abcdef0123456789abcdef.dir\n  path: data\n")
    paths.gate.mkdir(parents=True, exist_ok=True)
    gated = new_version(client, name, passed=True)
    registry.promote(client, name, gated, reason="the champion when the gate ran", actor="user:test")
    experiment = client.get_experiment_by_name("registry-tests")
    assert experiment is not None
    run_id = client.create_run(experiment.experiment_id).info.run_id
    number = new_version(client, name, passed=True, run_id=run_id)  # this run's model (the upload is tested above)
    monkeypatch.setattr(promotion, "_serving_bundle", lambda *args: {})  # its files: none here, the same each pass

    def write_report(champion: str | None, ok: bool) -> GateReport:
        report = GateReport(ok, run_id, champion, [GateResult("no regression vs champion", ">= 0.500", "0.600", ok)])
        (paths.gate / "report.json").write_text(json.dumps(report.to_json()))
        return report

    stale = write_report(gated, True)
    settings = load_settings(paths.params)
    version, new = promotion.register(paths, settings, client, run_id, stale, None, "user:test")
    moved = new_version(client, name, passed=True)
    registry.promote(client, name, moved, reason="promoted meanwhile by another run", actor="user:other")

    with pytest.raises(promotion.StaleGateError, match=f"champion is v{moved} but the gate compared against v{gated}"):
        promotion.decide(client, settings, version, new, stale, "user:test", "test")
    assert champion_version(client, name) == moved  # refused before any write
    assert promotion.DECISION not in client.get_model_version(name, number).tags

    gate_runs: list[tuple[str, bool]] = []

    passed = re_gate == "passes"

    def gate_stage(root: str, stage: str, flow_run_id: str | None, force: bool = False) -> Any:
        """What `dvc repro --force gate` leaves: a report against the champion the registry has now."""
        gate_runs.append((stage, force))
        if re_gate == "stopped":  # what run_stage returns when SIGTERM stopped the stage: its task's final state
            write_report(champion_version(client, name), True)  # a report it may not have finished
            return Cancelled(message="stopped by SIGTERM")
        write_report(champion_version(client, name), passed)
        return 0.0

    monkeypatch.setattr(training, "run_stage", SimpleNamespace(fn=gate_stage))
    monkeypatch.setattr(training, "get_run_logger", lambda: logging.getLogger("test"))
    monkeypatch.setattr(
        tracking.Tracker, "resume", staticmethod(lambda paths: SimpleNamespace(client=client, run_id=run_id))
    )
    if re_gate == "stopped":
        with pytest.raises(CancelledRun, match="stage gate"):
            training.register_and_promote.fn(str(project), None, "test")
        assert gate_runs == [("gate", True)]
        assert champion_version(client, name) == moved
        assert promotion.DECISION not in client.get_model_version(name, number).tags
        # Not re-described: the version still says what its finished gate compared it with.
        assert f"compared with champion v{gated}" in (client.get_model_version(name, number).description or "")
        return
    outcome = training.register_and_promote.fn(str(project), None, "test")

    assert gate_runs == [("gate", True)]  # gated again, once, forced
    assert outcome["promoted"] is passed and outcome["version"] == number
    assert champion_version(client, name) == (number if passed else moved)
    tags = client.get_model_version(name, number).tags
    assert tags[promotion.DECISION] == ("promoted" if passed else "rejected")
    assert tags["conveyor.gates.passed"] == str(passed).lower()  # the new verdict, not the stale one
    assert tags["conveyor.gates.failed"] == ("-" if passed else "no regression vs champion")
    description = client.get_model_version(name, number).description or ""
    assert f"compared with champion v{moved}" in description  # the review summary says what it was compared with
    moves = [(m.from_version, m.to_version) for m in registry.history(client, name) if m.alias == registry.CHAMPION]
    assert moves == [(None, gated), (gated, moved)] + ([(moved, number)] if passed else [])


def test_the_code_is_dirty_only_when_code_changed(tmp_path: Path) -> None:
    """`conveyor data add` (no commit by default) and an uncommitted worker checkout change params.yaml or data.dvc,
    which a run records on their own: lineage read "git commit X (uncommitted changes)" with the code equal to X."""
    import subprocess

    from conveyor.lineage import git_state

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    for name in ("params.yaml", "data.dvc", "stage.py"):
        (tmp_path / name).write_text("before\n")
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "code"], check=True)
    (tmp_path / "params.yaml").write_text("after\n")
    (tmp_path / "data.dvc").write_text("after\n")
    (tmp_path / "notes.txt").write_text("an untracked file that is no code\n")
    assert git_state(tmp_path).dirty is False
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "new_module.py").write_text("import this\n")  # no commit has it: the commit is not the code
    assert git_state(tmp_path).dirty is True
    (tmp_path / "pkg" / "new_module.py").unlink()
    (tmp_path / "stage.py").write_text("after\n")
    assert git_state(tmp_path).dirty is True
