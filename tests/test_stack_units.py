"""The stack's own helpers without starting the stack (`tests/test_stack.py` starts it): Prometheus' scrape
configuration checked by Prometheus' own `promtool`, the env file read back as a shell reads it, the DVC remote
handed back, and the probes that must answer in seconds."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conveyor import storage
from conveyor.paths import ProjectPaths
from conveyor.settings import Settings
from pipelines.dvc_repo import dvc
from stack import control, parts
from stack.control import Layout


def _layout(root: Path) -> Layout:
    settings = Settings.model_validate({"stack": {"directory": str(root / "stack dir")}})
    layout = Layout(root / "stack dir", settings, root)
    layout.root.mkdir(parents=True)
    return layout


def test_prometheus_scrapes_a_server_that_wants_its_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With CONVEYOR_SERVE_TOKEN set, the stack's server (which inherits it) answers /metrics with 401 to a scrape
    without it: every scrape failed, and `stack status` still said Prometheus was up."""
    layout = _layout(tmp_path)
    monkeypatch.setenv("CONVEYOR_SERVE_TOKEN", "s3cret-token")
    config = control.write_prometheus_config(layout)
    text = config.read_text()
    token_file = config.with_name("server-token")
    assert f"credentials_file: '{token_file}'" in text and "s3cret-token" not in text
    assert token_file.read_text() == "s3cret-token" and token_file.stat().st_mode & 0o077 == 0
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian's prometheus package ships it)")
    checked = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    monkeypatch.delenv("CONVEYOR_SERVE_TOKEN")
    assert "authorization" not in control.write_prometheus_config(layout).read_text()


def test_the_env_file_reads_back_as_a_shell_reads_it(tmp_path: Path) -> None:
    """A stack folder whose path holds a space broke `source stack.env` ("not a valid identifier")."""
    layout = _layout(tmp_path)
    keys = {"S3_ACCESS_KEY": "access", "S3_SECRET_KEY": "se'cr et"}
    env_file = control.write_env_file(layout, keys)
    sourced = subprocess.run(
        ["bash", "-c", f"set -e; source {control.shlex.quote(str(env_file))}; env -0"],
        capture_output=True, check=True, timeout=30, env={"PATH": os.environ["PATH"]},
    )  # fmt: skip
    shell = dict(item.split("=", 1) for item in sourced.stdout.decode().split("\0") if "=" in item)
    assert shell["CONVEYOR_STACK_DIR"] == str(layout.root) and shell["AWS_SECRET_ACCESS_KEY"] == "se'cr et"
    assert control.read_env_file(env_file) == control.client_env(layout, keys)


def test_stack_down_leaves_a_users_own_local_dvc_remote(tmp_path: Path) -> None:
    """`stack down` unset the local default remote whatever it was, even when the stack had never been up."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    dvc(tmp_path, "init", "-q")
    dvc(tmp_path, "remote", "add", "--local", "--default", "mine", str(tmp_path / "elsewhere"))
    paths = ProjectPaths(tmp_path)
    control.release_dvc_remote(paths)
    assert dvc(tmp_path, "remote", "default", "--local").stdout.strip() == "mine"
    dvc(tmp_path, "remote", "add", "--local", "--force", "--default", control.REMOTE, "s3://conveyor/dvc")
    control.release_dvc_remote(paths)
    left = dvc(tmp_path, "remote", "default", "--local", check=False)
    assert control.REMOTE not in left.stdout and "No default remote" in left.stdout + left.stderr


def test_a_postgres_that_accepts_and_never_answers_is_not_ready_within_seconds() -> None:
    """psycopg2 waited for good on a postmaster that accepted and said nothing: `stack status` hung."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    held: list[socket.socket] = []
    accepting = threading.Thread(target=lambda: held.append(listener.accept()[0]), daemon=True)
    accepting.start()
    try:
        started = time.monotonic()
        assert parts.postgres_ready(listener.getsockname()[1], "secret") is False
        assert time.monotonic() - started < 20
    finally:
        for connection in held:
            connection.close()
        listener.close()


def test_a_work_pool_name_with_a_space_is_asked_for_not_a_traceback() -> None:
    """Prefect allows `line 1` as a pool name; the worker check raised http.client.InvalidURL mid `stack up`."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    assert control._worker_online(f"http://127.0.0.1:{closed}/api", "line 1") is False


def test_an_endpoint_without_a_scheme_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """AWS_ENDPOINT_URL=127.0.0.1:9000 (the scheme forgotten) was boto3's bare ValueError traceback."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "127.0.0.1:9000")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    with pytest.raises(storage.StorageError, match=r"'127\.0\.0\.1:9000' \(AWS_ENDPOINT_URL\) has no scheme"):
        storage.client()


def test_a_stack_directory_under_home_is_the_homes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`stack.directory: ~/conveyor-stack` is under the home folder (it was a folder named `~` in the project); a
    relative one stays the project's."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    project = ProjectPaths(tmp_path / "project")
    under_home = Layout.of(project, Settings.model_validate({"stack": {"directory": "~/conveyor-stack"}}))
    assert under_home.root == tmp_path / "home" / "conveyor-stack"
    relative = Layout.of(project, Settings.model_validate({"stack": {"directory": ".stack"}}))
    assert relative.root == tmp_path / "project" / ".stack"
