"""What every command group shares: the consoles, the one place expected errors become a message and exit 1, and
opening the project (and its registry) the command runs in."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from conveyor.errors import TEMPORARY_FAILURE, ConveyorError
from conveyor.open_records import StopRequested
from conveyor.paths import ProjectNotFoundError, ProjectPaths, disk_full_message, find_project_root
from conveyor.settings import MAX_WINDOW_HOURS, Settings, load_settings
from conveyor.tables import FoldingTable

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

# Expected failures: Conveyor's own, and a path the user named that is missing or already there.
# A path the user gave that is missing, taken, unreadable, or a folder where a file goes (or the reverse): the OS's
# message names the path.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    ConveyorError,
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)


def positive(value: float | None) -> float | None:
    """A typer callback: a finite number above 0 (click's ranges let nan and inf through, and 0 read as unset)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"{value}: a number above 0")
    return value


def window_hours(value: float | None) -> float | None:
    """A typer callback: a window of hours above 0 and at most ten years, as `monitor.window_hours`."""
    if value is not None and positive(value) and value > MAX_WINDOW_HOURS:
        raise typer.BadParameter(f"{value}: at most {MAX_WINDOW_HOURS} hours (ten years)")
    return value


PORT = {"min": 1, "max": 65535}  # typer.Option(**PORT): a port that exists (70000 wrapped to 4464 and was printed)


def print_error(exc: BaseException) -> None:
    # The message as text, not Rich markup: a path like `line[/cam1]` crashed the error's own printing, `[cam1]` was
    # dropped from it, and a regex's `[a-z0-9]` vanished from a settings error.
    err_console.print("[bold red]error:[/]", escape(str(exc)), highlight=False, soft_wrap=True)


def friendly_errors(fn: F) -> F:
    """Expected failures (bad params, bad data, an unreachable server) end with their message, not a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except EXPECTED_ERRORS as exc:
            print_error(exc)
            raise typer.Exit(TEMPORARY_FAILURE if isinstance(exc, ConveyorError) and exc.transient else 1) from None
        except StopRequested as stop:
            err_console.print(f"[bold yellow]stopped:[/] {stop}; what it had open is closed as stopped")
            raise typer.Exit(StopRequested.exit_code) from None
        except Exception as exc:
            try:
                near = find_project_root()
            except ProjectNotFoundError:
                near = Path.cwd()
            full = disk_full_message(exc, near)
            if full is None:
                raise
            err_console.print(f"[bold red]error:[/] {full}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def exec_tool(tool: str, *args: str) -> None:
    """Replace this process with a command-line tool of this environment (a server or worker runs in the foreground)."""
    path = str(Path(sys.executable).parent / tool)
    os.execv(path, [path, *args])


def open_project() -> tuple[ProjectPaths, Settings]:
    paths = ProjectPaths.discover()
    return paths, load_settings(paths.params)


def open_registry() -> tuple[ProjectPaths, Settings, Any]:
    """The project, its settings and an MLflow client of its tracking server (MLflow imported only here)."""
    from conveyor.tracking import Tracker

    paths, settings = open_project()
    return paths, settings, Tracker.client_for(paths)


LISTED = 50  # problems printed one per line; a count for the rest


def print_conversion(conversion: Any) -> None:
    """What an import changed on the way in: carved splits, dropped classes, left-out images, warnings."""
    if conversion.carved:
        carved = ", ".join(f"{n} to {s}" for s, n in sorted(conversion.carved.items()))
        console.print(f"splits the source lacks were carved by content hash (data.split): {carved}")
    if conversion.dropped_boxes:
        console.print(f"boxes dropped by data.class_map: {conversion.dropped_boxes}")
    if conversion.left_out:
        console.print(
            f"[yellow]{len(conversion.skipped)} image(s) left out for errors (validate.on_error: skip); "
            f"{len(conversion.left_out)} problem(s):[/]",
            highlight=False,
        )
        for problem in conversion.left_out[:LISTED]:
            console.print(f"  {problem}", highlight=False, markup=False)
        if len(conversion.left_out) > LISTED:
            console.print(f"  ... and {len(conversion.left_out) - LISTED} more", highlight=False)
    for warning in conversion.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)


def print_added(summary: Any) -> None:
    print_conversion(summary.conversion)
    table = FoldingTable(title=f"added {summary.batch}")
    for column in ("split", "images", "label files"):
        table.add_column(column)
    for split, n in summary.images.items():
        table.add_row(split, str(n), str(summary.labels[split]))
    console.print(table)
    step = "data.dvc committed" if summary.committed else "commit data.dvc (or pass --commit)"
    console.print(
        f"classes {summary.names}; data is now {summary.md5}: {step}, then `conveyor run` retrains on it",
        highlight=False,
    )
