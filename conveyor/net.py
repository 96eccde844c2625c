"""Ports and health checks for the servers Conveyor starts (the model server, Prefect, the production stack, the
demo): one copy of each, used by all."""

from __future__ import annotations

import errno
import random
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from conveyor.errors import ConveyorError

T = TypeVar("T")


class StartupError(ConveyorError, RuntimeError):
    """A server that exited, or did not answer in time, while starting; the message says where its log is."""


# The kernel's range for ports it picks itself (bind to port 0, the local end of an outgoing connection); Linux's
# default where /proc does not say.
EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
EPHEMERAL_DEFAULT_LOW = 32768
PLANNED_PORTS_BELOW_EPHEMERAL = 12000  # how many ports under that range free_port picks from
_handed_out: set[int] = set()
_pick = random.SystemRandom()


def _ephemeral_low() -> int:
    try:
        return int(EPHEMERAL_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return EPHEMERAL_DEFAULT_LOW


def free_port(host: str = "127.0.0.1") -> int:
    """A port no one listens on now, for a server started later: picked at random below the kernel's ephemeral
    range. A port the kernel picked (bind to 0) is free again once this returns, and the next process to ask the
    kernel, or to open a connection, may get it before the planned server binds it: a CI run once saw one server's
    internal Triton answer on the port planned for the next server's API. Ports below that range the kernel never
    hands out by itself. A port is handed out once per process."""
    high = _ephemeral_low()
    low = max(1024, high - PLANNED_PORTS_BELOW_EPHEMERAL)
    for _ in range(200):
        port = _pick.randrange(low, high)
        if port not in _handed_out and listen_problem(port, host) is None:
            _handed_out.add(port)
            return port
    with socket.socket() as probe:  # that range is all taken: the kernel's pick, with the race it has
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on `port` now (a port in TIME_WAIT counts as free, as it does for servers)."""
    return listen_problem(port, host) is None


def listen_problem(port: int, host: str = "127.0.0.1") -> str | None:
    """Why a server could not listen on `host`:`port` now, in words (None: it could). A host that is no address of
    this machine, or no name at all, is told apart from a port that is taken."""
    try:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except socket.gaierror:
        return f"{host} is no host name or address this machine can resolve"
    except OSError as exc:
        if exc.errno == errno.EADDRNOTAVAIL:
            return f"{host} is not an address of this machine (0.0.0.0 listens on all of them)"
        return f"port {host}:{port} is not free"
    return None


def http_answers(url: str, accept_errors: bool = False, timeout: float = 3.0, slow_is_up: bool = False) -> bool:
    """True when `url` answers 200 (or any HTTP status, with accept_errors: a store that wants a signature; or no
    answer within `timeout`, with slow_is_up: something accepted the connection, a loaded server)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return bool(response.status == 200)
    except urllib.error.HTTPError:
        return accept_errors
    except urllib.error.URLError as exc:
        return slow_is_up and isinstance(exc.reason, TimeoutError)  # socket.timeout is TimeoutError
    except TimeoutError:
        return slow_is_up
    except (OSError, ValueError):
        return False


def wait_until(predicate: Callable[[], T | None], timeout: float, what: str, interval: float = 0.25) -> T:
    """The first truthy value of `predicate`, asked every `interval` s; TimeoutError naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def wait_started(
    what: str,
    healthy: Callable[[], bool],
    timeout: float,
    process: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> None:
    """Until `healthy()`; a StartupError (with the end of `log`) when `process` exits first or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while not healthy():
        if process is not None and process.poll() is not None:
            tail = log.read_text(errors="replace")[-1500:] if log is not None and log.is_file() else ""
            where = f"; the end of {log}:\n{tail}" if log is not None else ""
            raise StartupError(f"{what} exited with {process.returncode} while starting{where}")
        if time.monotonic() >= deadline:
            see = f"; see {log}" if log is not None else ""
            raise StartupError(f"{what} did not become healthy within {timeout:.0f} s{see}")
        time.sleep(0.25)
