"""Where things live in a Conveyor project: one place, so stages and tests agree."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PARAMS_FILE = "params.yaml"


class ProjectNotFoundError(RuntimeError):
    """Raised when no Conveyor project (a folder with params.yaml and dvc.yaml) encloses the working directory."""


def find_project_root(start: Path | None = None) -> Path:
    """The nearest folder at or above `start` (default: the working directory) holding params.yaml and dvc.yaml.

    DVC runs stage commands from the folder of dvc.yaml, so stages find the same root as a user's shell does.
    """
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / PARAMS_FILE).is_file() and (folder / "dvc.yaml").is_file():
            return folder
    raise ProjectNotFoundError(
        f"no Conveyor project at or above {here}: expected a folder with {PARAMS_FILE} and dvc.yaml"
    )


@dataclass(frozen=True)
class ProjectPaths:
    """Every path a stage reads or writes, derived from the project root."""

    root: Path

    @classmethod
    def discover(cls, start: Path | None = None) -> ProjectPaths:
        return cls(find_project_root(start))

    @property
    def params(self) -> Path:
        return self.root / PARAMS_FILE

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def data_dvc(self) -> Path:
        return self.root / "data.dvc"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def validation(self) -> Path:
        return self.artifacts / "validation"

    @property
    def train(self) -> Path:
        return self.artifacts / "train"

    @property
    def evaluate(self) -> Path:
        return self.artifacts / "evaluate"

    @property
    def export(self) -> Path:
        return self.artifacts / "export"

    @property
    def gate(self) -> Path:
        return self.artifacts / "gate"

    @property
    def metrics(self) -> Path:
        """DVC metrics files, small and committed to git like dvc.lock."""
        return self.root / "metrics"

    @property
    def run_record(self) -> Path:
        """The MLflow run shared by train, evaluate and export (written by train)."""
        return self.train / "run.json"

    @property
    def scratch(self) -> Path:
        """Rebuildable working files (dataset views, Ultralytics settings); never a DVC output."""
        return self.root / ".conveyor"

    @property
    def monitoring(self) -> Path:
        """Drift checks' reports, gauges and cached profiles."""
        return self.scratch / "monitoring"

    @property
    def labelling(self) -> Path:
        """Selections for labelling (`conveyor label select`): the frames, task files and what was chosen."""
        return self.scratch / "labelling"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlartifacts"


def available_cores() -> int:
    """Cores this process may run on (respects CPU affinity and cgroup-pinned sets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def tracking_uri(paths: ProjectPaths) -> str:
    """The MLflow tracking URI: MLFLOW_TRACKING_URI, else the project's embedded SQLite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{paths.mlflow_db}"
