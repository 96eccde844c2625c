"""The parts of the local production stack, each a real server process on its own port, with its data and log under
the stack's directory: how to start it, how to know it is up, how to stop it.

PostgreSQL refuses to run as root; as root it runs as the `postgres` user (Debian's package creates it), so the
stack's directory must be reachable by that user. Every part is started in a session of its own and recorded with its
PID and the process's identity (`conveyor.processes`: its start since the boot), so `down` stops exactly what `up`
started (a reused PID is another process), and what a dead part left in its session.
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
from conveyor.paths import write_atomically
from conveyor.processes import identity, same_process

VENV_BIN = Path(sys.executable).parent


class StackError(ConveyorError, RuntimeError):
    """A part cannot start (missing program, port taken, did not become healthy); the message says which and why."""


@dataclass(frozen=True)
class Started:
    """A part `up` started: what `status` checks and `down` stops."""

    name: str
    pid: int
    pid_started: float  # wall-clock start: what finds its children started after it (`stop`)
    url: str
    log: str
    seconds: float  # from start to healthy
    identity: str = ""  # `conveyor.processes.identity`: the process, whatever the clock did since (older records: "")

    def process(self) -> psutil.Process | None:
        """The process, if it is still the one that was started."""
        try:
            if self.identity:
                return psutil.Process(self.pid) if same_process(self.pid, self.identity) else None
            process = psutil.Process(self.pid)
            if abs(process.create_time() - self.pid_started) > 1.0 or process.status() == psutil.STATUS_ZOMBIE:
                return None
            return process
        except psutil.NoSuchProcess:
            return None


def load_state(path: Path) -> dict[str, Started]:
    """What `up` started; nothing when it never ran. A damaged record is an error, not an empty stack: read as
    empty, `down` stopped nothing and forgot the parts that kept running."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise StackError(f"{path}: cannot read the stack's record ({exc.strerror})") from None
    try:
        raw = json.loads(text)
        return {str(name): Started(**entry) for name, entry in raw.items()}
    except (ValueError, TypeError, AttributeError) as exc:
        raise StackError(
            f"{path} is damaged ({type(exc).__name__}: {exc}): the parts it recorded may still run. Stop them by "
            f"hand (their logs are under {path.parent / 'logs'}; `ps -ef | grep {path.parent}`), then remove it"
        ) from None


def save_state(path: Path, state: dict[str, Started]) -> None:
    write_atomically(path, json.dumps({name: asdict(entry) for name, entry in state.items()}, indent=2))


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
    started = psutil.Process(process.pid).create_time()
    return Started(name, process.pid, started, url, str(log), round(seconds, 2), identity(process.pid) or "")


def left_in_group(entry: Started) -> list[psutil.Process]:
    """Processes still in the part's process group after its main process died (each part leads a session of its
    own): a crashed `mlflow server` leaves its uvicorn holding the port. Only those started after the part, so a
    group id reused since a reboot is nobody's to stop."""
    found = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == entry.pid and process.create_time() >= entry.pid_started - 1.0:
                found.append(process)
        except (OSError, psutil.Error):  # gone meanwhile, or another user's
            continue
    return found


def stop(entry: Started, grace: float = 20.0) -> str:
    """Stop a part `up` started (that process and its children, or what it left in its session when it died):
    SIGTERM (PostgreSQL: SIGINT, its fast shutdown), then SIGKILL after `grace` s. Returns what happened, for the
    table."""
    process = entry.process()
    if process is None:
        orphans = left_in_group(entry)
        if not orphans:
            return "not running"
        for member in orphans:
            with contextlib.suppress(psutil.Error):
                member.terminate()
        _, alive = psutil.wait_procs(orphans, timeout=grace)
        for member in alive:
            with contextlib.suppress(psutil.Error):
                member.kill()
        return f"had exited; stopped {len(orphans)} of its processes left running"
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
    initdb = str(postgres_bin() / "initdb")  # a missing PostgreSQL is said before the password is written
    write_atomically(pwfile, password + "\n", private=True)
    try:
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
                initdb,
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
    finally:
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
