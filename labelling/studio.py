"""Labels coming back: `conveyor label import FILE`, through `conveyor data add` as a new data version.

- A **Label Studio JSON export** (a list of tasks) is read here: each task's image must be a frame of a selection
  (found by name under the selections folder, `.conveyor/labelling/` by default; Label Studio's own upload prefix is
  understood), the latest submitted annotation of each task counts (cancelled ones do not), its rectangles become COCO
  boxes (a rotated one: the axis-aligned box around it), and the result goes through `data add` like any COCO export.
  Tasks nobody labelled are left out and counted; an export with no annotation at all is refused (it was exported
  before anyone labelled).
- Anything else (**CVAT's COCO 1.0 or YOLO export**, a Pascal VOC folder) goes to `data add` as it is.

The Label Studio format is read with the standard library: its export is plain JSON (tasks, annotations, results in
percent of the image), and `label-studio-sdk`'s converter would bring an HTTP client and its own URL rules for a
mapping this short.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

from conveyor.paths import ProjectPaths
from labelling.tasks import SELECTION_FILE
from pipelines.data import AddSummary, add_dataset
from pipelines.formats import image_size
from pipelines.validate import DataValidationError

UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-")  # Label Studio renames uploaded files <8 hex>-<name>


@dataclass(frozen=True)
class LabelImport:
    added: AddSummary
    tasks: int
    labelled: int  # tasks with a submitted annotation (the others were left out)


def selected_frames(root: Path) -> dict[str, Path]:
    """Every selected frame under `root` (a selection folder, or a folder of them), by its stored name."""
    frames: dict[str, Path] = {}
    for record in sorted(root.glob(f"**/{SELECTION_FILE}")):
        try:
            for frame in json.loads(record.read_text()).get("frames", []):
                frames[str(frame["name"])] = record.parent / "images" / str(frame["name"])
        except (ValueError, AttributeError, KeyError, TypeError) as exc:  # damaged by hand, or cut short
            raise DataValidationError(
                f"{record}: not a selection record `conveyor label select` wrote ({type(exc).__name__}: {exc}); "
                "nothing was added"
            ) from None
    return frames


def image_name(url: str) -> str:
    """The file name a task's image URL ends in (`/data/local-files/?d=images/x.jpg`, `/data/upload/3/x.jpg`)."""
    parsed = urlparse(url)
    inner = parse_qs(parsed.query).get("d")  # decoded already: decoding it again would read `%25` as `%`
    return PurePosixPath(inner[0] if inner else unquote(parsed.path)).name


def _latest(annotations: list[dict[str, Any]]) -> dict[str, Any] | None:
    submitted = [a for a in annotations if not a.get("was_cancelled")]

    def when(a: dict[str, Any]) -> tuple[str, int]:
        return str(a.get("updated_at") or a.get("created_at") or ""), int(a.get("id") or 0)

    return max(submitted, key=when, default=None)


def _task_to_coco(
    task: dict[str, Any],
    n: int,
    frames: dict[str, Path],
    names: list[str],
    images: list[dict[str, Any]],
    boxes: list[dict[str, Any]],
    unknown: list[str],
    labelled_by: dict[str, tuple[Any, str]],
    out: Path,
) -> int:
    """One task's latest submitted annotation into the COCO lists; 1 if it was labelled. Raises what a task of another
    shape raises (AttributeError, KeyError, TypeError, ValueError): the caller names the task."""
    url = str((task.get("data") or {}).get("image", ""))
    name = image_name(url)
    path = frames.get(name) or frames.get(UPLOAD_PREFIX.sub("", name))
    if path is None or not path.is_file():
        unknown.append(f"task {task.get('id', n)}: image '{name or url}'")
        return 0
    annotation = _latest(task.get("annotations") or [])
    if annotation is None:
        return 0  # nobody labelled it (yet)
    # The same frame in two tasks, or the same image under two names (served twice, picked by two selections):
    # whose boxes are right cannot be told. By content, not by name.
    content = hashlib.sha256(path.read_bytes()).hexdigest()
    if content in labelled_by:
        earlier_task, earlier_name = labelled_by[content]
        which = f"frame '{path.name}'" if earlier_name == path.name else f"one image ('{earlier_name}', '{path.name}')"
        raise DataValidationError(
            f"tasks {earlier_task} and {task.get('id', n)} both label {which}: delete one of the two tasks (or its "
            "annotation) in Label Studio and export again; nothing was added"
        )
    labelled_by[content] = (task.get("id", n), path.name)
    image: dict[str, Any] = {"id": len(images) + 1, "file_name": path.name}
    found: list[dict[str, Any]] = []
    for result, label in _labelled_boxes(annotation.get("result") or []):
        value = result["value"]
        w, h = float(result.get("original_width") or 0), float(result.get("original_height") or 0)
        if not (w and h):
            w, h = (float(v) for v in (image_size(path) or (0, 0)))
        image.update(width=w, height=h)
        x, y, width, height = (float(value[k]) for k in ("x", "y", "width", "height"))  # "a" is a ValueError
        box = [x * w / 100, y * h / 100, width * w / 100, height * h / 100]
        rotation = float(value.get("rotation") or 0)
        if rotation % 360:
            box = enclosing_box(box, rotation, w, h)
        if label not in names:
            names.append(label)
        found.append({"image_id": image["id"], "category_id": names.index(label) + 1, "bbox": box})
    images.append(image)
    boxes.extend({"id": len(boxes) + i + 1, **box} for i, box in enumerate(found))
    shutil.copy2(path, out / "images" / path.name)
    return 1


