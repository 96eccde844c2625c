"""The synthetic dataset (data tests): deterministic, well-formed labels, every class present, shift knobs work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conveyor.settings import DomainShift, SynthSettings, ValidateSettings
from pipelines import synth
from pipelines.data import dir_md5
from pipelines.validate import validate_dataset

SMALL = SynthSettings(image_size=96, counts={"train": 12, "val": 4, "test": 4})


def test_same_settings_give_identical_bytes(tmp_path: Path) -> None:
    synth.generate(SMALL, tmp_path / "a")
    synth.generate(SMALL, tmp_path / "b")
    assert dir_md5(tmp_path / "a") == dir_md5(tmp_path / "b")


def test_seed_changes_the_data(tmp_path: Path) -> None:
    synth.generate(SMALL, tmp_path / "a")
    synth.generate(SMALL.model_copy(update={"seed": 8}), tmp_path / "b")
    assert dir_md5(tmp_path / "a") != dir_md5(tmp_path / "b")


def test_layout_labels_and_classes(tmp_path: Path) -> None:
    summary = synth.generate(SMALL, tmp_path / "data")
    spec = yaml.safe_load((tmp_path / "data/data.yaml").read_text())
    assert spec["names"] == {0: "scratch", 1: "dent", 2: "stain"}
    assert summary.images == {"train": 12, "val": 4, "test": 4}
    report, _ = validate_dataset(tmp_path / "data", ValidateSettings())
    assert report.ok and not report.problems  # the generator's output passes its own validation


def test_defect_classes_differ_in_shape_and_size() -> None:
    settings = SynthSettings(image_size=320, counts={"train": 200, "val": 1, "test": 1})
    shapes: dict[int, list[tuple[float, float]]] = {0: [], 1: [], 2: []}
    background = 0
    for i in range(200):
        _, boxes = synth.render_image(settings, "train", i)
        background += not boxes
        for cls, _, _, w, h in boxes:
            shapes[cls].append((max(w, h) / max(min(w, h), 1e-6), w * h))
    assert all(len(v) > 30 for v in shapes.values())
    elongation = {c: float(np.median([e for e, _ in v])) for c, v in shapes.items()}
    area = {c: float(np.median([a for _, a in v])) for c, v in shapes.items()}
    assert elongation[0] > 2 * max(elongation[1], elongation[2])  # scratches are thin and long
    assert area[2] > 0.8 * area[1]  # stains are blobs, at least as large as dents
    assert 5 <= background <= 40  # ~10 % defect-free images


def test_domain_shift_knobs() -> None:
    base = SynthSettings(image_size=128)
    plain, _boxes = synth.render_image(base, "test", 0)
    dark, _ = synth.render_image(base.model_copy(update={"shift": DomainShift(brightness=0.5)}), "test", 0)
    blurred, _ = synth.render_image(base.model_copy(update={"shift": DomainShift(blur_sigma=3)}), "test", 0)
    assert dark.mean() < 0.7 * plain.mean()
    assert np.abs(np.diff(blurred.astype(float), axis=1)).mean() < np.abs(np.diff(plain.astype(float), axis=1)).mean()
    large = base.model_copy(update={"shift": DomainShift(defect_scale=2.0)})
    areas = [w * h for i in range(30) for *_, w, h in synth.render_image(large, "test", i)[1]]
    normal = [w * h for i in range(30) for *_, w, h in synth.render_image(base, "test", i)[1]]
    assert np.median(areas) > 2 * np.median(normal)
    concrete = synth.render_image(base.model_copy(update={"shift": DomainShift(background="concrete")}), "test", 0)[0]
    assert concrete.shape == plain.shape


def test_refuses_to_overwrite_without_asking(tmp_path: Path) -> None:
    synth.generate(SMALL, tmp_path / "data")
    with pytest.raises(FileExistsError, match="not empty"):
        synth.generate(SMALL, tmp_path / "data")
    synth.generate(SMALL, tmp_path / "data", overwrite=True)


def test_an_overwrite_that_fails_part_way_leaves_the_dataset_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`data synth --overwrite` deleted the dataset first: a bad setting or Ctrl-C part way left data/ emptied or
    half-written (814 of 2000 train images, no val or test). It is written beside it and swapped in whole."""
    out = tmp_path / "data"
    synth.generate(SMALL, out)
    before = dir_md5(out)
    original = synth.render_image
    calls = {"n": 0}

    def interrupted(settings: SynthSettings, split: str, index: int) -> tuple[np.ndarray, list]:
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return original(settings, split, index)

    monkeypatch.setattr(synth, "render_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        synth.generate(SMALL.model_copy(update={"seed": 8}), out, overwrite=True)
    assert dir_md5(out) == before and [p.name for p in tmp_path.iterdir()] == ["data"]
    monkeypatch.undo()
    synth.generate(SMALL.model_copy(update={"seed": 8}), out, overwrite=True)
    assert dir_md5(out) != before and len(list((out / "images/train").iterdir())) == 12
    assert sorted(p.name for p in out.iterdir()) == ["data.yaml", "images", "labels"]  # nothing set aside is left
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_a_folder_that_cannot_take_its_place_leaves_the_old_one_there(tmp_path: Path) -> None:
    """`replace_folder` (bundles, Triton repositories, the synthetic dataset): the old folder is set aside, and put
    back when the new one cannot be renamed into place."""
    from conveyor.paths import replace_folder, staged_beside

    target = tmp_path / "bundle"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with staged_beside(target) as staging:
        (staging / "new.txt").write_text("new")
    missing = tmp_path / "gone"
    with pytest.raises(FileNotFoundError):
        replace_folder(missing, target)  # the new one is not there to take its place
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    replace_folder(staging, target)
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    with pytest.raises(KeyboardInterrupt), staged_beside(target) as staging:
        raise KeyboardInterrupt
    assert not staging.exists()
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        SynthSettings(seed=-1)  # numpy takes no negative seed: refused when params.yaml is read


def test_dir_md5_matches_dvc(tmp_path: Path) -> None:
    """Our DVC directory hash (used to check regenerated data) is DVC's own."""
    synth.generate(SMALL, tmp_path / "data")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "add", "-q", "data"], cwd=tmp_path, check=True)
    recorded = yaml.safe_load((tmp_path / "data.dvc").read_text())["outs"][0]["md5"]
    assert dir_md5(tmp_path / "data") == recorded
    # What a run records: the data it reads. Edited since data.dvc was written (`dvc repro` or `conveyor train`
    # without the flow's preflight), it was recorded as data.dvc's version: another dataset than the one trained on.
    from conveyor.lineage import data_used

    assert data_used(tmp_path / "data.dvc", tmp_path / "data") == (recorded, True)
    next((tmp_path / "data" / "labels" / "train").iterdir()).write_text("")
    edited, is_recorded = data_used(tmp_path / "data.dvc", tmp_path / "data")
    assert edited != recorded and edited == dir_md5(tmp_path / "data") and not is_recorded
