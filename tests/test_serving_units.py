"""Serving's pieces without a server: image checks, the edge runner against Conveyor's own pre- and post-processing,
the prediction log's bounded queue, batch prediction's inputs and resume, and the serve settings."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from conveyor.errors import ConveyorError
from conveyor.settings import ConfigError, ServeSettings
from pipelines.inference import (
    Detection,
    ImageError,
    ImageLimits,
    Inference,
    ModelCard,
    check_image_bytes,
    decode_image,
    postprocess,
)
from pipelines.prediction_log import Pending, PredictionLog, read_log
from pipelines.runtimes import letterbox
from serving import batch, bundle
from serving.server import ServeOptions

EDGE = Path(__file__).resolve().parents[1] / "serving" / "edge" / "run.py"


def encoded(fmt: str, size: tuple[int, int] = (64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), np.uint8)).save(buffer, fmt)
    return buffer.getvalue()


def edge_module() -> ModuleType:
    """The bundle's run.py loaded as the device loads it: a file, not a module of Conveyor's."""
    spec = importlib.util.spec_from_file_location("edge_run", EDGE)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_image_checks_name_the_problem() -> None:
    limits = ImageLimits(max_bytes=100_000, max_pixels=10_000)
    assert check_image_bytes(encoded("JPEG"), limits) == (64, 48)
    assert check_image_bytes(encoded("PNG"), limits) == (64, 48)
    jpeg = encoded("JPEG")
    cases = {
        b"": "empty body",
        b"GIF89a" + b"\0" * 20: "not a JPEG or PNG",
        jpeg[: len(jpeg) // 2]: "truncated JPEG",
        encoded("PNG", (200, 100)): "over the limit of 10000",
        b"\xff\xd8\xff" + b"0" * 100_001: "over the limit of 100000",
        b"\x89PNG\r\n\x1a\n" + b"\0" * 30: "not a decodable image",
    }
    for data, message in cases.items():
        with pytest.raises(ImageError, match=message):
            check_image_bytes(data, limits)


def test_a_png_is_checked_without_decoding_its_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    """A PNG's getexif() decodes every pixel: a 0.2 MB PNG of 40000x40000 took 1.2 GB before the pixel limit refused
    it, and a valid large one held the event loop (and the health probes) for half a second. The pixel count is
    checked first, and the orientation read from the header's EXIF block."""
    from PIL import PngImagePlugin

    def decoded(self: Any) -> None:
        raise AssertionError("the check decoded the image's pixels")

    large = io.BytesIO()
    Image.new("L", (4000, 3000)).save(large, "PNG")
    turned = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: a viewer (and OpenCV) shows it 48 wide, 64 high
    Image.new("RGB", (64, 48)).save(turned, "PNG", exif=exif)
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", decoded)
    with pytest.raises(ImageError, match="4000x3000 = 12000000 pixels, over the limit of 1000000"):
        check_image_bytes(large.getvalue(), ImageLimits(max_pixels=1_000_000))
    assert check_image_bytes(turned.getvalue(), ImageLimits()) == (48, 64)


def test_edge_letterbox_is_ultralytics_letterbox() -> None:
    edge = edge_module()
    image = np.random.default_rng(1).integers(0, 255, (237, 411, 3), np.uint8)
    assert np.array_equal(edge.letterbox(image, 320)[None], letterbox([image], 320))


def test_edge_postprocess_gives_conveyors_detections() -> None:
    """Random raw outputs with a few confident, overlapping boxes: the numpy NMS keeps what Ultralytics' NMS keeps."""
    edge = edge_module()
    rng = np.random.default_rng(2)
    card = ModelCard(names=["scratch", "dent", "stain"], imgsz=320, conf=0.25, iou=0.7)
    anchors = 2100
    raw = np.zeros((1, 7, anchors), np.float32)
    raw[0, 0:2] = rng.uniform(20, 300, (2, anchors))
    raw[0, 2:4] = rng.uniform(10, 80, (2, anchors))
    raw[0, 4:] = rng.uniform(0, 0.2, (3, anchors))
    hot = rng.choice(anchors, 60, replace=False)
    raw[0, 4:, hot] = rng.uniform(0.1, 0.99, (60, 3))
    raw[0, 0:2, hot[:20]] = 150  # a cluster: NMS must suppress inside it
    for shape in ((320, 320), (360, 480)):
        expected = [d.to_json() for d in postprocess(raw.copy(), [shape], card)[0]]
        got = edge.postprocess(raw[0].copy(), shape, card.to_json(), card.conf)
        assert [d["class_id"] for d in got] == [d["class_id"] for d in expected]
        assert np.allclose([d["box"] for d in got], [d["box"] for d in expected], atol=0.02)
        assert np.allclose([d["confidence"] for d in got], [d["confidence"] for d in expected], atol=1e-5)


def test_edge_runner_logs_what_the_server_logs() -> None:
    """The runner keeps its own copies of two constants (it imports no Conveyor): they are the server's."""
    from pipelines import inference, model_features

    edge = edge_module()
    assert edge.SCORE_FLOOR == inference.SCORE_FLOOR and edge.FEATURES_OUTPUT == model_features.FEATURES_OUTPUT
    found = edge.Found([{"class_id": 1, "class_name": "dent", "confidence": 0.9, "box": [0, 0, 4, 4]}], [], None)
    assert found.detections[0].class_name == "dent" and found.scores == [] and found.score_boxes == []
    # The log's record from the runner's inference and from the server's, for the same detections: the same columns
    # and values (boxes as fractions of the frame: the drift check tells dust on the lens from defects by them).
    from pipelines.features import SCORE_BOX, record, sample_image

    detections = [Detection(1, "dent", 0.9, (12.5, 30.0, 60.25, 90.0)), Detection(2, "stain", 0.05, (200, 10, 230, 40))]
    image = np.full((240, 320, 3), 90, np.uint8)
    sample = sample_image(image, 320)
    server = record(sample, Inference(detections[:1], detections, None))
    runner = record(sample, edge.Found([d.to_json() for d in detections[:1]], [d.to_json() for d in detections], None))
    assert runner == server and server[SCORE_BOX][:4] == [0.0391, 0.125, 0.1883, 0.375]


def pending(version: str = "1") -> Pending:
    from pipelines.features import sample_image
    from pipelines.inference import Inference

    detection = Detection(0, "scratch", 0.9, (1.0, 2.0, 11.0, 12.0))
    sample = sample_image(np.full((48, 64, 3), 100, np.uint8), 320)
    return Pending(time.time(), version, sample, Inference([detection], [detection], None))


def test_prediction_log_writes_hourly_parquet_and_drops_when_full(tmp_path: Path) -> None:
    dropped: list[int] = []
    log = PredictionLog(tmp_path / "log", queue_size=3, flush_seconds=60, keep_hours=1, on_dropped=dropped.append)
    log.directory.mkdir()
    for _ in range(5):  # the writer is not running: the queue holds 3, the rest are dropped and counted
        log.offer(pending())
    assert log.dropped == 2 and sum(dropped) == 2
    log.flush()
    window = read_log(tmp_path / "log")
    frame = window.records
    assert window.unreadable == []
    assert len(frame) == 3 and list(frame["detections"]) == [1, 1, 1]
    assert frame["brightness"].iloc[0] == pytest.approx(100) and frame["contrast"].iloc[0] == pytest.approx(0)
    assert json.loads(frame["class_counts"].iloc[0]) == {"scratch": 1}
    assert frame["mean_box_area"].iloc[0] == pytest.approx(100 / (64 * 48))
    assert len(list((tmp_path / "log").glob("date=*/hour=*/part-*.parquet"))) == 1


def test_the_log_queue_is_bounded_by_the_bytes_it_holds_too(tmp_path: Path) -> None:
    """A waiting record holds its image's sample (~200 kB at 320 px) and, when kept, the image: 10,000 of them were
    2 to 5 GB, in a 4 GiB pod, whenever the writer fell behind. Past the byte bound they are dropped and counted,
    and the room comes back as the writer takes them."""
    from pipelines.features import sample_image

    item = pending()
    size = item.sample.nbytes
    assert size == sample_image(np.full((48, 64, 3), 100, np.uint8), 320).nbytes > 50_000  # the view at 320 px
    log = PredictionLog(tmp_path / "log", queue_size=100, flush_seconds=60, keep_hours=1, queue_bytes=3 * size + 10)
    log.directory.mkdir()
    for _ in range(2):
        log.offer(pending())
    log.offer(replace(pending(), frame=b"\xff\xd8\xff" + b"\0" * 20))  # room for its sample, not with its image
    assert log.dropped == 1
    for _ in range(3):
        log.offer(pending())
    assert log.dropped == 3  # one fitted: three waiting
    log.flush()
    for _ in range(3):  # the writer took them: room for three again
        log.offer(pending())
    assert log.dropped == 3 and log.flush() and log.written == 6


