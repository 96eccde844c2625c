"""The labelling round trip: frames worth labelling chosen from a mixed pool, written for Label Studio and CVAT, and
the labels brought back as a new data version. The model is the bundled checkpoint (PyTorch), no registry needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conveyor.paths import ProjectPaths
from conveyor.settings import DomainShift, LabelSettings, SynthSettings, load_settings
from labelling import select as selecting
from labelling.studio import import_labels
from labelling.tasks import write_selection
from pipelines import data, formats, synth
from pipelines.inference import Detector, ModelCard
from pipelines.runtimes import TorchRuntime
from pipelines.validate import DataValidationError
from tests.formats_support import NAMES, yolo_boxes

ASSET = Path(__file__).parent / "assets" / "yolo11n-defects-320.pt"
SHIFT = DomainShift(brightness=0.45, blur_sigma=1.6, defect_scale=1.7)  # as the drift scenario's shifted line


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pool")
    for name, seed, shift in (("reference", 40, DomainShift()), ("same", 41, DomainShift()), ("shifted", 42, SHIFT)):
        counts = {"train": 40 if name == "reference" else 0, "val": 0, "test": 0 if name == "reference" else 16}
        synth.generate(SynthSettings(seed=seed, counts=counts, shift=shift), root / name)
    return {"root": root, **{n: root / n for n in ("reference", "same", "shifted")}}


@pytest.fixture(scope="module")
def chosen(pool: dict[str, Path]) -> list[selecting.Candidate]:
    detector = Detector(TorchRuntime(ASSET), ModelCard(NAMES, 320))
    reference = selecting.embed_files(sorted((pool["reference"] / "images/train").glob("*.jpg")), detector)
    frames = sorted((pool["same"] / "images/test").glob("*.jpg")) + sorted(
        (pool["shifted"] / "images/test").glob("*.jpg")
    )
    return selecting.select(frames, detector, reference, LabelSettings(count=8, pool_factor=2))


@pytest.fixture
def paths(project: Path, monkeypatch: pytest.MonkeyPatch) -> ProjectPaths:
    monkeypatch.chdir(project)
    return ProjectPaths.discover()


def test_selection_prefers_what_the_model_has_not_seen_and_is_diverse(
    chosen: list[selecting.Candidate], pool: dict[str, Path]
) -> None:
    shifted = [c for c in chosen if c.path.is_relative_to(pool["shifted"])]
    # The pool is half shifted (16 of 32); a random pick would take 4 of 8.
    assert len(chosen) == 8 and len(shifted) >= 6, [(c.path.parent.parent.parent.name, c.score) for c in chosen]
    assert len({c.cluster for c in chosen}) == 8 and len({c.path for c in chosen}) == 8
    assert [c.score for c in chosen] == sorted((c.score for c in chosen), reverse=True)
    assert all(0 <= c.uncertainty <= 1 and 0 <= c.novelty <= 1 for c in chosen)


def test_uncertainty_peaks_at_the_threshold() -> None:
    from pipelines.inference import Detection

    def frame(*confidences: float) -> list[Detection]:
        return [Detection(0, "scratch", c, (0, 0, 1, 1)) for c in confidences]

    assert selecting.uncertainty(frame(0.25), 0.25, 0.05) == 1.0
    assert selecting.uncertainty(frame(), 0.25, 0.05) == 0.0
    assert selecting.uncertainty(frame(0.99), 0.25, 0.05) < 0.02
    assert selecting.uncertainty(frame(0.95, 0.2), 0.25, 0.05) == pytest.approx(0.75)


def _studio_export(selection: Path, labelled: int) -> list[dict[str, object]]:
    """What a person hands back from Label Studio: the true boxes of the first `labelled` tasks, in percent."""
    tasks = json.loads((selection / "tasks.json").read_text())
    record = {f["name"]: Path(f["from"]) for f in json.loads((selection / "selection.json").read_text())["frames"]}
    for n, task in enumerate(tasks[:labelled]):
        source = record[task["data"]["image"].rsplit("/", 1)[1]]
        boxes = yolo_boxes(source.parents[2] / "labels/test" / f"{source.stem}.txt", 320, 320)
        result = [
            {
                "type": "rectanglelabels",
                "from_name": "label",
                "to_name": "image",
                "original_width": 320,
                "original_height": 320,
                "value": {"x": x0 / 3.2, "y": y0 / 3.2, "width": (x1 - x0) / 3.2, "height": (y1 - y0) / 3.2,
                          "rectanglelabels": [NAMES[c]]},
            }
            for c, x0, y0, x1, y1 in boxes
        ]  # fmt: skip
        task["id"] = n + 1
        task["annotations"] = [{"id": 1, "result": [], "was_cancelled": True}, {"id": 2, "result": result}]
    return tasks


def test_round_trip_through_label_studio_and_cvat(
    paths: ProjectPaths, chosen: list[selecting.Candidate], pool: dict[str, Path], tmp_path: Path
) -> None:
    data.synthesize(paths, load_settings(paths.params).synth)
    selection = paths.labelling / "sel-test"
    files = write_selection(selection, chosen, NAMES, 0.25, "test v1", "pool")
    assert files.frames == 8 and len(list((selection / "images").iterdir())) == 8
    tasks = json.loads((selection / "tasks.json").read_text())
    labels = {r["value"]["rectanglelabels"][0] for t in tasks for r in t["predictions"][0]["result"]}
    assert labels <= set(NAMES) and files.boxes == sum(len(t["predictions"][0]["result"]) for t in tasks)
    assert '<Label value="scratch"/>' in (selection / "label_config.xml").read_text()
    cvat = formats.read_source(selection / "cvat")  # CVAT's COCO 1.0 package reads back as a COCO export
    assert cvat.names == NAMES and len(cvat.items) == 8 and sum(len(i.lines or []) for i in cvat.items) == files.boxes

    export = tmp_path / "project-1-at-2026.json"
    export.write_text(json.dumps(_studio_export(selection, labelled=6)))
    before = data.data_status(paths).expected
    result = import_labels(paths, export)
    assert (result.tasks, result.labelled) == (8, 6) and result.added.total_images == 6
    assert result.added.batch.endswith("labelstudio-project-1-at-2026") and result.added.md5 != before
    added = {p.name.split("__", 1)[1]: p for p in paths.data.glob(f"labels/*/{result.added.batch}__*.txt")}
    frames = json.loads((selection / "selection.json").read_text())["frames"]
    origin = {Path(f["name"]).stem: Path(f["from"]) for f in frames}
    truth = {
        name: (origin[Path(name).stem].parents[2] / "labels/test" / f"{origin[Path(name).stem].stem}.txt")
        .read_text()
        .split()
        for name in added
    }
    assert truth and all(
        [round(float(v), 3) for v in added[n].read_text().split()] == [round(float(v), 3) for v in truth[n]]
        for n in added
    )


def test_label_studio_exports_that_are_refused(
    paths: ProjectPaths, chosen: list[selecting.Candidate], pool: dict[str, Path], tmp_path: Path
) -> None:
    data.synthesize(paths, load_settings(paths.params).synth)
    selection = paths.labelling / "sel-test"
    write_selection(selection, chosen, NAMES, 0.25, "test v1", "pool")
    before = data.dir_md5(paths.data)
    stranger = _studio_export(selection, labelled=2)
    stranger[0]["data"] = {"image": "/data/upload/1/0a1b2c3d-never-selected.jpg"}
    (tmp_path / "stranger.json").write_text(json.dumps(stranger))
    with pytest.raises(DataValidationError, match=r"never selected[\s\S]*never-selected\.jpg"):
        import_labels(paths, tmp_path / "stranger.json")
    (tmp_path / "empty.json").write_text(json.dumps(json.loads((selection / "tasks.json").read_text())))
    with pytest.raises(DataValidationError, match="nothing has been labelled yet"):
        import_labels(paths, tmp_path / "empty.json")
    assert data.dir_md5(paths.data) == before and data.data_status(paths).in_sync
