"""The stack's own helpers without starting the stack (`tests/test_stack.py` starts it): Prometheus' scrape
configuration checked by Prometheus' own `promtool`, the env file read back as a shell reads it, the DVC remote
handed back, and the probes that must answer in seconds."""

from __future__ import annotations

import contextlib
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


def test_a_damaged_record_or_secrets_file_is_named_not_read_as_an_empty_stack(tmp_path: Path) -> None:
    """A truncated state.json was read as no stack (`down` stopped nothing and forgot the parts); a list or a missing
    field was a TypeError traceback; secrets.env lost a key mid-write (KeyError traceback at every `up`), or was lost
    beside a database it opens, and new passwords were made that could not open it."""
    layout = _layout(tmp_path)
    for text in ('{"mlflow": {"name": "mlfl', "[]", '{"mlflow": {"name": "mlflow"}}'):
        layout.state_file.write_text(text)
        with pytest.raises(parts.StackError, match=r"state\.json is damaged .*Stop them by hand"):
            parts.load_state(layout.state_file)
    layout.state_file.unlink()
    assert parts.load_state(layout.state_file) == {}

    layout.secrets_file.write_text("S3_ACCESS_KEY=a\n")
    with pytest.raises(parts.StackError, match="S3_SECRET_KEY, PG_SUPERUSER_PASSWORD, PG_PASSWORD missing"):
        control._secrets(layout)
    layout.secrets_file.unlink()
    (layout.root / "postgres" / "data").mkdir(parents=True)
    (layout.root / "postgres" / "data" / "PG_VERSION").write_text("15\n")
    with pytest.raises(parts.StackError, match="opens only with the password it held"):
        control._secrets(layout)
    assert not layout.secrets_file.exists()


def test_the_stacks_secrets_are_private_from_their_first_byte(tmp_path: Path) -> None:
    """`touch(mode=0o600)` leaves an existing file's mode alone: a stack.env once made 0644 kept the generated keys
    readable by every user. Each secret file is now created 0600, whatever was there."""
    settings = Settings.model_validate({"stack": {"directory": str(tmp_path / "fresh")}})
    layout = Layout(tmp_path / "fresh", settings, tmp_path)
    keys = control._secrets(layout)
    assert set(keys) == set(control.SECRET_KEYS)
    assert layout.root.stat().st_mode & 0o077 in (0, 0o011)  # the stack's data is its user's (root: traversable)
    assert layout.secrets_file.stat().st_mode & 0o777 == 0o600
    layout.env_file.write_text("old")
    layout.env_file.chmod(0o644)
    control.write_env_file(layout, keys)
    assert layout.env_file.stat().st_mode & 0o777 == 0o600 and keys["S3_SECRET_KEY"] in layout.env_file.read_text()
    assert control._secrets(layout) == keys  # read back, not made again


def test_two_ups_at_once_are_refused(tmp_path: Path) -> None:
    """Two `stack up` at once each started the parts the other had not recorded yet: a second worker ran on, taking
    flow runs, that no `down` stopped."""
    from conveyor.paths import exclusive

    layout = _layout(tmp_path)
    paths = ProjectPaths(tmp_path)
    lock = layout.root.parent / f".{layout.root.name}.lock"
    with exclusive(lock):
        with pytest.raises(parts.StackError, match="another `conveyor stack up` or `down` is running"):
            control.up(paths, layout.settings, timeout=5)
        with pytest.raises(parts.StackError, match="another `conveyor stack up` or `down` is running"):
            control.down(paths, layout.settings)
    assert not layout.state_file.exists()


def test_a_part_is_known_by_its_start_whatever_the_clock_did_and_its_leftovers_are_stopped(tmp_path: Path) -> None:
    """Its start as a wall-clock time moved with the clock (NTP after a boot, a VM resumed): every part looked gone,
    and `down` forgot parts that kept running. A part whose main process died left its children (a crashed MLflow's
    uvicorn on the port) to every later `up`'s 'port in use'."""
    log = tmp_path / "part.log"
    process = parts.start(
        "part", ["sh", "-c", "sleep 300 & exec sleep 300"], env=dict(os.environ), log=log, cwd=tmp_path, url="-"
    )
    try:
        entry = parts.record("part", process, "-", log, 0.0)
        assert entry.identity and entry.process() is not None
        jumped = parts.Started(**{**entry.__dict__, "pid_started": entry.pid_started + 3600})  # the clock moved
        assert jumped.process() is not None
        other = parts.Started(**{**entry.__dict__, "identity": entry.identity.rsplit(":", 1)[0] + ":1"})
        assert other.process() is None  # a pid reused by another process

        time.sleep(0.3)  # the shell has started its background sleep
        process.kill()  # the main process dies; its child stays in the part's group
        process.wait()
        assert entry.process() is None and len(parts.left_in_group(entry)) == 1
        assert parts.stop(entry, grace=5) == "had exited; stopped 1 of its processes left running"
        assert parts.left_in_group(entry) == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 9)