def test_a_part_without_detections_keeps_the_windows_statistics_numeric(tmp_path: Path) -> None:
    """An hour in which no image had a detection writes its per-image statistics as all-None columns; read with the
    next hour's, they stay numbers, with no pandas FutureWarning (pandas 3 would make them objects)."""
    import warnings

    from pipelines.features import sample_image

    log = PredictionLog(tmp_path / "log", queue_size=10, flush_seconds=60, keep_hours=1)
    log.directory.mkdir()
    empty = sample_image(np.full((48, 64, 3), 100, np.uint8), 320)
    log.offer(Pending(time.time() - 2, "1", empty, Inference([], [], None)))
    log.flush()
    log.offer(pending())
    log.flush()
    assert len(list((tmp_path / "log").glob("date=*/hour=*/part-*.parquet"))) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frame = read_log(tmp_path / "log").records
    assert str(frame["mean_confidence"].dtype) == "float64" and str(frame["max_box_area"].dtype) == "float64"
    assert np.isnan(frame["mean_confidence"].iloc[0]) and frame["mean_confidence"].iloc[1] == pytest.approx(0.9)
    assert "frame" in frame and frame["frame"].isna().all()  # a column no part filled is kept


def test_prediction_log_survives_an_unwritable_disk(tmp_path: Path) -> None:
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the log directory should be")
    log = PredictionLog(blocked, queue_size=10, flush_seconds=60, keep_hours=1)
    log.offer(pending())
    log.flush()  # logs the error, counts the loss, raises nothing
    assert log.dropped == 1 and log.written == 0


def test_a_full_disk_is_freed_by_expiry_even_though_no_write_succeeds(tmp_path: Path) -> None:
    """The expiry that frees old hours ran only after a write that succeeded: on a full disk no write succeeded, so
    the log stopped for good. It now runs at every flush, before the write. The disk here is a stand-in: a write
    that fails (a file where the hour's folder goes) while an hour past keep_hours is still on disk."""
    from datetime import UTC, datetime, timedelta

    log = PredictionLog(tmp_path / "log", queue_size=10, flush_seconds=60, keep_hours=1)
    old = tmp_path / "log" / (datetime.now(UTC) - timedelta(hours=5)).strftime("date=%Y-%m-%d/hour=%H")
    old.mkdir(parents=True)
    (old / "part-1-old.parquet").write_bytes(b"x" * 1000)
    record = pending()
    now_hour = tmp_path / "log" / datetime.fromtimestamp(record.at, UTC).strftime("date=%Y-%m-%d/hour=%H")
    now_hour.parent.mkdir(parents=True, exist_ok=True)
    now_hour.write_text("in the way: the write fails")
    log.offer(record)
    log.flush()
    assert log.written == 0 and log.dropped == 1 and not old.exists()


def test_a_flush_is_written_whole_or_not_at_all_and_keeps_every_rows_columns(tmp_path: Path) -> None:
    """A flush spanning two hours whose second part failed left the first on disk, counted as dropped and never
    shipped; and Arrow took a part's columns from its first row, so records after a hot swap to a model with a
    features output lost their embeddings."""
    import pyarrow.parquet as pq

    from pipelines.features import EMBEDDING

    log = PredictionLog(tmp_path / "log", queue_size=10, flush_seconds=60, keep_hours=48)
    log.directory.mkdir()
    later = pending()
    earlier = replace(later, at=later.at - 3600)
    log.offer(earlier)
    log.offer(later)
    blocked = tmp_path / "log" / datetime.fromtimestamp(later.at, UTC).strftime("date=%Y-%m-%d/hour=%H")
    blocked.parent.mkdir(parents=True, exist_ok=True)
    blocked.write_text("in the way")
    log.flush()
    assert log.dropped == 2 and list((tmp_path / "log").glob("date=*/hour=*/part-*.parquet")) == []
    blocked.unlink()

    without = pending()
    found = without.inference
    with_features = replace(without, inference=Inference(found.detections, found.candidates, np.ones(8, np.float32)))
    log.offer(without)
    log.offer(with_features)
    log.flush()
    (part,) = (tmp_path / "log").glob("date=*/hour=*/part-*.parquet")
    table = pq.read_table(part)
    assert EMBEDDING in table.column_names and table.column(EMBEDDING).to_pylist()[1] is not None


