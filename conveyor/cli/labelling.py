"""`conveyor label select | import`: the labelling round trip."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from conveyor.cli.common import console, friendly_errors, open_project, print_added, window_hours
from conveyor.tables import FoldingTable

app = typer.Typer(
    help="Frames worth labelling out to Label Studio or CVAT, and their labels back.", no_args_is_help=True
)


@app.command("select")
@friendly_errors
def label_select(
    source: Annotated[
        Path | None, typer.Option(help="a folder of unlabelled images (default: the prediction log's kept frames)")
    ] = None,
    hours: Annotated[
        float | None,
        typer.Option(callback=window_hours, help="prediction-log window in hours (default monitor.window_hours)"),
    ] = None,
    count: Annotated[int | None, typer.Option(min=1, help="frames to select (default label.count)")] = None,
    model: Annotated[str | None, typer.Option(help="the model that scores them (default: the champion)")] = None,
    out: Annotated[Path | None, typer.Option(help="selection folder (default .conveyor/labelling/sel-<time>)")] = None,
    image_url: Annotated[
        str | None, typer.Option(help="prefix of the images' URLs in Label Studio tasks (default: local files)")
    ] = None,
) -> None:
    """Choose frames worth labelling (the model unsure, unlike its training data, not all alike) and write them as
    Label Studio tasks and a CVAT COCO package with the model's boxes as pre-annotations."""
    from labelling.run import SelectOptions, select_frames

    paths, settings = open_project()
    selection = select_frames(paths, settings, SelectOptions(source, hours, count, model, out, image_url), console)
    table = FoldingTable(title=f"{selection.files.frames} of {selection.pool} frames selected by {selection.model}")
    for column in ("frame", "score", "uncertainty", "novelty", "boxes"):
        table.add_column(column, justify="right" if column != "frame" else "left")
    for c in selection.chosen[:20]:
        boxes = sum(d.confidence >= settings.serve.conf for d in c.detections)
        table.add_row(c.path.name, f"{c.score:.2f}", f"{c.uncertainty:.2f}", f"{c.novelty:.2f}", str(boxes))
    console.print(table)
    folder = selection.files.folder
    console.print(
        f"written to {folder}: Label Studio: import tasks.json with label_config.xml (serve the images with "
        f"LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={folder}, and add a "
        f"Local Files storage with path {folder / 'images'} to the project); CVAT: "
        f"cvat/ (COCO 1.0). Bring labels back with `conveyor label import EXPORT`",
        highlight=False,
        soft_wrap=True,
    )


@app.command("import")
@friendly_errors
def label_import(
    export: Annotated[Path, typer.Argument(help="a Label Studio JSON export, or a CVAT/COCO/VOC/YOLO export folder")],
    selections: Annotated[
        Path | None, typer.Option(help="where the selections are (default .conveyor/labelling)")
    ] = None,
    commit: Annotated[bool, typer.Option(help="git-commit data.dvc with the new version")] = False,
) -> None:
    """Bring a labelling tool's export back as a new data version (checked like `conveyor data add`)."""
    from labelling.studio import import_labels

    paths, _ = open_project()
    result = import_labels(paths, export, selections=selections, commit=commit)
    if result.labelled < result.tasks:
        console.print(f"{result.tasks - result.labelled} of {result.tasks} tasks had no annotation and were left out")
    print_added(result.added)
