"""`conveyor data synth | import | add | pull | status`: make, import and version the dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.markup import escape

from conveyor.cli.common import console, friendly_errors, open_project, print_added, print_conversion
from conveyor.settings import ConfigError, DomainShift
from conveyor.tables import FoldingTable

app = typer.Typer(help="Make, import and version the dataset.", no_args_is_help=True)


@app.command("synth")
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

    paths, settings = open_project()
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
        except ValidationError as exc:  # each problem by its option's name, not pydantic's text of the model
            options = {"brightness": "--brightness", "blur_sigma": "--blur", "background": "--background",
                       "defect_scale": "--defect-scale"}  # fmt: skip
            problems = [
                f"{options.get(str(e['loc'][0]), e['loc'][0]) if e['loc'] else 'the shift'}: "
                f"{str(e['msg']).removeprefix('Value error, ')} (got {e.get('input')!r})"
                for e in exc.errors()
            ]
            raise ConfigError("domain shift options: " + "; ".join(problems)) from None
        synth_settings = synth_settings.model_copy(update={"shift": shift})
    summary = data.synthesize(paths, synth_settings, out, overwrite=overwrite)
    table = FoldingTable(title=f"synthetic dataset in {escape(str(summary.root))}")
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


@app.command("import")
@friendly_errors
def data_import(
    source: DatasetArgument,
    replace: Annotated[bool, typer.Option(help="replace the current dataset (its version stays in DVC)")] = False,
) -> None:
    """Bring your own dataset (YOLO, COCO or Pascal VOC) into data/ and record it with DVC."""
    from pipelines import data

    paths, _ = open_project()
    summary = data.import_dataset(paths, source, replace=replace)
    print_conversion(summary.conversion)
    counts = ", ".join(f"{s} {n}" for s, n in summary.images.items())
    console.print(
        f"imported {sum(summary.images.values())} images ({counts}) from {summary.conversion.format}, "
        f"{sum(summary.labels.values())} label files, classes {summary.names}; commit data.dvc, then `dvc repro` "
        "(validation reports bad files)",
        highlight=False,
    )


@app.command("add")
@friendly_errors
def data_add(
    source: DatasetArgument,
    commit: Annotated[bool, typer.Option(help="git-commit data.dvc with the new version")] = False,
) -> None:
    """Append a batch of labelled images (YOLO, COCO or VOC; checked first) and record it with DVC."""
    from pipelines import data

    paths, _ = open_project()
    print_added(data.add_dataset(paths, source, commit=commit))


@app.command("pull")
@friendly_errors
def data_pull() -> None:
    """Make data/ exactly the version data.dvc names (DVC remote, the shipped demo remote, or regeneration)."""
    from pipelines import data

    paths, settings = open_project()
    md5 = data.ensure_data_version(paths, settings.synth, console)
    console.print(f"data/ is {md5}, as data.dvc names")


@app.command("status")
@friendly_errors
def data_status_cmd() -> None:
    """Whether data/ is the version data.dvc names."""
    from pipelines import data

    paths, _ = open_project()
    status = data.data_status(paths)
    state = (
        "in sync"
        if status.in_sync
        else ("missing: run `conveyor data pull`" if status.actual is None else f"modified ({status.actual})")
    )
    console.print(f"data.dvc names {status.expected}; data/ is {state}")
    if not status.in_sync:
        raise typer.Exit(1)