def test_shipping_that_never_worked_is_said_and_a_store_that_will_not_list_still_gets_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A wrong endpoint from the start was never said (the shipper starts behind, and warned only on falling
    behind); credentials that may upload but not list (a device's least-privilege key) uploaded nothing, ever. A
    stand-in client: the real store's refusal of a listing is a ClientError with code AccessDenied, raised here as
    botocore raises it."""
    from botocore.exceptions import ClientError, EndpointConnectionError

    from pipelines.log_parts import LogShipper

    log = PredictionLog(tmp_path / "log", queue_size=10, flush_seconds=60, keep_hours=48)
    log.directory.mkdir()
    log.offer(pending())
    log.flush()

    class Away:
        def get_paginator(self, name: str) -> Any:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9")

    away = LogShipper("s3://bucket/log", lambda: Away())
    with caplog.at_level("WARNING", logger="conveyor.serving"):
        away.catch_up(log.directory)
    assert away.behind and "cannot ship to s3://bucket/log" in caplog.text

    uploaded: list[str] = []

    class UploadOnly:
        def get_paginator(self, name: str) -> Any:
            refusal = {"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}
            raise ClientError(refusal, "ListObjectsV2")

        def upload_file(self, path: str, bucket: str, key: str, **options: Any) -> None:
            uploaded.append(key)

    shipper = LogShipper("s3://bucket/log", lambda: UploadOnly())
    shipper.catch_up(log.directory)
    assert not shipper.behind and len(uploaded) == 1 and uploaded[0].startswith("log/date=")
    shipper.behind = True
    shipper.catch_up(log.directory)  # what it uploaded is not uploaded again
    assert len(uploaded) == 1


def test_a_catch_up_skips_a_frame_being_written_and_a_file_expired_under_it(tmp_path: Path) -> None:
    """The shipper's thread lists the log while the writer's thread writes and expires it. A kept frame is written
    under a temporary name and renamed whole: listed half-written, it was uploaded half, and a key the store has is
    never sent again. A file whose hour expired between the listing and its upload ended the whole pass as "cannot
    ship". A stand-in client records what would be uploaded (what a real store does with it is tested in
    tests/test_stack.py)."""
    from pipelines.log_parts import WRITING_PREFIX, LogShipper

    log = PredictionLog(tmp_path / "log", queue_size=10, flush_seconds=60, keep_hours=48, keep_frames=1.0)
    log.directory.mkdir()
    item = replace(pending(), frame=b"\xff\xd8\xff" + b"\0" * 64)
    log.offer(item)
    log.offer(pending())
    log.flush()
    (frame,) = log.directory.glob("date=*/hour=*/frames/*")
    (frame.parent / f"{WRITING_PREFIX}{frame.name}").write_bytes(b"\xff\xd8")  # a frame the writer is writing
    (frame.parent / f"{frame.stem}-expired.jpg").write_bytes(b"\xff\xd8\xff")
    uploaded: list[str] = []

    class Store:
        def get_paginator(self, name: str) -> Any:
            return SimpleNamespace(paginate=lambda **kw: [{"Contents": []}])

        def upload_file(self, path: str, bucket: str, key: str, **options: Any) -> None:
            if "-expired" in path:
                raise FileNotFoundError(path)  # as boto3 raises for a file gone since the listing
            assert options["Config"].use_threads is False  # the process's exit never waits on an upload
            uploaded.append(key)

    shipper = LogShipper("s3://bucket/log", lambda: Store())
    shipper.catch_up(log.directory)
    assert not shipper.behind and shipper.failures == 0
    parts = list(log.directory.glob("date=*/hour=*/part-*.parquet"))
    wanted = [f"log/{f.relative_to(log.directory).as_posix()}" for f in [frame, *parts]]
    assert parts and sorted(uploaded) == sorted(wanted)


def test_a_file_written_during_a_catch_up_is_shipped_and_counted_once(tmp_path: Path) -> None:
    """The shipper catches up while behind (after an outage) on its own thread, as the writer goes on writing and
    submitting. A file written and submitted before the catch-up listed the log was uploaded by it, then again by the
    next pass from the queue, and `log_shipped` counted it twice. A stand-in client records the uploads."""
    from pipelines.log_parts import LogShipper

    log = PredictionLog(tmp_path / "log", queue_size=10, flush_seconds=60, keep_hours=48)
    log.directory.mkdir()
    uploaded: list[str] = []

    class Store:
        def get_paginator(self, name: str) -> Any:
            return SimpleNamespace(paginate=lambda **kw: [{"Contents": []}])

        def upload_file(self, path: str, bucket: str, key: str, **options: Any) -> None:
            uploaded.append(key)

    shipper = LogShipper("s3://bucket/log", lambda: Store())
    assert shipper.behind  # it starts behind, to carry over what an earlier process left
    log.offer(pending())
    log.flush()  # the writer's part file, written before the catch-up lists the log
    (part,) = log.directory.glob("date=*/hour=*/part-*.parquet")
    shipper.submit([part.relative_to(log.directory).as_posix()])
    shipper.catch_up(log.directory)  # the pass that was under way when the file was submitted
    shipper._pass(log.directory)  # the next pass
    assert uploaded == [f"log/{part.relative_to(log.directory).as_posix()}"] and shipper.shipped == 1

    log.offer(pending())
    log.flush()  # a file written once caught up goes from the queue, as before
    (newer,) = set(log.directory.glob("date=*/hour=*/part-*.parquet")) - {part}
    shipper.submit([newer.relative_to(log.directory).as_posix()])
    shipper._pass(log.directory)
    assert len(uploaded) == 2 and uploaded[1].endswith(newer.name) and shipper.shipped == 2

    # Written and submitted while the catch-up lists the store (before it lists the folder): shipped once too.
    written: list[str] = []

    class Listing(Store):
        def get_paginator(self, name: str) -> Any:
            log.offer(pending())
            log.flush()
            (late,) = set(log.directory.glob("date=*/hour=*/part-*.parquet")) - {part, newer}
            written.append(late.relative_to(log.directory).as_posix())
            shipper.submit(written)
            return super().get_paginator(name)

    shipper._client, shipper.behind = Listing(), True
    shipper.catch_up(log.directory)
    shipper._pass(log.directory)
    assert [key for key in uploaded if key.endswith(written[0])] == [f"log/{written[0]}"]


def test_a_store_that_hangs_never_holds_up_the_writer(tmp_path: Path) -> None:
    """An S3 endpoint that takes connections and never answers (a store behind a stuck proxy): each request waits out
    its read timeout, 30 s a try. Shipping ran on the writer's thread, so the writer wrote nothing meanwhile, its
    queue filled and records were dropped. Here a real boto3 client against a real socket that never answers: the
    writer keeps writing every flush while the shipper waits; with the store gone, closing takes no longer."""
    import socket
    from functools import partial

    from conveyor import storage
    from conveyor.net import wait_until
    from pipelines.log_parts import PART_GLOB, LogShipper

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # the kernel completes the connections; nobody reads a request or answers one
    endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
    shipper = LogShipper("s3://bucket/log", lambda: storage.client(endpoint, attempts=1, credentials=("key", "secret")))
    log = PredictionLog(tmp_path / "log", queue_size=10, flush_seconds=0.2, keep_hours=48, shipper=shipper).start()
    try:
        for round_ in range(1, 6):
            for _ in range(5):  # half the queue a round: a writer held up for a round drops records
                log.offer(pending())
            wait_until(partial(lambda wanted: log.written == wanted, 5 * round_), 10, f"round {round_} written")
        assert log.dropped == 0 and shipper.shipped == 0 and shipper.behind
        assert len(list(log.directory.glob(PART_GLOB))) >= 2
    finally:
        silent.close()  # the store gone: the request it held fails at once
        started = time.monotonic()
        log.close()
    assert time.monotonic() - started < 10
    assert shipper.failures >= 1  # its thread did reach for the store (it starts behind whether it ran or not)
    assert shipper.behind and len(read_log(log.directory).records) == 25  # kept locally, for the next start to ship


def test_records_offered_after_the_log_closed_are_counted_and_future_ones_left_out(tmp_path: Path) -> None:
    """The server closed the log before Triton: a request served meanwhile was neither written nor counted. A device
    whose clock ran ahead dated records in the future, and they decided which version every window checked."""
    log = PredictionLog(tmp_path / "log", queue_size=10, flush_seconds=60, keep_hours=48).start()
    log.offer(pending())
    soon = pending(version="5")
    ahead = replace(soon, at=soon.at + 30 * 86400)
    log.offer(ahead)
    log.close()
    log.offer(pending())
    assert log.written == 2 and log.dropped == 1
    window = read_log(tmp_path / "log")
    assert list(window.records["model_version"]) == ["1"]
    assert window.unreadable == ["1 records dated after now (a clock ahead: server): left out"]


def test_batch_sources(tmp_path: Path) -> None:
    folder = tmp_path / "images" / "line-2"
    folder.mkdir(parents=True)
    for name in ("b.jpg", "a.png", "notes.txt"):
        (folder / name).write_bytes(b"x")
    assert [Path(p).name for p in batch.list_images(str(tmp_path / "images"))] == ["a.png", "b.jpg"]
    assert [Path(p).name for p in batch.list_images(str(folder / "*.jpg"))] == ["b.jpg"]
    listing = tmp_path / "list.txt"
    listing.write_text("images/line-2/b.jpg\n\n")
    assert batch.list_images(str(listing)) == [str(tmp_path / "images/line-2/b.jpg")]
    # One image by two spellings in a list is one; a file whose name looks like a pattern is that file.
    listing.write_text(f"images/line-2/b.jpg\n./images/line-2/b.jpg\n{folder / 'b.jpg'}\n")
    assert batch.list_images(str(listing)) == [str(tmp_path / "images/line-2/b.jpg")]
    (folder / "photo[1].jpg").write_bytes(b"x")
    assert batch.list_images(str(folder / "photo[1].jpg")) == [str(folder / "photo[1].jpg")]
    for source, message in ((tmp_path / "nope", "no such folder"), (tmp_path / "empty.txt", "no .jpg")):
        if source.suffix:
            source.write_text("")
        with pytest.raises(batch.SourceError, match=message):
            batch.list_images(str(source))


def test_a_source_of_another_kind_is_named(tmp_path: Path) -> None:
    bmp = tmp_path / "a.bmp"
    bmp.write_bytes(b"BM\xff\xfe\x00\x80" * 10)  # read as a list file, it was a UnicodeDecodeError traceback
    with pytest.raises(batch.SourceError, match=r"neither a \.jpg, \.jpeg or \.png image nor a text file"):
        batch.list_images(str(bmp))
    with pytest.raises(ConveyorError, match=r"no bucket in s3:// \(expected s3://bucket/prefix\)"):
        batch.list_images("s3://")


def test_a_resume_by_another_spelling_of_the_folder_skips_what_was_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`predict imgs` then `predict /abs/imgs` (the same folder) predicted every image again: keys by the absolute,
    normalised path. No model runs: every image is done."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs").mkdir()
    out = tmp_path / "out.jsonl"
    out.write_text("".join(json.dumps({"image": f"imgs/{n}.jpg", "version": "1"}) + "\n" for n in "ab"))
    model = SimpleNamespace(version="1", name="m", detectors=[None])
    images = [str(tmp_path / "imgs" / "a.jpg"), str(tmp_path / "imgs" / ".." / "imgs" / "b.jpg")]
    summary = batch.predict(model, images, out, 4, ImageLimits(), Console(file=io.StringIO()))  # type: ignore[arg-type]
    assert summary.images == 0 and summary.skipped == 2


def test_resume_drops_a_torn_last_line(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text('{"image": "a.jpg"}\n{"image": "b.jpg"}\n{"image": "c.j')
    assert batch.done_images(out) == {"a.jpg", "b.jpg"}
    assert out.read_text() == '{"image": "a.jpg"}\n{"image": "b.jpg"}\n'
    out.write_text('{"image": "a.jpg"}\n{"im')  # torn within its first bytes
    assert batch.done_images(out) == {"a.jpg"} and out.read_text() == '{"image": "a.jpg"}\n'
    out.write_text('{"image": "a.jpg"}\n\n  \n')  # blank lines (an editor's) are not records, and are kept
    assert batch.done_images(out) == {"a.jpg"} and out.read_text() == '{"image": "a.jpg"}\n\n  \n'


@pytest.mark.parametrize(
    "text",
    [
        "# a README\n\nSome text, no newline at the end",  # --out README.md: it was cut to nothing
        "serve:\n  conf: 0.25\n",  # --out params.yaml
        '{"image": "a.jpg"}\nnot json\n{"image": "b.jpg"}\n',  # a damaged line in the middle
        '{"frame": 1}\n',  # JSON lines of something else (was a KeyError)
        "[1, 2]\n",  # (was a TypeError)
        "no newline and not ours",
    ],
)
def test_an_output_that_is_not_predictions_is_refused_and_left_alone(tmp_path: Path, text: str) -> None:
    out = tmp_path / "named-by-mistake"
    out.write_text(text)
    with pytest.raises(batch.OutputError, match="is not a prediction of `conveyor predict`"):
        batch.done_images(out)
    assert out.read_text() == text
    with pytest.raises(batch.OutputError, match="is a folder"):
        batch.done_images(tmp_path)


def test_serve_options_are_checked_like_params() -> None:
    cfg = ServeOptions(port=9000, workers=2).apply(ServeSettings())
    assert (cfg.port, cfg.workers, cfg.runtime) == (9000, 2, "openvino")
    with pytest.raises(ConfigError, match="workers: Input should be greater than or equal to 1"):
        ServeOptions(workers=0).apply(ServeSettings())
    with pytest.raises(ConfigError, match="runtime"):
        ServeOptions(runtime="tflite").apply(ServeSettings())
    with pytest.raises(ConfigError, match=r"port: Input should be less than or equal to 65535 \(got 70000\)"):
        ServeOptions(port=70000).apply(ServeSettings())
    with pytest.raises(ConfigError, match="\n  - port and grpc_port are both 9000"):  # no empty key before it
        ServeOptions(port=9000, grpc_port=9000).apply(ServeSettings())


def test_serve_refuses_tensorrt_without_a_gpu_and_a_taken_port(tmp_path: Path) -> None:
    import socket

    from pipelines.runtimes import tensorrt_unavailable_reason
    from tests.conftest import base_env, make_project

    if tensorrt_unavailable_reason() is None:
        pytest.skip("this machine can run TensorRT: nothing to refuse")
    project = make_project(tmp_path / "project")
    refused = subprocess.run(
        ["conveyor", "serve", "--runtime", "tensorrt"], cwd=project, env=base_env(), capture_output=True, text=True
    )
    assert refused.returncode == 1 and "cannot run on tensorrt" in refused.stderr, refused.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = subprocess.run(
            ["conveyor", "serve", "--port", str(port)], cwd=project, env=base_env(), capture_output=True, text=True
        )
    assert busy.returncode == 1 and f"HTTP port 127.0.0.1:{port} is not free" in busy.stderr, busy.stderr
    # A host that is no address here is not a port that is taken (it said "port fabrik-pc:8080 is not free").
    from conveyor.net import listen_problem

    assert (
        listen_problem(port, "192.0.2.1")
        == "192.0.2.1 is not an address of this machine (0.0.0.0 listens on all of them)"
    )
    assert "no host name or address" in (listen_problem(port, "no-such-host.invalid") or "")


@pytest.mark.parametrize(("delta", "served"), [(-0.004, True), (-0.025, False)])
def test_int8_is_bundled_only_within_the_parity_limit(tmp_path: Path, delta: float, served: bool) -> None:
    """OpenVINO INT8 goes into the registry version only if its ΔmAP50-95 passes the parity limit (-0.025 is what
    NNCF's INT8 measured on the demo checkpoint here: refused with the default limit of 0.01)."""
    from conveyor.paths import ProjectPaths
    from conveyor.settings import Settings
    from pipelines.promotion import _serving_bundle

    paths = ProjectPaths(tmp_path)
    exports = {
        name: {"path": f"artifacts/export/{name}/model", "delta_map50_95": d}
        for name, d in (("onnx_dynamic", 0.0), ("openvino", 0.0), ("openvino_int8", delta))
    }
    paths.export.mkdir(parents=True)
    (paths.export / "export.json").write_text(json.dumps({"imgsz": 320, "exports": exports}))
    paths.validation.mkdir(parents=True)
    (paths.validation / "manifest.json").write_text(json.dumps({"names": ["scratch", "dent", "stain"]}))
    settings = Settings()
    settings = settings.model_copy(update={"serve": settings.serve.model_copy(update={"conf": 0.4})})
    artifacts = _serving_bundle(paths, settings, tmp_path / "staging")
    assert ("openvino_int8" in artifacts) is served
    assert {"metadata", "weights", "onnx", "openvino"} <= set(artifacts)
    # serve.conf is the version's threshold: the pyfunc, the edge bundle and the Triton repository start from it.
    assert json.loads(Path(artifacts["metadata"]).read_text())["conf"] == 0.4


def test_edge_rollout_fetches_again_after_a_transient_error_and_not_after_a_refusal(tmp_path: Path) -> None:
    """A download cut short (an error that is not the bundle's fault) leaves the entry to be fetched again; a bundle
    that fails its checks is refused once and not fetched again (it was never retried after either)."""
    from types import SimpleNamespace

    edge = edge_module()
    entry = {"bundle": "bundles/m-v2.tar.gz", "sha256": "ab" * 32, "manifest_sha256": "cd" * 32}
    fetched: list[str] = []

    class FlakyChannel:
        location = "test"
        line = "line-1"
        offered: dict[str, str] | None = None

        def current(self) -> dict[str, str] | None:
            return self.offered

        def fetch(self, entry: dict[str, str], into: Path) -> Path:
            fetched.append(entry["sha256"])
            if len(fetched) == 1:
                raise ConnectionError("the store went away mid-download")
            into.mkdir(parents=True, exist_ok=True)
            return into  # no manifest.json: refused by verify

    channel = FlakyChannel()
    running = SimpleNamespace(root=tmp_path, manifest={"model": "m"})
    rollout = edge.Rollout(channel, running, "onnx", None, 3600, tmp_path / "rollouts")
    try:
        channel.offered = entry
        with pytest.raises(ConnectionError):
            rollout.poll_once()  # the thread's loop prints it as a warning and asks again next time
        rollout.poll_once()
        assert len(fetched) == 2 and len(rollout.refused) == 1
        assert rollout.refused[0].startswith("bundles/m-v2.tar.gz: ") and "not a Conveyor bundle" in rollout.refused[0]
        rollout.poll_once()
        assert len(fetched) == 2, "a refused bundle was fetched again"
    finally:
        rollout.close()


def _tiny_bundle(
    root: Path,
    key: Any,
    version: str,
    model: bytes | None = None,
    line: str = "line-1",
    reject: dict[str, Any] | None = None,
    rule_file: bool = True,
) -> Path:
    """A signed bundle around a 1-node ONNX model (a reshape of the image into YOLO's output layout: 3 classes,
    336 anchors), for the runner's rollout without the project's model."""
    import hashlib

    from onnx import TensorProto, helper

    (root / "model").mkdir(parents=True)
    card = {"imgsz": 28, "names": ["scratch", "dent", "stain"], "iou": 0.7, "conf": 0.25}
    (root / "model" / "metadata.json").write_text(json.dumps(card))
    if model is None:
        shape = helper.make_tensor("shape", TensorProto.INT64, [3], [1, 7, 336])
        graph = helper.make_graph(
            [helper.make_node("Reshape", ["images", "shape"], ["output0"])],
            "tiny",
            [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 28, 28])],
            [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 7, 336])],
            initializer=[shape],
        )
        tiny = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        tiny.ir_version = 8
        model = tiny.SerializeToString()
    (root / "model" / "model.onnx").write_bytes(model)
    if rule_file:
        (root / "edge.json").write_text(json.dumps({"line": line, "reject": reject or {"min_confidence": 0.5}}))
    listed = {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*")
              if p.is_file()}  # fmt: skip
    (root / "manifest.json").write_text(json.dumps({"model": "m", "version": version, "sha256": listed}))
    (root / "manifest.sig").write_bytes(key.sign((root / "manifest.json").read_bytes()))
    return root


