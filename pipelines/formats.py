"""Datasets as labelling tools export them, brought to the YOLO layout the stages read.

Sources, told apart by what the folder holds (the source is only ever read):
- **yolo**: `data.yaml` with `names` and split folders (Ultralytics, Roboflow), or the flat `images/` + `labels/` +
  `classes.txt` that Label Studio's YOLO export writes (no splits);
- **coco**: one or several COCO JSON files (in `annotations/`, beside the images, or one per split folder as Roboflow
  writes them); a file's split comes from its name or folder (`instances_val.json`, `valid/_annotations.coco.json`);
- **voc**: Pascal VOC, `Annotations/*.xml` with `JPEGImages/` (`ImageSets/Main/<split>.txt` name the splits).

Rules, whatever the format:
- Every problem (a box outside its image, an unknown category, a file that is named but absent, duplicate image ids)
  is a `validate.Problem` in one report, and the validate stage's `on_error` policy decides: `fail` refuses the
  whole source, `skip` leaves out the images concerned and lists them.
- `data.class_map` renames, merges or drops classes before anything is written, so the dataset's class list stays
  what the registry's models know even when a labelling tool's category list changes.
- Splits the source does not name are decided by `splits.split_of` (a content hash: stable as data grows).

Why not Ultralytics' `convert_coco`: it maps categories by id (`cls91to80` or `id - 1`), not by name, writes its own
folder layout, and drops what it cannot convert without saying so; the checks above are the point of an import.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import yaml
from defusedxml import ElementTree

from conveyor.settings import SPLITS, DataSettings, Split
from pipelines import splits, synth
from pipelines.validate import IMAGE_SUFFIXES, DataValidationError, Problem, read_class_names

Format = Literal["yolo", "coco", "voc"]
SPLIT_ALIASES: dict[str, Split] = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
VOC_BOX = ("xmin", "ymin", "xmax", "ymax")
EDGE_TOLERANCE_PX = 1.0  # boxes past the image edge by less than this are clipped (rounding in exports)


@dataclass
class Item:
    """One image of the source: where it is, its split if the source names one, and its boxes as YOLO label lines
    with the *source's* class ids (None: no label file, a background image)."""

    image: Path
    name: str  # the path it gets under images/<split>/
    split: Split | None
    lines: list[str] | None
    errors: list[Problem] = field(default_factory=list)
    label_source: Path | None = None  # the file the boxes came from (a YOLO .txt, a COCO .json, a VOC .xml)


@dataclass
class Source:
    format: Format
    names: list[str]  # the source's classes, by source id
    items: list[Item]
    problems: list[Problem]  # problems not tied to one image (a file that cannot be read, ...)
    has_splits: bool  # the source names splits (missing ones are then carved on import only)


@dataclass(frozen=True)
class ConvertSummary:
    format: Format
    names: list[str]
    images: dict[str, int]
    labels: dict[str, int]
    carved: dict[str, int]  # images whose split was decided by the content hash, per split
    dropped_boxes: dict[str, int]  # boxes of classes the class map drops, per source class
    skipped: list[str]  # images left out by the skip policy
    warnings: list[str]
    origin: dict[str, Path] = field(default_factory=dict)  # written file (images/..., labels/...) -> source file


def detect_format(source: Path) -> Format:
    if source.is_file() and source.suffix == ".json":
        return "coco"
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such dataset folder")
    if (source / "data.yaml").is_file() or (source / "classes.txt").is_file():
        return "yolo"
    if (source / "Annotations").is_dir():
        return "voc"
    if _json_candidates(source):
        return "coco"  # which of them are COCO files is decided once, when they are read
    raise FileNotFoundError(
        f"{source}: no data.yaml, classes.txt, Annotations/ or COCO *.json: not a dataset an import reads. Expected "
        "YOLO (data.yaml, or images/ + labels/ + classes.txt), COCO (*.json annotation files with the images beside "
        "or in images/) or Pascal VOC (Annotations/*.xml and JPEGImages/)"
    )


