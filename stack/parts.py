"""The parts of the local production stack, each a real server process on its own port, with its data and log under
the stack's directory: how to start it, how to know it is up, how to stop it.

PostgreSQL refuses to run as root; as root it runs as the `postgres` user (Debian's package creates it), so the
stack's directory must be reachable by that user. Every part is started in a session of its own and recorded with its
PID and the PID's start time, so `down` stops exactly what `up` started (a reused PID is another process).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from conveyor.errors import ConveyorError

VENV_BIN = Path(sys.executable).parent


class StackError(ConveyorError, RuntimeError):
    """A part cannot start (missing program, port taken, did not become healthy); the message says which and why."""


@dataclass(frozen=True)
class Started:
    """A part `up` started: what `status` checks and `down` stops."""

    name: str
    pid: int
    pid_started: float
    url: str
    log: str
    seconds: float  # from start to healthy

    def process(self) -> psutil.Process | None:
        """The process, if it is still the one that was started."""
        try:
            process = psutil.Process(self.pid)
            if abs(process.create_time() - self.pid_started) > 1.0 or process.status() == psutil.STATUS_ZOMBIE:
                return None
            return process
        except psutil.NoSuchProcess:
            return None


def load_state(path: Path) -> dict[str, Started]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {name: Started(**entry) for name, entry in raw.items()}


def save_state(path: Path, state: dict[str, Started]) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({name: asdict(entry) for name, entry in state.items()}, indent=2))
    temporary.replace(path)


def start(
    name: str,
    argv: list[str],
    *,
    env: dict[str, str],
    log: Path,
    cwd: Path,
    url: str,
    user: str | None = None,
) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    log.touch()
    log.chmod(0o600)  # a server may print its connection settings: readable by the stack's user only
    with log.open("ab") as out:
        out.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} conveyor stack up: {' '.join(argv)}\n".encode())
        out.flush()
        try:
            return subprocess.Popen(
                argv,
                env=env,
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                user=user,
                # A worker started from a shell in the background inherits SIGINT ignored, and Prefect's own SIGTERM
                # handling then never stops it: start every part with default signal handling.
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            )
        except FileNotFoundError as exc:
            raise StackError(f"{name}: cannot run {argv[0]} ({exc.strerror})") from None


def record(name: str, process: subprocess.Popen[bytes], url: str, log: Path, seconds: float) -> Started:
    return Started(name, process.pid, psutil.Process(process.pid).create_time(), url, str(log), round(seconds, 2))


def stop(entry: Started, grace: float = 20.0) -> str:
    """Stop a part `up` started (and only that process and its session): SIGTERM (PostgreSQL: SIGINT, its fast
    shutdown), then SIGKILL after `grace` s. Returns what happened, for the table."""
    process = entry.process()
    if process is None:
        return "not running"
    family = [process]
    with contextlib.suppress(psutil.Error):
        family += process.children(recursive=True)
    first = signal.SIGINT if entry.name == "postgres" else signal.SIGTERM
    for member in family if entry.name != "postgres" else [process]:  # PostgreSQL stops its own children
        with contextlib.suppress(psutil.Error):
            member.send_signal(first)
    _, alive = psutil.wait_procs(family, timeout=grace)
    for member in alive:
        with contextlib.suppress(psutil.Error):
            member.kill()
    psutil.wait_procs(alive, timeout=10)
    return "stopped" if not alive else f"killed after {grace:.0f} s"


# --- PostgreSQL -------------------------------------------------------------------------------------------------


def postgres_bin() -> Path:
    """Debian's server binaries (`postgresql` package); PATH first, then /usr/lib/postgresql/*/bin."""
    found = shutil.which("postgres")
    if found:
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    if versions:
        return Path(versions[-1]).parent
    raise StackError("PostgreSQL is not installed: `apt-get install postgresql` (Debian), then `conveyor stack up`")


def postgres_user() -> str | None:
    """The user the cluster runs as: `postgres` when this is root (PostgreSQL refuses root), else this user."""
    if os.geteuid() != 0:
        return None
    try:
        import pwd

        pwd.getpwnam("postgres")
    except KeyError:
        raise StackError(
            "running as root, and no `postgres` user to run PostgreSQL as (Debian's package makes it)"
        ) from None
    return "postgres"


def _reachable_by(user: str, folder: Path) -> Path | None:
    """The first parent of `folder` that `user` cannot traverse (None: all fine)."""
    import pwd

    uid = pwd.getpwnam(user).pw_uid
    for parent in [*reversed(folder.parents)]:
        stat = parent.stat()
        if stat.st_uid != uid and not stat.st_mode & 0o001:
            return parent
    return None


def init_postgres(folder: Path, password: str) -> bool:
    """A cluster of the stack's own in `folder`/data (initdb once; False when it already existed): loopback TCP with
    passwords (scram-sha-256), the superuser `postgres` with `password`."""
    data = folder / "data"
    if (data / "PG_VERSION").is_file():
        return False
    user = postgres_user()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "socket").mkdir(exist_ok=True)
    pwfile = folder / "pwfile"
    pwfile.write_text(password + "\n")
    pwfile.chmod(0o600)
    if user is not None:
        blocked = _reachable_by(user, folder)
        if blocked is not None:
            raise StackError(
                f"PostgreSQL runs as the `postgres` user here (this is root), and it cannot reach {folder}: "
                f"{blocked} is closed to other users; set stack.directory to a folder it can reach"
            )
        import pwd

        entry = pwd.getpwnam(user)
        for path in (folder, folder / "socket", pwfile):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    result = subprocess.run(
        [
            str(postgres_bin() / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "--pwfile",
            str(pwfile),
            "--auth-local=scram-sha-256",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
        ],
        cwd=folder,
        user=user,
        capture_output=True,
        text=True,
    )
    pwfile.unlink(missing_ok=True)
    if result.returncode != 0:
        raise StackError(f"initdb failed in {data}: {result.stderr.strip() or result.stdout.strip()}")
    return True


def postgres_argv(folder: Path, port: int) -> list[str]:
    return [
        str(postgres_bin() / "postgres"),
        "-D",
        str(folder / "data"),
        "-c",
        f"port={port}",
        "-c",
        "listen_addresses=127.0.0.1",
        "-c",
        f"unix_socket_directories={folder / 'socket'}",
    ]


def postgres_ready(port: int, password: str) -> bool:
    import psycopg2

    try:
        psycopg2.connect(
            host="127.0.0.1", port=port, user="postgres", password=password, dbname="postgres", connect_timeout=3
        ).close()  # a postmaster that accepts and never answers would hold every health check for good
    except psycopg2.OperationalError:
        return False
    return True


def ensure_databases(port: int, password: str, role_password: str, databases: tuple[str, ...]) -> None:
    """The role `conveyor` owning one database per server (idempotent)."""
    import psycopg2
    from psycopg2 import sql

    connection = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", password=password, dbname="postgres")
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_roles WHERE rolname = 'conveyor'")
            if cursor.fetchone() is None:
                cursor.execute(sql.SQL("CREATE ROLE conveyor LOGIN PASSWORD {}").format(sql.Literal(role_password)))
            for database in databases:
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
                if cursor.fetchone() is None:
                    cursor.execute(sql.SQL("CREATE DATABASE {} OWNER conveyor").format(sql.Identifier(database)))
    finally:
        connection.close()