class _FolderChannel:
    """The channel's interface over bundle folders already unpacked (the archive's own checks are test_edge's)."""

    location = "test"
    line = "line-1"

    def __init__(self) -> None:
        self.offered: dict[str, str] | None = None
        self.bundles: dict[str, Path] = {}
        self.fetched: list[str] = []

    def offer(self, bundle: Path) -> None:
        import hashlib

        digest = hashlib.sha256(bundle.name.encode()).hexdigest()
        self.bundles[digest] = bundle
        manifest = hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
        self.offered = {"bundle": f"bundles/{bundle.name}.tar.gz", "sha256": digest, "manifest_sha256": manifest}

    def current(self) -> dict[str, str] | None:
        return self.offered

    def fetch(self, entry: dict[str, str], into: Path) -> Path:
        source = self.bundles[entry["sha256"]]
        self.fetched.append(source.name)
        shutil.copytree(source, into / source.name)
        return into / source.name


def test_edge_rollout_refuses_what_its_runtime_cannot_load_and_keeps_only_the_running_bundle(tmp_path: Path) -> None:
    """A signed bundle whose model the runtime cannot load (ONNX Runtime's errors are no OSError or ValueError) is
    refused and named, not fetched again, and deleted; so is a bundle swapped out. The one swapped in is recorded,
    and a restart runs it again (`rolled_out`) until its files no longer pass."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    edge = edge_module()
    key = Ed25519PrivateKey.generate()
    public = tmp_path / "team.pub"
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    installed = edge.Model("onnx", _tiny_bundle(tmp_path / "installed", key, "1"))
    broken = _tiny_bundle(tmp_path / "broken", key, "2", model=b"not a protobuf")
    v3, v4 = (_tiny_bundle(tmp_path / f"v{n}", key, str(n)) for n in (3, 4))
    rollouts = tmp_path / "rollouts"
    channel = _FolderChannel()
    rollout = edge.Rollout(channel, installed, "onnx", public, 3600, rollouts)
    try:
        assert edge.rolled_out(rollouts, public, "m") is None  # nothing taken yet: the installed bundle runs
        channel.offer(broken)
        rollout.poll_once()  # it escaped as a channel warning, unlisted, and was never tried again
        assert len(rollout.refused) == 1 and rollout.refused[0].startswith("bundles/broken.tar.gz: ")
        assert rollout.swap_if_ready() is None and not [p for p in rollouts.iterdir() if p.is_dir()]
        rollout.poll_once()
        assert len(rollout.refused) == 1, "a refused bundle was tried again"
        channel.offer(v3)
        rollout.poll_once()
        swapped = rollout.swap_if_ready()
        assert swapped is not None and swapped[0].version == "m v3"
        taken = swapped[0]
        assert edge.rolled_out(rollouts, public, "m") == taken.root
        channel.offer(v4)
        rollout.poll_once()
        swapped = rollout.swap_if_ready()
        assert swapped is not None and swapped[0].version == "m v4"
        taken = swapped[0]
        rollout._tidy()  # the rollout thread's, after each look at the channel
        assert [p.name for p in rollouts.iterdir() if p.is_dir()] == [taken.root.parent.name], "v3 left behind"
        assert edge.rolled_out(rollouts, public, "m") == taken.root
        assert edge.rolled_out(rollouts, public, "another") is None
    finally:
        rollout.close()
    (taken.root / "edge.json").write_text('{"reject": {"min_confidence": 0.01}}')  # changed on the device
    assert edge.rolled_out(rollouts, public, "m") is None


@dataclass
class _SignedRollout:
    """A runner's rollout on the tiny bundle v1, signed by the team's key, over a `_FolderChannel` (not started: the
    test polls)."""

    edge: ModuleType
    key: Any
    public: Path
    channel: _FolderChannel
    rollouts: Path
    rollout: Any


def _signed_rollout(tmp_path: Path) -> _SignedRollout:
    edge = edge_module()
    key, public = _team_key(tmp_path)
    installed = edge.Model("onnx", _tiny_bundle(tmp_path / "installed", key, "1"))
    channel, rollouts = _FolderChannel(), tmp_path / "rollouts"
    return _SignedRollout(
        edge, key, public, channel, rollouts, edge.Rollout(channel, installed, "onnx", public, 3600, rollouts)
    )


def _team_key(tmp_path: Path) -> tuple[Any, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    public = tmp_path / "team.pub"
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return key, public


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sha256", "VICTIM"),  # an absolute path: it named the folder that was removed before any check
        ("sha256", ".."),
        ("sha256", ""),
        ("sha256", "AB" * 32),
        ("bundle", "/etc/hostname"),
        ("bundle", "bundles/../../outside.tar.gz"),
        ("bundle", "elsewhere/m.tar.gz"),
    ],
)
def test_edge_rollout_acts_on_no_unchecked_field_of_the_unsigned_channel_entry(
    tmp_path: Path, field: str, value: str
) -> None:
    """LINE.json is not signed: an entry whose sha256 is no digest, or whose bundle is no bundles/NAME.tar.gz, is
    refused before anything is fetched or removed, and not tried again."""
    victim = tmp_path / "victim"
    (victim / "keep").mkdir(parents=True)
    setup = _signed_rollout(tmp_path)
    channel, rollouts, rollout = setup.channel, setup.rollouts, setup.rollout
    channel.offer(_tiny_bundle(tmp_path / "v2", setup.key, "2"))
    assert channel.offered is not None
    channel.offered[field] = str(victim) if value == "VICTIM" else value
    (rollouts / "abcdef0123456789").mkdir(parents=True)  # a bundle folder of the rollouts ("." named the whole folder)
    try:
        rollout.poll_once()
        rollout.poll_once()
        assert channel.fetched == [] and len(rollout.refused) == 1, rollout.refused
        assert field in rollout.refused[0]
        assert (victim / "keep").is_dir() and rollouts.is_dir()
    finally:
        rollout.close()


def test_edge_rollout_refuses_another_lines_bundle_and_a_bundle_without_its_rule(tmp_path: Path) -> None:
    """Another line's bundle, signed by the same team, carries that line's rule and region: refused. So is a signed
    bundle without edge.json (it ran with the default rule)."""
    setup = _signed_rollout(tmp_path)
    edge, key, channel, rollout = setup.edge, setup.key, setup.channel, setup.rollout
    try:
        channel.offer(_tiny_bundle(tmp_path / "v2", key, "2", line="line-2"))
        rollout.poll_once()
        assert rollout.swap_if_ready() is None
        assert (
            len(rollout.refused) == 1 and "built for line 'line-2', this runner is line 'line-1'" in rollout.refused[0]
        )
        channel.offer(_tiny_bundle(tmp_path / "v3", key, "3", rule_file=False))
        rollout.poll_once()
        assert rollout.swap_if_ready() is None and "no edge.json" in rollout.refused[-1]
    finally:
        rollout.close()
    # A restart as another line does not run this line's last bundle.
    assert edge.rolled_out(setup.rollouts, setup.public, "m", "line-2") is None


def test_edge_rollout_waits_for_the_stream_to_take_one_bundle_before_fetching_the_next(tmp_path: Path) -> None:
    """A camera that stalls while two bundles are published: the second is fetched only once the first runs, so it
    is never swapped in from a folder tidied away, nor with a rule read after its checks."""
    setup = _signed_rollout(tmp_path)
    edge, channel, rollout = setup.edge, setup.channel, setup.rollout
    v2 = _tiny_bundle(tmp_path / "v2", setup.key, "2")
    v3 = _tiny_bundle(tmp_path / "v3", setup.key, "3", reject={"classes": ["dent"], "min_confidence": 0.7})
    try:
        channel.offer(v2)
        rollout.poll_once()
        channel.offer(v3)
        rollout.poll_once()  # v2 still waits: the stream has not taken it
        rollout._tidy()
        assert channel.fetched == ["v2"]
        model, rule = rollout.swap_if_ready() or (None, None)
        assert model is not None and model.version == "m v2" and rule == edge.RejectRule(None, 0.5)
        rollout.poll_once()
        rollout._tidy()
        model, rule = rollout.swap_if_ready() or (None, None)
        assert model is not None and model.version == "m v3"
        assert rule == edge.RejectRule(("dent",), 0.7) and model.root.is_dir()
    finally:
        rollout.close()


def test_edge_channel_bounds_an_archive_before_it_is_fetched_whole_or_unpacked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The archive the unsigned entry names is refused past its size as it downloads, and past the unpacked size its
    members' headers add up to, before any of it is unpacked."""
    import tarfile

    edge = edge_module()
    source = tmp_path / "payload"
    source.mkdir()
    (source / "big.bin").write_bytes(b"\0" * 300_000)  # compresses to almost nothing
    channel_dir = tmp_path / "channel"
    (channel_dir / "bundles").mkdir(parents=True)
    archive = channel_dir / "bundles" / "m-v2.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname="payload")
    entry = {"bundle": "bundles/m-v2.tar.gz", "sha256": hashlib.sha256(archive.read_bytes()).hexdigest()}
    channel = edge.Channel(str(channel_dir), "line-1")
    monkeypatch.setattr(edge, "MAX_UNPACKED_BYTES", 200_000)
    with pytest.raises(edge.BundleError, match="unpacks to"):
        channel.fetch(entry, tmp_path / "into")
    assert not (tmp_path / "into" / "payload").exists()
    monkeypatch.setattr(edge, "MAX_ARCHIVE_BYTES", archive.stat().st_size - 1)
    monkeypatch.setattr(edge, "CHUNK_BYTES", 64)
    with pytest.raises(edge.BundleError, match="larger than"):
        channel.fetch(entry, tmp_path / "into2")
    monkeypatch.setattr(edge, "MAX_ARCHIVE_BYTES", archive.stat().st_size)
    monkeypatch.setattr(edge, "MAX_UNPACKED_BYTES", 400_000)
    assert channel.fetch(entry, tmp_path / "into3").name == "payload"


