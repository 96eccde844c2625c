"""Where a registered model came from, and which models a data version produced."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from conveyor.paths import ProjectPaths
from pipelines import registry
from pipelines.data import dvc

_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))$")


class ModelRefError(ValueError):
    """A model reference that names no version."""


def resolve(client: MlflowClient, default_name: str, ref: str) -> ModelVersion:
    """`models:/NAME@alias`, `models:/NAME/3`, `@champion`, or a version number of the configured model."""
    match = _MODEL_URI.match(ref)
    name, alias, version = (match["name"], match["alias"], match["version"]) if match else (default_name, None, None)
    if not match:
        if ref.startswith("@"):
            alias = ref[1:]
        elif ref.lstrip("v").isdigit():
            version = ref.lstrip("v")
        else:
            raise ModelRefError(f"'{ref}' is not models:/NAME@alias, models:/NAME/VERSION, @alias or a version")
    if alias:
        found = registry.version_by_alias(client, name, alias)
        if found is None:
            raise ModelRefError(f"{name} has no version with alias '{alias}'")
        return found
    try:
        return client.get_model_version(name, str(version))
    except Exception as exc:
        raise ModelRefError(f"{name} has no version {version}") from exc


def dvc_location(paths: ProjectPaths, md5: str) -> str:
    """Where the default DVC remote keeps that data version (DVC 3 layout: files/md5/ab/cdef....dir)."""
    default = dvc(paths.root, "remote", "default", check=False).stdout.strip()
    remotes = dict(
        line.split(maxsplit=1)
        for line in dvc(paths.root, "remote", "list", check=False).stdout.splitlines()
        if line.strip()
    )
    url = remotes.get(default, "").replace("(default)", "").strip()
    if not url:
        return f"(no default DVC remote) md5 {md5}"
    if "://" not in url and not Path(url).is_absolute():
        url = str((paths.root / ".dvc" / url).resolve())
    return f"{default}: {url.rstrip('/')}/files/md5/{md5[:2]}/{md5[2:]}"


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
        ("data location", dvc_location(paths, md5) if md5 != "unknown" else "-"),
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
