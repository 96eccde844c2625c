"""Labelling-tool exports of a synthetic YOLO dataset: COCO JSON and Pascal VOC, written from its YOLO labels."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from PIL import Image

NAMES = ["scratch", "dent", "stain"]


def yolo_boxes(label: Path, width: int, height: int) -> list[tuple[int, float, float, float, float]]:
    """(class, x0, y0, x1, y1) in pixels."""
    boxes = []
    for line in label.read_text().splitlines() if label.is_file() else []:
        c, cx, cy, w, h = line.split()
        x0, y0 = (float(cx) - float(w) / 2) * width, (float(cy) - float(h) / 2) * height
        boxes.append((int(c), x0, y0, x0 + float(w) * width, y0 + float(h) * height))
    return boxes


def to_coco(yolo: Path, out: Path, splits: dict[str, str], names: list[str] = NAMES) -> Path:
    """One COCO file per split (`splits`: YOLO split -> file stem) in out/annotations, images in out/images."""
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    for split, stem in splits.items():
        # Category ids as a tool numbers them (here from 7): an import maps them by name, never by id.
        categories = [{"id": i + 7, "name": n} for i, n in enumerate(names)]
        doc: dict[str, list[dict[str, object]]] = {"images": [], "annotations": [], "categories": categories}
        for n, image in enumerate(sorted((yolo / "images" / split).glob("*.jpg")), start=1):
            (out / "images").mkdir(exist_ok=True)
            shutil.copy2(image, out / "images" / image.name)
            width, height = Image.open(image).size
            doc["images"].append({"id": n, "file_name": image.name, "width": width, "height": height})
            for c, x0, y0, x1, y1 in yolo_boxes(yolo / "labels" / split / f"{image.stem}.txt", width, height):
                box = [x0, y0, x1 - x0, y1 - y0]
                ann = {"id": len(doc["annotations"]) + 1, "image_id": n, "category_id": c + 7, "bbox": box}
                doc["annotations"].append(ann)
        (out / "annotations" / f"{stem}.json").write_text(json.dumps(doc))
    return out


def to_voc(yolo: Path, out: Path, splits: dict[str, str], names: list[str] = NAMES) -> Path:
    """Pascal VOC: Annotations/*.xml (1-based pixel boxes), JPEGImages/, ImageSets/Main/<list>.txt per split."""
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    for split, list_name in splits.items():
        stems = []
        for image in sorted((yolo / "images" / split).glob("*.jpg")):
            shutil.copy2(image, out / "JPEGImages" / image.name)
            width, height = Image.open(image).size
            objects = "".join(
                f"<object><name>{names[c]}</name><difficult>0</difficult><bndbox><xmin>{x0 + 1:.4f}</xmin>"
                f"<ymin>{y0 + 1:.4f}</ymin><xmax>{x1 + 1:.4f}</xmax><ymax>{y1 + 1:.4f}</ymax></bndbox></object>"
                for c, x0, y0, x1, y1 in yolo_boxes(yolo / "labels" / split / f"{image.stem}.txt", width, height)
            )
            (out / "Annotations" / f"{image.stem}.xml").write_text(
                f"<annotation><filename>{image.name}</filename><size><width>{width}</width><height>{height}</height>"
                f"<depth>3</depth></size>{objects}</annotation>"
            )
            stems.append(image.stem)
        (out / "ImageSets/Main" / f"{list_name}.txt").write_text("\n".join(stems) + "\n")
    return out
