"""Data as it comes: COCO and Pascal VOC exports, train/val-only datasets, class maps, and every bad input named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from conveyor.paths import ProjectPaths
from conveyor.settings import DataSettings, SplitSettings, SynthSettings
from pipelines import data, formats, gate, splits, synth
from pipelines.validate import IMAGE_SUFFIXES, DataValidationError
from tests.formats_support import NAMES, to_coco, to_voc

ASSET = Path(__file__).parent / "assets" / "yolo11n-defects-320.pt"


@pytest.fixture(scope="module")
def yolo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("yolo") / "data"
    synth.generate(SynthSettings(image_size=64, seed=3, counts={"train": 16, "val": 4, "test": 4}), root)
    return root


@pytest.fixture
def paths(project: Path, monkeypatch: pytest.MonkeyPatch) -> ProjectPaths:
    monkeypatch.chdir(project)
    return ProjectPaths.discover()


def boxes_of(root: Path) -> dict[str, list[list[float]]]:
    """Image name -> its label lines as numbers, for every split (order-free)."""
    out = {}
    for label in root.glob("labels/*/*.txt"):
        out[label.stem] = sorted([float(v) for v in line.split()] for line in label.read_text().splitlines())
    return out


def same_boxes(a: list[list[float]], b: list[list[float]]) -> bool:
    return len(a) == len(b) and all(
        x[0] == y[0] and max(abs(p - q) for p, q in zip(x[1:], y[1:], strict=True)) < 1e-4
        for x, y in zip(a, b, strict=True)
    )


def test_coco_export_round_trips_with_its_splits_and_categories_by_name(yolo: Path, tmp_path: Path) -> None:
    coco = to_coco(
        yolo, tmp_path / "coco", {"train": "instances_train", "val": "instances_val", "test": "instances_test"}
    )
    summary = formats.convert(coco, tmp_path / "out", DataSettings(), "fail")
    assert summary.format == "coco" and summary.names == NAMES and not summary.carved
    assert summary.images == {"train": 16, "val": 4, "test": 4}
    expected, got = boxes_of(yolo), boxes_of(tmp_path / "out")
    assert expected.keys() <= got.keys() | {k for k in expected if not expected[k]}
    assert all(same_boxes(expected[k], got.get(k, [])) for k in expected)


def test_voc_with_train_and_val_lists_gets_a_stable_test_split(yolo: Path, tmp_path: Path) -> None:
    voc = to_voc(yolo, tmp_path / "voc", {"train": "train", "val": "val"})
    assert formats.read_source(voc).names == sorted(NAMES)  # VOC has no class list: sorted by name ...
    summary = formats.convert(voc, tmp_path / "out", DataSettings(classes=NAMES), "fail")  # ... or as data.classes says
    assert summary.format == "voc" and summary.names == NAMES
    assert summary.images["val"] == 4 and summary.carved.get("test", 0) == summary.images["test"] > 0
    assert summary.images["train"] + summary.images["test"] == 16
    expected, got = boxes_of(yolo), boxes_of(tmp_path / "out")
    assert all(same_boxes(expected[k], got[k]) for k in got)
    # The content hash decides: the same import again gives the same split for every image.
    formats.convert(voc, tmp_path / "again", DataSettings(classes=NAMES), "fail")
    assert sorted(p.name for p in (tmp_path / "again/images/test").iterdir()) == sorted(
        p.name for p in (tmp_path / "out/images/test").iterdir()
    )


def test_split_of_depends_only_on_the_image_and_the_seed() -> None:
    cfg = SplitSettings(val=0.2, test=0.2, seed=0)
    images = [f"image {i}".encode() for i in range(2000)]
    decided = [splits.split_of(b, cfg) for b in images]
    assert decided == [splits.split_of(b, cfg) for b in images]
    shares = {s: decided.count(s) / len(images) for s in ("train", "val", "test")}
    assert abs(shares["test"] - 0.2) < 0.04 and abs(shares["val"] - 0.2) < 0.04
    # Only val may be carved: test's images stay train, val's stay val.
    only_val = [splits.split_of(b, cfg, {"val"}) for b in images]
    assert "test" not in only_val and [d == "val" for d in decided] == [d == "val" for d in only_val]
    assert decided != [splits.split_of(b, SplitSettings(val=0.2, test=0.2, seed=1)) for b in images]


def test_train_val_only_yolo_import_carves_test_and_runs_validation(
    paths: ProjectPaths, yolo: Path, tmp_path: Path
) -> None:
    source = tmp_path / "tv"
    for kind in ("images", "labels"):
        for split in ("train", "val"):
            shutil.copytree(yolo / kind / split, source / kind / split)
    (source / "data.yaml").write_text(yaml.safe_dump({"train": "images/train", "val": "images/val", "names": NAMES}))
    summary = data.import_dataset(paths, source)
    assert summary.images["test"] == summary.conversion.carved["test"] > 0
    assert summary.images["val"] == 4 and data.data_status(paths).in_sync
    from conveyor.settings import ValidateSettings
    from pipelines.validate import validate_dataset

    report, _ = validate_dataset(paths.data, ValidateSettings())
    assert report.ok, report.summary()


def test_label_studio_yolo_export_without_splits(yolo: Path, tmp_path: Path) -> None:
    source = tmp_path / "ls"
    shutil.copytree(yolo / "images/train", source / "images")
    shutil.copytree(yolo / "labels/train", source / "labels")
    (source / "classes.txt").write_text("\n".join(NAMES) + "\n")
    summary = formats.convert(source, tmp_path / "out", DataSettings(), "fail", carve_named=False)
    assert sum(summary.images.values()) == 16 and set(summary.images) <= {"train", "val", "test"}
    assert summary.images["train"] == 16 - sum(summary.carved.values())


def test_class_map_renames_merges_and_drops(yolo: Path, tmp_path: Path) -> None:
    source = tmp_path / "tool"
    shutil.copytree(yolo, source)
    # The tool's classes: scratch split in two, dent, and a class nobody wants any more.
    (source / "data.yaml").write_text(yaml.safe_dump({"names": ["scratch_light", "scratch_dark", "dent", "smudge"]}))
    flip = 0
    for label in source.glob("labels/*/*.txt"):
        lines = []
        for line in label.read_text().splitlines():
            c, *rest = line.split()
            new = {"0": str(flip % 2), "1": "2", "2": "3"}[c]
            flip += c == "0"
            lines.append(" ".join([new, *rest]))
        label.write_text("".join(f"{x}\n" for x in lines))
    cfg = DataSettings(class_map={"scratch_light": "scratch", "scratch_dark": "scratch", "smudge": None})
    summary = formats.convert(source, tmp_path / "out", cfg, "fail")
    assert summary.names == ["scratch", "dent"]
    original = boxes_of(yolo)
    converted = boxes_of(tmp_path / "out")
    kept = {k: [b for b in v if b[0] != 2] for k, v in original.items()}  # stain (2) was smudge: dropped
    assert all(same_boxes(kept[k], converted.get(k, [])) for k in kept if kept[k])
    assert summary.dropped_boxes["smudge"] == sum(len(v) - len(kept[k]) for k, v in original.items())

    with pytest.raises(DataValidationError, match=r"'smudge' is not one of the dataset's classes.*class_map"):
        formats.convert(
            source,
            tmp_path / "x",
            DataSettings(
                classes=["scratch", "dent"], class_map={"scratch_light": "scratch", "scratch_dark": "scratch"}
            ),
            "fail",
        )
    with pytest.raises(ValidationError, match=r"class_map maps to \['stian'\]"):
        DataSettings(classes=["scratch", "dent", "stain"], class_map={"smudge": "stian"})


def _coco_doc(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "annotations/instances_train.json").read_text())


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (lambda d: d["images"].append({**d["images"][0], "file_name": "other.jpg"}), r"image id 1 is used twice"),
        (lambda d: d["annotations"][0].update(bbox=[50, 50, 40, 40]), r"outside the 64x64 image"),
        (lambda d: d["annotations"][0].update(category_id=99), r"unknown category id 99"),
        (lambda d: d["images"][1].update(file_name="gone.jpg"), r"image 'gone\.jpg' is named but not there"),
        (lambda d: d["annotations"][0].update(category_id=None), r"unknown category id None"),
        # Its copy would have been written outside images/ (data add: outside the project).
        (
            lambda d: d["images"][1].update(file_name="../../" + d["images"][1]["file_name"]),
            r"leaves the images folder",
        ),
        (lambda d: d["images"][1].update(file_name="/tmp/x.jpg"), r"image name '/tmp/x\.jpg' leaves the images folder"),
    ],
    ids=[
        "overlapping-image-ids",
        "box-outside",
        "unknown-category",
        "missing-image",
        "null-category",
        "dot-dot",
        "absolute",
    ],
)
def test_bad_coco_is_refused_whole_or_skipped_by_policy(
    yolo: Path, tmp_path: Path, break_it: object, message: str
) -> None:
    coco = to_coco(yolo, tmp_path / "coco", {"train": "instances_train"})
    doc = _coco_doc(coco)
    break_it(doc)  # type: ignore[operator]
    (coco / "annotations/instances_train.json").write_text(json.dumps(doc))
    with pytest.raises(DataValidationError, match=message) as raised:
        formats.convert(coco, tmp_path / "out", DataSettings(), "fail")
    assert "nothing was imported" in str(raised.value) and not (tmp_path / "out").exists()
    summary = formats.convert(coco, tmp_path / "skip", DataSettings(), "skip")
    assert summary.skipped and sum(summary.images.values()) == 16 - len(summary.skipped)


def test_coco_names_under_images_and_two_images_of_one_stem(yolo: Path, tmp_path: Path) -> None:
    """Label Studio's COCO export names its images `images/<name>`: they were copied to images/train/images/, where
    Ultralytics finds no label (it swaps the last /images/ for /labels/), and trained as background. A folder named
    images deeper in a name is refused; so are two images that would share one label file (a.jpg and a.png: the
    second's boxes overwrote the first's)."""
    coco = to_coco(yolo, tmp_path / "coco", {"train": "instances_train"})
    doc = _coco_doc(coco)
    for image in doc["images"]:
        image["file_name"] = f"images/{image['file_name']}"
    (coco / "annotations/instances_train.json").write_text(json.dumps(doc))
    formats.convert(coco, tmp_path / "out", DataSettings(), "fail")
    assert not (tmp_path / "out/images/train/images").exists()
    expected, got = boxes_of(yolo), boxes_of(tmp_path / "out")
    assert got and all(same_boxes(expected[k], got[k]) for k in got)
    for label in (tmp_path / "out").glob("labels/*/*.txt"):  # each where Ultralytics looks for its image's
        assert (tmp_path / "out/images" / label.parent.name / f"{label.stem}.jpg").is_file(), label

    nested = coco / "cam-1" / "images"
    nested.mkdir(parents=True)
    shutil.copy2(coco / doc["images"][0]["file_name"], nested / "x.jpg")
    doc["images"][0]["file_name"] = "cam-1/images/x.jpg"
    (coco / "annotations/instances_train.json").write_text(json.dumps(doc))
    with pytest.raises(
        DataValidationError, match=r"image name 'cam-1/images/x\.jpg' is inside a folder named 'images'"
    ):
        formats.convert(coco, tmp_path / "nested", DataSettings(), "fail")

    doc = _coco_doc(to_coco(yolo, tmp_path / "stems", {"train": "instances_train"}))
    shutil.copy2(tmp_path / "stems/images" / doc["images"][1]["file_name"], tmp_path / "stems/images/twin.png")
    shutil.copy2(tmp_path / "stems/images" / doc["images"][2]["file_name"], tmp_path / "stems/images/twin.jpg")
    doc["images"][1]["file_name"], doc["images"][2]["file_name"] = "twin.png", "twin.jpg"
    (tmp_path / "stems/annotations/instances_train.json").write_text(json.dumps(doc))
    with pytest.raises(DataValidationError, match=r"two images would share the label file labels/train/twin\.txt"):
        formats.convert(tmp_path / "stems", tmp_path / "twins", DataSettings(), "fail")


def test_a_voc_object_without_its_box_is_refused(yolo: Path, tmp_path: Path) -> None:
    """A missing coordinate became NaN, which passes every comparison: `0 nan nan nan nan` was written."""
    voc = to_voc(yolo, tmp_path / "voc", {"train": "train"})
    xml = next(p for p in sorted((voc / "Annotations").glob("*.xml")) if "<bndbox>" in p.read_text())
    text = xml.read_text()
    xml.write_text(text.replace(text[text.index("<xmin>") : text.index("</xmin>") + 7], "", 1))
    with pytest.raises(DataValidationError, match=r"lacks a coordinate"):
        formats.convert(voc, tmp_path / "out", DataSettings(), "fail")


def test_voc_naming_an_absent_image_and_an_unknown_format(yolo: Path, tmp_path: Path) -> None:
    voc = to_voc(yolo, tmp_path / "voc", {"train": "train"})
    (voc / "JPEGImages/train_00003.jpg").unlink()
    with pytest.raises(DataValidationError, match=r"Annotations/train_00003\.xml: names image 'train_00003\.jpg'"):
        formats.convert(voc, tmp_path / "out", DataSettings(), "fail")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk/notes.txt").write_text("hello")
    with pytest.raises(FileNotFoundError, match="not a dataset an import reads"):
        formats.convert(tmp_path / "junk", tmp_path / "out", DataSettings(), "fail")


def test_a_second_batch_with_the_same_image_is_refused(paths: ProjectPaths, yolo: Path, tmp_path: Path) -> None:
    data.import_dataset(paths, yolo)
    coco = to_coco(yolo, tmp_path / "coco", {"train": "export"})  # no split in the name: carved like a new batch
    before = data.dir_md5(paths.data)
    with pytest.raises(DataValidationError, match=r"already in the dataset as data/images/"):
        data.add_dataset(paths, coco)
    assert data.dir_md5(paths.data) == before and data.data_status(paths).in_sync


def test_the_gate_refuses_to_compare_with_a_champion_of_other_classes(paths: ProjectPaths, tmp_path: Path) -> None:
    """The champion (the bundled checkpoint) detects scratch, dent, stain; this data has scratch and dent only."""
    from conveyor.settings import load_settings

    per_class = {n: {"ap50": 0.9, "ap50_95": 0.6, "precision": 0.9, "recall": 0.9, "instances": 5} for n in NAMES[:2]}
    evaluation = {"split": "test", "images": 4, "map50": 0.9, "map50_95": 0.6, "precision": 0.9, "recall": 0.9}
    for folder, name, doc in (
        (paths.evaluate, "evaluation.json", {**evaluation, "per_class": per_class, "latency_ms": {}}),
        (paths.export, "export.json", {"exports": {}, "skipped": {}}),
        (paths.validation, "manifest.json", {"names": NAMES[:2], "splits": {}, "data_root": "data"}),
    ):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(doc))
    assert gate.checkpoint_names(ASSET) == NAMES
    report = gate.evaluate_gates(paths, load_settings(paths.params), ASSET, "3", "run")
    regression = next(g for g in report.gates if g.gate == "no regression vs champion")
    assert not regression.passed and not report.passed
    assert "classes changed" in regression.detail and "conveyor promote VERSION --force" in regression.detail


def test_coco_string_ids_are_ids_and_an_image_without_a_file_name_is_named(yolo: Path, tmp_path: Path) -> None:
    """COCO allows string ids ("img-a0"): read as keys (was a ValueError traceback); an image entry without a
    file_name is a problem the report names (was a KeyError traceback)."""
    coco = to_coco(yolo, tmp_path / "coco", {"train": "instances_train"})
    formats.convert(coco, tmp_path / "ints", DataSettings(), "fail")
    doc = _coco_doc(coco)
    for image in doc["images"]:
        image["id"] = f"img-{image['id']}"
    for annotation in doc["annotations"]:
        annotation["image_id"] = f"img-{annotation['image_id']}"
    (coco / "annotations/instances_train.json").write_text(json.dumps(doc))
    summary = formats.convert(coco, tmp_path / "strings", DataSettings(), "fail")
    assert sum(summary.images.values()) == 16 and boxes_of(tmp_path / "strings") == boxes_of(tmp_path / "ints")
    del doc["images"][0]["file_name"]
    (coco / "annotations/instances_train.json").write_text(json.dumps(doc))
    with pytest.raises(DataValidationError, match=r"image entry without an id and a file_name"):
        formats.convert(coco, tmp_path / "out", DataSettings(), "fail")


def test_remapped_class_ids_written_as_floats_keep_their_class(tmp_path: Path) -> None:
    """A label line "0.0 ..." is class 0 to the validate stage, so a batch's remapping reads it so too (it was left
    unmapped: a stain became the dataset's class 0, a scratch)."""
    from collections import Counter

    from pipelines.formats.conversion import _remap

    dropped: Counter[str] = Counter()
    lines = ["0.0 0.5 0.5 0.2 0.2", "1 0.5 0.5 0.1 0.1", "0.5 0.1 0.1 0.1 0.1", "x"]
    assert _remap(lines, {0: 2, 1: 0}, ["stain", "scratch"], dropped) == [
        "2 0.5 0.5 0.2 0.2",
        "0 0.5 0.5 0.1 0.1",
        "0.5 0.1 0.1 0.1 0.1",  # not a class id: left for the validation report to name
        "x",
    ]


