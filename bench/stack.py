"""Benchmark: the production stack's start time, and the training flow's cost on it against embedded defaults.

    python -m bench.stack            # or: make bench-stack (about 5 minutes)

Three projects with the same synthetic data and the flow tests' small training settings:
- embedded: `conveyor run` as `make run` does it (SQLite MLflow, a folder DVC remote, the local Prefect server, started
  before the clock as a user's second run finds it), once before the stack run and once after it, so that neither
  side has the page cache or the order to itself;
- stack: `conveyor stack up` (PostgreSQL, nanio S3, MLflow and Prefect on PostgreSQL, worker, server, Prometheus),
  then the training deployment run through the worker (`prefect deployment run`, measured from submission to
  Completed), then `conveyor stack down`.

Writes bench/results/stack.json with `stack_up_s`, `flow_embedded_s` (the mean of `flow_embedded_each_s`),
`flow_stack_s` and `overhead_s`.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

import conveyor  # noqa: F401  (offline switches before the ML imports)
from bench.record import host, write_result
from conveyor.net import free_port
from conveyor.paths import ProjectPaths, available_cores
from conveyor.scaffold import REPO
from conveyor.settings import load_settings
from stack import parts
from stack.control import Layout, read_env_file
from tests.conftest import base_env
from tests.flow_support import conveyor as run_conveyor
from tests.flow_support import make_flow_project, set_params

RESULTS = REPO / "bench" / "results" / "stack.json"


def timed(project: Path, env: dict[str, str], *args: str) -> float:
    started = time.perf_counter()
    run_conveyor(project, env, *args)
    return time.perf_counter() - started


def flow_through_worker(env: dict[str, str]) -> float:
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    started = time.perf_counter()
    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
        flow_run = run_deployment("conveyor-training/scheduled-training", timeout=1800, parameters={"reason": "bench"})
    assert isinstance(flow_run, FlowRun)  # the sync call, not the coroutine its type also allows
    if flow_run.state is None or not flow_run.state.is_completed():
        raise RuntimeError(f"the flow run through the worker ended {flow_run.state}")
    return time.perf_counter() - started


def main() -> None:
    console = Console()
    root = Path(tempfile.mkdtemp(prefix="bench-stack-"))
    root.chmod(0o755)  # PostgreSQL runs as `postgres` when this is root: the stack's folder must be reachable
    # The embedded runs' own local Prefect server, started before the clock (a first `make run` also starts it).
    embedded_env = base_env(PREFECT_HOME=str(root / "prefect-home"))
    embedded_each: list[float] = []
    try:
        first_project, _ = make_flow_project(root / "embedded")
        run_conveyor(first_project, embedded_env, "server", "start")
        console.print("embedded: conveyor run ...")
        embedded_each.append(timed(first_project, embedded_env, "run"))

        project, _ = make_flow_project(root / "stack")
        ports = {part: free_port() for part in ("postgres", "s3", "mlflow", "prefect", "prometheus")}
        set_params(
            project,
            stack={"directory": str(root / "stack" / "data"), "ports": ports},
            serve={"port": free_port(), "grpc_port": free_port()},
            orchestration={"worker_poll_seconds": 1},
        )
        layout = Layout.of(ProjectPaths(project), load_settings(ProjectPaths(project).params))
        console.print("stack: conveyor stack up ...")
        stack_up = timed(project, base_env(), "stack", "up")
        started = parts.load_state(layout.state_file)
        env = {**base_env(), **read_env_file(layout.env_file)}
        try:
            console.print("stack: the training deployment through the worker ...")
            flow_stack = flow_through_worker(env)
        finally:
            stack_down = timed(project, base_env(), "stack", "down")
        second_project, _ = make_flow_project(root / "embedded-again")
        console.print("embedded again: conveyor run ...")
        embedded_each.append(timed(second_project, embedded_env, "run"))
    finally:
        run_conveyor(root, embedded_env, "server", "stop", check=False)
        shutil.rmtree(root, ignore_errors=True)
    flow_embedded = sum(embedded_each) / len(embedded_each)

    table = Table(title=f"production stack benchmark ({available_cores()} cores)")
    for column in ("measure", "seconds"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    table.add_row("conveyor stack up (from nothing)", f"{stack_up:.1f}")
    for name, entry in started.items():
        table.add_row(f"  {name}: start to healthy", f"{entry.seconds:.1f}")
    table.add_row(
        "training flow, embedded (conveyor run), before / after", " / ".join(f"{s:.1f}" for s in embedded_each)
    )
    table.add_row("training flow on the stack, through the worker", f"{flow_stack:.1f}")
    table.add_row("  overhead on the stack (against the embedded mean)", f"{flow_stack - flow_embedded:+.1f}")
    table.add_row("conveyor stack down", f"{stack_down:.1f}")
    console.print(table)
    write_result(
        RESULTS,
        {
            "stack_up_s": round(stack_up, 1),
            "parts_healthy_s": {name: entry.seconds for name, entry in started.items()},
            "flow_embedded_s": round(flow_embedded, 1),
            "flow_embedded_each_s": [round(s, 1) for s in embedded_each],
            "flow_stack_s": round(flow_stack, 1),
            "overhead_s": round(flow_stack - flow_embedded, 1),
            "stack_down_s": round(stack_down, 1),
            "host": host(),
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
        },
        console,
    )


if __name__ == "__main__":
    main()
