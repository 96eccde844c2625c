"""Data validation: each fault made on purpose and found in the report; the raw data is never changed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conveyor.settings import SynthSettings, ValidateSettings
from pipelines import synth
from pipelines.data import dir_md5
from pipelines.validate import DataValidationError, run, validate_dataset

FAIL = ValidateSettings(on_error="fail")
SKIP = ValidateSettings(on_error="skip")


@pytest.fixture(scope="module")
def clean_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("clean") / "data"
    synth.generate(SynthSettings(image_size=64, counts={"train": 6, "val": 3, "test": 3}, background_fraction=0), root)
    return root


@pytest.fixture
def data(clean_dataset: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(clean_dataset, root)
    return root


def messages(data: Path, settings: ValidateSettings = FAIL) -> list[str]:
    report, _ = validate_dataset(data, settings)
    return [str(p) for p in report.problems]


def test_clean_dataset_passes(data: Path) -> None:
    report, accepted = validate_dataset(data, FAIL)
    assert report.ok and not report.problems
    assert {s: len(v) for s, v in accepted.items()} == {"train": 6, "val": 3, "test": 3}
    assert report.counts["train"].boxes > 0


def test_truncated_jpeg(data: Path) -> None:
    image = data / "images/train/train_00000.jpg"
    image.write_bytes(image.read_bytes()[:-200])
    assert any(
        m.startswith("data/images/train/train_00000.jpg: ") and ("truncated" in m or "unreadable" in m)
        for m in messages(data)
    )


def test_unreadable_image(data: Path) -> None:
    (data / "images/train/train_00001.jpg").write_bytes(b"this is not a jpeg")
    assert any(m.startswith("data/images/train/train_00001.jpg: unreadable image") for m in messages(data))


def test_missing_end_marker_is_truncation(data: Path) -> None:
    """Ultralytics would 'restore' such a JPEG by rewriting the raw file: we report it instead."""
    image = data / "images/train/train_00002.jpg"
    image.write_bytes(image.read_bytes()[:-2] + b"\x00\x00")
    assert "data/images/train/train_00002.jpg: truncated JPEG (no end-of-image marker)" in messages(data)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("0 0.5 0.5 0.1", "expected 5 fields (class cx cy w h), got 4"),
        ("0 0.5 0.5 0.1 0.1 0.3", "expected 5 fields (class cx cy w h), got 6"),
        ("7 0.5 0.5 0.1 0.1", "class id 7 out of range 0..2"),
        ("-1 0.5 0.5 0.1 0.1", "class id -1 out of range 0..2"),
        ("1.5 0.5 0.5 0.1 0.1", "class id 1.5 out of range 0..2"),
        ("0 1.5 0.5 0.1 0.1", "coordinates outside [0, 1]: 1.5 0.5 0.1 0.1"),
        ("0 0.5 -0.2 0.1 0.1", "coordinates outside [0, 1]: 0.5 -0.2 0.1 0.1"),
        ("0 0.5 0.5 0 0.1", "zero-area box (w=0, h=0.1)"),
        ("0 0.95 0.5 0.3 0.1", "box extends outside the image"),
        ("scratch 0.5 0.5 0.1 0.1", "non-numeric field in 'scratch 0.5 0.5 0.1 0.1'"),
    ],
)
def test_bad_label_line(data: Path, line: str, reason: str) -> None:
    label = data / "labels/val/val_00001.txt"
    label.write_text("1 0.5 0.5 0.2 0.2\n" + line + "\n")
    assert f"data/labels/val/val_00001.txt:2: {reason}" in messages(data)
    # An error, not a warning: it stops the stage, or (skip) its image is left out of training and scoring.
    assert not validate_dataset(data, FAIL)[0].ok
    _, accepted = validate_dataset(data, SKIP)
    assert "images/val/val_00001.jpg" not in {sample.image for sample in accepted["val"]}


def test_label_without_image(data: Path) -> None:
    (data / "labels/train/orphan.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    assert "data/labels/train/orphan.txt: label file without an image" in messages(data)


def test_image_without_label_is_counted_background(data: Path) -> None:
    (data / "labels/train/train_00003.txt").unlink()
    report, accepted = validate_dataset(data, FAIL)
    assert report.ok and not report.errors
    assert report.counts["train"].background == 1
    assert any(s.image == "images/train/train_00003.jpg" and s.label is None for s in accepted["train"])


def test_image_without_label_when_background_not_allowed(data: Path) -> None:
    (data / "labels/train/train_00003.txt").unlink()
    settings = ValidateSettings(on_error="fail", allow_background=False)
    assert "data/images/train/train_00003.jpg: no label file (background not allowed)" in messages(data, settings)


def test_leakage_between_splits(data: Path) -> None:
    shutil.copy(data / "images/train/train_00004.jpg", data / "images/test/copied.jpg")
    shutil.copy(data / "labels/train/train_00004.txt", data / "labels/test/copied.txt")
    assert (
        "data/images/test/copied.jpg: same image as data/images/train/train_00004.jpg (leakage between train and test)"
    ) in messages(data)
    assert not validate_dataset(data, FAIL)[0].ok  # an error: a test image the model trained on scores nothing
    _, accepted = validate_dataset(data, SKIP)
    assert "images/test/copied.jpg" not in {sample.image for sample in accepted["test"]}


def test_duplicate_within_split_is_a_warning(data: Path) -> None:
    shutil.copy(data / "images/train/train_00004.jpg", data / "images/train/again.jpg")
    report, _ = validate_dataset(data, FAIL)
    assert report.ok
    assert [p.severity for p in report.problems] == ["warning"]


def test_two_images_of_one_label_stem_are_both_left_out(data: Path) -> None:
    """a.jpg and a.png share labels/train/a.txt: which image it describes is unknown. The second was flagged and the
    first kept, with a label that may be the second's; under `skip` nothing at all was left out."""
    from PIL import Image

    Image.open(data / "images/train/train_00003.jpg").save(data / "images/train/train_00003.png")
    said = messages(data, SKIP)
    assert "data/images/train/train_00003.png: second image for one label stem 'train_00003' (with " in said[0], said
    assert any(m.startswith("data/images/train/train_00003.jpg: shares its label stem") for m in said), said
    report, accepted = validate_dataset(data, SKIP)
    kept = [sample.image for sample in accepted["train"]]
    assert "images/train/train_00003.jpg" not in kept and len(kept) == 5
    assert "data/images/train/train_00003.jpg" in report.skipped


