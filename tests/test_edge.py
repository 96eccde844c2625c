"""The line at the edge: the bundle's runner on a camera stream (the line simulator's video), one reject decision per
frame, over a real MQTT broker (Debian's mosquitto) that is stopped and started again, and signed bundles rolled out
through a channel in a folder and in a real S3 store (nanio) while the stream runs.

No camera can be plugged in here: the reader's reconnect is the one part checked against a stand-in capture (a
class that fails as an unplugged camera does), and the test says so."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conveyor.net import free_port, wait_until
from conveyor.settings import EdgeSettings, RejectSettings
from pipelines.inference import ModelCard
from pipelines.model_source import ModelFiles
from serving import bundle
from serving.line_simulator import LineVideo, load_truth, score, simulate
from tests.conftest import VENV_BIN, nanio_store
from tests.serving_support import export_checkpoint

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
PYTHON = str(VENV_BIN / "python")


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> ModelFiles:
    """The tests' checkpoint exported as a registered version's files (ONNX, OpenVINO, metadata)."""
    root = tmp_path_factory.mktemp("edge-model")
    artifacts = {k: Path(v) for k, v in export_checkpoint(root).items()}
    return ModelFiles("conveyor-defect-detector", "1", root, ModelCard.load(artifacts["metadata"]), artifacts)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return bundle.keygen(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def line(tmp_path_factory: pytest.TempPathFactory) -> LineVideo:
    return simulate(tmp_path_factory.mktemp("line"), parts=16, fps=10, frames_per_part=4)


def _bundle(files: ModelFiles, out: Path, key: Path | None, version: str = "1", **edge: Any) -> bundle.Bundle:
    return bundle.build(replace(files, version=version), out, 0.25, EdgeSettings(**edge), private_key=key)


def _run(root: Path, *args: str, timeout: float = 240) -> tuple[list[dict[str, Any]], dict[str, Any], str]:
    """The runner in a process of its own: its decisions (stdout), its summary and its stderr."""
    result = subprocess.run(
        [PYTHON, str(root / "run.py"), *args], capture_output=True, text=True, timeout=timeout, cwd=root
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    summary = next((json.loads(line) for line in result.stderr.splitlines() if '"summary"' in line), None)
    summary = summary or next(d for d in lines if d.get("summary"))
    return [d for d in lines if "frame" in d], summary, result.stderr


# --- decisions --------------------------------------------------------------------------------------------------


def test_the_reject_rule_follows_classes_confidence_area_and_region() -> None:
    from serving.edge.run import RejectRule

    def box(name: str, conf: float, x0: float, y0: float, x1: float, y1: float) -> dict[str, Any]:
        return {"class_name": name, "confidence": conf, "box": [x0, y0, x1, y1]}

    rule = RejectRule(("scratch",), 0.5, 100.0, (0.25, 0.0, 1.0, 1.0))
    assert rule.reasons([box("scratch", 0.9, 100, 10, 120, 20)], 200, 100)  # 200 px², centre inside
    assert not rule.reasons([box("dent", 0.9, 100, 10, 120, 20)], 200, 100)  # another class
    assert not rule.reasons([box("scratch", 0.4, 100, 10, 120, 20)], 200, 100)  # not sure enough
    assert not rule.reasons([box("scratch", 0.9, 100, 10, 105, 20)], 200, 100)  # too small: 50 px²
    assert not rule.reasons([box("scratch", 0.9, 0, 10, 40, 20)], 200, 100)  # centre left of the region
    # `run.py --conf 0.9` detects from 0.9 up: a rule at 0.5 would never reject at 0.5, and the runner says so.
    assert rule.unmet_below(0.25) is None and rule.unmet_below(0.5) is None
    assert "min_confidence 0.5 is below the detection threshold 0.9" in (rule.unmet_below(0.9) or "")
    with pytest.raises(ValueError, match="roi"):
        RejectSettings(roi=(0.5, 0, 0.4, 1))


def test_every_frame_decided_on_the_simulated_line_and_scored(
    model_files: ModelFiles, line: LineVideo, tmp_path: Path
) -> None:
    built = _bundle(model_files, tmp_path / "bundle", None, reject={"min_confidence": 0.5})
    decisions, summary, _ = _run(built.directory, "--stream", str(line.video), "--every-frame")
    assert [d["frame"] for d in decisions] == list(range(line.frames))
    assert summary["frames"] == line.frames and summary["skipped"] == 0
    assert all(d["model"] == "conveyor-defect-detector v1" and d["line"] == "line-1" for d in decisions)
    # Each decision is the rule applied to the runner's own detections of that frame.
    import cv2

    from serving.edge.run import Model, RejectRule

    model, rule = Model("openvino", built.directory), RejectRule.load(built.directory)
    capture = cv2.VideoCapture(str(line.video))
    for decision in decisions[:8]:
        ok, frame = capture.read()
        assert ok
        assert decision["reject"] == bool(rule.reasons(model.detect(frame), frame.shape[1], frame.shape[0]))
    result = score(decisions, load_truth(line.truth))
    assert result.parts == 16 and result.undecided == 0
    # The model decides, not a constant or a coin: a decider that never rejects errs on every defective part, one that
    # always rejects on every good part, and a coin on about half of both.
    assert 0 < result.rejected < result.parts, result
    assert result.missed_rejects + result.false_rejects < min(result.defective, result.parts - result.defective), result


def test_a_camera_paced_stream_takes_the_newest_frame(model_files: ModelFiles, tmp_path: Path) -> None:
    """A video plays at its frame rate, like a camera: at 240 fps (4 ms a frame) no CPU keeps up, so frames are
    skipped (counted), and every decided frame is newer than the one before. (At 60 fps a host that infers in under
    17 ms would skip none.)"""
    fast = simulate(tmp_path / "fast", parts=24, fps=240, frames_per_part=5)
    built = _bundle(model_files, tmp_path / "bundle", None)
    decisions, summary, _ = _run(built.directory, "--stream", str(fast.video))
    frames = [d["frame"] for d in decisions]
    assert frames == sorted(set(frames)) and summary["skipped"] > 0
    assert summary["frames"] + summary["skipped"] == fast.frames
    assert summary["latency_p99_ms"] >= summary["latency_p50_ms"] > 0


# --- MQTT ---------------------------------------------------------------------------------------------------------


class Broker:
    """Debian's mosquitto on a free port, persisting its sessions so that a restart keeps a subscriber's queue."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        root.mkdir(parents=True, exist_ok=True)
        (root / "mosquitto.conf").write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {root}/\nautosave_interval 1\n"
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.root / "mosquitto.log").open("ab")
        self.process = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.root / "mosquitto.conf")], stdout=log, stderr=log, start_new_session=True
        )
        from conveyor.net import port_free

        wait_until(lambda: not port_free(self.port), 10, "mosquitto to listen")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(10)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    if not Path(MOSQUITTO).is_file():
        pytest.skip("mosquitto is not installed (apt-get install mosquitto; `make test` installs it as root)")
    found = Broker(tmp_path / "mosquitto")
    found.start()
    try:
        yield found
    finally:
        found.stop()