def _task_id(task: Any, n: int) -> Any:
    return task.get("id", n) if isinstance(task, dict) else n


class LabelShapeError(ValueError):
    """A labelled result this detector cannot learn from (a polygon, a box with several labels or none)."""


OTHER_SHAPES = ("polygon", "brush", "keypoint", "ellipse", "polyline", "vector")
GEOMETRY = ("x", "y", "width", "height")


def _labelled_boxes(results: list[dict[str, Any]]) -> list[tuple[dict[str, Any], str]]:
    """Each box of an annotation with its one class: a `rectanglelabels` result (other `<Labels>` on the same region,
    a severity say, are attributes), or a `<Rectangle>` with a separate `<Labels>` (results `rectangle` and `labels`
    sharing the region's id). A labelled shape other than a rectangle, and a box with several classes or none, are a
    LabelShapeError: dropped, the frame was added with the defect it shows unlabelled, which teaches the model that
    it is no defect. Results that label no box (choices, a text field, a `labels` span of text, relations) are left
    alone."""
    regions: dict[str, dict[str, Any]] = {}
    for index, result in enumerate(results):
        kind = str(result.get("type") or "")
        if kind.removesuffix("labels") in OTHER_SHAPES:
            raise LabelShapeError(f"a {kind} result: this detector learns boxes; draw a rectangle instead")
        if kind not in ("rectanglelabels", "rectangle", "labels"):
            continue
        value = result.get("value") or {}
        region = regions.setdefault(str(result.get("id", f"#{index}")), {"classes": [], "labels": {}, "box": None})
        if kind == "rectanglelabels":
            region["classes"] += [str(label) for label in value.get(kind, [])]
        elif kind == "labels":
            region["labels"].setdefault(str(result.get("from_name", "labels")), []).extend(
                map(str, value.get(kind, []))
            )
        # A rectanglelabels result is its own box (one missing a coordinate is refused as not Label Studio's shape).
        if region["box"] is None and (kind != "labels" or all(key in value for key in GEOMETRY)):
            region["box"] = result
    boxes = []
    for region_id, region in regions.items():
        if region["box"] is None:
            continue  # labels of no box (a span of text)
        if region["box"]["type"] == "rectanglelabels":
            classes = sorted(set(region["classes"]))
        elif len(region["labels"]) > 1:
            given = "; ".join(f"{name}: {', '.join(sorted(set(v)))}" for name, v in sorted(region["labels"].items()))
            raise LabelShapeError(f"region {region_id}: a rectangle labelled by several controls ({given}): which is "
                                  "its class? Use RectangleLabels for the class")  # fmt: skip
        else:
            classes = sorted({label for labels in region["labels"].values() for label in labels})
        if len(classes) != 1:
            which = f"several classes ({', '.join(classes)})" if classes else "no class"
            raise LabelShapeError(f"region {region_id}: a rectangle with {which}; give each box one class")
        boxes.append((region["box"], classes[0]))
    return boxes


def enclosing_box(box: list[float], degrees: float, image_w: float, image_h: float) -> list[float]:
    """The axis-aligned box (x, y, width, height in pixels) that holds a rectangle Label Studio rotated by `degrees`
    clockwise about its top-left corner (x, y): this detector draws axis-aligned boxes, so a rotated one becomes the
    box around it, as Label Studio's own converter makes it, but in pixels (in percent, a wide image would shear it);
    clipped to the image."""
    x, y, width, height = box
    turn = math.radians(degrees)
    cos, sin = math.cos(turn), math.sin(turn)
    corners = [(0.0, 0.0), (width, 0.0), (width, height), (0.0, height)]
    xs = [x + dx * cos - dy * sin for dx, dy in corners]
    ys = [y + dx * sin + dy * cos for dx, dy in corners]
    left, top = max(0.0, min(xs)), max(0.0, min(ys))
    right, bottom = min(image_w, max(xs)), min(image_h, max(ys))
    return [left, top, max(0.0, right - left), max(0.0, bottom - top)]


