"""`conveyor`: one CLI for the whole pipeline. Stage commands are what dvc.yaml runs."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from conveyor.open_records import StopRequested
from conveyor.paths import ProjectNotFoundError, ProjectPaths, disk_full_message, find_project_root
from conveyor.settings import ConfigError, DomainShift, Settings, load_settings
from conveyor.tables import FoldingTable

app = typer.Typer(help="Conveyor: MLOps for YOLO object detection.", no_args_is_help=True, add_completion=False)
data_app = typer.Typer(help="Make, import and version the dataset.", no_args_is_help=True)
app.add_typer(data_app, name="data")

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


def _known_errors() -> tuple[type[BaseException], ...]:
    # Imported here, not at the top: MLflow takes seconds to import, and `--help` or `validate` need none of it.
    from conveyor.tracking import ArtifactStoreError, TrackingUnavailableError
    from flows.deploy import PrefectServerMissingError
    from flows.local_server import PrefectServerError
    from labelling.select import NothingToSelectError
    from pipelines.data import DataVersionError
    from pipelines.lineage_report import ModelRefError
    from pipelines.model_features import FeatureOutputError
    from pipelines.performance import CalibrationError
    from pipelines.profile import ProfileError
    from pipelines.registry import PromotionRefusedError
    from pipelines.validate import DataValidationError
    from serving.batch import SourceError
    from serving.server import PortInUseError
    from serving.source import RuntimeUnavailableError
    from stack.parts import StackError
    from stack.storage import StorageError

    return (
        FeatureOutputError,
        CalibrationError,
        ProfileError,
        StackError,
        StorageError,
        NothingToSelectError,
        SourceError,
        PortInUseError,
        RuntimeUnavailableError,
        PromotionRefusedError,
        ModelRefError,
        PrefectServerMissingError,
        PrefectServerError,
        ConfigError,
        ProjectNotFoundError,
        TrackingUnavailableError,
        ArtifactStoreError,
        DataValidationError,
        DataVersionError,
        FileNotFoundError,
        FileExistsError,
    )


def friendly_errors(fn: F) -> F:
    """Expected failures (bad params, bad data, an unreachable server) end with their message, not a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except _known_errors() as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
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


def _exec(tool: str, *args: str) -> None:
    """Replace this process with a command-line tool of this environment (a server or worker runs in the foreground)."""
    path = str(Path(sys.executable).parent / tool)
    os.execv(path, [path, *args])


def _project() -> tuple[ProjectPaths, Settings]:
    paths = ProjectPaths.discover()
    return paths, load_settings(paths.params)


# --- data --------------------------------------------------------------------------------------------------------


@data_app.command("synth")
@friendly_errors
def data_synth(
    out: Annotated[Path | None, typer.Option(help="write here instead of data/ (not recorded by DVC)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing dataset")] = False,
    brightness: Annotated[float | None, typer.Option(help="domain shift: lighting factor (<1 darker)")] = None,
    blur: Annotated[float | None, typer.Option(help="domain shift: Gaussian blur sigma in pixels")] = None,
    background: Annotated[str | None, typer.Option(help="domain shift: metal|fabric|wood|concrete")] = None,
    defect_scale: Annotated[float | None, typer.Option(help="domain shift: defect size factor")] = None,
) -> None:
    """Generate the seeded synthetic surface-defect dataset (params.yaml `synth`), optionally domain-shifted."""
    from pipelines import data

    paths, settings = _project()
    overrides = {
        k: v
        for k, v in {
            "brightness": brightness,
            "blur_sigma": blur,
            "background": background,
            "defect_scale": defect_scale,
        }.items()
        if v is not None
    }
    synth_settings = settings.synth
    if overrides:
        try:
            shift = DomainShift.model_validate({**synth_settings.shift.model_dump(), **overrides})
        except ValueError as exc:
            raise ConfigError(f"domain shift options: {exc}") from None
        synth_settings = synth_settings.model_copy(update={"shift": shift})
    summary = data.synthesize(paths, synth_settings, out, overwrite=overwrite)
    table = FoldingTable(title=f"synthetic dataset in {summary.root}")
    for column in ("split", "images", "boxes", "background"):
        table.add_column(column)
    for split, n in summary.images.items():
        table.add_row(split, str(n), str(summary.boxes[split]), str(summary.background_images[split]))
    console.print(table)
    if out is None:
        console.print("recorded with `dvc add data`: commit data.dvc to name this version")


DatasetArgument = Annotated[
    Path,
    typer.Argument(
        help="a dataset: YOLO (data.yaml, or images/ + labels/ + classes.txt), COCO (*.json + images) or Pascal VOC"
    ),
]


def print_conversion(conversion: Any) -> None:
    """What an import changed on the way in: carved splits, dropped classes, left-out images, warnings."""
    if conversion.carved:
        carved = ", ".join(f"{n} to {s}" for s, n in sorted(conversion.carved.items()))
        console.print(f"splits the source lacks were carved by content hash (data.split): {carved}")
    if conversion.dropped_boxes:
        console.print(f"boxes dropped by data.class_map: {conversion.dropped_boxes}")
    if conversion.skipped:
        console.print(f"[yellow]{len(conversion.skipped)} image(s) left out for errors (validate.on_error: skip)[/]")
    for warning in conversion.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)


