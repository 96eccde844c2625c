"""The local Prefect server that stays up between runs, and `conveyor status` beside it: a real `prefect server start`
in a throwaway Prefect home, started, found again, reported and stopped through the CLI."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from flows import local_server
from tests.conftest import base_env, make_project


def conveyor(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["conveyor", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_started_once_found_again_and_stopped(tmp_path: Path) -> None:
    home = tmp_path / "prefect-home"
    project = make_project(tmp_path / "project")
    env = base_env(PREFECT_HOME=str(home), COLUMNS="200")
    try:
        first = conveyor(project, env, "server", "start")
        assert first.returncode == 0, first.stdout + first.stderr
        assert "started" in first.stdout
        state = json.loads((home / "conveyor-server.json").read_text())
        server = local_server.find(home)
        assert server is not None and server.pid == state["pid"]
        assert local_server.healthy(server.api_url)

        again = conveyor(project, env, "server", "start")
        assert "already running" in again.stdout and f"pid {server.pid}" in again.stdout

        # Slow to answer (training beside it): waited for, not replaced by a second server on its database.
        answers = iter([False, False, True])
        real = local_server.healthy
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(local_server, "healthy", lambda url, timeout=2.0: next(answers, True) and real(url, timeout))
            assert local_server.find(home) is None  # not answering now...
            assert local_server.start(home=home).pid == server.pid  # ...but it is the one, and it answers again

        # `conveyor status` finds the server by itself, and every part says something, even with no data or model.
        status = conveyor(project, env, "status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert "none yet: `conveyor data synth`" in status.stdout
        assert "champion" in status.stdout and "none" in status.stdout
        assert server.api_url in status.stdout
        assert "last training run" in status.stdout and "none recorded for this project" in status.stdout
        assert "not deployed (`conveyor deploy`)" in status.stdout
    finally:
        stopped = conveyor(project, env, "server", "stop")
    assert "stopped the Prefect server" in stopped.stdout
    assert local_server.find(home) is None and not (home / "conveyor-server.json").exists()
    after = conveyor(project, env, "server", "status")
    assert after.returncode == 1 and "no local Prefect server runs" in after.stdout


def test_a_configured_api_wins_and_nothing_is_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_server: str
) -> None:
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    monkeypatch.setenv("PREFECT_API_URL", prefect_server)
    assert local_server.use_api() == prefect_server
    # One that does not answer, or is not a URL, is said so by its URL (it was a Prefect traceback); nothing started.
    for api, said in (("http://127.0.0.1:9/api", "does not answer"), ("notaurl", r"is not an http\(s\) URL")):
        monkeypatch.setenv("PREFECT_API_URL", api)
        with pytest.raises(local_server.PrefectServerError, match=said):
            local_server.use_api(wait=1.0)
    assert not (tmp_path / "conveyor-server.json").exists()


def test_no_server_and_not_allowed_to_start_one_says_how(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    (tmp_path / "conveyor-server.json").write_text(json.dumps({"pid": 999999, "port": 9, "home": "", "started_at": ""}))
    with pytest.raises(local_server.PrefectServerError, match="conveyor server start"):
        local_server.use_api(start_if_needed=False)


def test_planned_ports_come_from_below_the_kernels_own_range_and_skip_taken_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A port planned now and bound later must not be one the kernel may hand to another process meanwhile (bind to
    0, an outgoing connection's local end): a CI run saw one server's Triton on the port planned for the next API."""
    import socket

    from conveyor import net

    ephemeral_low = net._ephemeral_low()
    picked = {net.free_port() for _ in range(40)}
    assert len(picked) == 40  # each handed out once in a process
    assert all(ephemeral_low - net.PLANNED_PORTS_BELOW_EPHEMERAL <= port < ephemeral_low for port in picked)

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        choices = iter([busy, ephemeral_low - 7, ephemeral_low - 9])
        monkeypatch.setattr(net, "_pick", type("Fixed", (), {"randrange": lambda self, lo, hi: next(choices)})())
        monkeypatch.setattr(net, "_handed_out", set())
        first = net.free_port()
        assert first != busy and first in (ephemeral_low - 7, ephemeral_low - 9)
