"""The labelling round trip: frames worth labelling chosen from a mixed pool, written for Label Studio and CVAT, and
the labels brought back as a new data version. The model is the bundled checkpoint (PyTorch), no registry needed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
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


def test_frames_in_the_dataset_or_selected_before_are_not_offered_again(
    paths: ProjectPaths, chosen: list[selecting.Candidate], pool: dict[str, Path]
) -> None:
    """The scoring is deterministic: each `label select` over the same window offered the same frames again,
    labelled or not, and frames of the dataset's own test split; `label import` then refused the whole export."""
    from labelling.run import known_frames

    test_split = sorted((pool["same"] / "images/test").glob("*.jpg"))
    (paths.data / "images" / "test").mkdir(parents=True, exist_ok=True)
    (paths.data / "images" / "test" / "kept.jpg").write_bytes(test_split[0].read_bytes())
    write_selection(paths.labelling / "earlier", chosen[:3], NAMES, 0.25, "test v1", "pool")
    known = known_frames(paths)
    assert {c.sha256 for c in chosen[:3]} <= known
    assert selecting.hashlib.sha256(test_split[0].read_bytes()).hexdigest() in known

    detector = Detector(TorchRuntime(ASSET), ModelCard(NAMES, 320))
    frames = [c.path for c in chosen[:3]] + test_split[:3]
    left_out: list[Path] = []
    again = selecting.select(
        frames, detector, np.zeros((0, 0)), LabelSettings(count=6), known=known, on_known=left_out.append
    )
    assert sorted(left_out) == sorted([c.path for c in chosen[:3]] + [test_split[0]])
    assert sorted(c.path for c in again) == sorted(test_split[1:3])
    with pytest.raises(selecting.NothingToSelectError, match="nothing new to label"):
        selecting.select(frames[:3], detector, np.zeros((0, 0)), LabelSettings(count=6), known=known)


def test_training_images_in_any_format_are_embedded_and_a_stray_file_left_out(
    pool: dict[str, Path], tmp_path: Path
) -> None:
    """Without a profile, the reference is the training images: a BMP one (`data add` keeps them as they came) or a
    stray file in the folder aborted the whole selection (ImageError: not a JPEG or PNG)."""
    from PIL import Image

    images = sorted((pool["reference"] / "images/train").glob("*.jpg"))[:3]
    Image.open(images[0]).save(tmp_path / "frame.bmp")
    (tmp_path / "notes.txt").write_text("not an image")
    detector = Detector(TorchRuntime(ASSET), ModelCard(NAMES, 320))
    embedded = selecting.embed_files([*images[1:], tmp_path / "frame.bmp", tmp_path / "notes.txt"], detector)
    assert embedded.shape[0] == 3 and embedded.shape[1] > 0


def test_a_frames_name_survives_the_task_url() -> None:
    """A frame named `line+2.jpg` or `cam#3.jpg` was put in the task's URL as it is: Label Studio's local-files route
    got another name, and `conveyor label import` refused the whole export ("never selected")."""
    from urllib.parse import parse_qs, urlparse

    from labelling.studio import image_name
    from labelling.tasks import DEFAULT_IMAGE_URL, task_image_url

    for name in ("000000000000-line+2_0001.jpg", "cam#3.jpg", "a&b c.jpg", "100%25.jpg", "plain.jpg"):
        url = task_image_url(DEFAULT_IMAGE_URL, name)
        assert parse_qs(urlparse(url).query)["d"] == [f"images/{name}"]  # what the local-files route reads
        assert image_name(url) == name
        assert image_name(task_image_url("/data/upload/3/", name)) == name


def test_uncertainty_peaks_at_the_threshold() -> None:
    from pipelines.inference import Detection

    def frame(*confidences: float) -> list[Detection]:
        return [Detection(0, "scratch", c, (0, 0, 1, 1)) for c in confidences]

    assert selecting.uncertainty(frame(0.25), 0.25, 0.05) == 1.0
    assert selecting.uncertainty(frame(), 0.25, 0.05) == 0.0
    assert selecting.uncertainty(frame(0.99), 0.25, 0.05) < 0.02
    assert selecting.uncertainty(frame(0.95, 0.2), 0.25, 0.05) == pytest.approx(0.75)


