"""`conveyor stack up | status | down`: the production stack as processes on this machine."""

from __future__ import annotations

import typer

from conveyor.cli.common import console, friendly_errors, open_project
from conveyor.tables import FoldingTable

app = typer.Typer(
    help="The local production stack: PostgreSQL, an S3 store, MLflow, Prefect server and worker, the model server, "
    "Prometheus. Data under stack.directory; `source` the env file it writes.",
    no_args_is_help=True,
)


@app.command("up")
@friendly_errors
def stack_up(
    timeout: float = typer.Option(
        120.0, min=1.0, max=3600.0, help="seconds each part may take to answer, started now or found running"
    ),
) -> None:
    """Start every part that is not running (PostgreSQL, S3, MLflow, Prefect, worker, server, Prometheus)."""
    from stack.control import Layout, up

    paths, settings = open_project()
    console.print(f"starting the stack under {Layout.of(paths, settings).root} ...")
    report = up(paths, settings, timeout)
    table = FoldingTable(title=f"Conveyor stack up ({report.seconds:.1f} s)")
    for column in ("part", "state", "address", "start s", "log"):
        table.add_column(column)
    layout = Layout.of(paths, settings)
    for name, entry in report.started.items():
        table.add_row(name, "started", layout.url(name), f"{entry.seconds:.1f}", entry.log)
    for name, entry in report.already.items():
        table.add_row(name, "already up", layout.url(name), "", entry.log)
    for name, why in report.skipped.items():
        table.add_row(name, "skipped", why, "", "")
    console.print(table)
    console.print(
        f"Use it: [bold]source {report.env_file}[/] (MLflow, Prefect, S3); the DVC default remote of this project is "
        f"s3://{settings.stack.bucket}/dvc now (.dvc/config.local). Stop it: `conveyor stack down`.",
        highlight=False,
    )


@app.command("status")
@friendly_errors
def stack_status() -> None:
    """Each part's health."""
    from stack.control import status

    paths, settings = open_project()
    rows = status(paths, settings)
    table = FoldingTable(title="Conveyor stack")
    for column in ("part", "state", "address", "detail"):
        table.add_column(column)
    for row in rows:
        color = {"up": "green", "not started": "dim"}.get(row.state, "red")
        table.add_row(row.name, f"[{color}]{row.state}[/]", row.url, row.detail)
    console.print(table)
    if any(row.state not in ("up", "not started") for row in rows):
        raise typer.Exit(1)


@app.command("down")
@friendly_errors
def stack_down() -> None:
    """Stop what `stack up` started (nothing else); the data stays for the next `up`."""
    from stack.control import down

    paths, settings = open_project()
    for name, outcome in down(paths, settings):
        console.print(f"{name}: {outcome}", highlight=False)
    console.print("the project's DVC default remote is the committed one again")
