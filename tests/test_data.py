"""The data version: import, add, and getting back exactly what data.dvc names (or failing without losing anything)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conveyor.paths import ProjectPaths
from conveyor.settings import SynthSettings, load_settings
from pipelines import data, synth
from pipelines.batches import batch_of
from pipelines.validate import DataValidationError
from tests.conftest import VENV_BIN, base_env, make_project, run_cmd


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
    # Settings that cannot regenerate this version (another seed): the data can only have come from the remote.
    elsewhere = synth_settings(paths).model_copy(update={"seed": 99})
    assert data.ensure_data_version(paths, elsewhere) == expected
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
    """Into an empty data/ too (a volume mounted there): the data was moved into it, as data/data, and data.dvc
    rewritten to name that, while the pull said it was the version data.dvc names."""
    data.synthesize(paths, synth_settings(paths))
    expected = data.data_status(paths).expected
    shutil.rmtree(paths.root / ".dvc" / "cache")
    for left in (None, "empty"):
        shutil.rmtree(paths.data)
        if left:
            paths.data.mkdir()
        assert data.ensure_data_version(paths, synth_settings(paths)) == expected
        assert data.data_status(paths).in_sync and (paths.data / "data.yaml").is_file()
        assert data.data_version(paths.data_dvc).md5 == expected
        shutil.rmtree(paths.root / ".dvc" / "cache")


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
    # Files no version records (a hand-added image) were deleted for good by --replace: refused, nothing changed.
    mine = paths.data / "images" / "train" / "myhand.jpg"
    mine.write_bytes(sorted((tmp_path / "p2" / "images" / "val").iterdir())[0].read_bytes())
    with pytest.raises(data.DataVersionError, match="would delete them for good; nothing was changed"):
        data.import_dataset(paths, tmp_path / "p2", replace=True)
    assert mine.is_file() and data.data_status(paths).expected == first
    mine.unlink()
    data.import_dataset(paths, tmp_path / "p2", replace=True)
    assert data.data_status(paths).expected != first and data.data_status(paths).in_sync
    assert sorted(p.name for p in paths.root.iterdir() if p.name.startswith(".data")) == []  # nothing set aside left


def test_a_torn_dvc_rwlock_is_removed_once_settled(paths: ProjectPaths) -> None:
    """A `dvc add` killed while writing its rwlock left it empty, and every later DVC command failed on it ("JSON
    structure is corrupted"). One that names no holder and has settled is removed; a fresh one is left to its
    writer."""
    rwlock = paths.root / ".dvc" / "tmp" / "rwlock"
    rwlock.parent.mkdir(parents=True, exist_ok=True)
    rwlock.write_text("")
    data._require_dvc(paths)
    assert rwlock.exists()  # just written: perhaps still being written
    old = time.time() - 60
    os.utime(rwlock, (old, old))
    data._require_dvc(paths)
    assert not rwlock.exists()
    rwlock.write_text('{"read": {}, "write": {}}')
    os.utime(rwlock, (old, old))
    data._require_dvc(paths)
    assert rwlock.exists()  # a readable one is DVC's


def test_import_without_data_yaml(paths: ProjectPaths, tmp_path: Path) -> None:
    (tmp_path / "nothing").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no data\.yaml"):
        data.import_dataset(paths, tmp_path / "nothing")


def test_import_outside_a_dvc_project_or_while_dvc_is_busy_changes_nothing(paths: ProjectPaths, tmp_path: Path) -> None:
    """Checked before data/ is touched (was: data/ replaced, then `dvc add` failed with a traceback)."""
    source = tmp_path / "src"
    synth.generate(SynthSettings(image_size=64, seed=3, counts={"train": 4, "val": 2, "test": 2}), source)
    data.synthesize(paths, synth_settings(paths))
    before = data.dir_md5(paths.data)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    lock = paths.root / ".dvc" / "tmp" / "rwlock"
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        lock.write_text(json.dumps({"write": {"artifacts/train": {"cmd": "dvc repro", "pid": holder.pid}}}))
        with pytest.raises(data.DataVersionError, match=rf"DVC is busy \(process {holder.pid}.*nothing was changed"):
            data.import_dataset(paths, source, replace=True)
    finally:
        holder.kill()
        holder.wait()
        lock.unlink()
    shutil.rmtree(paths.root / ".dvc")
    with pytest.raises(data.DataVersionError, match=r"not a DVC project \(no \.dvc/\): run `dvc init`"):
        data.import_dataset(paths, source, replace=True)
    assert data.dir_md5(paths.data) == before


def test_make_project_helper_is_isolated(tmp_path: Path) -> None:
    root = make_project(tmp_path / "p")
    assert (root / ".dvc").is_dir() and (root / ".git").is_dir() and not (root / "data").exists()


# --- conveyor data add ------------------------------------------------------------------------------------------


def _batch(folder: Path, *, seed: int = 11, counts: dict[str, int] | None = None) -> Path:
    """A small labelled batch (synthetic, another seed than the project's data, so no image repeats)."""
    counts = counts or {"train": 4, "val": 2, "test": 0}
    synth.generate(SynthSettings(image_size=64, seed=seed, counts=counts), folder)
    return folder


def _git_log(root: Path) -> str:
    return subprocess.run(["git", "log", "--format=%s"], cwd=root, capture_output=True, text=True).stdout


def test_batch_of() -> None:
    assert batch_of("add-20250102-030405-line-3__train_00001.jpg") == "add-20250102-030405-line-3"
    assert batch_of("data/labels/val/add-20250102-030405-b__x__y.txt") == "add-20250102-030405-b"
    assert batch_of("train_00001.jpg") == "base"
    assert batch_of("camera__0001.jpg") == "base"  # `__` in an original name is not a batch
    batch = data.batch_id("Line 3_Shift (B)")
    assert batch.startswith("add-") and batch.endswith("-line-3-shift-b")
    assert batch_of(f"{batch}__a.png") == batch


def test_add_batch_with_the_cli_and_commit(project: Path, tmp_path: Path) -> None:
    env = base_env()
    conveyor = str(VENV_BIN / "conveyor")
    run_cmd([conveyor, "data", "synth"], project, env)
    paths = ProjectPaths(project)
    before = data.data_status(paths).expected
    base_files = sorted(p.name for p in (project / "data/images/train").iterdir())
    shifted = tmp_path / "Line 3 Shift"
    run_cmd([conveyor, "data", "synth", "--out", str(shifted), "--brightness", "0.6"], project, env)
    n_train = len(list((shifted / "images/train").iterdir()))

    out = run_cmd([conveyor, "data", "add", str(shifted), "--commit"], project, env).stdout
    assert "data.dvc committed" in out and "conveyor run" in out

    added = sorted(p.name for p in (project / "data/images/train").iterdir() if p.name not in base_files)
    assert len(added) == n_train
    batch = batch_of(added[0])
    assert batch.startswith("add-") and batch.endswith("-line-3-shift")
    assert all(name.startswith(f"{batch}__") for name in added)
    assert (project / "data/labels/train" / f"{batch}__train_00000.txt").is_file()
    assert {batch_of(n) for n in base_files} == {"base"}
    assert (project / "data/data.yaml").read_text() != ""  # the dataset's own data.yaml is kept
    after = data.data_status(paths)
    assert after.expected != before and after.in_sync
    assert "in sync" in run_cmd([conveyor, "data", "status"], project, env).stdout
    assert _git_log(project).splitlines()[0].startswith(f"data: add {batch} (")
    assert not list(project.glob(".add-*"))  # no staging left behind


def test_add_batch_with_some_splits_without_commit(paths: ProjectPaths, tmp_path: Path) -> None:
    data.synthesize(paths, synth_settings(paths))
    before = data.data_status(paths).expected
    batch = _batch(tmp_path / "train-only", counts={"train": 3, "val": 0, "test": 0})
    (batch / "data.yaml").write_text(yaml.safe_dump({"train": "images/train", "names": ["scratch", "dent", "stain"]}))
    summary = data.add_dataset(paths, batch)
    assert summary.images == {"train": 3} and summary.labels == {"train": 3}
    assert summary.names == ["scratch", "dent", "stain"] and not summary.committed
    assert summary.md5 == data.data_status(paths).expected != before
    assert data.data_status(paths).in_sync
    assert len([p for p in (paths.data / "images/train").iterdir() if batch_of(p.name) == summary.batch]) == 3
    assert _git_log(paths.root) == ""  # nothing committed


def test_add_maps_classes_by_name_and_refuses_unknown_ones(paths: ProjectPaths, tmp_path: Path) -> None:
    data.synthesize(paths, synth_settings(paths))
    batch = _batch(tmp_path / "b")
    spec = yaml.safe_load((batch / "data.yaml").read_text())
    # A labelling tool that lists the classes in another order: ids are mapped by name, not refused.
    (batch / "data.yaml").write_text(yaml.safe_dump({**spec, "names": ["dent", "scratch", "stain"]}))
    source_ids = [line.split()[0] for line in (batch / "labels/train/train_00000.txt").read_text().splitlines()]
    summary = data.add_dataset(paths, batch)
    added = (paths.data / "labels/train" / f"{summary.batch}__train_00000.txt").read_text().splitlines()
    swap = {"0": "1", "1": "0", "2": "2"}
    assert [line.split()[0] for line in added] == [swap[i] for i in source_ids] and source_ids
    assert summary.names == ["scratch", "dent", "stain"]

    before = data.dir_md5(paths.data)
    other = _batch(tmp_path / "c", seed=21)
    (other / "data.yaml").write_text(yaml.safe_dump({**spec, "names": ["scratch", "dent", "smudge"]}))
    with pytest.raises(DataValidationError, match=r"'smudge' is not one of the dataset's classes.*class_map"):
        data.add_dataset(paths, other)
    assert data.dir_md5(paths.data) == before


def test_add_refuses_a_batch_with_bad_files_and_names_them(paths: ProjectPaths, tmp_path: Path) -> None:
    data.synthesize(paths, synth_settings(paths))
    before = data.dir_md5(paths.data)
    batch = _batch(tmp_path / "b")
    image = batch / "images/train/train_00001.jpg"
    image.write_bytes(image.read_bytes()[:300])  # truncated
    (batch / "labels/val/val_00000.txt").write_text("0 0.5 0.5 0.2\n")  # 4 fields
    with pytest.raises(DataValidationError) as raised:
        data.add_dataset(paths, batch)
    message = str(raised.value)
    assert "images/train/train_00001.jpg" in message and "labels/val/val_00000.txt:1" in message
    assert "nothing was added" in message
    assert data.dir_md5(paths.data) == before and data.data_status(paths).in_sync
    assert not list(paths.root.glob(".add-*"))


def test_add_refuses_an_image_already_in_another_split(paths: ProjectPaths, tmp_path: Path) -> None:
    data.synthesize(paths, synth_settings(paths))
    before = data.dir_md5(paths.data)
    batch = _batch(tmp_path / "b")
    shutil.copy2(paths.data / "images/test/test_00000.jpg", batch / "images/train/train_00000.jpg")
    with pytest.raises(DataValidationError, match=r"images/train/train_00000\.jpg: same image as data/images/test"):
        data.add_dataset(paths, batch)
    assert data.dir_md5(paths.data) == before
    # The same image twice in one batch, under two names: its label counted twice (it was only a warning).
    twice = _batch(tmp_path / "twice")
    shutil.copy2(twice / "images/train/train_00000.jpg", twice / "images/train/train_00000 (copy).jpg")
    shutil.copy2(twice / "labels/train/train_00000.txt", twice / "labels/train/train_00000 (copy).txt")
    with pytest.raises(
        DataValidationError,
        match=r"train_00000(?: \(copy\))?\.jpg: same image as images/train/train_00000[^:]*\.jpg in this batch",
    ):
        data.add_dataset(paths, twice)
    assert data.dir_md5(paths.data) == before


def test_add_missing_empty_and_no_data(paths: ProjectPaths, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such folder"):
        data.add_dataset(paths, tmp_path / "nowhere")
    empty = _batch(tmp_path / "empty", counts={"train": 0, "val": 0, "test": 0})
    with pytest.raises(data.DataVersionError, match="conveyor data pull"):
        data.add_dataset(paths, empty)  # no data/ yet
    data.synthesize(paths, synth_settings(paths))
    before = data.dir_md5(paths.data)
    with pytest.raises(DataValidationError, match="no images to add"):
        data.add_dataset(paths, empty)
    (tmp_path / "bare").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no data\.yaml"):
        data.add_dataset(paths, tmp_path / "bare")
    assert data.dir_md5(paths.data) == before


def test_add_name_collision_and_failed_record_leave_data_as_it_was(
    paths: ProjectPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data.synthesize(paths, synth_settings(paths))
    monkeypatch.setattr(data, "batch_id", lambda name: "add-20250101-000000-fixed")
    data.add_dataset(paths, _batch(tmp_path / "one"))
    before = data.dir_md5(paths.data)
    with pytest.raises(FileExistsError, match="already exist"):
        data.add_dataset(paths, _batch(tmp_path / "two", seed=12))
    assert data.dir_md5(paths.data) == before

    monkeypatch.setattr(data, "batch_id", lambda name: "add-20250101-000001-other")

    def failing_dvc(root: Path, *args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        raise subprocess.CalledProcessError(1, ["dvc", *args], stderr="ERROR: disk full")

    monkeypatch.setattr(data, "dvc", failing_dvc)
    with pytest.raises(data.DataVersionError, match=r"`dvc add data` failed: ERROR: disk full; the batch was taken"):
        data.add_dataset(paths, _batch(tmp_path / "three", seed=13, counts={"train": 2, "val": 0, "test": 1}))
    assert data.dir_md5(paths.data) == before
    assert not [p for p in paths.data.rglob("*") if batch_of(p.name) == "add-20250101-000001-other"]

    # Ctrl-C as `dvc add` ends: data.dvc already names the new version when the batch is taken back. It is put
    # back as it was, so data/ and data.dvc agree (they disagreed, and every later add or pull refused).
    monkeypatch.undo()
    monkeypatch.setattr(data, "batch_id", lambda name: "add-20250101-000002-late")
    real_record = data.record_version

    def interrupted_after_recording(paths: ProjectPaths) -> str:
        real_record(paths)
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "record_version", interrupted_after_recording)
    with pytest.raises(KeyboardInterrupt):
        data.add_dataset(paths, _batch(tmp_path / "four", seed=14, counts={"train": 2, "val": 0, "test": 1}))
    status = data.data_status(paths)
    assert status.in_sync and status.actual == before


def test_wait_for_dvc_lock_waits_for_a_dying_holder_and_names_a_live_one(tmp_path: Path) -> None:
    """A killed run's `dvc repro` stays in DVC's rwlock while it exits; the next run waits for it instead of failing
    with "is busy" (the overlap test's kill, reduced to its lock)."""
    lock = tmp_path / ".dvc" / "tmp" / "rwlock"
    lock.parent.mkdir(parents=True)
    assert data.wait_for_dvc_lock(tmp_path) == []  # no lock file at all

    short = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1)"])
    long = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        info = {"cmd": "dvc repro --single-item train"}
        lock.write_text(
            json.dumps(
                {
                    "write": {"artifacts/train": {**info, "pid": short.pid}},
                    "read": {"data": [{**info, "pid": short.pid}, {**info, "pid": 2**22 + 1}]},  # and a dead PID
                }
            )
        )
        assert [p.pid for p in data.dvc_lock_holders(tmp_path)] == [short.pid]
        assert data.wait_for_dvc_lock(tmp_path, timeout=30) == []
        short.wait()  # reaped by its parent, as init reaps an orphan

        lock.write_text(json.dumps({"write": {"artifacts/train": {**info, "pid": long.pid}}}))
        assert data.wait_for_dvc_lock(tmp_path, timeout=0.5) == [long.pid]
    finally:
        short.kill()
        long.kill()
        long.wait()


def test_a_warm_start_file_is_kept_by_its_content(paths: ProjectPaths, tmp_path: Path) -> None:
    """DVC reads train.weights by its value: a checkpoint changed at the same path must change it, or the train
    stage would not re-run (it kept the path, and `dvc status` said up to date)."""
    from pipelines.warm_start import set_warm_start

    checkpoint = tmp_path / "ck.pt"
    checkpoint.write_bytes(b"first weights")
    set_warm_start(paths, load_settings(paths.params), str(checkpoint))
    first = load_settings(paths.params).train.weights
    checkpoint.write_bytes(b"other weights")
    set_warm_start(paths, load_settings(paths.params), str(checkpoint))
    second = load_settings(paths.params).train.weights
    assert first is not None and second is not None and first != second
    assert (paths.root / first).read_bytes() == b"first weights" and (
        paths.root / second
    ).read_bytes() == b"other weights"
    # A copy cut short (a kill, a full disk mid-copy) was trained from at every later run: it is made again.
    (paths.root / second).write_bytes(b"other w")
    set_warm_start(paths, load_settings(paths.params), str(checkpoint))
    assert load_settings(paths.params).train.weights == second
    assert (paths.root / second).read_bytes() == b"other weights"
    with pytest.raises(FileNotFoundError, match="not found"):
        set_warm_start(paths, load_settings(paths.params), str(tmp_path / "gone.pt"))


def test_a_warm_start_is_one_runs_and_a_hand_set_checkpoint_stays(paths: ProjectPaths, tmp_path: Path) -> None:
    """After a drift fine-tune, a run that asks for no warm start trains from train.model again (it stayed a
    fine-tune from that day's champion, from a file under .conveyor/ that other clones do not have)."""
    from conveyor.settings import set_param
    from pipelines.warm_start import clear_earlier_warm_start, set_warm_start

    checkpoint = tmp_path / "ck.pt"
    checkpoint.write_bytes(b"weights")
    set_warm_start(paths, load_settings(paths.params), str(checkpoint))
    assert clear_earlier_warm_start(paths, load_settings(paths.params))
    assert load_settings(paths.params).train.weights is None
    assert not clear_earlier_warm_start(paths, load_settings(paths.params))
    set_param(paths.params, ("train", "weights"), "checkpoints/line-7.pt")  # set by hand: the team's choice
    assert not clear_earlier_warm_start(paths, load_settings(paths.params))
    assert str(load_settings(paths.params).train.weights) == "checkpoints/line-7.pt"
    # A drift fine-tune over it (two warm starts in a row), then a scheduled run: the team's checkpoint comes back.
    # It was deleted from params.yaml for good, and scheduled runs trained from scratch.
    set_warm_start(paths, load_settings(paths.params), str(checkpoint))
    set_warm_start(paths, load_settings(paths.params), str(checkpoint))
    assert str(load_settings(paths.params).train.weights).startswith(".conveyor/warm-start/")
    assert clear_earlier_warm_start(paths, load_settings(paths.params))
    assert str(load_settings(paths.params).train.weights) == "checkpoints/line-7.pt"
    assert not clear_earlier_warm_start(paths, load_settings(paths.params))


def test_data_does_not_change_under_a_training_run(paths: ProjectPaths, tmp_path: Path) -> None:
    """A training run holds the project's training lock to its promotion: a batch added meanwhile would be named in
    the registry as the data the model was trained on. Refused, nothing changed; a run that starts during an add
    waits for it (the same lock)."""
    import fcntl

    data.synthesize(paths, synth_settings(paths))
    before = data.dir_md5(paths.data)
    batch = tmp_path / "batch"
    synth.generate(SynthSettings(image_size=64, seed=5, counts={"train": 2, "val": 1, "test": 1}), batch)
    with paths.training_lock.open("w") as run:
        fcntl.flock(run, fcntl.LOCK_EX)  # what flows/training.py's training_lock holds
        with pytest.raises(data.DataVersionError, match="a training run is in progress in this project"):
            data.add_dataset(paths, batch)
        with pytest.raises(data.DataVersionError, match="nothing was changed"):
            data.synthesize(paths, synth_settings(paths), overwrite=True)
        fcntl.flock(run, fcntl.LOCK_UN)
    assert data.dir_md5(paths.data) == before
    assert data.add_dataset(paths, batch).images  # once the run has ended
