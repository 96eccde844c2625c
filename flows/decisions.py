"""The registry step's decision, cached: which trained run and gate verdict it decided on, and what it decided. A
flow run in which no stage ran is told the same decision without importing MLflow (3 s); a record from an
interrupted step never exists, so such a run goes through the registry again."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from conveyor.paths import ProjectPaths, tracking_uri, write_atomically


def _decision_key(paths: ProjectPaths) -> str | None:
    """The trained run and its gate verdict, as this project's files say (None when either is missing)."""
    report = paths.gate / "report.json"
    if not (paths.run_record.is_file() and report.is_file()):
        return None
    return hashlib.sha256(paths.run_record.read_bytes() + b"\0" + report.read_bytes()).hexdigest()


def record_decision(paths: ProjectPaths, outcome: dict[str, Any]) -> None:
    """After the registry step completed: which run and gate verdict it decided on, and what it decided."""
    key = _decision_key(paths)
    if key is not None:
        record = {"key": key, "tracking_uri": tracking_uri(paths), "outcome": outcome}
        write_atomically(paths.scratch / "last-decision.json", json.dumps(record))


def previous_decision(paths: ProjectPaths) -> dict[str, Any] | None:
    """The registry step's outcome for exactly this run and gate report on this tracking store, recorded when it
    completed: a run in which no stage ran need not import MLflow (3 s) to be told the same. A record from an
    interrupted step never exists, so such a run goes through the registry again."""
    path = paths.scratch / "last-decision.json"
    key = _decision_key(paths)
    if key is None or not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError:
        return None
    if record.get("key") != key or record.get("tracking_uri") != tracking_uri(paths):
        return None
    version, then = record["outcome"]["version"], record["outcome"].get("champion")
    return {
        **record["outcome"],
        "newly_registered": False,
        "promoted": False,
        # Not "champion unchanged": the registry was not asked, and a rollback or promotion may have moved it since.
        "message": f"v{version} already decided (champion then: {f'v{then}' if then else 'none'})",
    }
