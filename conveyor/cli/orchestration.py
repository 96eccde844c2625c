"""`conveyor deploy | worker | server | status`: Prefect deployments, the worker, the local Prefect server, and where
the project stands."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from conveyor.cli.common import PORT, console, exec_tool, friendly_errors, open_project

app = typer.Typer()
server_app = typer.Typer(
    help="The local Prefect server (API and UI) that `conveyor run`, `deploy` and `worker` use when "
    "PREFECT_API_URL is not set.",
    no_args_is_help=True,
)
app.add_typer(server_app, name="server")


@app.command()
@friendly_errors
def deploy() -> None:
    """Register the scheduled training and drift-check deployments and the drift -> retraining automation."""
    from flows.local_server import use_api

    paths, settings = open_project()
    use_api()
    from flows.deploy import deploy as register_deployment

    info = register_deployment(paths, settings)
    console.print(
        f"deployment {info.name} ({info.id}): cron '{info.cron}' {info.timezone}, pool '{info.work_pool}', "
        f"one run at a time ({info.on_overlap} on overlap)\n"
        f"deployment {info.monitoring}: drift check, cron '{info.monitoring_cron}' {info.timezone}\n"
        + (
            f"automation '{info.automation}': conveyor.drift.detected -> {info.name} (reason=drift, warm start)\n"
            if info.automation
            else "no drift -> retraining automation (monitor.retrain_on_drift: false)\n"
        )
        + (
            f"automation '{info.zombie_automation}': no heartbeat for "
            f"{settings.orchestration.crashed_after_seconds} s -> flow run Crashed\n"
            if info.zombie_automation
            else "no zombie detection (orchestration.heartbeat_seconds: 0)\n"
        )
        + "".join(f"removed deployment {name}: renamed in params.yaml\n" for name in info.removed)
        + "Start a worker: `conveyor worker`",
        highlight=False,
    )


@app.command()
@friendly_errors
def worker() -> None:
    """Run a Prefect worker for the project's work pool: the scheduled and triggered trainings, and the drift checks."""
    from flows.local_server import use_api

    _, settings = open_project()
    use_api()
    # How soon a triggered run (a drift retraining) starts: the worker asks for work this often (Prefect's default 10).
    os.environ.setdefault("PREFECT_WORKER_QUERY_SECONDS", str(settings.orchestration.worker_poll_seconds))
    # The flow runs it starts inherit this: they send heartbeats, and `conveyor deploy`'s automation marks a run that
    # stops sending them (its machine died with the worker) Crashed.
    if settings.orchestration.heartbeat_seconds:
        os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(settings.orchestration.heartbeat_seconds))
    exec_tool(
        "prefect",
        "worker",
        "start",
        "--pool",
        settings.orchestration.work_pool,
        "--type",
        "process",
        "--install-policy",
        "never",
    )


@server_app.command("start")
@friendly_errors
def server_start(
    port: Annotated[
        int | None, typer.Option(**PORT, help="port for the API and UI (default 4200, or a free one)")
    ] = None,
    foreground: Annotated[
        bool, typer.Option(help="run in this terminal instead (any host; not found by `conveyor run`)")
    ] = False,
    host: Annotated[str, typer.Option(help="interface to listen on (--foreground only)")] = "127.0.0.1",
) -> None:
    """Start the local Prefect server in the background (or say where it already runs)."""
    from flows import local_server

    if foreground:
        console.print(
            f"Prefect UI on http://{host}:{port or 4200}; elsewhere: "
            f"export PREFECT_API_URL=http://{host}:{port or 4200}/api"
        )
        exec_tool("prefect", "server", "start", "--host", host, "--port", str(port or 4200))
    running = local_server.find()
    server = running or local_server.start(port)
    console.print(
        f"Prefect server {'already running' if running else 'started'} (pid {server.pid}): UI {server.ui_url}, "
        f"API {server.api_url}, log {local_server.log_file()}; `conveyor server stop` ends it",
        highlight=False,
    )


@server_app.command("stop")
@friendly_errors
def server_stop() -> None:
    """Stop the local Prefect server (runs, deployments and history stay in its database)."""
    from flows import local_server

    stopped = local_server.stop()
    console.print(f"stopped the Prefect server on port {stopped.port}" if stopped else "no local Prefect server runs")


@server_app.command("status")
@friendly_errors
def server_status() -> None:
    """Where the Prefect API is: PREFECT_API_URL, or the local server."""
    from flows import local_server

    configured = os.environ.get("PREFECT_API_URL")
    if configured:
        state = "answering" if local_server.healthy(configured) else "NOT answering"
        console.print(f"PREFECT_API_URL={configured} ({state})")
        raise typer.Exit(0 if state == "answering" else 1)
    server = local_server.find()
    if server is None:
        console.print("no local Prefect server runs (`conveyor run` starts one; or `conveyor server start`)")
        raise typer.Exit(1)
    console.print(f"local Prefect server (pid {server.pid}, since {server.started_at}): UI {server.ui_url}")


@app.command()
@friendly_errors
def status() -> None:
    """Where the project stands: data, stages, champion and challenger, the last flow run, the schedule."""
    from conveyor.cli.project_status import gather, render

    paths, settings = open_project()
    console.print(render(gather(paths, settings)))
