"""A selection, written for the labelling tools: Label Studio tasks and a CVAT (COCO 1.0) package, with the model's
detections as pre-annotations, so people correct boxes rather than draw them.

A selection folder holds:
- `images/`: the chosen frames, copied (named `<sha256 prefix>-<name>`, so two cameras' `frame_0001.jpg` differ);
- `tasks.json` + `label_config.xml`: import both into a Label Studio project (tasks point at
  `/data/local-files/?d=images/...`; see docs/labelling.md for the two environment variables that serve them);
- `cvat/annotations/instances_default.json` + `cvat/images/`: a CVAT task's "COCO 1.0" annotations;
- `selection.json`: what was chosen, from where, by which model, with each frame's scores (`label import` checks
  that an export's images are ones that were selected).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

from labelling.select import Candidate

SELECTION_FILE = "selection.json"
TASKS_FILE = "tasks.json"
CONFIG_FILE = "label_config.xml"
CVAT_ANNOTATIONS = "cvat/annotations/instances_default.json"
DEFAULT_IMAGE_URL = "/data/local-files/?d=images/"
FROM_NAME, TO_NAME = "label", "image"  # the control and object names of label_config.xml


@dataclass(frozen=True)
class SelectionFiles:
    folder: Path
    frames: int
    boxes: int  # pre-annotations (detections at or above the serving threshold)


def selection_id(now: datetime | None = None) -> str:
    return f"sel-{(now or datetime.now(UTC)).strftime('%Y%m%d-%H%M%S')}"


def stored_name(candidate: Candidate) -> str:
    return f"{candidate.sha256[:12]}-{candidate.path.name}"


def label_config(names: list[str]) -> str:
    labels = "\n".join(f"    <Label value={quoteattr(n)}/>" for n in names)
    return (
        f'<View>\n  <Image name="{TO_NAME}" value="$image"/>\n'
        f'  <RectangleLabels name="{FROM_NAME}" toName="{TO_NAME}" canRotate="false">\n{labels}\n  </RectangleLabels>\n'
        "</View>\n"
    )


def task_image_url(image_url: str, name: str) -> str:
    """The task's image: the name percent-encoded, since it ends a query value (`?d=images/...`) or a path, where a
    `+`, `#`, `&` or `%` in a frame's name would be read as something else (`studio.image_name` reads it back)."""
    return f"{image_url}{quote(name)}"


def studio_task(n: int, candidate: Candidate, name: str, conf: float, model: str, image_url: str) -> dict[str, Any]:
    w, h = candidate.width, candidate.height
    result = [
        {
            "id": f"p{n}-{k}",
            "type": "rectanglelabels",
            "from_name": FROM_NAME,
            "to_name": TO_NAME,
            "original_width": w,
            "original_height": h,
            "image_rotation": 0,
            "value": {
                "x": 100 * d.box[0] / w,
                "y": 100 * d.box[1] / h,
                "width": 100 * (d.box[2] - d.box[0]) / w,
                "height": 100 * (d.box[3] - d.box[1]) / h,
                "rotation": 0,
                "rectanglelabels": [d.class_name],
            },
            "score": round(d.confidence, 4),
        }
        for k, d in enumerate(x for x in candidate.detections if x.confidence >= conf)
    ]
    return {
        "data": {"image": task_image_url(image_url, name)},
        "meta": {"uncertainty": round(candidate.uncertainty, 4), "novelty": round(candidate.novelty, 4)},
        "predictions": [{"model_version": model, "score": round(candidate.score, 4), "result": result}],
    }


def coco_package(candidates: list[Candidate], stored: list[str], names: list[str], conf: float) -> dict[str, Any]:
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id, (c, name) in enumerate(zip(candidates, stored, strict=True), start=1):
        images.append({"id": image_id, "file_name": name, "width": c.width, "height": c.height})
        for d in (x for x in c.detections if x.confidence >= conf):
            x0, y0, x1, y1 = d.box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": d.class_id + 1,
                    "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                    "area": round((x1 - x0) * (y1 - y0), 2),
                    "iscrowd": 0,
                    "attributes": {"score": round(d.confidence, 4)},
                }
            )
    categories = [{"id": i + 1, "name": n, "supercategory": ""} for i, n in enumerate(names)]
    return {"images": images, "annotations": annotations, "categories": categories}


def write_selection(
    folder: Path,
    candidates: list[Candidate],
    names: list[str],
    conf: float,
    model: str,
    source: str,
    image_url: str = DEFAULT_IMAGE_URL,
) -> SelectionFiles:
    """Write the selection's frames, task files and record into `folder` (created; refused if it holds files)."""
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} already holds files; choose another --out")
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "cvat" / "images").mkdir(parents=True, exist_ok=True)
    (folder / "cvat" / "annotations").mkdir(parents=True, exist_ok=True)
    stored = [stored_name(c) for c in candidates]
    for c, name in zip(candidates, stored, strict=True):
        shutil.copy2(c.path, folder / "images" / name)
        shutil.copy2(c.path, folder / "cvat" / "images" / name)
    pairs = enumerate(zip(candidates, stored, strict=True))
    tasks = [studio_task(n, c, name, conf, model, image_url) for n, (c, name) in pairs]
    (folder / TASKS_FILE).write_text(json.dumps(tasks, indent=1))
    (folder / CONFIG_FILE).write_text(label_config(names))
    coco = coco_package(candidates, stored, names, conf)
    (folder / CVAT_ANNOTATIONS).write_text(json.dumps(coco, indent=1))
    record = {
        "id": folder.name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": model,
        "source": source,
        "names": names,
        "frames": [
            {
                "name": name,
                "sha256": c.sha256,
                "from": str(c.path),
                "score": round(c.score, 4),
                "uncertainty": round(c.uncertainty, 4),
                "novelty": round(c.novelty, 4),
                "cluster": c.cluster,
            }
            for c, name in zip(candidates, stored, strict=True)
        ],
    }
    (folder / SELECTION_FILE).write_text(json.dumps(record, indent=1))
    return SelectionFiles(folder, len(candidates), len(coco["annotations"]))
