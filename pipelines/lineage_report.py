"""Where a registered model came from, and which models a data version produced."""

from __future__ import annotations

from dataclasses import dataclass

from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from conveyor.paths import ProjectPaths
from pipelines import dvc_repo, registry
from pipelines.registry import ModelRefError, resolve


@dataclass(frozen=True)
class Lineage:
    model: str
    version: str
    aliases: list[str]
    rows: list[tuple[str, str]]


def lineage(client: MlflowClient, paths: ProjectPaths, default_name: str, ref: str) -> Lineage:
    version = resolve(client, default_name, ref)
    if not version.run_id:
        raise ModelRefError(f"{version.name} v{version.version} was not registered from a run: no lineage")
    run = client.get_run(version.run_id)
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
        ("data version", md5),
        ("data location", dvc_repo.remote_location(paths.root, md5) if md5 != "unknown" else "-"),
        (
            "git commit",
            f"{tags.get('conveyor.git_commit', 'unknown')}"
            f"{' (uncommitted changes)' if tags.get('conveyor.git_dirty') == 'true' else ''}",
        ),
        ("params hash", tags.get("conveyor.params_hash", "-")),
        ("train params", train_params or "-"),
        ("MLflow run", f"{run.info.run_id} (experiment {run.info.experiment_id}) on {client.tracking_uri}"),
        ("Prefect flow run", tags.get("conveyor.prefect_flow_run_id", "-")),
        (
            "gates",
            "passed"
            if tags.get("conveyor.gates.passed") == "true"
            else f"failed: {tags.get('conveyor.gates.failed', 'not gated')}",
        ),
        ("gate report", f"runs:/{run.info.run_id}/gate/report.md"),
        ("test mAP50-95", f"{run.data.metrics.get('test/mAP50-95', float('nan')):.3f}"),
        ("exports", ", ".join(exports) or "-"),
        ("model source", str(version.source)),
    ]
    return Lineage(version.name, str(version.version), list(version.aliases), rows)


def versions_for_data(client: MlflowClient, name: str, md5: str) -> list[ModelVersion]:
    return [v for v in registry.versions(client, name) if v.tags.get("conveyor.data_md5") == md5]