class Subscriber:
    """A persistent session (clean_session False): the broker keeps its QoS 1 messages while it is away."""

    def __init__(self, port: int, topic: str) -> None:
        import paho.mqtt.client as mqtt

        self.received: list[dict[str, Any]] = []
        self.subscribed = threading.Event()  # set by the broker's SUBACK: from then on it keeps the topic's messages
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="line-test", clean_session=False)
        self.client.on_connect = lambda client, *_: client.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = lambda _c, _u, message: self.received.append(json.loads(message.payload))
        self.client.reconnect_delay_set(1, 2)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_decisions_arrive_in_order_through_a_broker_that_restarts(
    model_files: ModelFiles, line: LineVideo, broker: Broker, tmp_path: Path
) -> None:
    from serving.edge.run import topic_of

    built = _bundle(model_files, tmp_path / "bundle", None, line="press-7")
    subscriber = Subscriber(broker.port, topic_of("press-7"))
    assert subscriber.subscribed.wait(10), "the broker did not acknowledge the subscription"
    mqtt = ["--mqtt", f"127.0.0.1:{broker.port}"]
    runner = subprocess.Popen(
        [PYTHON, str(built.directory / "run.py"), "--stream", str(line.video), "--every-frame", "--paced", *mqtt],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,  # its prediction log (edge-log/) lands there, as on a device
    )
    try:
        wait_until(lambda: len(subscriber.received) >= 5, 120, "the first decisions")
        broker.stop()  # the broker goes away mid-stream; decisions made meanwhile wait in the runner's queue
        down = time.time()
        time.sleep(3)
        broker.start()
        up = time.time()
        out, err = runner.communicate(timeout=180)
        assert runner.returncode == 0, err[-3000:]
        wait_until(lambda: {d["frame"] for d in subscriber.received} >= set(range(line.frames)), 60, "every decision")
    finally:
        if runner.poll() is None:
            runner.kill()
        subscriber.close()
    summary = json.loads(next(s for s in out.splitlines() if '"summary"' in s))
    assert summary["dropped"] == 0 and summary["published"] == line.frames
    frames = [d["frame"] for d in subscriber.received]
    firsts = [f for i, f in enumerate(frames) if f not in frames[:i]]  # QoS 1 is at least once: a resend may repeat
    assert firsts == list(range(line.frames)), "decisions out of order"
    assert all(d["line"] == "press-7" for d in subscriber.received)
    # The stream (a 10 fps camera) went on deciding while the broker was away: those decisions were queued.
    assert sum(down < d["time"] < up for d in subscriber.received) >= 15


