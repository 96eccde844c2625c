"""What every benchmark writes beside its numbers: the host it ran on, and the results file itself."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

from rich.console import Console

from conveyor.lineage import cpu_model
from conveyor.paths import available_cores
from conveyor.scaffold import REPO


def host(**extra: Any) -> dict[str, Any]:
    """The CPU model (its vector ISA named), the cores this process may use, the platform and Python."""
    return {
        "cpu": cpu_model(),
        "cores": available_cores(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        **extra,
    }


def write_result(path: Path, result: dict[str, Any], console: Console | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    if console is not None:
        shown = path.resolve().relative_to(REPO) if path.resolve().is_relative_to(REPO) else path
        console.print(f"written to {shown}")
