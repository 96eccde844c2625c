"""The data version: import, and getting back exactly what data.dvc names (or failing without losing anything)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conveyor.paths import ProjectPaths
from conveyor.settings import SynthSettings, load_settings
from pipelines import data, synth
from tests.conftest import make_project


@pytest.fixture
def paths(project: Path, monkeypatch: pytest.MonkeyPatch) -> ProjectPaths:
    monkeypatch.chdir(project)
    return ProjectPaths.discover()


def synth_settings(paths: ProjectPaths) -> SynthSettings:
    return load_settings(paths.params).synth


def dvc(paths: ProjectPaths, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "dvc", *args], cwd=paths.root, check=True, capture_output=True)


def test_in_sync_data_is_left_alone(paths: ProjectPaths) -> None:
    data.synthesize(paths, synth_settings(paths))
    md5 = data.data_status(paths).expected
    assert data.ensure_data_version(paths, synth_settings(paths)) == md5


def test_local_edits_are_never_overwritten(paths: ProjectPaths) -> None:
    data.synthesize(paths, synth_settings(paths))
    edited = paths.data / "labels/train/train_00000.txt"
    edited.write_text("0 0.5 0.5 0.2 0.2\n")
    with pytest.raises(data.DataVersionError, match=r"differs from the version data\.dvc names"):
        data.ensure_data_version(paths, synth_settings(paths))
    assert edited.read_text() == "0 0.5 0.5 0.2 0.2\n"


def test_missing_data_comes_from_the_default_remote(paths: ProjectPaths) -> None:
    data.synthesize(paths, synth_settings(paths))
    dvc(paths, "push")
    expected = data.data_status(paths).expected
    shutil.rmtree(paths.data)
    shutil.rmtree(paths.root / ".dvc" / "cache")
    assert data.ensure_data_version(paths, synth_settings(paths)) == expected
    assert data.data_status(paths).in_sync


def test_missing_data_comes_from_the_demo_remote_and_seeds_the_default(paths: ProjectPaths) -> None:
    data.synthesize(paths, synth_settings(paths))
    dvc(paths, "push", "--remote", data.DEMO_REMOTE)
    shutil.rmtree(paths.data)
    shutil.rmtree(paths.root / ".dvc" / "cache")
    data.ensure_data_version(paths, synth_settings(paths))
    assert data.data_status(paths).in_sync
    assert any((paths.root / ".dvc-remote").rglob("*.dir"))  # now in the default remote too


def test_no_remote_regenerates_and_checks_the_hash(paths: ProjectPaths) -> None:
    data.synthesize(paths, synth_settings(paths))
    expected = data.data_status(paths).expected
    shutil.rmtree(paths.data)
    shutil.rmtree(paths.root / ".dvc" / "cache")
    assert data.ensure_data_version(paths, synth_settings(paths)) == expected
    assert data.data_status(paths).in_sync


def test_regeneration_that_differs_is_refused(paths: ProjectPaths) -> None:
    data.synthesize(paths, synth_settings(paths))
    shutil.rmtree(paths.data)
    shutil.rmtree(paths.root / ".dvc" / "cache")
    other_seed = synth_settings(paths).model_copy(update={"seed": 99})
    with pytest.raises(data.DataVersionError, match="a different dataset, so nothing was used"):
        data.ensure_data_version(paths, other_seed)
    assert not paths.data.exists()


def _roboflow_export(root: Path) -> Path:
    """The layout many tools export: <split>/images, <split>/labels, data.yaml with ../train/images."""
    synth.generate(SynthSettings(image_size=64, counts={"train": 4, "val": 2, "test": 2}), root / "plain")
    export = root / "export"
    for split, folder in (("train", "train"), ("val", "valid"), ("test", "test")):
        for kind in ("images", "labels"):
            shutil.copytree(root / "plain" / kind / split, export / folder / kind)
    (export / "data.yaml").write_text(
        yaml.safe_dump(
            {
                "train": "../train/images",
                "val": "../valid/images",
                "test": "../test/images",
                "nc": 3,
                "names": ["scratch", "dent", "stain"],
            }
        )
    )
    return export


def test_import_roboflow_layout(paths: ProjectPaths, tmp_path: Path) -> None:
    source = _roboflow_export(tmp_path / "src")
    before = data.dir_md5(source)
    summary = data.import_dataset(paths, source)
    assert summary.images == {"train": 4, "val": 2, "test": 2}
    assert summary.names == ["scratch", "dent", "stain"]
    assert sorted(p.name for p in (paths.data / "labels/val").iterdir()) == ["val_00000.txt", "val_00001.txt"]
    assert data.data_status(paths).in_sync  # recorded with dvc add
    assert data.dir_md5(source) == before  # the source is only read


def test_import_plain_layout_refuses_to_replace_without_asking(paths: ProjectPaths, tmp_path: Path) -> None:
    synth.generate(SynthSettings(image_size=64, counts={"train": 3, "val": 1, "test": 1}), tmp_path / "plain")
    data.import_dataset(paths, tmp_path / "plain")
    first = data.data_status(paths).expected
    with pytest.raises(FileExistsError, match="--replace"):
        data.import_dataset(paths, tmp_path / "plain")
    synth.generate(SynthSettings(image_size=64, seed=5, counts={"train": 3, "val": 1, "test": 1}), tmp_path / "p2")
    data.import_dataset(paths, tmp_path / "p2", replace=True)
    assert data.data_status(paths).expected != first


def test_import_without_data_yaml(paths: ProjectPaths, tmp_path: Path) -> None:
    (tmp_path / "nothing").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no data\.yaml"):
        data.import_dataset(paths, tmp_path / "nothing")


def test_make_project_helper_is_isolated(tmp_path: Path) -> None:
    root = make_project(tmp_path / "p")
    assert (root / ".dvc").is_dir() and (root / ".git").is_dir() and not (root / "data").exists()