@data_app.command("import")
@friendly_errors
def data_import(
    source: DatasetArgument,
    replace: Annotated[bool, typer.Option(help="replace the current dataset (its version stays in DVC)")] = False,
) -> None:
    """Bring your own dataset (YOLO, COCO or Pascal VOC) into data/ and record it with DVC."""
    from pipelines import data

    paths, _ = _project()
    summary = data.import_dataset(paths, source, replace=replace)
    print_conversion(summary.conversion)
    counts = ", ".join(f"{s} {n}" for s, n in summary.images.items())
    console.print(
        f"imported {sum(summary.images.values())} images ({counts}) from {summary.conversion.format}, "
        f"{sum(summary.labels.values())} label files, classes {summary.names}; commit data.dvc, then `dvc repro` "
        "(validation reports bad files)",
        highlight=False,
    )


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


@data_app.command("add")
@friendly_errors
def data_add(
    source: DatasetArgument,
    commit: Annotated[bool, typer.Option(help="git-commit data.dvc with the new version")] = False,
) -> None:
    """Append a batch of labelled images (YOLO, COCO or VOC; checked first) and record it with DVC."""
    from pipelines import data

    paths, _ = _project()
    print_added(data.add_dataset(paths, source, commit=commit))


@data_app.command("pull")
@friendly_errors
def data_pull() -> None:
    """Make data/ exactly the version data.dvc names (DVC remote, the shipped demo remote, or regeneration)."""
    from pipelines import data

    paths, settings = _project()
    md5 = data.ensure_data_version(paths, settings.synth, console)
    console.print(f"data/ is {md5}, as data.dvc names")


@data_app.command("status")
@friendly_errors
def data_status_cmd() -> None:
    """Whether data/ is the version data.dvc names."""
    from pipelines import data

    paths, _ = _project()
    status = data.data_status(paths)
    state = (
        "in sync"
        if status.in_sync
        else ("missing: run `conveyor data pull`" if status.actual is None else f"modified ({status.actual})")
    )
    console.print(f"data.dvc names {status.expected}; data/ is {state}")
    if not status.in_sync:
        raise typer.Exit(1)


# --- stages (dvc.yaml runs these) ---------------------------------------------------------------------------------


@app.command()
@friendly_errors
def validate() -> None:
    """Stage: check every image and label; write the report and the manifest of accepted files."""
    from pipelines import validate as step

    paths, settings = _project()
    report = step.run(paths.data, settings.validate_, paths.validation)
    step.print_report(report, console)


@app.command()
@friendly_errors
def train() -> None:
    """Stage: train YOLO on the validated data, tracked in MLflow."""
    from pipelines import train as step

    paths, settings = _project()
    result = step.run(paths, settings, console)
    console.print(f"trained {result.epochs_run} epochs in {result.seconds:.0f} s -> {result.weights}")


@app.command()
@friendly_errors
def evaluate() -> None:
    """Stage: evaluate the trained model on the held-out split."""
    from pipelines import evaluate as step

    paths, settings = _project()
    step.run(paths, settings, console)


@app.command("export")
@friendly_errors
def export_cmd() -> None:
    """Stage: export to ONNX / OpenVINO (/ TensorRT on a GPU) and measure parity and latency."""
    from pipelines import export as step

    paths, settings = _project()
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
    from prefect.exceptions import CancelledRun

    from flows.training import TrainingBusyError, training_flow

    started = time.perf_counter()
    expected: tuple[type[BaseException], ...] = (*_known_errors(), TrainingBusyError, RuntimeError)
    try:
        outcome = training_flow(reason=reason, warm_start=warm_start, project_dir=str(paths.root))
    except CancelledRun as exc:
        err_console.print(f"[bold yellow]stopped:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(StopRequested.exit_code) from None
    except expected as exc:
        # The flow's log above holds the details (a failed stage's own output included).
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
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

        paths, settings = _project()
        step.run(paths, settings, console)
        return
    from monitoring.reference import compute_reference
    from serving.source import resolve_version

    paths, settings, client = _registry()
    version = resolve_version(client, settings.registry.model_name, model)
    reference = compute_reference(client, paths, settings, version, console)
    console.print(f"v{version.version}: profile of {len(reference.frame)} images logged to run {version.run_id}")


@app.command()
@friendly_errors
def gate() -> None:
    """Stage: apply the validation gates (thresholds, no regression vs the champion, export parity, latency)."""
    from pipelines import gate as step

    paths, settings = _project()
    step.run(paths, settings, console)


# --- registry -------------------------------------------------------------------------------------------------------


def _registry() -> tuple[ProjectPaths, Settings, Any]:
    from conveyor.tracking import Tracker

    paths, settings = _project()
    return paths, settings, Tracker.client_for(paths)


@app.command()
@friendly_errors
def models() -> None:
    """Registered versions with their aliases, gate status and test metrics."""
    from pipelines import registry

    _, settings, client = _registry()
    name = settings.registry.model_name
    table = FoldingTable(title=f"registered model {name}")
    for column in ("version", "aliases", "gates", "test mAP50-95", "data", "created", "run"):
        table.add_column(column)
    found = registry.versions(client, name)
    aliases = registry.aliases_by_version(client, name) if found else {}
    for v in found:
        metrics = client.get_run(v.run_id).data.metrics
        gates = "pass" if registry.gates_passed(v) else f"FAIL ({v.tags.get('conveyor.gates.failed', '?')})"
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(v.creation_timestamp / 1000))
        table.add_row(
            str(v.version),
            registry.alias_text(aliases, v.version),
            gates,
            f"{metrics.get('test/mAP50-95', float('nan')):.3f}",
            v.tags.get("conveyor.data_md5", "?")[:12],
            created,
            str(v.run_id)[:12],
        )
    console.print(table)


