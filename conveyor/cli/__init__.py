"""`conveyor`: one CLI for the whole pipeline, mounted here from one module per command group.

Each group (`data`, `pipeline`, `registry`, `serving`, `monitoring`, `labelling`, `orchestration`, `stack`) defines
its own Typer app and imports nothing from its siblings; what they share (consoles, error handling, opening the
project) is `conveyor.cli.common`. Heavy libraries (MLflow, torch, FastAPI, Prefect) are imported inside the commands
that use them, so `--help` is quick and `conveyor drift` loads no web framework.
"""

from __future__ import annotations

import typer

from conveyor.cli import data, labelling, monitoring, orchestration, pipeline, registry, serving, stack

app = typer.Typer(help="Conveyor: MLOps for YOLO object detection.", no_args_is_help=True, add_completion=False)
for group in (pipeline, registry, serving, monitoring, orchestration):
    app.add_typer(group.app)  # commands at the top level: `conveyor train`, `conveyor serve`, ...
app.add_typer(data.app, name="data")
app.add_typer(labelling.app, name="label")
app.add_typer(stack.app, name="stack")

__all__ = ["app"]