def test_coco_ids_written_as_floats_are_the_same_ids(yolo: Path, tmp_path: Path) -> None:
    """Some tools write 1.0 for 1: an annotation's image and category ids match their integer ids."""
    coco = to_coco(yolo, tmp_path / "coco", {"train": "instances_train"})
    formats.convert(coco, tmp_path / "ints", DataSettings(), "fail")
    doc = _coco_doc(coco)
    for annotation in doc["annotations"]:
        annotation["image_id"], annotation["category_id"] = (
            float(annotation["image_id"]),
            float(annotation["category_id"]),
        )
    (coco / "annotations/instances_train.json").write_text(json.dumps(doc))
    formats.convert(coco, tmp_path / "floats", DataSettings(), "fail")
    assert boxes_of(tmp_path / "floats") == boxes_of(tmp_path / "ints")


def _coco_folder(root: Path, images: dict[str, Any], annotations: list[dict[str, Any]], json_name: str) -> Path:
    """A one-split COCO export by hand: `images` name -> a PIL image (saved with its `exif`, if given in .info)."""
    (root / "images").mkdir(parents=True)
    entries = []
    for n, (name, image) in enumerate(images.items(), 1):
        image.save(root / "images" / name, exif=image.info.get("exif", b""))
        entries.append({"id": n, "file_name": name})
    (root / "annotations").mkdir()
    doc = {"images": entries, "annotations": annotations, "categories": [{"id": 1, "name": NAMES[0]}]}
    (root / "annotations" / json_name).write_text(json.dumps(doc))
    return root