@pytest.mark.parametrize(
    ("rotation", "expected"),
    [
        (0, [20, 20, 80, 10]),
        (360, [20, 20, 80, 10]),
        (90, [10, 20, 10, 80]),  # turned about its top-left corner, clockwise: it hangs down and to the left
        (180, [0, 10, 20, 10]),  # ... and up past the image's left edge: clipped
    ],
)
def test_a_rotated_box_comes_back_as_the_axis_aligned_box_around_it(
    tmp_path: Path, rotation: float, expected: list[float]
) -> None:
    """Label Studio stores a rotated rectangle as its top-left corner, size and `rotation`; the import read it as if
    it were not turned (a box 90 degrees off the drawn one). Measured in pixels on a 200x100 image, where percent
    would shear it."""
    from PIL import Image

    from labelling.studio import studio_to_coco

    Image.new("RGB", (200, 100)).save(tmp_path / "frame.jpg")
    value = {"x": 10, "y": 20, "width": 40, "height": 10, "rotation": rotation, "rectanglelabels": ["scratch"]}
    result = {"type": "rectanglelabels", "original_width": 200, "original_height": 100, "value": value}
    tasks = [
        {"id": 1, "data": {"image": "/data/local-files/?d=images/frame.jpg"}, "annotations": [{"result": [result]}]}
    ]
    out = tmp_path / "coco"
    (out / "images").mkdir(parents=True)
    studio_to_coco(tmp_path / "export.json", tasks, {"frame.jpg": tmp_path / "frame.jpg"}, out)
    (box,) = [a["bbox"] for a in json.loads((out / "annotations.json").read_text())["annotations"]]
    assert box == pytest.approx(expected, abs=1e-6)


def test_one_image_under_two_names_in_one_export_is_refused(tmp_path: Path) -> None:
    """A frame served twice (req-0001.jpg, req-0937.jpg), picked by two selections and labelled twice, differently:
    the refusal of one frame in two tasks went by name, and both copies were imported with their conflicting boxes."""
    from PIL import Image

    from labelling.studio import studio_to_coco

    Image.new("RGB", (64, 64), (90, 90, 90)).save(tmp_path / "req-0001.jpg")
    (tmp_path / "req-0937.jpg").write_bytes((tmp_path / "req-0001.jpg").read_bytes())
    value = {"x": 10, "y": 10, "width": 20, "height": 20, "rectanglelabels": ["scratch"]}
    result = {"type": "rectanglelabels", "value": value}
    tasks = [
        {"id": n, "data": {"image": f"/data/local-files/?d=images/{name}"}, "annotations": [{"result": [result]}]}
        for n, name in ((1, "req-0001.jpg"), (2, "req-0937.jpg"))
    ]
    out = tmp_path / "coco"
    (out / "images").mkdir(parents=True)
    frames = {name: tmp_path / name for name in ("req-0001.jpg", "req-0937.jpg")}
    with pytest.raises(DataValidationError, match=r"tasks 1 and 2 both label one image \('req-0001.jpg', 'req-0937"):
        studio_to_coco(tmp_path / "export.json", tasks, frames, out)