def read_source(source: Path) -> Source:
    """Parse a source of any supported format; problems are collected, never raised one by one."""
    fmt = detect_format(source)
    return {"yolo": _read_yolo, "coco": _read_coco, "voc": _read_voc}[fmt](source)


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root if root.is_dir() else root.parent).as_posix()
    except ValueError:
        return path.as_posix()


def _split_from_name(*words: str) -> Split | None:
    """`instances_train2017` -> train, `valid` -> val: the first split alias among the name's tokens."""
    for word in words:
        for token in word.lower().replace("-", "_").replace(".", "_").split("_"):
            token = token.rstrip("0123456789")
            if token in SPLIT_ALIASES:
                return SPLIT_ALIASES[token]
    return None


# --- YOLO ------------------------------------------------------------------------------------------------------


def _read_yolo(source: Path) -> Source:
    if (source / "data.yaml").is_file():
        try:
            names = read_class_names(source)
            folders: dict[str | None, Path] = {split: path for split, path in split_dirs(source).items()}
        except (OSError, ValueError, yaml.YAMLError) as exc:
            raise DataValidationError(f"{source / 'data.yaml'}: {exc}") from None
        has_splits = True
    else:  # Label Studio's YOLO export: images/, labels/, classes.txt, no splits
        names = [n.strip() for n in (source / "classes.txt").read_text(encoding="utf-8").splitlines() if n.strip()]
        if not names:
            raise DataValidationError(f"{source / 'classes.txt'}: no class names")
        folders = {None: source / "images"}
        has_splits = False
    items: list[Item] = []
    for split, image_dir in folders.items():
        labels = label_dir(image_dir)
        for path in sorted(p for p in image_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
            rel = path.relative_to(image_dir)
            label = (labels / rel).with_suffix(".txt")
            lines = label.read_text(encoding="utf-8", errors="replace").splitlines() if label.is_file() else None
            items.append(Item(path, rel.as_posix(), split, lines, label_source=label))  # type: ignore[arg-type]
    return Source("yolo", names, items, [], has_splits)


def split_dirs(source: Path) -> dict[str, Path]:
    """Image folders per split, from the source's data.yaml (`train: images/train`, or `../train/images`)."""
    spec = yaml.safe_load((source / "data.yaml").read_text()) or {}
    base = source / str(spec.get("path") or ".")  # an absolute `path:` replaces source on join
    found: dict[str, Path] = {}
    for key, value in spec.items():
        split = SPLIT_ALIASES.get(str(key))
        if split is None or not isinstance(value, str):
            continue
        # Roboflow-style exports say `../train/images` for a folder beside data.yaml.
        for candidate in (base / value, source / value, source / value.removeprefix("../")):
            if candidate.is_dir():
                found[split] = candidate.resolve()
                break
        else:
            raise FileNotFoundError(f"{source / 'data.yaml'}: {key}: folder {value} not found")
    if not found:  # no split keys: the plain images/<split> layout
        found = {s: source / "images" / s for s in SPLITS if (source / "images" / s).is_dir()}
    return found


def label_dir(image_dir: Path) -> Path:
    """Ultralytics' rule: the labels folder replaces the last 'images' part of the image folder's path."""
    parts = list(image_dir.parts)
    if "images" not in parts:
        raise ValueError(f"{image_dir}: image folders must have an 'images' part (YOLO layout) to find the labels")
    index = len(parts) - 1 - parts[::-1].index("images")
    parts[index] = "labels"
    return Path(*parts)


# --- COCO ------------------------------------------------------------------------------------------------------


def _json_candidates(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    found = sorted(source.glob("*.json")) + sorted(source.glob("annotations/*.json")) + sorted(source.glob("*/*.json"))
    return list(dict.fromkeys(found))


def _coco_documents(source: Path) -> list[tuple[Path, Any]]:
    """Each annotation file, parsed once (None: unreadable). A file named as the source is always kept, so its
    errors are reported; in a folder, only JSON shaped like COCO (images and annotations) counts."""
    documents: list[tuple[Path, Any]] = []
    for path in _json_candidates(source):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            doc = None
        if source.is_file() or (isinstance(doc, dict) and "images" in doc and "annotations" in doc):
            documents.append((path, doc))
    return documents


def _image_dirs(json_file: Path, root: Path, split: Split | None) -> list[Path]:
    """Where a COCO file's `file_name`s may live: beside it, in images/ beside it or beside annotations/."""
    base = json_file.parent.parent if json_file.parent.name == "annotations" else json_file.parent
    candidates = [json_file.parent, json_file.parent / "images", base / "images", base, root / "images", root]
    if split:
        candidates += [base / "images" / split, root / "images" / split, root / split]
    return list(dict.fromkeys(candidates))


def _box_line(
    class_id: int, x0: float, y0: float, x1: float, y1: float, width: float, height: float
) -> tuple[str | None, str]:
    """A YOLO line for a pixel box, or a reason it is not one. Tiny overflows (rounding) are clipped."""
    if x1 <= x0 or y1 <= y0:
        return None, f"box has no area ({x0:g},{y0:g})-({x1:g},{y1:g})"
    tol = EDGE_TOLERANCE_PX
    if x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
        return None, f"box ({x0:g},{y0:g})-({x1:g},{y1:g}) is outside the {width:g}x{height:g} image"
    x0, y0, x1, y1 = max(x0, 0.0), max(y0, 0.0), min(x1, width), min(y1, height)
    cx, cy, w, h = (x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height
    return f"{class_id} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}", ""


def image_size(path: Path) -> tuple[int, int] | None:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.size
    except OSError:
        return None


def _read_coco(source: Path) -> Source:
    documents = _coco_documents(source)
    if not documents:
        raise DataValidationError(f"{source}: no COCO annotation file (*.json with images and annotations)")
    root = source if source.is_dir() else source.parent
    names: list[str] = []
    items: list[Item] = []
    problems: list[Problem] = []
    splits_named = 0
    for file, doc in documents:
        shown = _rel(file, root)
        if not isinstance(doc, dict):
            problems.append(Problem(shown, "not a readable COCO file (not a JSON object)"))
            continue
        try:
            categories = {int(c["id"]): str(c["name"]) for c in doc.get("categories", [])}
            images = list(doc["images"])
            annotations = list(doc["annotations"])
        except (ValueError, KeyError, TypeError) as exc:
            problems.append(Problem(shown, f"not a readable COCO file: {exc}"))
            continue
        for name in categories.values():
            if name not in names:
                names.append(name)
        split = _split_from_name(file.stem, file.parent.name)
        splits_named += split is not None
        by_id: dict[int, Item] = {}
        sizes: dict[int, tuple[float, float]] = {}
        repeated: set[int] = set()
        for image in images:
            image_id, file_name = int(image["id"]), str(image["file_name"])
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
                    Problem(shown, f"image '{file_name}' is named but not there (looked in {folders[0]} and beside)")
                )
            by_id[image_id] = item
            width, height = image.get("width"), image.get("height")
            if not (width and height) and path is not None:
                width, height = image_size(path) or (0, 0)
            sizes[image_id] = (float(width or 0), float(height or 0))
        for item_id in repeated:
            by_id[item_id].errors.append(Problem(shown, f"image id {item_id} is used twice"))
        for ann in annotations:
            image_id = int(ann.get("image_id", -1))
            owner = by_id.get(image_id)
            if owner is None:
                problems.append(Problem(shown, f"annotation {ann.get('id')}: image id {image_id} is not in images"))
                continue
            item = owner
            if item.lines is None:
                item.lines = []
            if ann.get("iscrowd"):
                continue  # a crowd region is not one object (Ultralytics skips them too)
            category = categories.get(int(ann.get("category_id", -1)))
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
            line, reason = _box_line(names.index(category), x, y, x + w, y + h, width, height)
            if line is None:
                item.errors.append(Problem(shown, f"annotation {ann.get('id')} ({item.name}): {reason}"))
            else:
                item.lines.append(line)
        items += by_id.values()
    return Source("coco", names, items, problems, has_splits=splits_named == len(documents) and splits_named > 0)


# --- Pascal VOC ------------------------------------------------------------------------------------------------


def _read_voc(source: Path) -> Source:
    listed: dict[str, Split] = {}
    lists = source / "ImageSets" / "Main"
    for split, list_name in (("train", "trainval"), ("train", "train"), ("val", "val"), ("test", "test")):
        path = lists / f"{list_name}.txt"
        if path.is_file():
            for stem in path.read_text().split():
                listed[stem] = split  # type: ignore[assignment]  # val/test listed after trainval win
    names: list[str] = []
    items: list[Item] = []
    problems: list[Problem] = []
    for xml in sorted((source / "Annotations").glob("*.xml")):
        shown = _rel(xml, source)
        try:
            root = ElementTree.parse(xml).getroot()
            file_name = root.findtext("filename") or f"{xml.stem}.jpg"
            width = float(root.findtext("size/width") or 0)
            height = float(root.findtext("size/height") or 0)
        except (ElementTree.ParseError, ValueError) as exc:
            problems.append(Problem(shown, f"not a readable VOC file: {exc}"))
            continue
        image = source / "JPEGImages" / file_name
        item = Item(image, file_name, listed.get(xml.stem), [], label_source=xml)
        if not image.is_file():
            item.errors.append(Problem(shown, f"names image '{file_name}', which is not in JPEGImages/"))
        elif not (width and height):
            width, height = (float(v) for v in (image_size(image) or (0, 0)))
        for obj in root.iter("object"):
            name = (obj.findtext("name") or "").strip()
            if not name:
                item.errors.append(Problem(shown, "an object without a name"))
                continue
            if name not in names:
                names.append(name)
            try:
                # VOC pixel coordinates start at 1 (as Ultralytics' VOC converter reads them)
                x0, y0, x1, y1 = (float(obj.findtext(f"bndbox/{k}") or "nan") - 1 for k in VOC_BOX)
            except ValueError:
                item.errors.append(Problem(shown, f"object '{name}': bndbox is not numeric"))
                continue
            line, reason = _box_line(names.index(name), x0, y0, x1, y1, width, height)
            if line is None:
                item.errors.append(Problem(shown, f"object '{name}': {reason}"))
            else:
                assert item.lines is not None
                item.lines.append(line)
        items.append(item)
    if not items and not problems:
        problems.append(Problem(_rel(source / "Annotations", source), "no annotation files (*.xml)"))
    # VOC has no class list: the classes are sorted by name (not by which file came first); `data.classes` orders them.
    order = sorted(names)
    for item in items:
        item.lines = [
            f"{order.index(names[int(line.split()[0])])} {line.split(' ', 1)[1]}" for line in item.lines or []
        ]
    return Source("voc", order, items, problems, has_splits=bool(listed))


# --- to the YOLO layout ----------------------------------------------------------------------------------------


def class_mapping(
    source_names: list[str], settings: DataSettings, target: list[str] | None
) -> tuple[list[str], dict[int, int | None]]:
    """The dataset's classes and source id -> dataset id (None: dropped), after `data.class_map`.

    `target` is the class list the result must use (the current dataset's, for a batch); else `data.classes`, else
    the mapped source names in source order. A source class that maps to none of them is an error naming the fix.
    """
    mapped = {name: settings.class_map.get(name, name) for name in source_names}
    names = target or settings.classes or list(dict.fromkeys(n for n in mapped.values() if n is not None))
    unknown = {s: t for s, t in mapped.items() if t is not None and t not in names}
    if unknown:
        listed = ", ".join(f"'{s}'" + (f" (mapped to '{t}')" if s != t else "") for s, t in unknown.items())
        raise DataValidationError(
            f"class {listed} is not one of the dataset's classes {names}. Map it to one of them, or to null to drop "
            "its boxes, in params.yaml `data.class_map`; nothing was changed"
        )
    return names, {i: (names.index(t) if t is not None else None) for i, t in enumerate(mapped.values())}


def _remap(lines: list[str], ids: dict[int, int | None], source_names: list[str], dropped: Counter[str]) -> list[str]:
    out = []
    for line in lines:
        fields = line.split()
        try:
            source_id = int(fields[0])
        except (IndexError, ValueError):
            out.append(line)  # not a label line: kept as it is, so the validation report names it
            continue
        if source_id not in ids:
            out.append(line)  # out of range: the validation report names it
        elif ids[source_id] is None:
            dropped[source_names[source_id]] += 1
        else:
            out.append(" ".join([str(ids[source_id]), *fields[1:]]))
    return out


def convert(
    source: Path,
    staging: Path,
    settings: DataSettings,
    on_error: str,
    *,
    target_names: list[str] | None = None,
    carve_named: bool = True,
    action: Literal["import", "add"] = "import",
    prefix: str = "",
) -> ConvertSummary:
    """Write `source` (any supported format) to `staging` as a YOLO dataset (data.yaml, images/, labels/), each file
    named `<prefix><name>` (`data add` writes a batch's files under their batch name at once).

    Images whose split the source does not name are carved by content hash; with `carve_named`, so are the splits a
    source with named splits lacks (an import must end with train, val and test). Raises DataValidationError, with
    every problem listed, when the policy is `fail` and any problem is an error; nothing is written then.
    """
    parsed = read_source(source)
    names, ids = class_mapping(parsed.names, settings, target_names)
    errors = parsed.problems + [p for item in parsed.items for p in item.errors]
    if errors and on_error == "fail":
        _refuse(source, errors, action)
    skipped = [item.name for item in parsed.items if item.errors]
    items = [item for item in parsed.items if not item.errors]
    if not items:
        left_out = f" ({len(skipped)} left out for errors)" if skipped else ""
        raise DataValidationError(f"{source}: no images to {action}{left_out}")
    present = {item.split for item in items if item.split}
    lacking = ({"val", "test"} - present) if carve_named else set()
    carved: Counter[str] = Counter()
    for item in items:
        if item.split is None or (item.split == "train" and lacking):
            choices = {"val", "test"} if item.split is None else lacking
            item.split = splits.split_of(item.image.read_bytes(), settings.split, choices)
            if item.split != "train":
                carved[item.split] += 1
    dropped: Counter[str] = Counter()
    images: Counter[str] = Counter()
    labels: Counter[str] = Counter()
    taken: dict[str, Item] = {}
    origin: dict[str, Path] = {}
    for item in items:
        assert item.split is not None
        named = PurePosixPath(item.name)
        dest = f"{item.split}/{(named.parent / f'{prefix}{named.name}').as_posix()}"
        if dest in taken:
            raise DataValidationError(
                f"{source}: two images would both be images/{dest} ({taken[dest].image} and {item.image}); rename one"
            )
        taken[dest] = item
        target = staging / "images" / dest
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(item.image, target)
        origin[f"images/{dest}"] = item.image
        images[item.split] += 1
        if item.lines is not None:
            label = (staging / "labels" / dest).with_suffix(".txt")
            label.parent.mkdir(parents=True, exist_ok=True)
            label.write_text("".join(f"{line}\n" for line in _remap(item.lines, ids, parsed.names, dropped)))
            origin[label.relative_to(staging).as_posix()] = item.label_source or item.image
            labels[item.split] += 1
    synth.write_dataset_yaml(staging, names)
    unused = sorted(set(settings.class_map) - set(parsed.names))
    warnings = [f"data.class_map names {unused}, which this source does not have"] if unused else []
    return ConvertSummary(
        parsed.format,
        names,
        {s: images[s] for s in SPLITS if images[s]},
        {s: labels[s] for s in SPLITS if images[s]},
        dict(carved),
        dict(dropped),
        skipped,
        warnings,
        origin,
    )


def _refuse(source: Path, problems: list[Problem], action: str) -> None:
    listed = "\n".join(f"  {p}" for p in problems[:50])
    more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
    why = (
        "validate.on_error is 'fail'; 'skip' leaves these images out"
        if action == "import"
        else "a batch is refused whole on any error"
    )
    raise DataValidationError(f"{source}: {len(problems)} error(s), nothing was {action}ed ({why}):\n{listed}{more}")