def test_a_portrait_photo_without_a_size_gets_its_boxes_in_the_upright_frame(tmp_path: Path) -> None:
    """A phone's JPEG stored 100x60 with EXIF orientation 6 is 60x100 to OpenCV and Ultralytics. Annotations that
    give no size had their boxes divided by the stored sides: `0 0.2 0.5 0.2 0.667` for what is `0 0.333 0.3 0.333
    0.4` in the pixels the trainer sees."""
    from PIL import Image

    photo = Image.new("RGB", (100, 60), (120, 120, 120))
    exif = Image.Exif()
    exif[0x0112] = 6
    photo.info["exif"] = exif.tobytes()
    annotation = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 40]}
    source = _coco_folder(tmp_path / "coco", {"portrait.jpg": photo}, [annotation], "instances_train.json")
    assert formats.image_size(source / "images" / "portrait.jpg") == (60, 100)
    formats.convert(source, tmp_path / "out", DataSettings(), "fail")
    (label,) = (tmp_path / "out" / "labels").rglob("portrait.txt")
    assert [round(float(v), 3) for v in label.read_text().split()] == [0, 0.333, 0.3, 0.333, 0.4]

    # An annotation that gives the stored size (LabelImg writes it) had its boxes divided by the wrong sides, and
    # they passed every check: now named, as is a size of another shape. A size of the upright image's shape is
    # right whatever its scale (resized in proportion since it was labelled): boxes are divided by it.
    doc_file = source / "annotations" / "instances_train.json"

    def with_size(width: int, height: int) -> None:
        doc = json.loads(doc_file.read_text())
        doc["images"][0].update(width=width, height=height)
        doc_file.write_text(json.dumps(doc))

    for size, said in (
        ((100, 60), "as stored; turned upright by its EXIF orientation"),
        ((50, 30), "as stored; turned upright by its EXIF orientation"),
        ((80, 80), "but the image is 60x100, another shape"),
    ):
        with_size(*size)
        with pytest.raises(
            DataValidationError, match=rf"image portrait\.jpg: gives the image's size as {size[0]}x{size[1]}, {said}"
        ):
            formats.convert(source, tmp_path / f"out-{size[0]}", DataSettings(), "fail")
    with_size(120, 200)  # the upright image at twice its size: its boxes are fractions of that
    formats.convert(source, tmp_path / "out-resized", DataSettings(), "fail")
    (label,) = (tmp_path / "out-resized" / "labels").rglob("portrait.txt")
    assert [round(float(v), 3) for v in label.read_text().split()] == [0, 0.167, 0.15, 0.167, 0.2]


