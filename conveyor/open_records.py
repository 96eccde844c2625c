"""Records a process leaves open while it works, and how the next one finds those whose process died.

An MLflow run is RUNNING while a stage logs into it, and a Prefect flow run is Running while the flow works. A process
killed outright (SIGKILL, the OOM killer, a power cut) never says otherwise, and both UIs then show a training that
never ends. So the process that opens such a record writes a marker under `.conveyor/open/` naming the record and
itself (host, PID, the PID's start time), and removes it when it has closed the record. A marker whose process is gone
from this host is evidence that the record lies: the next run of the project and `conveyor status` close it
(`flows/repair.py`, both records).

Only markers of this host are judged, and only by their process: a run of another machine (its own project folder),
or of a live process here, is never touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import psutil

from conveyor import processes
from conveyor.paths import ProjectPaths

MLFLOW_RUN = "mlflow-run"
PREFECT_FLOW_RUN = "prefect-flow-run"


@dataclass(frozen=True)
class OpenRecord:
    kind: str  # MLFLOW_RUN | PREFECT_FLOW_RUN
    record_id: str
    endpoint: str  # the tracking URI or Prefect API URL the record lives on
    host: str
    pid: int
    pid_started: float  # psutil's create_time (markers before `identity`: read with a second's slack)
    what: str  # what the process was doing ("stage train", "training flow")
    failure: str = ""  # set when the process failed and could not close the record itself (its server was down)
    # `processes.identity`: boot id and start ticks. create_time is computed from the wall clock's boot time, which
    # moves when the clock is stepped (NTP, a VM resumed), and a live training then read as gone.
    identity: str = ""

    @property
    def process_text(self) -> str:
        return f"process {self.pid} on {self.host} ({self.what})"


def _folder(paths: ProjectPaths) -> Path:
    return paths.scratch / "open"


def _marker(paths: ProjectPaths, kind: str, record_id: str) -> Path:
    return _folder(paths) / f"{kind}-{record_id}.json"


def mark_open(paths: ProjectPaths, kind: str, record_id: str, endpoint: str, what: str, failure: str = "") -> Path:
    """Say that this process holds `record_id` open (written atomically; a later mark by another process of the same
    run, e.g. the next stage, takes the marker over). With `failure`: the process failed and leaves the record for
    the next look to close, as failed, with these words."""
    folder = _folder(paths)
    folder.mkdir(parents=True, exist_ok=True)
    record = OpenRecord(
        kind,
        record_id,
        endpoint,
        socket.gethostname(),
        os.getpid(),
        psutil.Process().create_time(),
        what,
        failure,
        processes.identity(os.getpid()) or "",
    )
    path = _marker(paths, kind, record_id)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    temporary.write_text(json.dumps(asdict(record)))
    temporary.replace(path)
    return path


def mark_closed(paths: ProjectPaths, kind: str, record_id: str) -> None:
    """The record was closed by its process: nothing is left to repair. Only this process's own marker is removed."""
    path = _marker(paths, kind, record_id)
    record = _read(path)
    if record is not None and record.pid == os.getpid() and record.host == socket.gethostname():
        path.unlink(missing_ok=True)


def _read(path: Path) -> OpenRecord | None:
    try:
        return OpenRecord(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _process_gone(record: OpenRecord) -> bool:
    if record.identity:
        return not processes.same_process(record.pid, record.identity)
    try:
        process = psutil.Process(record.pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return True  # dead, only not yet reaped
        return abs(process.create_time() - record.pid_started) > 1.0  # the PID was reused
    except psutil.NoSuchProcess:
        return True


def abandoned(paths: ProjectPaths, kind: str, wait_seconds: float = 0.0) -> list[tuple[Path, OpenRecord]]:
    """Markers of `kind` of this host whose process is gone. With `wait_seconds`, a process still exiting (a killed
    run's stage, torn down by the kernel) is given that long first."""
    folder = _folder(paths)
    if not folder.is_dir():
        return []
    host = socket.gethostname()
    found = []
    for path in sorted(folder.glob(f"{kind}-*.json")):
        record = _read(path)
        if record is None:
            path.unlink(missing_ok=True)  # a marker cut short by the crash itself: it names nothing
            continue
        if record.host != host or record.pid == os.getpid():
            continue
        if not _process_gone(record) and wait_seconds > 0:
            with contextlib.suppress(psutil.Error):
                psutil.Process(record.pid).wait(timeout=wait_seconds)
        if _process_gone(record):
            found.append((path, record))
    return found


def now_text() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def crash_note(record: OpenRecord, found_by: str) -> str:
    """The words left on a record closed for a dead process: what was found, when, and by whom."""
    if record.failure:
        closed = f"closed by {found_by} at {now_text()}"
        return f"{record.process_text} failed ({record.failure}) and could not close it; {closed}"
    return f"{record.process_text} was gone when {found_by} looked at {now_text()}: the process died without closing it"


@contextlib.contextmanager
def holding(paths: ProjectPaths, kind: str, record_id: str | None, endpoint: str, what: str) -> Iterator[None]:
    """Marked open for the block; the marker stays only if the process dies inside it (`record_id` None: nothing)."""
    if record_id is None:
        yield
        return
    mark_open(paths, kind, record_id, endpoint, what)
    try:
        yield
    finally:
        mark_closed(paths, kind, record_id)


class StopRequested(BaseException):
    """SIGTERM reached a process that holds a record open: a stop, not a crash. A BaseException, like
    KeyboardInterrupt, so that no `except Exception` on the way out swallows it."""

    exit_code = 128 + 15  # what a shell reports for a process ended by SIGTERM


def _raise_stop(signum: int, frame: object) -> None:
    # One stop is enough: a second SIGTERM (a supervisor that repeats itself) must not end the process while it is
    # closing its record, which would leave the record open.
    signal.signal(signum, signal.SIG_IGN)
    raise StopRequested(f"stopped by {signal.Signals(signum).name}")


@contextlib.contextmanager
def sigterm_stops() -> Iterator[None]:
    """Within the block, the first SIGTERM raises StopRequested (so the record is closed as stopped) instead of ending
    the process on the spot, and later ones are ignored: close the record inside the block. Only the main thread can
    install a handler; elsewhere the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stop_note(reason: str) -> str:
    """The words left on a record its own process closed when it was stopped."""
    return f"{reason} at {now_text()} on {socket.gethostname()} (process {os.getpid()}): a stop, not a crash"


def stop_descendants(process: subprocess.Popen[str], grace: float = 30.0) -> None:
    """SIGTERM to every process below `process` (a stage's command, through DVC and a shell), then wait up to
    `grace` s for all of them to exit on their own; what is still alive then is killed.

    All of them, not `process` alone: DVC runs the command through `$SHELL -c`. bash execs a single command, but a
    shell that stays between them dies of SIGTERM at once, and DVC then exits while the command is still closing its
    MLflow run; returning then would let the caller exit, and report the stop, before the record is closed."""
    below: list[psutil.Process] = []
    with contextlib.suppress(psutil.NoSuchProcess):
        below = psutil.Process(process.pid).children(recursive=True)
    for child in below:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(below, timeout=grace)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    try:
        process.wait(timeout=10.0)  # DVC, once its command is gone, releases its lock and exits
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
