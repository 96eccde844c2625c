"""Registry rules against a real MLflow server: aliases, gated promotion, forced promotion, rollback, history."""

from __future__ import annotations

import uuid

import pytest
from mlflow.tracking import MlflowClient

from pipelines import registry
from pipelines.registry import AliasMove, PromotionRefusedError, rollback_target


@pytest.fixture
def client(mlflow_server: str) -> MlflowClient:
    return MlflowClient(mlflow_server)


@pytest.fixture
def name() -> str:
    return f"model-{uuid.uuid4().hex[:8]}"


def new_version(client: MlflowClient, name: str, *, passed: bool) -> str:
    """A registry version the way the flow makes one (a logged model from a run), gate tags included."""
    experiment = client.get_experiment_by_name("registry-tests")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("registry-tests")
    run = client.create_run(experiment_id)
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


def test_promotion_needs_a_reason_and_a_version(client: MlflowClient, name: str) -> None:
    v1 = new_version(client, name, passed=True)
    with pytest.raises(PromotionRefusedError, match="needs a reason"):
        registry.promote(client, name, v1, reason="  ")
    with pytest.raises(PromotionRefusedError, match="has no version 99"):
        registry.promote(client, name, "99", reason="typo")
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


def test_rollback_without_champion(client: MlflowClient, name: str) -> None:
    new_version(client, name, passed=True)
    with pytest.raises(PromotionRefusedError, match="no earlier champion"):
        registry.rollback(client, name, reason="why not")


def _move(seq: int, frm: str | None, to: str, kind: str = "promote") -> AliasMove:
    return AliasMove(seq, registry.CHAMPION, frm, to, "t", kind, "r", "a")


def test_rollback_target_never_returns_to_a_rolled_back_version() -> None:
    moves = [_move(1, None, "1"), _move(2, "1", "2"), _move(3, "2", "1", "rollback"), _move(4, "1", "3")]
    assert rollback_target(moves, "3") == "1"  # v2 was rolled back from: skipped
    assert rollback_target(moves, "1") is None
    assert rollback_target([], None) is None
    challenger_only = [AliasMove(1, registry.CHALLENGER, None, "1", "t", "register", "r", "a")]
    assert rollback_target(challenger_only, None) is None
