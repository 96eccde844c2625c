"""YOLO sources: `data.yaml` with `names` and split folders (Ultralytics, Roboflow), or the flat `images/` +
`labels/` + `classes.txt` that Label Studio's YOLO export writes (no splits). Label lines are kept as they are, so
the validate stage names any bad one."""

from __future__ import annotations

from pathlib import Path

import yaml

from conveyor.settings import SPLITS
from pipelines.formats.common import SPLIT_ALIASES, Item, Source, relative_name
from pipelines.validate import IMAGE_SUFFIXES, DataValidationError, read_class_names


def read_yolo(source: Path) -> Source:
    if (source / "data.yaml").is_file():
        try:
            names = read_class_names(source)
            folders: dict[str | None, Path] = {split: path for split, path in split_dirs(source).items()}
        except (OSError, ValueError, yaml.YAMLError) as exc:
            raise DataValidationError(f"{source / 'data.yaml'}: {exc}") from None
        has_splits = True
    else:  # Label Studio's YOLO export: images/, labels/, classes.txt, no splits
        try:
            text = (source / "classes.txt").read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:  # a UnicodeDecodeError was a traceback
            raise DataValidationError(f"{source / 'classes.txt'}: not readable as UTF-8 text ({exc})") from None
        names = [n.strip() for n in text.splitlines() if n.strip()]
        if not names:
            raise DataValidationError(f"{source / 'classes.txt'}: no class names")
        folders = {None: source / "images"}
        has_splits = False
    items: list[Item] = []
    warnings: list[str] = []
    for split, image_dir in folders.items():
        labels = label_dir(image_dir)
        used: set[Path] = set()
        for path in sorted(p for p in image_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
            rel = path.relative_to(image_dir)
            label = (labels / rel).with_suffix(".txt")
            used.add(label)
            lines = label.read_text(encoding="utf-8", errors="replace").splitlines() if label.is_file() else None
            items.append(Item(path, rel.as_posix(), split, lines, label_source=label))  # type: ignore[arg-type]
        # A label whose image is missing, or of a type not read, was dropped without a word: its boxes are the
        # labelling's work, so it is named.
        found_labels = labels.rglob("*.txt") if labels.is_dir() else iter(())
        orphans = sorted(p for p in found_labels if p.is_file() and p not in used and p.name != "classes.txt")
        for label in orphans:
            beside = (image_dir / label.relative_to(labels)).parent
            others = sorted(p.name for p in beside.glob(f"{label.stem}.*"))
            found = (
                f"{', '.join(others)}, not an image type read ({', '.join(sorted(IMAGE_SUFFIXES))})"
                if others
                else f"no {label.stem}.* in {relative_name(beside, source)}"
            )
            warnings.append(f"{relative_name(label, source)}: a label file without its image ({found}): not imported")
    return Source("yolo", names, items, [], has_splits, warnings=warnings)


def split_dirs(source: Path) -> dict[str, Path]:
    """Image folders per split, from the source's data.yaml (`train: images/train`, or `../train/images`)."""
    spec = yaml.safe_load((source / "data.yaml").read_text()) or {}
    base = source / str(spec.get("path") or ".")  # an absolute `path:` replaces source on join
    found: dict[str, Path] = {}
    for key, value in spec.items():
        split = SPLIT_ALIASES.get(str(key))
        if split is None or value is None or value == "":  # `test:` left empty: no such split
            continue
        if not isinstance(value, str):  # Ultralytics takes a list of folders; its images were dropped silently
            raise DataValidationError(
                f"{source / 'data.yaml'}: {key}: {value!r} is not one folder: put the split's images in one folder "
                "(images/<split>, labels beside) and name it; nothing was imported"
            )
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
        raise DataValidationError(
            f"{image_dir}: image folders must have an 'images' part (YOLO layout) to find the labels"
        )
    index = len(parts) - 1 - parts[::-1].index("images")
    parts[index] = "labels"
    return Path(*parts)
