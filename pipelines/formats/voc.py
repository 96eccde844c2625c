"""Pascal VOC sources: `Annotations/*.xml` with `JPEGImages/`; `ImageSets/Main/<split>.txt` name the splits. VOC
has no class list: the classes are sorted by name."""

from __future__ import annotations

from pathlib import Path

from defusedxml import ElementTree

from conveyor.settings import Split
from pipelines.formats.common import Item, Source, box_line, image_size, relative_name, size_mismatch
from pipelines.validate import Problem

VOC_BOX = ("xmin", "ymin", "xmax", "ymax")


def read_voc(source: Path) -> Source:
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
        shown = relative_name(xml, source)
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
        elif width and height:
            if mismatch := size_mismatch(width, height, image):
                item.errors.append(Problem(shown, mismatch))
        else:
            width, height = (float(v) for v in (image_size(image) or (0, 0)))
            if not (width and height):  # its boxes were then each "outside the 0x0 image"
                item.errors.append(Problem(shown, f"gives no <size>, and its image '{file_name}' cannot be read"))
                items.append(item)
                continue
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
            line, reason = box_line(names.index(name), x0, y0, x1, y1, width, height)
            if line is None:
                item.errors.append(Problem(shown, f"object '{name}': {reason}"))
            else:
                assert item.lines is not None
                item.lines.append(line)
        items.append(item)
    if not items and not problems:
        problems.append(Problem(relative_name(source / "Annotations", source), "no annotation files (*.xml)"))
    # VOC has no class list: the classes are sorted by name (not by which file came first); `data.classes` orders them.
    order = sorted(names)
    for item in items:
        item.lines = [
            f"{order.index(names[int(line.split()[0])])} {line.split(' ', 1)[1]}" for line in item.lines or []
        ]
    return Source("voc", order, items, problems, has_splits=bool(listed))