def test_boxes_from_separate_labels_are_read_and_shapes_a_detector_cannot_learn_are_refused(tmp_path: Path) -> None:
    """Only `rectanglelabels` results were read: a `<Rectangle>` with a separate `<Labels>` (results `rectangle` and
    `labels`, one id) and a polygon were skipped, and the frame was added without its defects, teaching the model
    they are none. A box with two labels kept the first. Now the pair is a box; the others refuse the export, naming
    the task; a result that labels no region (a choice) is left alone."""
    from PIL import Image

    from labelling.studio import studio_to_coco

    Image.new("RGB", (200, 100)).save(tmp_path / "frame.jpg")
    geometry = {"x": 10, "y": 20, "width": 40, "height": 10}
    size = {"original_width": 200, "original_height": 100}

    def export(results: list[Any]) -> Path:
        tasks = [
            {"id": 7, "data": {"image": "/data/local-files/?d=images/frame.jpg"}, "annotations": [{"result": results}]}
        ]
        out = tmp_path / f"coco-{len(list(tmp_path.glob('coco-*')))}"
        (out / "images").mkdir(parents=True)
        studio_to_coco(tmp_path / "export.json", tasks, {"frame.jpg": tmp_path / "frame.jpg"}, out)
        return out

    paired = [
        {"id": "r1", "type": "rectangle", "value": geometry, **size},
        {"id": "r1", "type": "labels", "from_name": "label", "value": {**geometry, "labels": ["dent"]}, **size},
        {"id": "c1", "type": "choices", "value": {"choices": ["reviewed"]}},
    ]
    coco = json.loads((export(paired) / "annotations.json").read_text())
    (box,) = coco["annotations"]
    assert box["bbox"] == pytest.approx([20, 20, 80, 10]) and coco["categories"] == [{"id": 1, "name": "dent"}]
    # Results that label no box, and attributes of one, are left alone: a span of text, a region's choice and a
    # second <Labels> (a severity) on a RectangleLabels box, a relation.
    attributed = [
        {"id": "r1", "type": "rectanglelabels", "value": {**geometry, "rectanglelabels": ["scratch"]}, **size},
        {"id": "r1", "type": "labels", "from_name": "severity", "value": {**geometry, "labels": ["high"]}, **size},
        {"id": "r1", "type": "choices", "value": {"choices": ["checked"]}},
        {"id": "t1", "type": "labels", "value": {"start": 0, "end": 4, "text": "part", "labels": ["PART"]}},
        {"type": "relation", "from_id": "r1", "to_id": "t1"},
    ]
    coco = json.loads((export(attributed) / "annotations.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["scratch"] and len(coco["annotations"]) == 1

    polygon = {
        "id": "p1",
        "type": "polygonlabels",
        "value": {"points": [[1, 1], [5, 1], [5, 5]], "polygonlabels": ["dent"]},
    }
    two = {"id": "r2", "type": "rectanglelabels", "value": {**geometry, "rectanglelabels": ["dent", "scratch"]}, **size}
    bare = {"id": "r3", "type": "rectangle", "value": geometry, **size}
    for results, said in (
        ([polygon], "task 7: a polygonlabels result: this detector learns boxes"),
        ([two], "task 7: region r2: a rectangle with several classes (dent, scratch)"),
        ([bare], "task 7: region r3: a rectangle with no class"),
        (
            [
                {**bare, "id": "r4"},
                {"id": "r4", "type": "labels", "from_name": "defect", "value": {**geometry, "labels": ["dent"]}},
                {"id": "r4", "type": "labels", "from_name": "severity", "value": {**geometry, "labels": ["high"]}},
            ],
            "task 7: region r4: a rectangle labelled by several controls (defect: dent; severity: high)",
        ),
    ):
        with pytest.raises(DataValidationError, match=re.escape(said)):
            export(results)


def test_a_source_folder_of_other_formats_is_named_not_dropped(tmp_path: Path) -> None:
    """BMP, TIFF and WebP were listed as frames, then dropped as unreadable by the server's JPEG-or-PNG check."""
    from PIL import Image

    for name in ("a.webp", "b.bmp", "c.tif"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    with pytest.raises(selecting.NothingToSelectError, match=r"no JPEG or PNG images .*3 in other formats"):
        selecting.frames_in(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "d.jpg")
    frames, others = selecting.frames_in(tmp_path)
    assert [p.name for p in frames] == ["d.jpg"] and [p.name for p in others] == ["a.webp", "b.bmp", "c.tif"]


def test_diversity_fills_its_count_past_a_pool_of_look_alikes() -> None:
    """The best frames all the same to the model (one scene served again): k-means found one cluster, and 4 asked
    gave 1 frame though distinct ones ranked just below."""
    scores = np.array([0.9, 0.89, 0.88, 0.87, 0.86, 0.85, 0.84, 0.5, 0.4, 0.3])
    embeddings = np.array([[1.0, 0.0]] * 8 + [[0.0, 1.0], [1.0, 1.0]])
    picked = selecting.diverse(scores, embeddings, 4, 2)
    assert [i for i, _ in picked] == [0, 8, 9]  # one of the look-alikes, then the two that differ
    assert len({tuple(embeddings[i]) for i, _ in picked}) == 3


def test_label_studio_projects_are_made_without_rotation() -> None:
    """The config `conveyor label select` writes: an axis-aligned detector's boxes cannot be turned in the tool."""
    from labelling.tasks import label_config

    assert 'canRotate="false"' in label_config(list(NAMES))


def _true_result(selection: Path, image_url: str) -> list[dict[str, object]]:
    """What a person draws in Label Studio on a task's image: its true boxes, in percent of the image."""
    record = {f["name"]: Path(f["from"]) for f in json.loads((selection / "selection.json").read_text())["frames"]}
    source = record[image_url.rsplit("/", 1)[1]]
    boxes = yolo_boxes(source.parents[2] / "labels/test" / f"{source.stem}.txt", 320, 320)
    return [
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


def _studio_export(selection: Path, labelled: int) -> list[dict[str, object]]:
    """What a person hands back from Label Studio: the true boxes of the first `labelled` tasks, in percent."""
    tasks = json.loads((selection / "tasks.json").read_text())
    for n, task in enumerate(tasks[:labelled]):
        result = _true_result(selection, task["data"]["image"])
        task["id"] = n + 1
        task["annotations"] = [{"id": 1, "result": [], "was_cancelled": True}, {"id": 2, "result": result}]
    return tasks


def _labels_match_the_truth(paths: ProjectPaths, selection: Path, batch: str) -> None:
    """Every label file the import added holds the true boxes of the frame it came from (to 3 decimals)."""
    added = {p.name.split("__", 1)[1]: p for p in paths.data.glob(f"labels/*/{batch}__*.txt")}
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
    _labels_match_the_truth(paths, selection, result.added.batch)
    # The same export again: refused by `data add`, naming the export (it named the converted copy, deleted since).
    with pytest.raises(DataValidationError) as again:
        import_labels(paths, export)
    assert f"{export} (converted)" in str(again.value) and ".label-" not in str(again.value)


@dataclass(frozen=True)
class Studio:
    url: str
    files: Path  # LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT: what its /data/local-files/ route may serve
    session: Any  # requests.Session, logged in

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        headers = {"X-CSRFToken": self.session.cookies["csrftoken"], "Referer": self.url}
        answer = self.session.request(method, f"{self.url}{path}", headers=headers, timeout=120, **kwargs)
        assert answer.status_code < 300, f"{method} {path}: {answer.status_code} {answer.text[:500]}"
        return answer


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Studio]:
    """A real Label Studio, started for these tests from a venv of its own (its Django pins clash with the project's):
    installed once into .tools/ with the Makefile's uv, then a fresh database each run (its migrations take a minute or
    two). Local files served from a folder, as docs/labelling.md tells users to start it."""
    import requests

    from conveyor.net import free_port
    from tests.conftest import stop_tree
    from tests.flow_support import wait_for

    root = Path(__file__).parents[1]
    venv = root / ".tools" / "label-studio"
    program = venv / "bin" / "label-studio"
    # Every package pinned (label-studio-requirements.txt, compiled from its .in): installed by name alone, a new
    # sentry-sdk broke Label Studio at start. Synced again whenever the pins change.
    pins = Path(__file__).with_name("label-studio-requirements.txt")
    stamp = venv / ".synced"
    if not program.exists() or not stamp.is_file() or stamp.read_text() != pins.read_text():
        uv = root / ".tools" / "bin" / "uv"
        if not venv.is_dir():
            subprocess.run([str(uv), "venv", "-q", str(venv), "--python", sys.executable], check=True, timeout=300)
        install = [str(uv), "pip", "sync", "-q", "--python", str(venv / "bin" / "python"), str(pins)]
        subprocess.run(install, check=True, timeout=1200)
        stamp.write_text(pins.read_text())
    home = tmp_path_factory.mktemp("label-studio")
    files, store = home / "files", home / "data"
    files.mkdir()
    port = free_port()
    env = {
        **os.environ,
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(files),
        "LABEL_STUDIO_BASE_DATA_DIR": str(store),
        "LATEST_VERSION_CHECK": "false",  # it asks PyPI for a newer release at each start
    }
    email, password = "labeller@example.com", "conveyor-labels"  # the login form wants a valid address
    log = home / "label-studio.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(program), "start", "--no-browser", "--host", "127.0.0.1", "--port", str(port),
             "--username", email, "--password", password],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert process.poll() is None, f"Label Studio exited: {log.read_text()[-3000:]}"
        try:
            return requests.get(f"{url}/health", timeout=5).status_code == 200
        except requests.ConnectionError:
            return False

    try:
        wait_for(healthy, 900, "Label Studio to migrate its database and answer", poll=2)
        session = requests.Session()
        form = session.get(f"{url}/user/login/", timeout=30).text
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form)
        assert token, form[:500]
        login = session.post(
            f"{url}/user/login/",
            data={"email": email, "password": password, "csrfmiddlewaretoken": token.group(1)},
            headers={"Referer": f"{url}/user/login/"}, allow_redirects=False, timeout=30,
        )  # fmt: skip
        assert login.status_code == 302, "Label Studio refused the login"
        yield Studio(url, files, session)
    finally:
        stop_tree(process)


@pytest.mark.label_studio
def test_round_trip_through_a_real_label_studio(
    paths: ProjectPaths, chosen: list[selecting.Candidate], label_studio: Studio, tmp_path: Path
) -> None:
    """The selection goes into a real Label Studio as docs/labelling.md says (its label config, its tasks with the
    model's boxes, the frames served from the selection's folder), a person's boxes go in through its API, and its
    own JSON export comes back as a new data version with exactly those boxes."""
    data.synthesize(paths, load_settings(paths.params).synth)
    selection = label_studio.files / "sel-studio"
    files = write_selection(
        selection, chosen, NAMES, 0.25, "test v1", "pool", image_url="/data/local-files/?d=sel-studio/images/"
    )
    studio = label_studio
    config = (selection / "label_config.xml").read_text()
    project = studio.call("POST", "/api/projects", json={"title": "conveyor selection", "label_config": config})
    project_id = project.json()["id"]
    studio.call(
        "POST", "/api/storages/localfiles",
        json={"project": project_id, "path": str(selection / "images"), "use_blob_urls": False, "title": "frames"},
    )  # fmt: skip
    studio.call("POST", f"/api/projects/{project_id}/import", json=json.loads((selection / "tasks.json").read_text()))
    tasks = studio.call("GET", "/api/tasks", params={"project": project_id, "page_size": 100}).json()["tasks"]
    assert len(tasks) == files.frames == 8
    assert sum(t["total_predictions"] for t in tasks) == 8  # the model's boxes came in with every task
    for task in tasks:  # Label Studio serves each frame from the selection, byte for byte
        image = studio.call("GET", task["data"]["image"])
        assert image.content == (selection / "images" / task["data"]["image"].rsplit("/", 1)[1]).read_bytes()
    tasks.sort(key=lambda t: t["id"])
    for task in tasks[:6]:  # a person labels six frames; the seventh is skipped (cancelled), the last left alone
        studio.call("POST", f"/api/tasks/{task['id']}/annotations",
                    json={"result": _true_result(selection, task["data"]["image"])})  # fmt: skip
    studio.call("POST", f"/api/tasks/{tasks[6]['id']}/annotations", json={"result": [], "was_cancelled": True})
    exported = studio.call("GET", f"/api/projects/{project_id}/export", params={"exportType": "JSON"})
    export = tmp_path / f"project-{project_id}-at-2026-12-07-01-30-0a1b2c3d.json"
    export.write_bytes(exported.content)

    before = data.data_status(paths).expected
    # Label Studio serves its document root, here a folder outside the project: --selections names it.
    result = import_labels(paths, export, selections=label_studio.files)
    # Label Studio's export holds the tasks somebody opened: the cancelled one is there (and not labelled), the
    # untouched one is not.
    assert (result.tasks, result.labelled) == (7, 6) and result.added.total_images == 6
    assert result.added.md5 != before
    _labels_match_the_truth(paths, selection, result.added.batch)


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
    # Exports of another shape: each task is named, nothing is added (they were AttributeError, KeyError, TypeError
    # and ValueError tracebacks).
    good = _studio_export(selection, labelled=2)
    assert good[0]["annotations"][1]["result"], "the export the broken ones start from has boxes"  # type: ignore[index]

    def broken(change: Any) -> list[Any]:
        tasks = json.loads(json.dumps(good))
        change(tasks)
        return tasks

    for name, tasks in {
        "strings": ["a", "b"],
        "no x": broken(lambda t: t[0]["annotations"][1]["result"][0]["value"].pop("x")),
        "x is text": broken(lambda t: t[0]["annotations"][1]["result"][0]["value"].update(x="a")),
        "id is text": broken(lambda t: t[0]["annotations"][1].update(id="abc")),
    }.items():
        (tmp_path / "bad.json").write_text(json.dumps(tasks))
        with pytest.raises(DataValidationError, match=r"not in Label Studio's JSON export format[\s\S]*task "):
            import_labels(paths, tmp_path / "bad.json")
        assert data.dir_md5(paths.data) == before, name
    json_min = [{"id": 1, "image": "/data/local-files/?d=images/x.jpg", "label": []}]
    (tmp_path / "min.json").write_text(json.dumps(json_min))
    with pytest.raises(DataValidationError, match="JSON-MIN export"):  # it was "task 1: image '' never selected"
        import_labels(paths, tmp_path / "min.json")
    twice = [*good, {**good[0], "id": 99}]  # one frame in two tasks (named a staging path already deleted)
    (tmp_path / "twice.json").write_text(json.dumps(twice))
    with pytest.raises(DataValidationError, match=r"tasks 1 and 99 both label frame"):
        import_labels(paths, tmp_path / "twice.json")
    damaged = selection / "selection.json"
    record = damaged.read_text()
    damaged.write_text(record[: len(record) // 2])
    with pytest.raises(DataValidationError, match="not a selection record `conveyor label select` wrote"):
        import_labels(paths, tmp_path / "stranger.json")
    damaged.write_text(record)
    assert data.dir_md5(paths.data) == before and data.data_status(paths).in_sync
