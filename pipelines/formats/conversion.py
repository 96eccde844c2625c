"""Any source to the YOLO layout the stages read: which format a folder holds, its parse, the class mapping
(`data.class_map`), the split of images the source does not place, and the files written with every problem
reported at once."""

from __future__ import annotations

import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

from conveyor.settings import SPLITS, DataSettings
from pipelines import splits, synth
from pipelines.formats.coco import json_candidates, read_coco
from pipelines.formats.common import Format, Item, Source, relative_name
from pipelines.formats.voc import read_voc
from pipelines.formats.yolo import read_yolo
from pipelines.validate import DataValidationError, Problem


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
    left_out: list[str] = field(default_factory=list)  # every problem the skip policy passed over, with its reason


def detect_format(source: Path) -> Format:
    if source.is_file() and source.suffix == ".json":
        return "coco"
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such dataset folder")
    if (source / "data.yaml").is_file() or (source / "classes.txt").is_file():
        return "yolo"
    if (source / "Annotations").is_dir():
        return "voc"
    if json_candidates(source):
        return "coco"  # which of them are COCO files is decided once, when they are read
    raise FileNotFoundError(
        f"{source}: no data.yaml, classes.txt, Annotations/ or COCO *.json: not a dataset an import reads. Expected "
        "YOLO (data.yaml, or images/ + labels/ + classes.txt), COCO (*.json annotation files with the images beside "
        "or in images/) or Pascal VOC (Annotations/*.xml and JPEGImages/)"
    )


def read_source(source: Path) -> Source:
    """Parse a source of any supported format; problems are collected, never raised one by one."""
    fmt = detect_format(source)
    return {"yolo": read_yolo, "coco": read_coco, "voc": read_voc}[fmt](source)


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
            value = float(fields[0])  # "0.0" is class 0, as the validate stage reads it
        except (IndexError, ValueError):
            value = float("nan")
        if not value.is_integer():
            out.append(line)  # not a label line: kept as it is, so the validation report names it
            continue
        source_id = int(value)
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
    for item in parsed.items:
        named = PurePosixPath(item.name)
        if named.parts[:1] == ("images",) and len(named.parts) > 1:
            # Label Studio's COCO export names its images `images/<name>`: under images/<split>/ that folder would
            # hide every label from Ultralytics (it swaps the last /images/ of a path for /labels/).
            item.name = PurePosixPath(*named.parts[1:]).as_posix()
            named = PurePosixPath(item.name)
        if "images" in named.parts[:-1]:
            where = relative_name(item.label_source or item.image, source)
            item.errors.append(
                Problem(
                    where,
                    f"image name '{item.name}' is inside a folder named 'images': Ultralytics would look for its "
                    "label elsewhere and train on it without boxes; rename that folder",
                )
            )
        if named.is_absolute() or ".." in named.parts or not named.name:
            # Its copy would land outside the dataset's images/ (or outside the project): a COCO `file_name` or a VOC
            # `filename` is a name under the images folder.
            where = relative_name(item.label_source or item.image, source)
            item.errors.append(
                Problem(where, f"image name '{item.name}' leaves the images folder ('..' or an absolute path)")
            )
    errors = parsed.unreadable + parsed.problems + [p for item in parsed.items for p in item.errors]
    if errors and on_error == "fail":
        _refuse(source, errors, action)
    if parsed.unreadable:  # under skip too: not an image to leave out, but images unknown
        _refuse(source, parsed.unreadable, action, "a file that cannot be read holds images nobody can list")
    skipped = [item.name for item in parsed.items if item.errors]
    left_out = [str(p) for p in errors]  # under skip: what was left out, and why
    items = [item for item in parsed.items if not item.errors]
    if not items:
        why = f" ({len(skipped)} left out for errors)" if skipped else ""
        raise DataValidationError(f"{source}: no images to {action}{why}")
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
    stems: dict[str, Item] = {}
    origin: dict[str, Path] = {}
    for item in items:
        assert item.split is not None
        named = PurePosixPath(item.name)
        dest = f"{item.split}/{(named.parent / f'{prefix}{named.name}').as_posix()}"
        if dest in taken:
            raise DataValidationError(
                f"{source}: two images would both be images/{dest} ({taken[dest].image} and {item.image}); rename one"
            )
        stem = PurePosixPath(dest).with_suffix("").as_posix()
        if stem in stems:  # a.jpg and a.png: one label file, the second's boxes over the first's
            raise DataValidationError(
                f"{source}: two images would share the label file labels/{stem}.txt ({stems[stem].image} and "
                f"{item.image}); rename one"
            )
        taken[dest] = stems[stem] = item
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
    warnings = [
        *parsed.warnings,
        *([f"data.class_map names {unused}, which this source does not have"] if unused else []),
    ]
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
        left_out,
    )


def _refuse(source: Path, problems: list[Problem], action: str, why: str = "") -> None:
    listed = "\n".join(f"  {p}" for p in problems[:50])
    more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
    why = why or (
        "validate.on_error is 'fail'; 'skip' leaves these images out"
        if action == "import"
        else "a batch is refused whole on any error"
    )
    raise DataValidationError(f"{source}: {len(problems)} error(s), nothing was {action}ed ({why}):\n{listed}{more}")
