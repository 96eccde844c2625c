"""COCO sources: one or several COCO JSON files (in `annotations/`, beside the images, or one per split folder as
Roboflow writes them); a file's split comes from its name or folder (`instances_val.json`,
`valid/_annotations.coco.json`). Categories are mapped by name, never by id; crowd regions are skipped."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conveyor.settings import Split
from pipelines.formats.common import (
    Item,
    Source,
    box_line,
    image_size,
    relative_name,
    size_mismatch,
    split_from_name,
)
from pipelines.validate import DataValidationError, Problem


def json_candidates(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    found = sorted(source.glob("*.json")) + sorted(source.glob("annotations/*.json")) + sorted(source.glob("*/*.json"))
    return list(dict.fromkeys(found))


@dataclass(frozen=True)
class Unreadable:
    reason: str


def _coco_documents(source: Path) -> list[tuple[Path, Any]]:
    """Each annotation file, parsed once (`Unreadable`: it does not parse). A file named as the source is always
    kept, so its errors are reported; in a folder, JSON shaped like COCO (images and annotations) counts, and so
    does JSON that does not parse at all: a cut-short `instances_val.json` was skipped, and its split's images were
    left out of the import without a word."""
    documents: list[tuple[Path, Any]] = []
    for path in json_candidates(source):
        try:
            doc: Any = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            doc = Unreadable(str(exc).splitlines()[0][:200])
        if (
            source.is_file()
            or isinstance(doc, Unreadable)
            or (isinstance(doc, dict) and "images" in doc and "annotations" in doc)
        ):
            documents.append((path, doc))
    return documents


def _image_dirs(json_file: Path, root: Path, split: Split | None) -> list[Path]:
    """Where a COCO file's `file_name`s may live: beside it, in images/ beside it or beside annotations/."""
    base = json_file.parent.parent if json_file.parent.name == "annotations" else json_file.parent
    candidates = [json_file.parent, json_file.parent / "images", base / "images", base, root / "images", root]
    if split:
        candidates += [base / "images" / split, root / "images" / split, root / split]
    # COCO's own layout: annotations/instances_train2017.json for the images in train2017/.
    token = json_file.stem.rsplit("_", 1)[-1] if "_" in json_file.stem else ""
    if token:
        candidates += [base / token, base / "images" / token, root / token, root / "images" / token]
    return list(dict.fromkeys(candidates))


def _id(value: object) -> str:
    """An image's or category's id as a key: COCO ids are usually integers (some tools write 1.0), but strings are
    legal too ("img-a0")."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _number(value: object) -> float:
    """A width or height as the file gives it; 0 (read from the image instead) when missing or not a number."""
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0.0


def read_coco(source: Path) -> Source:
    documents = _coco_documents(source)
    if not documents:
        raise DataValidationError(f"{source}: no COCO annotation file (*.json with images and annotations)")
    root = source if source.is_dir() else source.parent
    names: list[str] = []
    items: list[Item] = []
    problems: list[Problem] = []
    unreadable: list[Problem] = []  # whole files: their images are not even known
    splits_named = 0
    for file, doc in documents:
        shown = relative_name(file, root)
        if isinstance(doc, Unreadable):
            unreadable.append(Problem(shown, f"not a readable COCO file (not valid JSON: {doc.reason})"))
            continue
        if not isinstance(doc, dict):
            unreadable.append(Problem(shown, "not a readable COCO file (not a JSON object)"))
            continue
        try:
            categories = {_id(c["id"]): str(c["name"]) for c in doc.get("categories", [])}
            images = list(doc["images"])
            annotations = list(doc["annotations"])
        except (ValueError, KeyError, TypeError) as exc:
            unreadable.append(Problem(shown, f"not a readable COCO file: {exc}"))
            continue
        for name in categories.values():
            if name not in names:
                names.append(name)
        # The folder above names a split (train/_annotations.coco.json); the source's own folder does not (a batch
        # called line3-test-run sent every image to test).
        split = split_from_name(file.stem, *([file.parent.name] if file.parent != root else []))
        splits_named += split is not None
        by_id: dict[str, Item] = {}
        sizes: dict[str, tuple[float, float]] = {}
        repeated: set[str] = set()
        for image in images:
            if not isinstance(image, dict) or image.get("id") is None or not isinstance(image.get("file_name"), str):
                problems.append(Problem(shown, f"image entry without an id and a file_name: {str(image)[:80]}"))
                continue
            image_id, file_name = _id(image["id"]), image["file_name"]
            folders = _image_dirs(file, root, split)
            path = next((d / file_name for d in folders if (d / file_name).is_file()), None)
            if image_id in by_id:
                repeated.add(image_id)
                problems.append(
                    Problem(
                        shown,
                        f"image id {image_id} is used twice ({by_id[image_id].name}, {file_name}): its annotations "
                        "cannot be told apart",
                    )
                )
                continue
            item = Item(path or folders[0] / file_name, Path(file_name).as_posix(), split, None, label_source=file)
            if path is None:
                item.errors.append(
                    Problem(
                        shown,
                        f"image '{file_name}' is named but not there (looked in "
                        f"{', '.join(relative_name(d, root) + '/' for d in folders if d.is_dir()) or root})",
                    )
                )
            by_id[image_id] = item
            width, height = _number(image.get("width")), _number(image.get("height"))
            if not (width and height) and path is not None:
                width, height = image_size(path) or (0, 0)
            elif path is not None and (mismatch := size_mismatch(float(width), float(height), path)):
                item.errors.append(Problem(shown, f"image {file_name}: {mismatch}"))
            sizes[image_id] = (float(width), float(height))
        for item_id in repeated:
            by_id[item_id].errors.append(Problem(shown, f"image id {item_id} is used twice"))
        for ann in annotations:
            if not isinstance(ann, dict):
                problems.append(Problem(shown, f"annotation is not an object: {str(ann)[:80]}"))
                continue
            image_id = _id(ann.get("image_id"))
            owner = by_id.get(image_id)
            if owner is None:
                problems.append(Problem(shown, f"annotation {ann.get('id')}: image id {image_id} is not in images"))
                continue
            item = owner
            if item.lines is None:
                item.lines = []
            if ann.get("iscrowd"):
                continue  # a crowd region is not one object (Ultralytics skips them too)
            category = categories.get(_id(ann.get("category_id")))
            if category is None:
                what = f"annotation {ann.get('id')} ({item.name})"
                item.errors.append(Problem(shown, f"{what}: unknown category id {ann.get('category_id')}"))
                continue
            width, height = sizes[image_id]
            try:
                x, y, w, h = (float(v) for v in ann["bbox"])
            except (KeyError, TypeError, ValueError):
                item.errors.append(Problem(shown, f"annotation {ann.get('id')} ({item.name}): no valid bbox"))
                continue
            line, reason = box_line(names.index(category), x, y, x + w, y + h, width, height)
            if line is None:
                item.errors.append(Problem(shown, f"annotation {ann.get('id')} ({item.name}): {reason}"))
            else:
                item.lines.append(line)
        items += by_id.values()
    has_splits = splits_named == len(documents) and splits_named > 0
    return Source("coco", names, items, problems, has_splits, unreadable)
