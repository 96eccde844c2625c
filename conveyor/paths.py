"""Where things live in a Conveyor project: one place, so stages and tests agree."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conveyor.errors import ConveyorError

PARAMS_FILE = "params.yaml"
DRIFT_METRICS_FILE = "drift.prom"


class ProjectNotFoundError(ConveyorError, RuntimeError):
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
    def training_lock(self) -> Path:
        """The file a training run holds locked from start to promotion (and a change of data/ while it runs)."""
        return self.scratch / "training.lock"

    @property
    def monitoring(self) -> Path:
        """Drift checks' reports, gauges and cached profiles."""
        return self.scratch / "monitoring"

    @property
    def drift_gauges(self) -> Path:
        """The last drift check as Prometheus gauges: written by `conveyor drift`, served on the server's /metrics."""
        return self.monitoring / DRIFT_METRICS_FILE

    @property
    def model_cache(self) -> Path:
        """Registered versions downloaded for serving, checks and labelling (one folder per name and version)."""
        return self.scratch / "serving" / "models"

    def prediction_log_dir(self, directory: Path | None) -> Path:
        """The local prediction log: `serve.prediction_log.directory` (relative to the project), by default
        .conveyor/predictions."""
        if directory is None:
            return self.scratch / "predictions"
        return directory if directory.is_absolute() else self.root / directory

    def prediction_log_source(self, directory: Path | None, s3: str | None) -> Path | str:
        """Where the prediction log is read (drift checks, labelling): the S3 prefix every replica ships to when
        `serve.prediction_log.s3` is set, else the local folder."""
        return s3 or self.prediction_log_dir(directory)

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


def available_cores(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """Cores this process may use: those it may run on (CPU affinity, cgroup-pinned sets), and no more than its CPU
    quota (a container's or Kubernetes pod's CPU limit), rounded down. On a node without the kubelet's static CPU
    manager a pod may run on every core of the node: OpenVINO and PyTorch then started one thread per node core
    against a 2-core quota, and were throttled."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)
    quota = cpu_quota(cgroup)
    return cores if quota is None else max(1, min(cores, int(quota)))


def cpu_quota(cgroup: Path = Path("/sys/fs/cgroup")) -> float | None:
    """This process's CPU quota in cores (cgroup v2's `cpu.max`, or v1's CFS quota and period), None without one."""
    try:
        if (cgroup / "cpu.max").is_file():
            limit, period = (cgroup / "cpu.max").read_text().split()[:2]
            return None if limit == "max" else int(limit) / int(period)
        v1 = cgroup / "cpu"
        limit = (v1 / "cpu.cfs_quota_us").read_text().strip()
        return None if int(limit) <= 0 else int(limit) / int((v1 / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError, ZeroDivisionError):  # no cgroup file system here, or one this does not read
        return None


def tracking_uri(paths: ProjectPaths) -> str:
    """The MLflow tracking URI: MLFLOW_TRACKING_URI, else the project's embedded SQLite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{paths.mlflow_db}"


@contextmanager
def exclusive(path: Path, busy: Callable[[], None] = lambda: None) -> Iterator[None]:
    """`path` locked for this process (flock: the OS releases it if the process dies). When another holds it,
    `busy()` is called first: it raises to refuse, or returns to wait for the lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            busy()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_atomically(path: Path, text: str | bytes, *, private: bool = False) -> None:
    """Write a record whole or not at all (a temporary file, then a rename): a crash or a full disk mid-write never
    leaves a torn record behind. `private`: readable by this user only (0600) from the moment it exists, whatever
    the file it replaces allowed (a secret written first and chmod-ed after is anyone's for a moment)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text if isinstance(text, bytes) else text.encode()
    try:
        temporary.unlink(missing_ok=True)  # a leftover of a killed writer keeps its mode: start afresh
        with os.fdopen(
            os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o666), "wb"
        ) as out:
            out.write(data)
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)


@contextmanager
def staged_beside(target: Path, tag: str = "partial") -> Iterator[Path]:
    """A fresh, empty folder beside `target` (`.NAME.TAG`) to build it in, removed if the block fails or is
    interrupted: nothing half-built is ever left where `target` goes, or beside it. The caller puts it in place
    (`replace_folder`, or part by part) after the block."""
    staging = target.with_name(f".{target.name}.{tag}")
    shutil.rmtree(staging, ignore_errors=True)  # a leftover of a killed run
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def replace_folder(staging: Path, target: Path) -> None:
    """`staging` renamed to `target`, whose old contents go: the old one is moved aside first, put back if the new one
    cannot take its place, and removed after; `target` never holds a mix of the two."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    had = target.exists()
    if had:
        target.rename(old)
    try:
        staging.rename(target)
    except BaseException:
        if had:
            old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def error_chain(error: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


# How writers that do not pass errno on report a failed write (ONNX's and OpenVINO's C++ writers, PyTorch's zip writer).
_WRITE_FAILED = ("No space left on device", "iostream error", "file write failed")
_LOW_SPACE = 100 * 2**20  # a failed write with less than this left is put down to the disk


def disk_full_message(error: BaseException, near: Path) -> str | None:
    """When `error` came from a full disk: the path, the space left there, and what to do; None for other errors.
    Known by errno ENOSPC/EDQUOT, or by a writer's words for a failed write while a filesystem the project writes to
    has little space left (the half-written file may already be gone, so "nothing left" is not required)."""
    chain = error_chain(error)
    hit = next((e for e in chain if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)), None)
    worded = any(words in str(e) for e in chain for words in _WRITE_FAILED)
    if hit is None and not worded:
        return None
    named = Path(str(hit.filename)) if hit is not None and hit.filename else None
    artifacts = near / "artifacts"
    candidates = [*([named] if named else []), *(artifacts.iterdir() if artifacts.is_dir() else []), near]
    folders = [c if c.is_dir() else c.parent for c in [*candidates, Path(tempfile.gettempdir())] if c.parent.exists()]
    fullest = min(folders, key=lambda folder: shutil.disk_usage(folder).free)
    usage = shutil.disk_usage(fullest)
    if hit is None and usage.free >= _LOW_SPACE:
        return None
    where = f"{named}" if named else f"under {fullest}"
    return (
        f"disk full writing {where} ({usage.free / 1e6:.1f} MB free of {usage.total / 1e6:.0f} MB there; the error: "
        f"{_first_words(error)}): nothing this step wrote is recorded as current (DVC records a stage only when it "
        "completes); free some space and re-run"
    )


def _first_words(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def read_stage_output(path: Path, stage: str) -> Any:
    """A stage's JSON output; missing, it names the stage to run first (it was a bare "[Errno 2]")."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: run the {stage} stage first (`conveyor {stage}`)") from None