def test_edge_runtime_the_bundle_lacks_is_named(tmp_path: Path) -> None:
    """int8 is bundled only when it passed the parity gate: asking for it without it was a bare StopIteration."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    edge = edge_module()
    root = _tiny_bundle(tmp_path / "bundle", Ed25519PrivateKey.generate(), "1")
    with pytest.raises(edge.BundleError, match=r"no openvino_int8 model .*use --runtime openvino"):
        edge.load_model("openvino_int8", root)
    (root / "model" / "model.onnx").write_bytes(b"damaged")
    with pytest.raises(edge.BundleError, match="cannot load the bundle's onnx model"):
        edge.load_model("onnx", root)


def test_edge_frames_keep_their_numbers_past_a_corrupt_frame(tmp_path: Path) -> None:
    """A frame of a video file the decoder cannot read is counted once, and the frames after it keep their numbers
    in the file (they shifted by one each: `conveyor edge score` credited a part's first decision to the part
    before), and the file's end is its end, not "damaged or truncated"."""
    import cv2

    edge = edge_module()
    video = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter.fourcc(*"MJPG"), 10, (64, 64))
    for index in range(20):
        writer.write(np.full((64, 64, 3), index * 10, np.uint8))
    writer.release()
    data = bytearray(video.read_bytes())
    starts = [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xD8]  # each frame's JPEG
    data[starts[10] : starts[10] + 200] = bytes(200)
    video.write_bytes(bytes(data))
    reader = edge.FrameReader(str(video), every_frame=True)
    frames = [(frame.index, round(int(frame.image[0, 0, 0]) / 10)) for frame in reader.frames()]
    reader.close()
    assert frames == [(index, index) for index in range(20) if index != 10]
    assert reader.unreadable == 1 and not reader.problems


