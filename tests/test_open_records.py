"""Markers of records a process holds open, and which of them a dead process left (conveyor.open_records)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil

from conveyor import open_records
from conveyor.paths import ProjectPaths
from conveyor.scaffold import REPO

MARK_AND_EXIT = """
import sys
from pathlib import Path
from conveyor import open_records
from conveyor.paths import ProjectPaths
open_records.mark_open(ProjectPaths(Path(sys.argv[1])), sys.argv[2], sys.argv[3], "http://x", "stage train")
"""


def _mark_from_a_process_that_exits(root: Path, kind: str, record_id: str) -> None:
    subprocess.run([sys.executable, "-c", MARK_AND_EXIT, str(root), kind, record_id], cwd=REPO, check=True)


def test_a_dead_process_marker_is_abandoned_a_live_one_and_our_own_are_not(tmp_path: Path) -> None:
    paths = ProjectPaths(tmp_path)
    _mark_from_a_process_that_exits(tmp_path, open_records.MLFLOW_RUN, "dead-run")
    open_records.mark_open(paths, open_records.MLFLOW_RUN, "own-run", "http://x", "stage evaluate")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live_marker = tmp_path / ".conveyor/open/mlflow-run-live-run.json"
        record = json.loads((tmp_path / ".conveyor/open/mlflow-run-own-run.json").read_text())
        live_marker.write_text(json.dumps({**record, "record_id": "live-run", "pid": live.pid, "pid_started": 0.0}))
        # pid_started 0: the PID now belongs to another process than the one that wrote the marker (reuse).
        found = {record.record_id for _, record in open_records.abandoned(paths, open_records.MLFLOW_RUN)}
        assert found == {"dead-run", "live-run"}

        live_marker.write_text(
            json.dumps(
                {
                    **record,
                    "record_id": "live-run",
                    "pid": live.pid,
                    "pid_started": psutil.Process(live.pid).create_time(),
                }
            )
        )
        found = {record.record_id for _, record in open_records.abandoned(paths, open_records.MLFLOW_RUN, 0.3)}
        assert found == {"dead-run"}  # alive after the wait: never judged dead
        assert open_records.abandoned(paths, open_records.PREFECT_FLOW_RUN) == []
    finally:
        live.kill()
        live.wait()


def test_markers_of_another_host_are_left_and_a_torn_marker_is_dropped(tmp_path: Path) -> None:
    paths = ProjectPaths(tmp_path)
    _mark_from_a_process_that_exits(tmp_path, open_records.PREFECT_FLOW_RUN, "elsewhere")
    marker = tmp_path / ".conveyor/open/prefect-flow-run-elsewhere.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "host": "another-machine"}))
    torn = tmp_path / ".conveyor/open/prefect-flow-run-torn.json"
    torn.write_text('{"kind": "prefect-fl')
    assert open_records.abandoned(paths, open_records.PREFECT_FLOW_RUN) == []
    assert marker.is_file() and not torn.exists()


def test_holding_removes_the_marker_on_return_and_on_error(tmp_path: Path) -> None:
    paths = ProjectPaths(tmp_path)
    folder = tmp_path / ".conveyor/open"
    with open_records.holding(paths, open_records.PREFECT_FLOW_RUN, "ok", "http://x", "training flow"):
        assert [p.name for p in folder.iterdir()] == ["prefect-flow-run-ok.json"]
    assert not list(folder.iterdir())
    try:
        with open_records.holding(paths, open_records.PREFECT_FLOW_RUN, "fails", "http://x", "training flow"):
            raise ValueError("a stage failed")
    except ValueError:
        pass
    assert not list(folder.iterdir())  # a failure is reported by the live process itself
