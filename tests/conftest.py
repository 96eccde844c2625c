"""Shared fixtures: real servers (MLflow), throwaway Conveyor projects, and the network guard."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conveyor.net import free_port, http_answers, wait_started
from conveyor.scaffold import create_project
from flows import local_server

VENV_BIN = Path(sys.executable).parent
NETGUARD = Path(__file__).parent / "netguard"

# Tiny but complete: every stage runs, in about a minute on 2 cores.
TINY_PARAMS: dict[str, object] = {
    "synth": {"seed": 3, "image_size": 96, "counts": {"train": 16, "val": 8, "test": 8}},
    "train": {"epochs": 2, "imgsz": 96, "batch": 8, "close_mosaic": 0, "finetune": {"epochs": 2}},
    "evaluate": {"batch": 8},
    "export": {"parity_images": 4, "latency": {"warmup": 1, "runs": 3}},
    "tracking": {"experiment": "conveyor-tests"},
}


# Under CI=true a skipped test fails the run: a missing Prometheus, PostgreSQL or Swift must not turn a claim into a
# skip. Allowed: hardware CI does not have, and kubectl, which `make test` cannot install (Debian's is 1.20, whose
# built-in kustomize predates the `labels` and `patches` fields the overlays use); this machine has Google's, and runs
# those tests.
ALLOWED_SKIPS = ("this machine can run TensorRT", "kubectl (its built-in kustomize) is not installed")
_skipped: list[str] = []
_file_seconds: dict[str, float] = {}  # setup + call + teardown of every test, per file (a worker runs a whole file)


# Seconds per file in the last full run (the table this suite prints at the end). The two xdist workers take whole
# files (`--dist loadfile --no-loadscope-reorder`, pyproject.toml) in collection order, so the files are collected
# longest first: a long file started last would leave one worker running it alone at the end. Unlisted files are
# short; a stale figure only costs balance, never a test.
FILE_SECONDS = {
    "test_faults.py": 256,
    "test_flow.py": 242,
    "test_stack.py": 209,
    "test_monitoring.py": 193,
    "test_edge.py": 130,
    "test_serving.py": 123,
    "test_pipeline_e2e.py": 114,
    "test_gpu_check.py": 66,
    "test_monitoring_units.py": 64,
    "test_gate.py": 52,
    "test_storage_quota.py": 41,
    "test_data.py": 41,
    "test_registry.py": 35,
    "test_local_server.py": 22,
}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--images", action="store_true", help="run the container image tests (`make test-images`)")
    parser.addoption("--label-studio", action="store_true", help="run the real Label Studio round trip")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The image tests need `make images` (15 minutes, 12 GB): `make test-images` runs them, `make test` leaves them out.
    # The real Label Studio round trip installs Label Studio into a venv of its own and migrates its database (one to
    # three minutes on 2 cores): `make test-label-studio` runs it, `make test` leaves it out.
    for option, marker in (("--images", "images"), ("--label-studio", "label_studio")):
        if not config.getoption(option):
            left_out = [item for item in items if item.get_closest_marker(marker)]
            if left_out:
                config.hook.pytest_deselected(items=left_out)
                items[:] = [item for item in items if not item.get_closest_marker(marker)]
    items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 0))  # stable: a file's own order is kept


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    file = report.nodeid.split("::", 1)[0]
    _file_seconds[file] = _file_seconds.get(file, 0.0) + report.duration
    if report.skipped:
        reason = str(report.longrepr[2]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not any(allowed in reason for allowed in ALLOWED_SKIPS):
            _skipped.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if hasattr(session.config, "workerinput"):  # an xdist worker: the controller decides
        return
    if os.environ.get("CI") == "true" and _skipped and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int) -> None:
    if _file_seconds:
        terminalreporter.section("seconds per test file (setup, tests and teardown; two files run at once)")
        for file, seconds in sorted(_file_seconds.items(), key=lambda item: -item[1]):
            terminalreporter.write_line(f"{seconds:8.1f}  {file}")
        terminalreporter.write_line(f"{sum(_file_seconds.values()):8.1f}  in all")
    if os.environ.get("CI") == "true" and _skipped:
        terminalreporter.section("skipped under CI=true: these claims were not checked", red=True)
        for line in _skipped:
            terminalreporter.write_line(line)


def wait_http(url: str, timeout: float, process: subprocess.Popen[bytes] | None = None) -> None:
    wait_started(url, lambda: http_answers(url, timeout=2), timeout, process)


@contextlib.contextmanager
def nanio_store(root: Path, user: str) -> Iterator[dict[str, str]]:
    """A real S3-compatible store (nanio, from PyPI) on a free port, data under `root`; yields the environment a
    client needs to reach it (AWS_* only: any AWS_ variable of this process is left out)."""
    port = free_port()
    keys = {"NANIO_ACCESS_KEY": user, "NANIO_SECRET_KEY": f"{user}-secret-key"}
    server = subprocess.Popen(
        [VENV_BIN / "nanio", "serve", "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(root)],
        env={**os.environ, **keys},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        yield {
            **{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
            "AWS_ACCESS_KEY_ID": keys["NANIO_ACCESS_KEY"],
            "AWS_SECRET_ACCESS_KEY": keys["NANIO_SECRET_KEY"],
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    finally:
        stop_tree(server)


def stop_tree(process: subprocess.Popen[bytes]) -> None:
    """Servers spawn workers: end the whole process group, not only the parent."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=15)
    except ProcessLookupError:
        pass


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def start_mlflow_server(root: Path, port: int, artifacts: str | None = None, **env: str) -> subprocess.Popen[bytes]:
    """A real MLflow tracking server (SQLite backend, proxied artifacts: under root, or at `artifacts` such as an
    s3:// URL with the store's endpoint and credentials in `env`), lean: one worker, no job runner; healthy when this
    returns. Started again on the same root and port: the same server, restarted."""
    argv = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{root}/mlflow.db",
        "--artifacts-destination",
        artifacts or str(root / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    server_env = base_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true", **env)
    return start_logged_server(argv, server_env, root / "server.log", f"http://127.0.0.1:{port}/health", 90)


def start_logged_server(
    argv: list[str], env: dict[str, str], log_path: Path, health_url: str, timeout: float
) -> subprocess.Popen[bytes]:
    """A server in its own process group, its output appended to `log_path`; healthy when this returns, stopped
    when it never is."""
    with log_path.open("ab") as log:
        process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(health_url, timeout, process)
    except BaseException:
        stop_tree(process)
        raise
    return process


MLFLOW_STORES: dict[str, Path] = {}  # the session server's URL -> its folder (mlflow.db), for `mlflow gc`


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    process = start_mlflow_server(root, port)
    MLFLOW_STORES[f"http://127.0.0.1:{port}"] = root
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_tree(process)


def start_prefect_server(home: Path, port: int, **env: str) -> subprocess.Popen[bytes]:
    """A real Prefect server (API and UI) with its own home, its log in home/server.log; healthy when this returns."""
    return start_logged_server(
        local_server.server_argv("127.0.0.1", port),
        base_env(**local_server.server_env(home, "127.0.0.1", port), **env),
        home / "server.log",
        f"http://127.0.0.1:{port}/api/health",
        180,
    )


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real Prefect server for the whole test session (not a temporary server per process)."""
    port = free_port()
    # An enqueued run re-checks for a free slot every 30 s by default.
    process = start_prefect_server(
        tmp_path_factory.mktemp("prefect-home"), port, PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS="2"
    )
    try:
        yield f"http://127.0.0.1:{port}/api"
    finally:
        stop_tree(process)


def run_cmd(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result


def make_project(root: Path, params: dict[str, object] | None = None) -> Path:
    """A fresh Conveyor project with tiny params, its own git and DVC repos, and no data yet.
    Its demo remote is its own (tests push to it), never this checkout's."""
    return create_project(root, TINY_PARAMS if params is None else params, demo_remote=root.parent / "demo-remote")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "project")


@pytest.fixture
def netguard_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """Environment whose Python processes refuse and record any non-loopback network attempt."""
    log = tmp_path / "netguard.log"
    log.touch()
    env = base_env(PYTHONPATH=str(NETGUARD), CONVEYOR_NETGUARD_LOG=str(log))
    return env, log