def test_edge_camera_away_for_long_keeps_bounded_records_and_warnings(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A camera that never comes back is reopened every few seconds for as long as it is away (a week: 120,000
    times): the reader keeps its last problems and warns now and then, not once per reopen. Stand-in capture: no
    camera can be attached here; the pauses between reopens are skipped."""
    edge = edge_module()
    monkeypatch.setattr(edge.time, "sleep", lambda seconds: None)
    opened: list[int] = []

    class Away:
        def __init__(self) -> None:
            opened.append(1)
            if len(opened) > 1000:
                reader.ended.set()

        def isOpened(self) -> bool:
            return True

        def get(self, prop: int) -> float:
            return 0.0

        def read(self) -> tuple[bool, None]:
            return False, None

        def release(self) -> None:
            pass

    reader = edge.FrameReader("0", every_frame=True, reopen_after=1, open_capture=lambda source: Away())
    assert list(reader.frames()) == []
    reader.close()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "reopening" in line]
    assert reader.reopened >= 1000 and len(reader.problems) == edge.PROBLEMS_KEPT
    assert 10 <= len(warnings) <= 25, len(warnings)
    stats = edge.StreamStats()
    stats.latencies_ms.extend(range(edge.LATENCIES_KEPT + 10))
    assert len(stats.latencies_ms) == edge.LATENCIES_KEPT


@pytest.mark.parametrize(
    ("option", "value", "said"),
    [
        ("--mqtt", "localhost:abc", "the port 1-65535"),
        ("--mqtt", "localhost:99999", "the port 1-65535"),
        ("--queue", "-1", "must be a positive number"),
        ("--frames", "0", "must be a positive number"),
        ("--frames", "1.5", "invalid int value"),
        ("--poll", "-1", "must be a positive number"),
        ("--poll", "inf", "must be a positive number"),
        ("--conf", "1.5", "between 0 and 1"),
    ],
)
def test_edge_runner_refuses_bad_options_by_name(
    option: str, value: str, said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each was a traceback, a run that published nothing and exited 0, or (--poll -1) a channel read in a loop."""
    edge = edge_module()
    with pytest.raises(SystemExit) as exited:
        edge.main(["--stream", "0", option, value])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert option in err and said in err, err


def test_bundle_overwrite_replaces_only_a_bundle_and_keygen_never_exposes_the_key(tmp_path: Path) -> None:
    """`--out data --overwrite` removed whatever folder it named; the private key was written with the umask's
    permissions and chmod-ed after."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "labels.csv").write_text("a,b\n")
    with pytest.raises(FileExistsError, match="not a bundle"):
        bundle.build(Any, data, 0.25, overwrite=True)  # type: ignore[arg-type]  # refused before the files are read
    assert (data / "labels.csv").is_file()
    created: list[int] = []
    real_open = os.open

    def watched(path: Any, flags: int, mode: int = 0o777, *args: Any) -> int:
        if str(path).endswith(".key"):
            created.append(mode)
        return real_open(path, flags, mode, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "open", watched)
        private, _ = bundle.keygen(tmp_path / "keys")
    assert created == [0o600] and private.stat().st_mode & 0o777 == 0o600


def test_edge_log_is_at_the_bundles_threshold_whatever_conf_decides_at(tmp_path: Path) -> None:
    """`run.py --conf 0.9` decides at 0.9, but its prediction log keeps the detections at the bundle's threshold
    (serve.conf): the drift check compares the log with a profile made at serve.conf."""
    import cv2
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    edge = edge_module()
    model = edge.Model("onnx", _tiny_bundle(tmp_path / "bundle", Ed25519PrivateKey.generate(), "1"))
    video = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter.fourcc(*"MJPG"), 10, (28, 28))
    for seed in range(3):
        writer.write(np.random.default_rng(seed).integers(0, 256, (28, 28, 3), np.uint8))
    writer.release()
    logged: list[Any] = []
    log = SimpleNamespace(offer=lambda image, found, version: logged.append(found), close=lambda: None, counts=dict)
    reader = edge.FrameReader(str(video), every_frame=True)
    summary = edge.run_stream(model, reader, edge.RejectRule(), edge.JsonLines(), "line-1", 0.9, log=log)
    assert summary["frames"] == len(logged) == 3
    for found in logged:
        assert found.found == [d for d in found.candidate_dicts if d["confidence"] >= 0.25]
        assert any(d["confidence"] < 0.9 for d in found.found), "the log kept the decision's threshold"


def test_edge_reject_rule_the_model_can_meet() -> None:
    """A class the model does not know, or a confidence under the threshold the runner detects at, would never
    reject a part: `conveyor bundle` refuses them, and an empty class list (it meant any class) is refused."""
    from conveyor.settings import RejectSettings

    names = ["scratch", "dent", "stain"]
    bundle.check_rule(RejectSettings(classes=["scratch", "dent"], min_confidence=0.5), names, 0.25)
    with pytest.raises(ConfigError, match=r"'scratches' not among the model's classes \(scratch, dent, stain\)"):
        bundle.check_rule(RejectSettings(classes=["scratches"]), names, 0.25)
    with pytest.raises(ConfigError, match=r"min_confidence 0\.1 is under serve\.conf 0\.25"):
        bundle.check_rule(RejectSettings(min_confidence=0.1), names, 0.25)
    with pytest.raises(ValueError, match="at least 1 item"):
        RejectSettings(classes=[])


def test_an_exif_rotated_jpeg_reports_the_frame_its_detections_are_in() -> None:
    """OpenCV turns a JPEG upright by its EXIF orientation: /predict's width and height are that frame's (they were
    the stored frame's, so boxes and size disagreed)."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (320, 480, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif)
    decoded = decode_image(buffer.getvalue())
    assert check_image_bytes(buffer.getvalue(), ImageLimits()) == (decoded.shape[1], decoded.shape[0]) == (320, 480)


def test_the_api_answers_503_when_triton_is_away_and_counts_every_500() -> None:
    """The model metadata route with Triton not answering is a 503 with Retry-After (it was a 500), and a request
    that fails on a bug is counted in conveyor_http_requests as the 500 it becomes (it was not counted at all)."""
    import socket

    from fastapi.testclient import TestClient

    from serving.app import ApiConfig, create_app
    from serving.metrics import ServingMetrics
    from serving.swap import ModelSlot
    from serving.triton import TritonPorts

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    config = ApiConfig("m", TritonPorts(closed, closed, closed, "127.0.0.1"), ImageLimits(), 4, 4, None)
    app = create_app(config, ModelSlot(), ServingMetrics())
    with TestClient(app, raise_server_exceptions=False) as client:
        answer = client.get("/v2/models/m")
        assert answer.status_code == 503 and "Triton is not answering" in answer.json()["error"]
        assert answer.headers["Retry-After"]
        app.state.server.slot = None  # a bug in a handler
        assert client.get("/v2/health/ready").status_code == 500
        app.state.server.slot = ModelSlot()
        page = client.get("/metrics").text
    assert 'conveyor_http_requests_total{route="/v2/models/{name}",status="503"} 1.0' in page
    assert 'conveyor_http_requests_total{route="/v2/health/ready",status="500"} 1.0' in page


def test_the_api_passes_on_only_the_protocol_and_inflates_bodies_within_the_limit() -> None:
    """`/v2/{path}` passed every path to Triton with its token: a client could load a model, that is, run code on the
    server (`/v2/repository/models/X/load` with a model.py). Only the protocol's routes are passed on now. A gzipped
    body went to Triton, which inflated it without limit (300 MB from 0.3 MB): the API inflates it, against the limit
    of a plain body. The open health route names no error it quotes (a registry URL with its password)."""
    import gzip
    import socket
    import zlib

    from fastapi.testclient import TestClient

    from serving.app import ApiConfig, create_app, public_reason
    from serving.metrics import ServingMetrics
    from serving.swap import ModelSlot
    from serving.triton import TritonPorts

    with socket.socket() as probe:  # Triton is not there: nothing may reach it in this test
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    limits = ImageLimits(max_bytes=1000)
    app = create_app(ApiConfig("m", TritonPorts(closed, closed, closed, "127.0.0.1"), limits, 4, 4, None), ModelSlot(),
                     ServingMetrics())  # fmt: skip
    with TestClient(app, raise_server_exceptions=False) as client:
        for method, path in (
            ("POST", "/v2/repository/models/pwn/load"),
            ("POST", "/v2/repository/models/m/unload"),
            ("GET", "/v2/logging"),
            ("POST", "/v2/systemsharedmemory/region/x/register"),
            ("GET", "/v2/trace/setting"),
            ("GET", "/v2/models/m/stats"),
            ("GET", "/v2/models/m/versions/1/stats"),
        ):
            answer = client.request(method, path, json={})
            assert answer.status_code == 404 and "not served here" in answer.json()["error"], (path, answer.text)
        assert client.get("/v2/models/m/infer").status_code == 405
        assert client.post("/v2/models/other/infer", json={}).status_code == 404
        # The protocol's routes still reach Triton (away here: 503, not a refusal).
        assert client.get("/v2/models/m/versions/1/config").status_code == 503
        assert client.get("/v2").status_code == 503

        def v2_get(body: bytes, encoding: str) -> Any:
            return client.request("GET", "/v2/models/m/config", content=body, headers={"Content-Encoding": encoding})

        limit = 1000 * 4
        bomb = gzip.compress(b"\0" * 3_000_000)  # 3 kB that inflate to 3 MB
        assert len(bomb) < limit
        answer = v2_get(bomb, "gzip")
        assert answer.status_code == 413 and "inflates past the limit of 4000 bytes" in answer.json()["error"]
        assert v2_get(zlib.compress(b"\0" * 5000), "deflate").status_code == 413
        assert v2_get(gzip.compress(b"{}")[:-6], "gzip").json()["error"].startswith("the body is cut short")
        assert v2_get(b"not gzip at all", "gzip").json()["error"].startswith("the body is not valid gzip")
        assert v2_get(b"{}", "br").status_code == 415
        assert v2_get(gzip.compress(b"{}"), "gzip").status_code == 503  # inflated and passed on: Triton is away

        app.state.server.slot.state.reason = "registry unreachable: API request to http://plant:hunter2@mlflow:5000/"
        said = client.get("/v2/health/ready").json()["reason"]
        assert said.startswith("registry unreachable; the details: GET /v2/models/") and "hunter2" not in said
    assert public_reason("no model loaded yet") == "no model loaded yet"


def test_errors_quoting_a_url_lose_its_credentials_and_tracebacks_stay_on_the_server() -> None:
    from conveyor.errors import without_credentials
    from serving.app import _without_traceback

    said = without_credentials("API request to http://plant:hunter2@127.0.0.1:9/api failed; s3://key@bucket/x")
    assert said == "API request to http://***@127.0.0.1:9/api failed; s3://***@bucket/x"
    assert without_credentials("http://mlflow:5000/api") == "http://mlflow:5000/api"
    body = json.dumps({"error": "Failed to process the request(s): Traceback (most recent call last):\n  File ..."})
    assert json.loads(_without_traceback(body.encode())) == {"error": "Failed to process the request(s)"}
    plain = json.dumps({"error": "unexpected shape for input 'image'"}).encode()
    assert _without_traceback(plain) == plain and _without_traceback(b"not json") == b"not json"


def test_a_slot_names_classes_by_the_version_that_answered() -> None:
    """A request answered by the version being swapped out is named by its classes, not the new version's."""
    from types import SimpleNamespace

    from serving.swap import ModelSlot

    slot = ModelSlot()
    for version, names in (("1", ["scratch", "dent", "stain"]), ("2", ["dent", "scratch"])):
        slot.swap(SimpleNamespace(version=version, name="m", loaded_at=0.0, card=SimpleNamespace(names=names)))  # type: ignore[arg-type]
    assert slot.names("1") == ["scratch", "dent", "stain"] and slot.names("2") == ["dent", "scratch"]
    assert slot.names("9") is None
    # v1 promoted again after eighteen others, then swapped out: requests it answered are still named by its classes
    # (it was the oldest entry, and the next swap evicted it).
    for version in [*(str(v) for v in range(3, 21)), "1", "21"]:
        slot.swap(SimpleNamespace(version=version, name="m", loaded_at=0.0, card=SimpleNamespace(names=["a"])))  # type: ignore[arg-type]
    assert slot.names("1") == ["a"] and slot.names("2") is None


def test_sigterm_ends_a_stream_whose_camera_delivers_nothing() -> None:
    """A service stop (SIGTERM) while the camera sends no frames: the runner ends with its summary (it waited for a
    frame forever, until SIGKILL lost its queued decisions). In a process of its own: the signal is real."""
    script = f"""
import importlib.util, json, sys, threading
from types import SimpleNamespace
spec = importlib.util.spec_from_file_location("edge_run", {str(EDGE)!r})
edge = importlib.util.module_from_spec(spec)
sys.modules["edge_run"] = edge
spec.loader.exec_module(edge)

class Announcing(threading.Condition):  # says when the loop waits for a frame: the handler is installed by then
    said = False
    def wait(self, timeout=None):
        if not self.said:
            self.said = True
            print("waiting", flush=True)
        return super().wait(timeout)

reader = object.__new__(edge.FrameReader)  # a camera that never delivers: its reader thread waits for the end
reader.ended, reader._newest, reader._ready = threading.Event(), None, Announcing()
reader.skipped = reader.unreadable = reader.reopened = 0
reader.error = None
reader.capture = SimpleNamespace(release=lambda: None)
reader._thread = threading.Thread(target=reader.ended.wait, daemon=True)
reader._thread.start()
print(json.dumps(edge.run_stream(None, reader, None, edge.JsonLines(), "line-1")), flush=True)
"""
    runner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert runner.stdout is not None and runner.stdout.readline().strip() == "waiting"
        runner.send_signal(signal.SIGTERM)
        out, err = runner.communicate(timeout=30)  # without the fix: it never ends, and this times out
    finally:
        if runner.poll() is None:
            runner.kill()
    assert runner.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1])["frames"] == 0


