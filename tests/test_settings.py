"""Config loading: the repository's params.yaml is valid, and every bad input is named precisely."""

from __future__ import annotations

from pathlib import Path

import pytest

from conveyor.scaffold import REPO
from conveyor.settings import ConfigError, load_settings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_repository_params_load() -> None:
    settings = load_settings(REPO / "params.yaml")
    assert settings.train.model.endswith(".yaml")
    assert settings.validate_.on_error == "fail"
    assert set(settings.synth.counts) == {"train", "val", "test"}


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "params.yaml")


def test_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(write(tmp_path, "train: [epochs: 3"))


def test_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_settings(write(tmp_path, "- 1\n- 2\n"))


def test_bad_value_names_the_key_and_the_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_settings(write(tmp_path, "train:\n  epochs: -3\n"))
    message = str(excinfo.value)
    assert "params.yaml" in message
    assert "train.epochs" in message and "-3" in message


def test_unknown_key_suggests_the_right_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_settings(write(tmp_path, "train:\n  epoch: 3\n"))
    assert "train.epoch: unknown key (did you mean 'epochs'?)" in str(excinfo.value)


def test_unknown_nested_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"export\.latency\.run: unknown key \(did you mean 'runs'\?\)"):
        load_settings(write(tmp_path, "export:\n  latency:\n    run: 5\n"))


def test_unknown_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"trian: unknown key \(did you mean 'train'\?\)"):
        load_settings(write(tmp_path, "trian:\n  epochs: 3\n"))


def test_wrong_choice(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"validate\.on_error"):
        load_settings(write(tmp_path, "validate:\n  on_error: ignore\n"))


def test_every_error_is_listed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_settings(write(tmp_path, "train:\n  epochs: 0\n  batch: 0\nexport:\n  formats: [onnx, onnx]\n"))
    message = str(excinfo.value)
    assert "train.epochs" in message and "train.batch" in message and "formats lists a format twice" in message


def test_synth_counts_need_every_split(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing \['test'\]"):
        load_settings(write(tmp_path, "synth:\n  counts: {train: 4, val: 2}\n"))


def test_section_hash_is_stable_and_sensitive(tmp_path: Path) -> None:
    a = load_settings(write(tmp_path, "train:\n  epochs: 3\n"))
    b = load_settings(write(tmp_path, "train:\n  epochs: 3\n"))
    c = load_settings(write(tmp_path, "train:\n  epochs: 4\n"))
    assert a.section_hash() == b.section_hash() != c.section_hash()
    assert a.section_hash("validate") == c.section_hash("validate")


def test_extra_may_not_repeat_a_train_setting(tmp_path: Path) -> None:
    # Ultralytics would fail much later ("got multiple values for keyword argument"), mid-pipeline.
    with pytest.raises(ConfigError, match=r"train\.extra repeats nbs"):
        load_settings(write(tmp_path, "train:\n  extra: {nbs: 16, lr0: 0.01}\n"))