@app.command()
@friendly_errors
def promote(
    version: Annotated[str, typer.Argument(help="the version to make champion")],
    reason: Annotated[str, typer.Option(help="why (recorded in the history)")],
    force: Annotated[bool, typer.Option(help="promote even though its gates failed (recorded)")] = False,
) -> None:
    """Make a version the champion (refused if its gates failed, unless --force)."""
    from pipelines import registry

    _, settings, client = _registry()
    move = registry.promote(client, settings.registry.model_name, version.lstrip("v"), reason=reason, force=force)
    console.print(f"champion: v{move.from_version or '-'} -> v{move.to_version} ({move.kind}: {move.reason})")


@app.command()
@friendly_errors
def rollback(reason: Annotated[str, typer.Option(help="why (recorded in the history)")]) -> None:
    """Move the champion back to the previous champion."""
    from pipelines import registry

    _, settings, client = _registry()
    move = registry.rollback(client, settings.registry.model_name, reason=reason)
    console.print(f"champion: v{move.from_version} -> v{move.to_version} (rollback: {move.reason})")


@app.command()
@friendly_errors
def history() -> None:
    """Every alias move: from, to, when, why, by whom."""
    from pipelines import registry

    _, settings, client = _registry()
    table = FoldingTable(title=f"alias history of {settings.registry.model_name}")
    for column in ("#", "when", "alias", "from", "to", "kind", "by", "reason"):
        table.add_column(column)
    for m in registry.history(client, settings.registry.model_name):
        table.add_row(
            str(m.seq),
            m.at,
            m.alias,
            f"v{m.from_version}" if m.from_version else "-",
            f"v{m.to_version}",
            m.kind,
            m.actor,
            m.reason,
        )
    console.print(table)


@app.command()
@friendly_errors
def lineage(
    ref: Annotated[str, typer.Argument(help="models:/NAME@alias, models:/NAME/VERSION, @champion or a version")] = (
        "@champion"
    ),
    data: Annotated[str | None, typer.Option("--data", help="list the versions trained on this data md5")] = None,
) -> None:
    """Where a model came from (data, code, params, runs, gates, exports), or what a data version produced."""
    from pipelines import lineage_report, registry

    paths, settings, client = _registry()
    name = settings.registry.model_name
    if data:
        found = lineage_report.versions_for_data(client, name, data)
        table = FoldingTable(title=f"versions of {name} trained on data {data}")
        for column in ("version", "aliases", "gates", "run"):
            table.add_column(column)
        aliases = registry.aliases_by_version(client, name) if found else {}
        for v in found:
            table.add_row(
                str(v.version),
                registry.alias_text(aliases, v.version),
                v.tags.get("conveyor.gates.passed", "?"),
                str(v.run_id),
            )
        console.print(table if found else f"no version of {name} was trained on data {data}")
        return
    result = lineage_report.lineage(client, paths, name, ref)
    table = FoldingTable(
        title=f"{result.model} v{result.version} ({', '.join(result.aliases) or 'no alias'})", show_header=False
    )
    table.add_column(style="bold")
    table.add_column()
    for key, value in result.rows:
        table.add_row(key, value)
    console.print(table)


@app.command()
@friendly_errors
def summary() -> None:
    """Print the summary of the last pipeline run."""
    from conveyor.summary import print_summary

    print_summary(ProjectPaths.discover(), console)


@app.command()
@friendly_errors
def ui(
    port: Annotated[int, typer.Option(help="port for the MLflow UI")] = 5000,
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
    _exec("mlflow", "server", "--backend-store-uri", uri, "--host", host, "--port", str(port), "--workers", "1")


# The serving and monitoring command groups register themselves on `app` (imported last: they import this module's
# helpers).
from conveyor import cli_labelling, cli_monitoring, cli_orchestration, cli_serving, cli_stack  # noqa: E402, F401

if __name__ == "__main__":
    app()