def test_a_bundle_refuses_files_it_would_load_unlisted_and_leaves_the_rest(tmp_path: Path) -> None:
    """No checksum or signature covers a file the manifest does not list: where the runner or Python would load it
    (the model folder, a module or package beside run.py, a bytecode cache) the bundle is refused; the runner's
    own log and a shell's nohup.out are left alone."""
    import hashlib

    edge = edge_module()
    (tmp_path / "run.py").write_text("print('runner')\n")
    digest = hashlib.sha256((tmp_path / "run.py").read_bytes()).hexdigest()
    (tmp_path / "manifest.json").write_text(json.dumps({"sha256": {"run.py": digest}}))
    for harmless in ("nohup.out", "decisions.jsonl", "edge-log/date=2026-12-06/part-1.parquet"):
        (tmp_path / harmless).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / harmless).write_text("x")
    assert edge.verify(tmp_path)["sha256"] == {"run.py": digest}
    for planted in ("cv2.py", "numpy/__init__.py", "model/openvino_int8/model.xml", "__pycache__/run.cpython-311.pyc"):
        (tmp_path / planted).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / planted).write_text("x")
        with pytest.raises(edge.BundleError, match=rf"does not list \({re.escape(planted)}\)"):
            edge.verify(tmp_path)
        (tmp_path / planted).unlink()