def test_an_image_in_a_folder_named_images_is_refused(data: Path) -> None:
    """Ultralytics swaps the last /images/ of a path for /labels/: data/images/train/images/x.jpg's label is looked
    for at data/images/train/labels/x.txt, and the image trains with no boxes. Validation passed it."""
    (data / "images/train/images").mkdir()
    (data / "labels/train/images").mkdir()
    (data / "images/train/train_00005.jpg").rename(data / "images/train/images/train_00005.jpg")
    (data / "labels/train/train_00005.txt").rename(data / "labels/train/images/train_00005.txt")
    assert any(
        m.startswith("data/images/train/images/train_00005.jpg: inside a folder named 'images'") for m in messages(data)
    )


def test_a_png_named_jpg_is_an_image_not_a_truncated_jpeg(data: Path) -> None:
    """The end-of-image check went by the name: a PNG saved as .jpg (common in renamed data) failed validation."""
    from PIL import Image

    image = data / "images/train/train_00001.jpg"
    Image.open(image).save(image, format="PNG")
    report, _ = validate_dataset(data, FAIL)
    assert report.ok, report.summary()


def test_empty_split(data: Path) -> None:
    shutil.rmtree(data / "images/val")
    shutil.rmtree(data / "labels/val")
    report, _ = validate_dataset(data, SKIP)
    assert "data/images/val: split is empty: no images" in [str(p) for p in report.problems]
    assert not report.ok  # skipping cannot mend an empty split


def test_a_split_whose_every_image_is_skipped_is_empty(data: Path) -> None:
    """Skipping every image of a split leaves it as empty as no images: training would read nothing from it."""
    for label in (data / "labels/val").glob("*.txt"):
        label.write_text("7 0.5 0.5 0.1 0.1\n")  # a class the dataset does not have
    report, accepted = validate_dataset(data, SKIP)
    images = report.counts["val"].images
    assert f"data/images/val: split is empty: all {images} images have errors" in [str(p) for p in report.problems]
    assert not report.ok and accepted["val"] == []


def test_missing_data_yaml(data: Path) -> None:
    (data / "data.yaml").unlink()
    report, _ = validate_dataset(data, SKIP)
    assert not report.ok
    assert str(report.problems[0]).startswith("data/data.yaml: cannot read class names")


def test_fail_policy_raises_with_readable_summary_and_writes_the_report(data: Path, tmp_path: Path) -> None:
    (data / "labels/train/train_00000.txt").write_text("9 0.5 0.5 0.1 0.1\n")
    out = tmp_path / "validation"
    with pytest.raises(DataValidationError) as excinfo:
        run(data, FAIL, out)
    assert "data/labels/train/train_00000.txt:1: class id 9 out of range 0..2" in str(excinfo.value)
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] is False
    assert report["problems"][0] == {
        "file": "data/labels/train/train_00000.txt",
        "line": 1,
        "reason": "class id 9 out of range 0..2",
        "severity": "error",
        "message": "data/labels/train/train_00000.txt:1: class id 9 out of range 0..2",
    }


def test_skip_policy_lists_and_excludes_bad_files_and_never_touches_raw_data(data: Path, tmp_path: Path) -> None:
    before = dir_md5(data)
    (data / "labels/train/train_00000.txt").write_text("9 0.5 0.5 0.1 0.1\n")
    (data / "images/train/train_00001.jpg").write_bytes(b"garbage")
    (data / "labels/val/orphan.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    changed = dir_md5(data)
    out = tmp_path / "validation"
    report = run(data, SKIP, out)
    assert report.ok
    assert set(report.skipped) == {
        "data/images/train/train_00000.jpg",
        "data/labels/train/train_00000.txt",
        "data/images/train/train_00001.jpg",
        "data/labels/train/train_00001.txt",
        "data/labels/val/orphan.txt",
    }
    assert report.counts["train"].skipped == 2 and report.counts["train"].accepted == 4
    manifest = json.loads((out / "manifest.json").read_text())
    kept = {entry["image"] for entry in manifest["splits"]["train"]}
    assert "images/train/train_00000.jpg" not in kept and len(kept) == 4
    assert "skipped by policy: 5 file(s)" in (out / "summary.txt").read_text()
    assert dir_md5(data) == changed != before  # validation read, never wrote
    assert (data / "images/train/train_00001.jpg").read_bytes() == b"garbage"