def _refuse_tasks(export: Path, problems: list[str], why: str) -> None:
    """A DataValidationError listing the tasks (the first 50) that `why` refuses, when there are any."""
    if problems:
        listed = "\n".join(f"  {p}" for p in problems[:50])
        raise DataValidationError(f"{export}: {len(problems)} task(s) {why}:\n{listed}")


def studio_to_coco(export: Path, tasks: list[Any], frames: dict[str, Path], out: Path) -> tuple[int, int]:
    """Write a Label Studio export's tasks as a COCO dataset in `out` (annotations.json, images/). Returns (tasks,
    labelled).

    Raises DataValidationError naming every task whose image was never selected, or when nothing was labelled.
    """
    names: list[str] = []
    images: list[dict[str, Any]] = []
    boxes: list[dict[str, Any]] = []
    unknown: list[str] = []
    malformed: list[str] = []
    shapes: list[str] = []
    labelled_by: dict[str, tuple[Any, str]] = {}  # image's SHA-256 -> the task that labelled it, and its name
    labelled = 0
    if tasks and all(isinstance(t, dict) and "data" not in t and "image" in t for t in tasks):
        raise DataValidationError(
            f"{export}: this is Label Studio's JSON-MIN export, which keeps no annotation history: export the project "
            "as JSON instead; nothing was added"
        )
    for n, task in enumerate(tasks):
        try:
            labelled += _task_to_coco(task, n, frames, names, images, boxes, unknown, labelled_by, out)
        except LabelShapeError as exc:
            shapes.append(f"task {_task_id(task, n)}: {exc}")
        except (AttributeError, KeyError, TypeError, ValueError) as exc:  # not the shape Label Studio exports
            malformed.append(f"task {_task_id(task, n)}: {type(exc).__name__}: {exc}")
    _refuse_tasks(
        export,
        malformed,
        "are not in Label Studio's JSON export format (each task an object with data.image and annotations of "
        "rectanglelabels with x, y, width and height in percent); nothing was added",
    )
    _refuse_tasks(
        export,
        shapes,
        "hold labels a box detector cannot learn from: give each defect one rectangle with one label in Label Studio "
        "(or delete those results) and export again; nothing was added",
    )
    _refuse_tasks(
        export,
        unknown,
        "name images that were never selected (no selection under the selections folder has them), so nothing was "
        "added. Import tasks made by `conveyor label select`, or pass --selections with the folder that holds their "
        "selection",
    )
    if not labelled:
        raise DataValidationError(
            f"{export}: {len(tasks)} task(s) and no annotations: nothing has been labelled yet (submit the tasks in "
            "Label Studio, then export again); nothing was added"
        )
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(names)]
    coco = {"images": images, "annotations": boxes, "categories": categories}
    (out / "annotations.json").write_text(json.dumps(coco))
    return len(tasks), labelled


def import_labels(
    paths: ProjectPaths, export: Path, *, selections: Path | None = None, commit: bool = False
) -> LabelImport:
    """A labelling tool's export, back as a new data version (through `add_dataset`, so checked the same way)."""
    export = export.resolve()
    if not export.exists():
        raise FileNotFoundError(f"{export}: no such export")
    tasks: Any = None
    if export.is_file() and export.suffix == ".json":
        try:
            tasks = json.loads(export.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise DataValidationError(f"{export}: not readable JSON: {exc}") from None
    if not isinstance(tasks, list):  # Label Studio exports a list of tasks; anything else is a dataset export
        added = add_dataset(paths, export, commit=commit)
        return LabelImport(added, added.total_images, added.total_images)
    frames = selected_frames(selections or paths.labelling)
    staging = Path(tempfile.mkdtemp(dir=paths.root, prefix=".label-"))
    try:
        (staging / "images").mkdir()
        total, labelled = studio_to_coco(export, tasks, frames, staging)
        try:
            added = add_dataset(paths, staging, commit=commit, name=f"labelstudio-{export.stem}")
        except DataValidationError as exc:  # it names the converted copy, deleted below: name the export
            raise DataValidationError(str(exc).replace(str(staging), f"{export} (converted)")) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return LabelImport(added, total, labelled)