def test_a_full_queue_drops_the_excess_and_says_how_many(
    model_files: ModelFiles, line: LineVideo, tmp_path: Path
) -> None:
    """No broker at all: the queue (5) fills, the rest are dropped and counted, and the runner still decides every
    frame and ends."""
    built = _bundle(model_files, tmp_path / "bundle", None)
    nobody = free_port()
    _, summary, err = _run(
        built.directory, "--stream", str(line.video), "--every-frame", "--mqtt", f"127.0.0.1:{nobody}", "--queue", "5"
    )
    assert summary["frames"] == line.frames
    assert summary["published"] == 5 and summary["dropped"] == line.frames - 5
    assert "not acknowledged by the broker" in err


def test_two_cameras_on_one_line_are_two_clients_and_their_decisions_say_which(
    model_files: ModelFiles, line: LineVideo, broker: Broker, tmp_path: Path
) -> None:
    """Two runners on one line (two cameras over the belt) publish to its topic at once. Each is its own MQTT client:
    a broker closes a client when another connects under its id, so one shared id would knock them off in turn. Every
    frame of each arrives, named by its camera."""
    from serving.edge.run import topic_of

    built = _bundle(model_files, tmp_path / "bundle", None, line="press-7")
    subscriber = Subscriber(broker.port, topic_of("press-7"))
    assert subscriber.subscribed.wait(10), "the broker did not acknowledge the subscription"
    cameras = ("cam-top", "cam-side")
    runners = [
        subprocess.Popen(
            [
                PYTHON,
                str(built.directory / "run.py"),
                "--stream",
                str(line.video),
                "--every-frame",
                "--no-log",
                "--mqtt",
                f"127.0.0.1:{broker.port}",
                "--device",
                camera,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        for camera in cameras
    ]
    try:
        ended = [runner.communicate(timeout=180) for runner in runners]
        assert [runner.returncode for runner in runners] == [0, 0], [err[-3000:] for _, err in ended]

        def frames_of(camera: str) -> set[int]:
            return {d["frame"] for d in subscriber.received if d["device"] == camera}

        wait_until(lambda: all(frames_of(c) >= set(range(line.frames)) for c in cameras), 60, "every decision")
    finally:
        for runner in runners:
            if runner.poll() is None:
                runner.kill()
        subscriber.close()
    for out, _ in ended:
        summary = json.loads(next(s for s in out.splitlines() if '"summary"' in s))
        assert summary["published"] == line.frames and summary["dropped"] == 0
    assert {d["device"] for d in subscriber.received} == set(cameras)
    assert all(d["line"] == "press-7" for d in subscriber.received)
    said = (broker.root / "mosquitto.log").read_text()
    assert all(f"as conveyor-edge-press-7-{camera} " in said for camera in cameras), said[-2000:]
    assert "already connected, closing old connection" not in said, said[-2000:]


# --- rollout ------------------------------------------------------------------------------------------------------


def _tampered(good: bundle.Bundle, out: Path) -> bundle.Bundle:
    """The good bundle with its reject rule changed after signing."""
    shutil.copytree(good.directory, out)
    (out / "edge.json").write_text('{"reject": {"min_confidence": 0.01}}')
    archive = out.with_name(out.name + ".tar.gz")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(out, arcname=out.name)
    return bundle.Bundle(out, archive, 0, 0.0)


def _rollout_under_a_stream(
    files: ModelFiles, keys: tuple[Path, Path], channel: str, video: Path, tmp_path: Path, env: dict[str, str]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """v1 runs every frame of a video played at its rate; a tampered bundle and another model's are published and
    refused, an unsigned one cannot be published, then v2 is published and swapped in while frames keep coming."""
    private, public = keys
    v1 = _bundle(files, tmp_path / "v1", private)
    v2 = _bundle(files, tmp_path / "v2", private, version="2")
    other = bundle.build(
        replace(files, name="another-model", version="9"), tmp_path / "other", 0.25, private_key=private
    )
    unsigned = _bundle(files, tmp_path / "unsigned", None, version="3")
    bundle.publish(v1, channel, "line-1")
    follow = ["--channel", channel, "--public-key", str(public), "--poll", "0.2"]
    runner = subprocess.Popen(
        [PYTHON, str(v1.directory / "run.py"), "--stream", str(video), "--every-frame", "--paced", *follow],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,  # its prediction log (edge-log/) lands there, as on a device
    )
    out: list[str] = []
    err: list[str] = []
    readers = [
        threading.Thread(target=lambda: out.extend(runner.stdout or []), daemon=True),
        threading.Thread(target=lambda: err.extend(runner.stderr or []), daemon=True),
    ]
    for reader in readers:
        reader.start()
    try:
        wait_until(lambda: len(out) >= 5, 120, "the first decisions")
        bundle.publish(_tampered(v2, tmp_path / "tampered"), channel, "line-1")
        wait_until(lambda: sum("refused bundle" in line for line in err) >= 1, 60, "the tampered bundle refused")
        bundle.publish(other, channel, "line-1")
        wait_until(lambda: sum("refused bundle" in line for line in err) >= 2, 60, "another model's bundle refused")
        with pytest.raises(bundle.ChannelError, match="not signed"):
            bundle.publish(unsigned, channel, "line-1")
        bundle.publish(v2, channel, "line-1")
        assert runner.wait(timeout=300) == 0, "".join(err)[-3000:]
    finally:
        if runner.poll() is None:
            runner.kill()
        for reader in readers:
            reader.join(timeout=10)
    lines = [json.loads(line) for line in out if line.startswith("{")]
    summary = json.loads(next(s for s in err if '"summary"' in s))
    return [d for d in lines if "frame" in d], summary


def test_a_signed_bundle_is_swapped_in_under_a_running_stream_and_bad_ones_refused(
    model_files: ModelFiles, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    video = simulate(tmp_path / "line", parts=50, fps=20, frames_per_part=4)  # 10 s at its rate
    decisions, summary = _rollout_under_a_stream(
        model_files, keys, str(tmp_path / "channel"), video.video, tmp_path, dict(os.environ)
    )
    assert [d["frame"] for d in decisions] == list(range(video.frames)), "a frame left undecided"
    models = [d["model"] for d in decisions]
    switch = models.index("conveyor-defect-detector v2")
    assert set(models[:switch]) == {"conveyor-defect-detector v1"}
    assert set(models[switch:]) == {"conveyor-defect-detector v2"}
    assert summary["swaps"] == ["conveyor-defect-detector v2"]
    refusals = " ".join(summary["refused"])
    assert "bundle damaged: edge.json" in refusals
    assert "for model 'another-model', this line runs 'conveyor-defect-detector'" in refusals
    # Restarted (a reboot), the runner installed as v1 decides on v2, the bundle it last took from the channel, from
    # its first frame; the refused bundles and v1 were not kept in its rollout folder (the working directory's).
    rollouts = tmp_path / "edge-rollouts"
    assert len([p for p in rollouts.iterdir() if p.is_dir()]) == 1
    public = keys[1]
    restarted = subprocess.run(
        [PYTHON, str(tmp_path / "v1" / "run.py"), "--stream", str(video.video), "--every-frame", "--frames", "3",
         "--channel", str(tmp_path / "channel"), "--public-key", str(public), "--no-log"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "running conveyor-defect-detector v2, the bundle last taken from the channel" in restarted.stderr
    restarted_on = {json.loads(line)["model"] for line in restarted.stdout.splitlines() if '"frame"' in line}
    assert restarted_on == {"conveyor-defect-detector v2"}, restarted.stdout[-2000:]
    # The line follows a registry rollback: back to the newest entry it had of v1.
    entry = bundle.roll_back_channel(str(tmp_path / "channel"), "line-1", "1")
    assert entry["version"] == "1" and bundle.current(str(tmp_path / "channel"), "line-1") == entry
    with pytest.raises(bundle.ChannelError, match="never ran v7"):
        bundle.roll_back_channel(str(tmp_path / "channel"), "line-1", "7")


def test_a_rollout_survives_a_damaged_archive_a_failed_record_a_lost_folder_and_an_entry_for_what_runs(
    model_files: ModelFiles, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    """The rollout thread and the swap, in this process, on a folder channel. Four ways they failed:
    - an archive cut short when it was published raised EOFError, which no refusal caught: it was fetched again (tens
      of MB) at every poll, forever;
    - a swap whose record for the next start could not be written (a full disk) raised out of the stream loop, and
      the runner died with the bundle it had taken;
    - an entry naming the running bundle's archive, without its manifest hash, deleted the running bundle's folder
      to fetch it again;
    - the rollout folder removed under the runner killed the rollout thread for good."""
    from serving.edge.run import ROLLOUT_STATE, Channel, Model, Rollout

    private, public = keys
    v1 = _bundle(model_files, tmp_path / "v1", private)
    v2 = _bundle(model_files, tmp_path / "v2", private, version="2")
    v3 = _bundle(model_files, tmp_path / "v3", private, version="3")
    channel = tmp_path / "channel"
    rollouts = tmp_path / "rollouts"
    rollout = Rollout(Channel(str(channel), "line-1"), Model("onnx", v1.directory), "onnx", public, 0.1, rollouts)

    v3.archive.write_bytes(v3.archive.read_bytes()[:-4096])  # cut short, then published as it is
    bundle.publish(v3, str(channel), "line-1")
    rollout.poll_once()
    assert len(rollout.refused) == 1 and "v3" in rollout.refused[0], rollout.refused
    rollout.poll_once()  # the same entry: not fetched again
    assert len(rollout.refused) == 1 and not [p for p in rollouts.iterdir() if p.is_dir()]

    entry = bundle.publish(v2, str(channel), "line-1")
    rollout.poll_once()
    (rollouts / ROLLOUT_STATE).with_suffix(".partial").mkdir()  # where the record is staged: not writable
    swapped = rollout.swap_if_ready()
    assert swapped is not None and swapped[0].version == "conveyor-defect-detector v2"
    assert "could not record it for the next start" in rollout.problems[0]
    running = rollouts / entry["sha256"][:16]
    assert swapped[0].root.is_relative_to(running) and any(running.rglob("manifest.json"))

    raw = json.loads((channel / "line-1.json").read_text())
    (channel / "line-1.json").write_text(json.dumps({k: v for k, v in raw.items() if k != "manifest_sha256"}))
    rollout.poll_once()
    assert any(running.rglob("manifest.json")), "the running bundle's folder was deleted"
    assert rollout._ready.empty() and len(rollout.refused) == 1

    shutil.rmtree(rollouts)
    rollout.start()
    try:
        time.sleep(0.5)  # a few polls over a folder that is gone
        assert rollout._thread.is_alive(), "the rollout thread died"
    finally:
        rollout.close()


def test_a_channel_in_a_real_s3_store(model_files: ModelFiles, keys: tuple[Path, Path], tmp_path: Path) -> None:
    saved = dict(os.environ)
    with nanio_store(tmp_path / "s3", "edge-test") as env:
        try:
            os.environ.update(env)
            from conveyor import storage

            wait_until(lambda: _bucket_ready(storage), 30, "the S3 store")
            video = simulate(tmp_path / "line", parts=50, fps=20, frames_per_part=4)  # 10 s at its rate
            decisions, summary = _rollout_under_a_stream(
                model_files, keys, "s3://edge/channel", video.video, tmp_path, env
            )
            assert [d["frame"] for d in decisions] == list(range(video.frames))
            assert summary["swaps"] == ["conveyor-defect-detector v2"] and len(summary["refused"]) == 2
        finally:
            os.environ.clear()
            os.environ.update(saved)


def _bucket_ready(storage: Any) -> bool:
    try:
        storage.ensure_bucket("edge")
    except Exception:
        return False
    return True


# --- bad input ------------------------------------------------------------------------------------------------------


def test_bad_streams_and_bundles_get_clear_messages(model_files: ModelFiles, line: LineVideo, tmp_path: Path) -> None:
    private, _ = bundle.keygen(tmp_path / "keys")
    built = _bundle(model_files, tmp_path / "bundle", private)
    run = [PYTHON, str(built.directory / "run.py")]
    missing = subprocess.run(
        [*run, "--stream", str(tmp_path / "nope.avi")], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert missing.returncode != 0 and "cannot open the stream" in missing.stderr
    # A stream that ends early (a truncated file): what was there is decided, then the summary.
    cut = tmp_path / "cut.avi"
    cut.write_bytes(line.video.read_bytes()[: line.video.stat().st_size // 2])
    decisions, summary, err = _run(built.directory, "--stream", str(cut), "--every-frame")
    assert 0 < summary["frames"] < line.frames and len(decisions) == summary["frames"]
    assert "damaged or truncated" in err
    # Another team's key: the runner refuses its own bundle before deciding anything.
    _, stranger = bundle.keygen(tmp_path / "stranger")
    refused = subprocess.run(
        [*run, "--stream", str(line.video), "--public-key", str(stranger)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert refused.returncode == 2 and "bundle signature invalid" in refused.stderr
    # A key that is not there, not a public key (the private one, given by mistake) or not Ed25519: one line, no
    # traceback (it was a FileNotFoundError or ValueError traceback).
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    rsa_key = tmp_path / "rsa.pub"
    rsa_key.write_bytes(
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    for key, said in (
        (tmp_path / "no-such.pub", "cannot read it"),
        (private, "not a PEM public key"),
        (rsa_key, "not an Ed25519 public key"),
    ):
        refused = subprocess.run(
            [*run, "--verify", "--public-key", str(key)], capture_output=True, text=True, timeout=120, cwd=tmp_path
        )
        assert refused.returncode == 2 and said in refused.stderr and "Traceback" not in refused.stderr, refused.stderr
    # A model put beside the signed ones: no checksum or signature covers it, so the bundle is refused (the runner
    # would have loaded model/openvino_int8/*.xml with --runtime openvino_int8).
    public = tmp_path / "keys" / "edge-signing.pub"
    planted = built.directory / "model" / "openvino_int8" / "model.xml"
    planted.parent.mkdir()
    planted.write_text("<net/>")
    refused = subprocess.run(
        [*run, "--verify", "--public-key", str(public)], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert refused.returncode == 2, refused.stderr
    assert "manifest does not list (model/openvino_int8/model.xml): added after it was built" in refused.stderr
    shutil.rmtree(planted.parent)
    # A manifest cut short, or not a manifest, and a damaged edge.json: one line each (they were JSON tracebacks).
    manifest = built.directory / "manifest.json"
    edge_json = built.directory / "edge.json"
    kept = manifest.read_bytes(), edge_json.read_bytes()
    try:
        for broken in (kept[0][: len(kept[0]) // 2], b"[]", b'{"sha256": ["model/model.onnx"]}'):
            manifest.write_bytes(broken)
            refused = subprocess.run([*run, "--verify"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
            assert refused.returncode == 2 and "is not a readable manifest" in refused.stderr, refused.stderr
            assert "Traceback" not in refused.stderr
        manifest.write_bytes(kept[0])
        edge_json.write_bytes(kept[1][:-10])
        refused = subprocess.run([*run, "--verify"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert refused.returncode == 2 and "edge.json is not readable" in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr
    finally:
        manifest.write_bytes(kept[0])
        edge_json.write_bytes(kept[1])
    # A channel without the team's key: unsigned bundles would be swapped in on checksums alone.
    unsigned = subprocess.run(
        [*run, "--stream", str(line.video), "--channel", str(tmp_path / "channel")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert unsigned.returncode == 2 and "needs --public-key" in unsigned.stderr
    with pytest.raises(FileExistsError, match="orphan"):
        bundle.keygen(tmp_path / "keys")
    # A signing key that is not one is refused before anything is copied, and nothing is left behind (it was a
    # ValueError traceback, with 21 MB of a half-built bundle beside the project).
    for key, said in ((public, "not an unencrypted PEM private key"), (tmp_path / "none.key", "cannot read it")):
        with pytest.raises(bundle.ChannelError, match=said):
            _bundle(model_files, tmp_path / "refused", key)
        assert not (tmp_path / "refused").exists() and not (tmp_path / ".refused.partial").exists()
    # A line name is a file name in the channel: '../x' wrote outside it.
    bad_line = subprocess.run(
        [*run, "--stream", str(line.video), "--line", "../x"], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert bad_line.returncode == 2 and "--line '../x'" in bad_line.stderr


class StandInCapture:
    """What FrameReader asks of cv2.VideoCapture, for a camera no test can attach: a subclass says what `read` does."""

    def __init__(self) -> None:
        self.reads = 0

    def isOpened(self) -> bool:
        return True

    def get(self, prop: int) -> float:
        return 0.0

    def read(self) -> tuple[bool, np.ndarray | None]:
        self.reads += 1
        return True, np.zeros((8, 8, 3), np.uint8)

    def release(self) -> None:
        pass


def test_a_camera_that_disappears_is_reopened() -> None:
    """Stand-in capture (no camera can be attached here): a live source that stops delivering frames is released
    and opened again, and frames flow once it is back."""
    from serving.edge.run import FrameReader

    opened: list[int] = []

    class Camera(StandInCapture):
        def __init__(self) -> None:
            super().__init__()
            opened.append(1)

        def read(self) -> tuple[bool, np.ndarray | None]:
            self.reads += 1
            if len(opened) == 1 and self.reads > 3:  # unplugged after three frames
                return False, None
            time.sleep(0.01)
            return True, np.zeros((8, 8, 3), np.uint8)

    reader = FrameReader("0", reopen_after=5, open_capture=lambda source: Camera())
    try:
        for seen, _ in enumerate(reader.frames(), start=1):
            if seen >= 10:
                break
    finally:
        reader.close()
    assert len(opened) == 2 and reader.reopened == 1 and reader.unreadable >= 5
    assert "reopening 0" in reader.problems[0]


def test_a_reader_that_fails_ends_the_stream_with_its_error_and_a_stuck_read_is_not_released_under_it() -> None:
    """Stand-in captures (no camera here). A backend's error in the reader thread (OpenCV raises cv2.error) killed
    the thread, and the runner waited for frames forever, alive, deciding nothing: now the stream ends with the
    error, in both reading modes. And close() released the capture while the thread was still in a read (a stalled
    RTSP read lasts up to 30 s), which OpenCV's native decoder can crash on: the thread releases it itself."""
    import cv2

    from serving.edge.run import FrameReader, StreamError

    class Failing(StandInCapture):
        def read(self) -> tuple[bool, np.ndarray | None]:
            self.reads += 1
            if self.reads > 2:
                raise cv2.error("a backend's failure")
            return True, np.zeros((8, 8, 3), np.uint8)

    for every_frame in (False, True):
        reader = FrameReader("0", every_frame=every_frame, open_capture=lambda source: Failing())
        seen = 0
        with pytest.raises(StreamError, match=r"reading 0 failed: error.*a backend's failure"):
            for _ in reader.frames():
                seen += 1
        reader.close()
        assert 1 <= seen <= 2

    events: list[str] = []
    in_read = threading.Event()

    class Stalled(StandInCapture):
        def read(self) -> tuple[bool, np.ndarray | None]:
            if self.reads:
                in_read.set()
                time.sleep(6)  # longer than close() waits
            self.reads += 1
            return True, np.zeros((8, 8, 3), np.uint8)

        def release(self) -> None:
            events.append("released")

    capture = Stalled()
    reader = FrameReader("0", open_capture=lambda source: capture)
    next(iter(reader.frames()))
    assert in_read.wait(5)
    reader.close()  # waits 5 s, then leaves the read to its thread
    assert events == [], "released while the thread was in a read"
    assert reader._thread is not None
    reader._thread.join(timeout=10)
    assert events == ["released"] and capture.reads == 2  # by its own thread, once the read returned


# --- the edge feeds monitoring --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_edge_logs_the_servers_records_and_they_reach_the_drift_check(
    line: LineVideo, tmp_path: Path, mlflow_server: str, prefect_server: str
) -> None:
    """A runner with a bundle made by `conveyor bundle` ships its prediction log to the store the server ships to
    (a real S3 store); its records are the server's for the same frames (same feature code, same model), and
    `conveyor drift` and the monitoring flow check its window as its own device, beside the server's."""
    import cv2
    from mlflow.tracking import MlflowClient

    from pipelines.features import sample_image
    from pipelines.inference import Detector, ModelCard
    from pipelines.prediction_log import Pending, PredictionLog, read_log, s3_shipper
    from pipelines.runtimes import open_runtime
    from tests.conftest import make_project
    from tests.flow_support import conveyor, flow_params, servers_env
    from tests.monitoring_support import register_old_version

    name = f"edge-{os.getpid()}-{int(time.time())}"
    params = flow_params(name)
    params["monitor"].update({"min_samples": 20, "experiment": f"monitoring-{name}"})
    params["serve"] = {"prediction_log": {"s3": "s3://edge/predictions", "flush_seconds": 1}}
    params["edge"] = {"log": {"flush_seconds": 1}}
    project = make_project(tmp_path / "project", params)
    saved = dict(os.environ)
    with nanio_store(tmp_path / "s3", "edge-log") as store:
        try:
            os.environ.update(store)
            from conveyor import storage

            wait_until(lambda: _bucket_ready(storage), 30, "the S3 store")
            env = {**servers_env(mlflow_server, prefect_server), **{k: v for k, v in store.items() if "AWS" in k}}
            conveyor(project, env, "data", "synth")
            register_old_version(MlflowClient(mlflow_server), name, project, tmp_path / "export")
            conveyor(project, env, "validate")
            conveyor(project, env, "profile", "--model", "1")
            # --line builds the bundle for that line (its signed edge.json says so), as --publish --line sends it.
            conveyor(project, env, "bundle", "1", "--out", str(tmp_path / "bundle"), "--line", "press-7")
            config = json.loads((tmp_path / "bundle" / "edge.json").read_text())
            assert config["log"]["s3"] == "s3://edge/predictions"  # where the server ships, by default
            assert config["line"] == "press-7"

            device = tmp_path / "device"
            device.mkdir()
            runner = [PYTHON, str(tmp_path / "bundle" / "run.py"), "--stream", str(line.video), "--every-frame"]
            result = subprocess.run(
                [*runner, "--device", "cam-7"], capture_output=True, text=True, timeout=240, cwd=device, env=env
            )
            assert result.returncode == 0, result.stderr[-3000:]
            summary = json.loads(next(s for s in result.stderr.splitlines() if '"summary"' in s))
            assert summary["logged"] == line.frames and summary["log_dropped"] == 0, summary
            assert summary["log_shipped"] >= 1 and summary["log_behind"] is False, summary
            assert list((device / "edge-log").glob("date=*/hour=*/part-*.parquet"))  # kept on the device too

            # The server's records for the same frames, by the server's code, shipped to the same prefix.
            card = ModelCard.load(Path(tmp_path / "bundle" / "model" / "metadata.json"))
            xml = next((tmp_path / "bundle" / "model" / "openvino").glob("*.xml")).parent
            detector = Detector(open_runtime("openvino", xml), card)
            capture = cv2.VideoCapture(str(line.video))
            frames = [capture.read()[1] for _ in range(line.frames)]
            server_log = PredictionLog(
                tmp_path / "server-log", 1000, 60, 48, shipper=s3_shipper("s3://edge/predictions")
            )
            server_log.start()
            for frame in frames:
                found = detector.run([frame])[0]
                server_log.offer(Pending(time.time(), "1", sample_image(frame, card.imgsz), found))
            server_log.close()
            window = read_log("s3://edge/predictions").records
            assert window["device"].value_counts().to_dict() == {"cam-7": line.frames, "server": line.frames}
            edge_rows = window[window["device"] == "cam-7"].reset_index(drop=True)
            server_rows = window[window["device"] == "server"].reset_index(drop=True)
            assert set(edge_rows["line"]) == {"press-7"} and set(edge_rows["model_version"]) == {"1"}
            shared = [c for c in server_rows.columns if c not in ("time", "device", "line")]
            assert set(shared) <= set(edge_rows.columns)  # every column the server writes
            for column in ("brightness", "sharpness", "noise", "blockiness", "detections", "mean_confidence"):
                np.testing.assert_allclose(
                    edge_rows[column].astype(float), server_rows[column].astype(float), rtol=1e-4, atol=1e-4
                )
            for k in range(line.frames):
                np.testing.assert_allclose(edge_rows["embedding"][k], server_rows["embedding"][k], rtol=1e-3, atol=1e-3)
                assert len(edge_rows["score_confidence"][k]) == len(server_rows["score_confidence"][k])

            # `conveyor drift` checks one device's window at a time; an unknown device names those present.
            edge_check = conveyor(project, {**env, "COLUMNS": "200"}, "drift", "--device", "cam-7")
            assert f"{name} v1 on cam-7: " in edge_check.stdout, edge_check.stdout
            assert f"({line.frames} current rows" in edge_check.stdout
            server_check = conveyor(project, {**env, "COLUMNS": "200"}, "drift")
            assert f"{name} v1: " in server_check.stdout and f"({line.frames} current rows" in server_check.stdout
            unknown = conveyor(project, env, "drift", "--device", "cam-9", check=False)
            assert unknown.returncode == 1
            assert f"cam-7 ({line.frames}), server ({line.frames})" in unknown.stderr.replace("\n", " ")
            gauges = (project / ".conveyor" / "monitoring" / "drift.prom").read_text()
            assert 'device="cam-7"' in gauges and 'device="server"' in gauges
            assert gauges.count("# TYPE conveyor_drift_detected gauge") == 1  # one family, both devices' samples

            # The monitoring flow checks every device with records in the window, each on its own. A device whose
            # check fails (no records: they expired since they were listed) fails the run at the end, naming it,
            # after the devices listed after it were checked (it stopped the loop: they went unchecked every hour).
            flow = subprocess.run(
                [PYTHON, "-c", "import json, sys; from flows.drift_check import monitoring_flow; "
                 "print(json.dumps(monitoring_flow(project_dir=sys.argv[1]), default=str))\n"
                 "try:\n monitoring_flow(project_dir=sys.argv[1], devices=['cam-9', 'cam-7'])\n"
                 "except Exception as exc: print('failed:', exc)", str(project)],
                capture_output=True, text=True, timeout=600, env=env, cwd=Path(__file__).parent.parent,
            )  # fmt: skip
            assert flow.returncode == 0, flow.stderr[-3000:]
            said = flow.stdout.strip().splitlines()
            checked = json.loads(next(line for line in said if line.startswith("{")))
            assert list(checked) == ["server", "cam-7"]
            assert checked["cam-7"]["device"] == "cam-7" and checked["cam-7"]["current_rows"] == line.frames
            assert said[-1].startswith("failed: the drift check failed for 1 of 2 devices (cam-9: "), said[-1]
            assert said[-1].endswith("checked: cam-7"), said[-1]
            client = MlflowClient(mlflow_server)
            runs = client.search_runs(
                [client.get_experiment_by_name(f"monitoring-{name}").experiment_id],  # type: ignore[union-attr]
                filter_string="tags.`conveyor.drift.device` = 'cam-7'",
            )
            assert len(runs) == 3 and {r.info.run_name for r in runs} == {"drift v1 cam-7"}
        finally:
            os.environ.clear()
            os.environ.update(saved)