def test_a_cut_short_annotation_file_in_a_folder_is_named_not_skipped(yolo: Path, tmp_path: Path) -> None:
    """A COCO folder whose instances_val.json was cut short imported the train split alone, and carved val out of it,
    without a word, even with on_error: fail."""
    coco = to_coco(yolo, tmp_path / "coco", {"train": "instances_train", "val": "instances_val"})
    val = coco / "annotations" / "instances_val.json"
    val.write_text(val.read_text()[: len(val.read_text()) // 2])
    with pytest.raises(DataValidationError, match=r"instances_val\.json.*not valid JSON"):
        formats.convert(coco, tmp_path / "out", DataSettings(), "fail")
    # Under on_error: skip too: which images the file held is unknown, so none can be left out (the val split went,
    # without a word).
    with pytest.raises(DataValidationError, match=r"a file that cannot be read holds images nobody can list"):
        formats.convert(coco, tmp_path / "skip", DataSettings(), "skip")


def test_skipped_images_are_listed_with_their_reasons(yolo: Path, tmp_path: Path) -> None:
    """`on_error: skip` said only how many images it left out; the docs promise it lists them. Each, with why."""
    coco = to_coco(yolo, tmp_path / "coco", {"train": "instances_train"})
    doc = _coco_doc(coco)
    doc["annotations"][0]["category_id"] = 99
    (coco / "annotations/instances_train.json").write_text(json.dumps(doc))
    summary = formats.convert(coco, tmp_path / "skip", DataSettings(), "skip")
    assert len(summary.skipped) == 1 and len(summary.left_out) == 1
    assert "unknown category id 99" in summary.left_out[0] and "instances_train.json" in summary.left_out[0]


def test_the_source_folders_own_name_is_not_a_split(yolo: Path, tmp_path: Path) -> None:
    """A COCO file at the top of a batch folder called line3-test-run sent every image to test (the folder's name
    read as a split); a folder inside the source still names one (train/_annotations.coco.json)."""
    batch = to_coco(yolo, tmp_path / "line3-test-run", {"train": "result"})
    top = batch / "result.json"
    (batch / "annotations" / "result.json").rename(top)  # Label Studio's COCO export: result.json at the top
    summary = formats.convert(batch, tmp_path / "out", DataSettings(), "fail")
    assert set(summary.images) == {"train", "val", "test"} and summary.images["test"] < 16, summary.images


def test_a_yolo_label_without_its_image_is_named(yolo: Path, tmp_path: Path) -> None:
    """A label whose image is missing, or of a type not read (.gif), was dropped with its boxes, without a word: now
    said, without refusing the import (a leftover label of a deleted image loses nothing); LabelImg's classes.txt in
    the labels folder is no label."""
    source = tmp_path / "yolo"
    shutil.copytree(yolo, source)
    labels = source / "labels" / "train"
    shutil.copy(next(labels.glob("*.txt")), labels / "lost.txt")
    shutil.copy(next(labels.glob("*.txt")), labels / "animated.txt")
    (labels / "classes.txt").write_text("\n".join(NAMES))
    (source / "images" / "train" / "animated.gif").write_bytes(b"GIF89a")
    summary = formats.convert(source, tmp_path / "out", DataSettings(), "fail")
    assert summary.warnings == [
        "labels/train/animated.txt: a label file without its image (animated.gif, not an image type read "
        f"({', '.join(sorted(IMAGE_SUFFIXES))})): not imported",
        "labels/train/lost.txt: a label file without its image (no lost.* in images/train): not imported",
    ]


def test_a_split_given_as_a_list_and_an_unreadable_classes_file_are_named(yolo: Path, tmp_path: Path) -> None:
    """`train: [images/train, images/train2]` (Ultralytics takes a list) imported no train images, without a word; a
    classes.txt that is not UTF-8 was a UnicodeDecodeError traceback."""
    spec = yaml.safe_load((yolo / "data.yaml").read_text())
    spec["train"] = ["images/train", "images/train"]
    listed = tmp_path / "listed"
    shutil.copytree(yolo, listed)
    (listed / "data.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(DataValidationError, match=r"train: \['images/train', 'images/train'\] is not one folder"):
        formats.convert(listed, tmp_path / "out", DataSettings(), "fail")
    plain = tmp_path / "plain"
    (plain / "images").mkdir(parents=True)
    (plain / "classes.txt").write_bytes("scratch\nd\xe9nt\n".encode("latin-1"))
    with pytest.raises(DataValidationError, match=r"classes\.txt: not readable as UTF-8 text"):
        formats.convert(plain, tmp_path / "out2", DataSettings(), "fail")


def test_cocos_own_2017_layout_is_read(tmp_path: Path) -> None:
    """annotations/instances_train2017.json with its images in train2017/ (as COCO ships): every image was "named
    but not there", and the message named one folder of the five looked in."""
    from PIL import Image

    annotation = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20]}
    source = _coco_folder(
        tmp_path / "coco", {"000000000009.jpg": Image.new("RGB", (64, 64))}, [annotation], "instances_train2017.json"
    )
    (source / "train2017").mkdir()
    (source / "images" / "000000000009.jpg").rename(source / "train2017" / "000000000009.jpg")
    (source / "images").rmdir()
    summary = formats.convert(source, tmp_path / "out", DataSettings(), "fail")
    assert sum(summary.images.values()) == 1
    (source / "train2017" / "000000000009.jpg").unlink()
    with pytest.raises(DataValidationError, match=r"named but not there \(looked in .*train2017/"):
        formats.convert(source, tmp_path / "out2", DataSettings(), "fail")


def test_a_box_just_past_the_edge_is_refused_not_written_without_area(yolo: Path, tmp_path: Path) -> None:
    """Within the edge tolerance but wholly outside the image, a box was clipped to a line of negative or zero width
    (`0 1.001 0.25 -0.002 ...`); a VOC file without <size> whose image cannot be read had each box "outside the 0x0
    image"."""
    from pipelines.formats.common import box_line

    assert box_line(0, 100.2, 10, 100.8, 20, 100, 60) == (
        None,
        "box (100.2,10)-(100,20) has no area inside the 100x60 image",
    )
    assert box_line(0, -0.5, 10, 0.0, 20, 100, 60)[0] is None
    assert box_line(0, -0.5, 10, 10, 20, 100, 60)[0] == "0 0.050000 0.250000 0.100000 0.166667"  # clipped, kept
    voc = to_voc(yolo, tmp_path / "voc", {"train": "train"})
    first = sorted((voc / "Annotations").glob("*.xml"))[0]
    text = first.read_text()
    first.write_text(text[: text.index("<size>")] + text[text.index("</size>") + len("</size>") :])
    image = voc / "JPEGImages" / f"{first.stem}.jpg"
    image.write_bytes(b"not an image")
    with pytest.raises(DataValidationError, match=r"gives no <size>, and its image .* cannot be read"):
        formats.convert(voc, tmp_path / "out", DataSettings(), "fail")
