"""`conveyor validate | train | evaluate | export | profile | gate` (the stages `dvc.yaml` runs), `conveyor run` (the
main job: the training flow end to end), `conveyor summary` and `conveyor ui` (its review)."""

from __future__ import annotations

import os
import time
from typing import Annotated

import typer

from conveyor.cli.common import (
    EXPECTED_ERRORS,
    PORT,
    console,
    err_console,
    exec_tool,
    friendly_errors,
    open_project,
    open_registry,
    print_error,
)
from conveyor.open_records import StopRequested
from conveyor.paths import ProjectPaths
from conveyor.settings import load_settings

app = typer.Typer()

# What the training flow raises for a failed stage (RuntimeError, with the stage's output in the log above), besides
# the expected errors every command handles.
FLOW_ERRORS: tuple[type[BaseException], ...] = (*EXPECTED_ERRORS, RuntimeError)

# --- stages (dvc.yaml runs these) ---------------------------------------------------------------------------------


@app.command()
@friendly_errors
def validate() -> None:
    """Stage: check every image and label; write the report and the manifest of accepted files."""
    from pipelines import validate as step

    paths, settings = open_project()
    report = step.run(paths.data, settings.validate_, paths.validation)
    step.print_report(report, console)


@app.command()
@friendly_errors
def train() -> None:
    """Stage: train YOLO on the validated data, tracked in MLflow."""
    from pipelines import train as step

    paths, settings = open_project()
    result = step.run(paths, settings, console)
    console.print(f"trained {result.epochs_run} epochs in {result.seconds:.0f} s -> {result.weights}")


@app.command()
@friendly_errors
def evaluate() -> None:
    """Stage: evaluate the trained model on the held-out split."""
    from pipelines import evaluate as step

    paths, settings = open_project()
    step.run(paths, settings, console)


@app.command("export")
@friendly_errors
def export_cmd() -> None:
    """Stage: export to ONNX / OpenVINO (/ TensorRT on a GPU) and measure parity and latency."""
    from pipelines import export as step

    paths, settings = open_project()
    step.run(paths, settings, console)


# --- the main job ---------------------------------------------------------------------------------------------------


@app.command()
@friendly_errors
def run(
    reason: Annotated[str, typer.Option(help="why this run happens: manual, schedule, drift")] = "manual",
    warm_start: Annotated[
        str | None, typer.Option(help="'champion' or a local .pt checkpoint to warm-start training from")
    ] = None,
) -> None:
    """The main job: the training flow end to end (data, stages, gates, registry, push), then a summary."""
    from conveyor.summary import print_summary
    from flows.local_server import use_api

    paths = ProjectPaths.discover()
    load_settings(paths.params)  # bad params fail here, before a flow run is created
    use_api()  # PREFECT_API_URL, or the local server that stays up between runs (set before Prefect is imported)
    from prefect.exceptions import CancelledRun, ParameterTypeError

    from flows.training import training_flow

    refused: tuple[type[BaseException], ...] = (*FLOW_ERRORS, ParameterTypeError)
    started = time.perf_counter()
    try:
        outcome = training_flow(reason=reason, warm_start=warm_start, project_dir=str(paths.root))
    except CancelledRun as exc:
        err_console.print(f"[bold yellow]stopped:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(StopRequested.exit_code) from None
    except refused as exc:
        # The flow's log above holds the details (a failed stage's own output included); a parameter the flow refused
        # (a --reason too long for the registry's history) is named.
        print_error(exc)
        raise typer.Exit(1) from None
    stages = " + ".join(f"{name} {seconds:.0f}" for name, seconds in outcome["stage_seconds"].items())
    console.print(
        f"flow {outcome['flow_seconds']:.1f} s = stages {sum(outcome['stage_seconds'].values()):.1f} s ({stages}) "
        f"+ orchestration {outcome['overhead_seconds']:.1f} s (preflight, registry, push, Prefect)",
        highlight=False,
    )
    print_summary(paths, console, title=f"Conveyor run ({time.perf_counter() - started:.0f} s): {outcome['message']}")


@app.command()
@friendly_errors
def profile(
    model: Annotated[
        str | None,
        typer.Option(help="an older registered version to profile on the data it was trained on (data/ must be it)"),
    ] = None,
) -> None:
    """Stage: the reference profile for drift checks (features, predictions and the model's features of the train
    and val images; the performance estimate's calibration on the val split)."""
    if model is None:
        from pipelines import profile as step

        paths, settings = open_project()
        step.run(paths, settings, console)
        return
    from pipelines.model_source import resolve_version
    from pipelines.reference import compute_reference

    paths, settings, client = open_registry()
    version = resolve_version(client, settings.registry.model_name, model)
    reference = compute_reference(client, paths, settings, version, console)
    console.print(f"v{version.version}: profile of {len(reference.frame)} images logged to run {version.run_id}")


@app.command()
@friendly_errors
def gate() -> None:
    """Stage: apply the validation gates (thresholds, no regression vs the champion, export parity, latency)."""
    from pipelines import gate as step

    paths, settings = open_project()
    step.run(paths, settings, console)


@app.command()
@friendly_errors
def summary() -> None:
    """Print the summary of the last pipeline run."""
    from conveyor.summary import print_summary

    print_summary(ProjectPaths.discover(), console)


@app.command()
@friendly_errors
def ui(
    port: Annotated[int, typer.Option(**PORT, help="port for the MLflow UI")] = 5000,
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
) -> None:
    """Open the MLflow UI on the embedded store (SQLite + local artifacts), at the runs table a reviewer wants."""
    from conveyor.tracking import RunRecord, review_url, tracking_uri

    paths = ProjectPaths.discover()
    uri = tracking_uri(paths)
    base = uri if uri.startswith("http") else f"http://{host}:{port}"
    record = RunRecord.load(paths.run_record) if paths.run_record.is_file() else None
    review = f"; the review view: {review_url(base, record.experiment_id)}" if record else ""
    if uri.startswith("http"):
        console.print(f"tracking server in use: open {uri}{review}", soft_wrap=True)
        return
    console.print(f"MLflow UI on {base}{review} (Ctrl-C to stop)", soft_wrap=True)
    os.environ["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # a lean server: no job runner
    exec_tool("mlflow", "server", "--backend-store-uri", uri, "--host", host, "--port", str(port), "--workers", "1")