def test_an_s3_channel_that_cannot_be_reached_says_which_and_why(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rollout channel on S3 without credentials, or on a store that is down, is a ChannelError naming the channel
    (it was a NoCredentialsError or EndpointConnectionError traceback, and `conveyor rollback` then never said that
    the registry had rolled back and the channel had not)."""
    from conveyor.net import free_port

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    channel = bundle.ChannelStore("s3://conveyor/channel")
    with pytest.raises(bundle.ChannelError, match=r"edge channel s3://conveyor/channel: no S3 credentials"):
        channel.read("line-1.json")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    with pytest.raises(bundle.ChannelError, match=r"edge channel s3://conveyor/channel: .*the store is unreachable"):
        channel.write("line-1.json", b"{}")


def test_a_version_that_failed_to_load_is_tried_again_later_and_afresh_when_promoted_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The artifact store down for longer than three looks: the version is tried again every `retry_seconds`, and
    loads once the store is back (the server stayed unready for good). A version that failed, rolled back from and
    promoted again is tried afresh. The registry and the store are stood in for here (the watcher's policy is what
    is tested; test_serving loads real versions from a real MLflow server)."""
    from serving import swap
    from serving.metrics import ServingMetrics

    champion = {"version": "7"}
    store_up = {"value": False}
    loads: list[str] = []

    def fetch(client: Any, version: Any, cache: Path) -> Any:
        loads.append(version.version)
        if not store_up["value"]:
            raise ConnectionError("S3 unreachable")
        return version

    def load(files: Any, runtime: str, workers: int, conf: float) -> Any:
        return SimpleNamespace(
            name="m", version=files.version, runtime=runtime, card=SimpleNamespace(names=["scratch"]),
            loaded_at=time.time(), load_seconds=0.1,
        )  # fmt: skip

    monkeypatch.setattr(swap.source, "resolve_version", lambda *_: SimpleNamespace(version=champion["version"]))
    monkeypatch.setattr(swap.source, "fetch", fetch)
    monkeypatch.setattr(swap.source, "load", load)
    slot = swap.ModelSlot()
    no_client: Any = lambda: None  # noqa: E731  (resolve_version is stood in: no registry is asked)
    watcher = swap.RegistryWatcher(no_client, "m", None, tmp_path, "onnx", 1, 0.25, 3600, slot, ServingMetrics())
    for _ in range(5):
        watcher.check()
    assert loads == ["7"] * swap.MAX_ATTEMPTS and not slot.ready  # then it waits: not a download every look
    assert "v7 failed to load (attempt 3; tried again in 300 s): S3 unreachable" in slot.state.reason
    store_up["value"] = True
    watcher.retry_seconds = 0  # the wait has passed
    watcher.check()
    assert slot.ready and slot.current.version == "7"  # it stayed unready until the server was restarted

    store_up["value"] = False
    champion["version"] = "8"
    for _ in range(swap.MAX_ATTEMPTS):
        watcher.check()
    watcher.retry_seconds = 3600
    champion["version"] = "7"  # rolled back to the version serving
    watcher.check()
    store_up["value"] = True
    champion["version"] = "8"  # the store fixed, v8 promoted again: loaded at once
    watcher.check()
    assert slot.current.version == "8", slot.state.last_error


def test_the_model_cache_keeps_the_served_version_and_the_one_before(tmp_path: Path) -> None:
    """Every champion stayed in the model cache for good (on Kubernetes a 5 GiB emptyDir shared with the prediction
    log: the pod was evicted after enough promotions), and downloads a kill cut short stayed beside them."""
    from pipelines.model_source import STALE_DOWNLOAD_SECONDS, prune

    cache = tmp_path / "models"
    for version in ("1", "2", "3", "4"):
        (cache / "m" / version).mkdir(parents=True)
        (cache / "m" / version / "MLmodel").write_text("flavors: {}")
    (cache / "other" / "1").mkdir(parents=True)  # another model's (batch predictions of another project's name)
    killed, running = cache / ".download-killed", cache / ".download-running"
    for folder in (killed, running):
        folder.mkdir()
    old = time.time() - STALE_DOWNLOAD_SECONDS - 60
    os.utime(killed, (old, old))
    removed = prune(cache, "m", {"4", "3"})
    assert sorted(p.name for p in removed) == [".download-killed", "1", "2"]
    assert sorted(p.name for p in (cache / "m").iterdir()) == ["3", "4"]
    assert running.is_dir() and (cache / "other" / "1").is_dir()
    assert prune(tmp_path / "nothing-yet", "m", {"1"}) == []


def test_preprocessed_requests_are_split_to_the_batch_a_static_model_takes(tmp_path: Path) -> None:
    """A model that takes one frame at a time (an ONNX export without a dynamic batch, a TensorRT engine): two
    preprocessed frames in one batch are inferred one by one (ONNX Runtime refused the whole batch, and every request
    in it failed). A real ONNX Runtime session on a 1-node model with a static batch of 1."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from pipelines.inference import Detector
    from pipelines.runtimes import OnnxRuntime
    from serving.metrics import ServingMetrics
    from serving.model import ServedModel
    from serving.swap import ModelSlot

    root = _tiny_bundle(tmp_path / "bundle", Ed25519PrivateKey.generate(), "1")
    runtime = OnnxRuntime(root / "model" / "model.onnx", threads=1)
    assert runtime.max_batch == 1
    card = ModelCard(["scratch", "dent", "stain"], 28)
    detector = Detector(runtime, card)
    slot = ModelSlot()
    slot.current = SimpleNamespace(detectors=[detector], card=card, version="1")  # type: ignore[assignment]
    served = ServedModel(slot, 0, ServingMetrics(), None, ImageLimits())
    frames = np.random.default_rng(0).random((2, 3, 28, 28), dtype=np.float32)
    responses = served.execute_tensors([frames, frames[1:]])  # two requests, three frames
    alone = [detector.detect_tensors(frames[k : k + 1])[0] for k in (0, 1)]
    assert [list(r["num_detections"].reshape(-1)) for r in responses] == [
        [len(alone[0]), len(alone[1])],
        [len(alone[1])],
    ]
    assert all(r["error"].reshape(-1).tolist() == [b""] * len(r["error"]) for r in responses)
    assert len(alone[0]) > 0


def test_a_state_folder_that_is_not_writable_is_named_with_what_to_do(tmp_path: Path) -> None:
    """Turning the prediction log off was suggested for the model cache too, where it changes nothing."""
    from serving.server import StateNotWritableError, _check_writable

    blocked = tmp_path / "blocked"
    blocked.write_text("a file where a folder should be")
    with pytest.raises(StateNotWritableError) as cache:
        _check_writable(blocked / "models", "the model cache")
    assert "the model cache at" in str(cache.value) and "prediction log" not in str(cache.value)
    with pytest.raises(StateNotWritableError, match=r"or turn the prediction log off"):
        _check_writable(blocked / "log", "the prediction log", ", or turn the prediction log off")


def test_an_image_that_could_not_be_read_is_tried_again_on_a_resume(tmp_path: Path) -> None:
    """Permission denied on one image wrote its error line, and a resumed run took it as done: the image was never
    predicted. Now its line says `retry`, and the resume removes it and predicts the image; an image whose bytes are
    bad stays done. A real detector (ONNX Runtime on a 1-node model); the reader stands in for a file that is
    unreadable once (root reads any file here)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from rich.console import Console

    from pipelines.inference import Detector
    from pipelines.runtimes import OnnxRuntime

    root = _tiny_bundle(tmp_path / "bundle", Ed25519PrivateKey.generate(), "1")
    card = ModelCard(["scratch", "dent", "stain"], 28)
    model: Any = SimpleNamespace(
        name="m", version="1", detectors=[Detector(OnnxRuntime(root / "model/model.onnx"), card)]
    )
    images = [str(tmp_path / name) for name in ("a.png", "b.png", "bad.jpg")]
    for path in images[:2]:
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28, 3), np.uint8)).save(path)
    Path(images[2]).write_bytes(b"not a jpeg")
    denied = {images[1]}

    def read(path: str) -> bytes:
        if path in denied:
            raise PermissionError(13, "Permission denied", path)
        return Path(path).read_bytes()

    out = tmp_path / "out.jsonl"
    quiet = Console(file=io.StringIO())
    first = batch.predict(model, images, out, 2, ImageLimits(), quiet, read)
    assert first.failed == 2
    said = {Path(r["image"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    assert said["b.png"]["retry"] is True and "retry" not in said["bad.jpg"]
    assert batch.done_images(out) == {images[0], images[2]}  # and b.png's line is gone from the file
    denied.clear()
    again = batch.predict(model, images, out, 2, ImageLimits(), quiet, read)
    assert (again.images, again.skipped, again.failed) == (1, 2, 0)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(Path(r["image"]).name for r in lines) == ["a.png", "b.png", "bad.jpg"]
    assert "detections" in next(r for r in lines if r["image"] == images[1])
    # Resumed with another version: its images were skipped, the file kept v1's results under a v2 run's summary.
    other: Any = SimpleNamespace(name="m", version="2", detectors=model.detectors)
    with pytest.raises(batch.OutputError, match=r"holds predictions of m v1, not v2: .* resume with --model 1"):
        batch.predict(other, images, out, 2, ImageLimits(), quiet, read)
    assert [json.loads(line) for line in out.read_text().splitlines()] == lines  # untouched
