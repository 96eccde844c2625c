"""The local Prefect server that stays up between runs.

Without PREFECT_API_URL, Prefect starts a temporary server inside every process that runs a flow (6 to 20 s on two
cores, then gone with its UI). Conveyor instead keeps one `prefect server start` per user running in the background,
on the database those temporary servers used ($PREFECT_HOME/prefect.db), so `conveyor run`, `conveyor deploy` and
`conveyor worker` find it in milliseconds and its UI shows every run. It is started on first use and found again
from a small state file; `conveyor server stop` ends it.

Rules: PREFECT_API_URL, when set, always wins (a team's server); this module never touches a server it did not start.
Nothing here imports Prefect: the API URL must be in the environment before Prefect is imported.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from conveyor.errors import ConveyorError
from conveyor.net import StartupError, free_port, http_answers, port_free, wait_started
from conveyor.paths import exclusive, write_atomically
from conveyor.processes import identity, same_process

DEFAULT_PORT = 4200
START_TIMEOUT_S = 120.0  # a fresh database is migrated on first start: ~20 s on two busy cores


class PrefectServerError(ConveyorError, RuntimeError):
    """The local Prefect server could not be started or reached; the message says where its log is."""


@dataclass(frozen=True)
class LocalServer:
    pid: int
    port: int
    home: str
    started_at: str
    identity: str = ""  # `conveyor.processes.identity` (older records: ""): a pid reused after a reboot is not it

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def prefect_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()


def _state_file(home: Path) -> Path:
    return home / "conveyor-server.json"


def log_file(home: Path | None = None) -> Path:
    return (home or prefect_home()) / "conveyor-server.log"


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    return http_answers(f"{api_url.rstrip('/')}/health", timeout=timeout)


def find(home: Path | None = None) -> LocalServer | None:
    """The server this user's Conveyor started, if it is still up and answering."""
    server = _recorded(home or prefect_home())
    return server if server is not None and healthy(server.api_url) else None


def _recorded(home: Path) -> LocalServer | None:
    """The server the state file names, if its process is still a Prefect server (answering or not: under load,
    /health may take longer than its timeout, and that server still holds the port and the database)."""
    try:
        server = LocalServer(**json.loads(_state_file(home).read_text()))
    except (OSError, ValueError, TypeError):
        return None
    if server.identity and not same_process(server.pid, server.identity):
        return None  # the pid is another process now (the stack's own Prefect server, after a reboot)
    return server if _alive(server.pid) and _is_prefect_server(server.pid) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process reuses the pid
        return False
    return True


def _is_prefect_server(pid: int) -> bool:
    """Whether the pid is (still) a Prefect server's, not another process that reuses it."""
    import psutil

    try:
        command = psutil.Process(pid).cmdline()
    except (psutil.Error, OSError):
        return False
    return any(part.endswith("prefect") for part in command) and "server" in command


def server_argv(host: str, port: int) -> list[str]:
    """The command line of a Prefect server (API and UI) of this environment."""
    return [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", host, "--port", str(port)]


def server_env(home: Path, host: str, port: int) -> dict[str, str]:
    """Its environment: its own home (database, logs), the port the UI asks the API on, no analytics."""
    return {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_API_HOST": host,
        "PREFECT_SERVER_API_PORT": str(port),  # the UI asks the API on this port, not 4200
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }


def start(
    port: int | None = None,
    home: Path | None = None,
    timeout: float = START_TIMEOUT_S,
    extra_env: dict[str, str] | None = None,
) -> LocalServer:
    """Find the running server or start one in the background (detached: it outlives this process).

    A lock makes concurrent callers share one server. The port is `port`, else 4200 when free, else any free port.
    """
    home = home or prefect_home()
    home.mkdir(parents=True, exist_ok=True)
    with exclusive(home / "conveyor-server.lock"):
        running = _recorded(home)
        if running is not None:
            # Up but slow to answer (training beside it): wait for it, never start a second server on its database
            # (unless it exits meanwhile: then one is started below).
            try:
                wait_started(
                    "the local Prefect server",
                    lambda: healthy(running.api_url, 2.0) or _recorded(home) is None,
                    timeout,
                )
            except StartupError:
                raise PrefectServerError(
                    f"the local Prefect server (pid {running.pid}, {running.api_url}) runs but has not answered for "
                    f"{timeout:.0f} s: `conveyor server stop`, then try again; its log: {log_file(home)}"
                ) from None
            if _recorded(home) is not None:
                return running
        chosen = port or (DEFAULT_PORT if port_free(DEFAULT_PORT) else free_port())
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        env.update(server_env(home, "127.0.0.1", chosen), **(extra_env or {}))
        with log_file(home).open("ab") as log:
            process = subprocess.Popen(
                server_argv("127.0.0.1", chosen),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        server = LocalServer(
            process.pid, chosen, str(home), time.strftime("%Y-%m-%dT%H:%M:%S%z"), identity(process.pid) or ""
        )
        try:
            wait_started("the local Prefect server", lambda: healthy(server.api_url, 1.0), timeout, process)
        except StartupError as exc:
            _stop_group(process.pid)
            raise PrefectServerError(f"{exc} on port {chosen}; its log: {log_file(home)}") from None
        write_atomically(_state_file(home), json.dumps(asdict(server)))
        return server


def stop(home: Path | None = None) -> LocalServer | None:
    """Stop the server this user's Conveyor started; None when none was running."""
    home = home or prefect_home()
    server = _recorded(home)  # answering or not: a slow server is stopped too, not forgotten while it runs
    state = _state_file(home)
    if server is None:
        state.unlink(missing_ok=True)
        return None
    _stop_group(server.pid)
    state.unlink(missing_ok=True)
    return server


def _stop_group(pid: int) -> None:
    """SIGTERM the server's process group (uvicorn and its children), SIGKILL what is left after 15 s."""
    for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            with contextlib.suppress(ChildProcessError):  # reap it when it is our child (started and stopped here)
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.1)


def require_answering(api_url: str, wait: float) -> None:
    """A configured server that does not answer is said so at once, by its URL (Prefect's client raised a
    ConnectError or UnsupportedProtocol traceback, or a worker retried for minutes)."""
    if not api_url.startswith(("http://", "https://")):
        raise PrefectServerError(f"PREFECT_API_URL={api_url!r} is not an http(s) URL (e.g. http://127.0.0.1:4200/api)")
    deadline = time.monotonic() + wait
    # Something listens there: any HTTP answer counts (a proxy's 401 is Prefect's to explain), and so does a /health
    # that is slow to answer (a loaded server, on 2 cores); only a refused connection or an unknown host does not.
    health = f"{api_url.rstrip('/')}/health"
    while not http_answers(health, accept_errors=True, timeout=5.0, slow_is_up=True):
        if time.monotonic() >= deadline:  # a server restarting gets `wait` seconds
            raise PrefectServerError(
                f"the Prefect server at PREFECT_API_URL={api_url} does not answer ({health}): "
                "start it, or unset PREFECT_API_URL to use the local one (`conveyor server start`)"
            )
        time.sleep(0.5)


def use_api(start_if_needed: bool = True, wait: float = 10.0) -> str:
    """Put the Prefect API this process should use in PREFECT_API_URL (before Prefect is imported) and return it:
    the one already set (once it answers, within `wait` seconds), else the local server (started when
    `start_if_needed`)."""
    configured = os.environ.get("PREFECT_API_URL")
    if configured:
        require_answering(configured, wait)
        return configured
    server = start() if start_if_needed else find()
    if server is None:
        raise PrefectServerError("no Prefect server: start one with `conveyor server start`, or set PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = server.api_url
    return server.api_url
