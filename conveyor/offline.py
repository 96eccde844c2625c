"""Keep the ML stack offline and quiet: no downloads, update checks, auto-installs or telemetry; and the few other
process-wide switches every entry point needs (artifacts through the MLflow server, OpenMP threads that yield).

A factory line has no internet, and a pipeline that phones home (or waits on a DNS timeout) is a pipeline that hangs.
`configure()` must run before Ultralytics is imported: Ultralytics decides ONLINE and reads its settings at import.
Importing the `conveyor` package calls it, so every entry point (CLI, DVC stages, Prefect flows) is covered.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

# Environment switches, each honoured by the library named.
OFFLINE_ENV: dict[str, str] = {
    "YOLO_OFFLINE": "1",  # Ultralytics: skip the DNS online probe, no hub, no update checks
    "YOLO_AUTOINSTALL": "0",  # Ultralytics: never pip-install a missing package mid-run
    "YOLO_VERBOSE": "False",  # Ultralytics: our own progress and tables instead of its console banners
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",  # honoured by MLflow and several others
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # With no PREFECT_API_URL, Prefect starts a temporary local server; a fresh database takes ~21 s on 2 cores,
    # past Prefect's 20 s default.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "HF_HUB_OFFLINE": "1",
    # MLflow retries an unreachable server for ~4 minutes by default; a pipeline should say so within seconds.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # tqdm bars would flood the Prefect task logs
    # Artifacts go through the MLflow server both ways: only the server reaches the object store. MLflow 3.17's
    # client otherwise downloads from presigned URLs on the server's S3 endpoint whenever the server can make them,
    # and that endpoint is often an address only the server resolves (compose's `minio:9000`, a cluster's service
    # name): a laptop or an edge box then cannot fetch a model (found bringing infra/compose.yaml up).
    "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false",
    "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD": "false",
    # PyTorch's OpenMP threads sleep instead of spinning while they wait for work. Alone on its cores a run is as
    # fast either way; with anything else busy beside it (a second run, the model server, a drift check, a test
    # worker) spinning threads take the cores from it: two small flow runs at once took 76.5 s each with libgomp's
    # default and 40 s each with PASSIVE, 35-36 s alone either way (2 cores; `make bench-concurrency`).
    "OMP_WAIT_POLICY": "PASSIVE",
}

# Ultralytics settings: integrations off (we track MLflow ourselves and fail loudly), no sync to its hub.
ULTRALYTICS_SETTINGS: dict[str, object] = {
    "sync": False,
    "mlflow": False,
    "dvc": False,
    "clearml": False,
    "comet": False,
    "raytune": False,
    "tensorboard": False,
    "wandb": False,
    "vscode_msg": False,
    "openvino_msg": False,
}

_FONTS = ("Arial.ttf", "Arial.Unicode.ttf")


def ultralytics_config_dir() -> Path:
    """Ultralytics' settings and fonts live per user, not in the project, so many checkouts share one."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "conveyor" / "ultralytics"


def configure() -> None:
    """Set the offline switches for this process and its children. Idempotent and cheap (no heavy imports)."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    _caches_where_writable()
    os.environ.setdefault("YOLO_CONFIG_DIR", str(ultralytics_config_dir()))
    with contextlib.suppress(OSError):  # a read-only config dir someone set: only training's plots miss the font
        _install_fonts(Path(os.environ["YOLO_CONFIG_DIR"]) / "Ultralytics")
    _decline_openvino_telemetry()


def _caches_where_writable() -> None:
    """Per-user caches (Ultralytics' settings, PyTriton's workspace, Matplotlib's) live under the home; on a read-only
    root filesystem (a hardened container) they move to this user's folder in the temporary directory, which such a
    container mounts writable. Variables already set are left alone."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    with contextlib.suppress(OSError):
        cache.mkdir(parents=True, exist_ok=True)
    if os.access(cache, os.W_OK):
        return
    import tempfile

    base = Path(tempfile.gettempdir()) / f"conveyor-{os.getuid()}"
    os.environ.setdefault("XDG_CACHE_HOME", str(base / "cache"))
    os.environ.setdefault("MPLCONFIGDIR", str(base / "matplotlib"))


def _install_fonts(target: Path) -> None:
    """Ultralytics downloads Arial for its plots unless the file is in its config dir; matplotlib ships DejaVu Sans."""
    if all((target / name).exists() for name in _FONTS):
        return
    import matplotlib

    source = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    target.mkdir(parents=True, exist_ok=True)
    for name in _FONTS:
        if not (target / name).exists():
            shutil.copyfile(source, target / name)


def _decline_openvino_telemetry() -> None:
    """OpenVINO sends usage data unless the user's consent file says no; record a 'no' where none is recorded."""
    consent = Path.home() / "intel" / "openvino_telemetry"
    if consent.exists():
        return
    try:
        consent.parent.mkdir(parents=True, exist_ok=True)
        consent.write_text("0")  # the format OpenVINO's own `opt_in_out --opt_out` writes
    except OSError:  # read-only home: OpenVINO then cannot record consent either, and sends nothing
        pass


def apply_ultralytics_settings() -> None:
    """Turn off Ultralytics' integrations and hub sync. Imports Ultralytics, so call it where it is needed."""
    from ultralytics.utils import SETTINGS

    stale = {k: v for k, v in ULTRALYTICS_SETTINGS.items() if SETTINGS.get(k) != v}
    if stale:
        SETTINGS.update(stale)
