"""The DAG knows its code: every module a stage's step imports (directly, lazily, or through another module) is one of
its `dvc.yaml` dependencies, so a change to that code re-runs the stage, and no listed module is one it never reads.

Left out on purpose, as the dvc.yaml header says: the foundation that only names, loads and records (paths, settings
whose values DVC tracks per params key, the MLflow record, lineage, terminal tables, the offline switches)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from conveyor.scaffold import REPO

PACKAGES = {"conveyor", "pipelines", "serving", "monitoring", "labelling", "flows", "stack"}
# Modules whose change cannot change a stage's outputs: each with the reason.
NOT_DEPENDENCIES = {
    "conveyor/__init__.py": "empty package marker",
    "pipelines/__init__.py": "empty package marker",
    "conveyor/errors.py": "the base class of expected errors",
    "conveyor/paths.py": "file and folder names",
    "conveyor/settings.py": "typed loading of params.yaml; DVC tracks the values per params key",
    "conveyor/tracking.py": "the MLflow record of a run, not its outputs",
    "conveyor/open_records.py": "closing what a killed run left open in MLflow",
    "conveyor/processes.py": "whether the process that left a record open still runs",
    "conveyor/lineage.py": "data hash, git commit and host for the record",
    "conveyor/tables.py": "terminal tables",
    "conveyor/offline.py": "network switches and fonts for Ultralytics' plots",
}


def _module_file(module: str) -> Path | None:
    base = REPO.joinpath(*module.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def project_imports(source: Path) -> set[str]:
    """Project modules `source` imports anywhere (top level or inside a function), as dotted names."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pipelines import runtimes`
    return {name for name in found if name.split(".")[0] in PACKAGES and _module_file(name) is not None}


def imported_files(module: str) -> set[str]:
    """The repository files `module` needs, transitively, relative to the repository root."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        file = _module_file(todo.pop())
        if file is None or (relative := file.relative_to(REPO).as_posix()) in seen:
            continue
        seen.add(relative)
        todo.extend(project_imports(file))
    return seen


STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_module_a_stage_imports_is_a_dependency(stage: str) -> None:
    spec = STAGES[stage]
    assert spec["cmd"] == f"conveyor {stage}", "the test maps `conveyor STAGE` to pipelines/STAGE.py"
    needed = imported_files(f"pipelines.{stage}") - set(NOT_DEPENDENCIES)
    listed = {dep for dep in spec["deps"] if dep.endswith(".py")}
    assert not needed - listed, f"{stage}: imported but not in dvc.yaml's deps: {sorted(needed - listed)}"
    assert not listed - needed, f"{stage}: in dvc.yaml's deps but never imported: {sorted(listed - needed)}"


def test_the_walk_sees_lazy_and_package_imports(tmp_path: Path) -> None:
    """The import walk itself: an import inside a function and `from package import module` both count (the
    stages import Ultralytics and their helpers lazily)."""
    assert "pipelines/runtimes.py" in imported_files("pipelines.export")  # `from pipelines import runtimes`
    assert "pipelines/performance.py" in imported_files("pipelines.profile")
    assert "pipelines/registry.py" in imported_files("pipelines.gate")
    assert "serving/app.py" not in imported_files("pipelines.gate")  # and only what is imported
