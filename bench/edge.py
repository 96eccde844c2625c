"""Benchmark: the edge runner on a camera stream against the raw runtime on the same frames, side by side in one run.

    python -m bench.edge            # or: make bench-edge

A bundle of the demo champion (artifacts/train/weights/best.pt when this checkout has trained one, else the tests'
checkpoint), OpenVINO at 320 px, on the line simulator's video (parts passing under a camera at 10 fps; the truth
of which parts are defective is known):
- raw: the frames decoded beforehand, then the bundle's `Model.detect` on each (letterbox, runtime, NMS): frames/s;
- stream, every frame: the runner reading the video itself, deciding each frame by the reject rule and writing the
  decision: frames/s, so `throughput_ratio` = stream / raw says what the stream costs beyond the model (five
  interleaved rounds of each, medians);
- stream, every frame, with the prediction log (params.yaml `edge.log`, on by default: the server's records for
  each frame, for the drift check): `throughput_ratio_with_log`, in the same interleaved rounds;
- stream, camera-paced, with the log: the video played at its 10 fps, as a camera delivers it, the newest frame
  taken: capture-to-decision p50/p99 and skipped frames at the line's own rate;
- the line's outcome: missed rejects (defective parts let through) and false rejects (good parts rejected) of the
  paced run, beside the model's own part-level recall and precision on the still images of the same parts.

Writes bench/results/edge.json (keys: throughput_ratio, throughput_ratio_with_log, stream_fps, raw_fps, p50_ms,
p99_ms, skipped,
missed_rejects, false_rejects, parts, defective, still_recall, still_precision).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import statistics
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

import cv2
from rich.console import Console
from rich.table import Table

import conveyor  # noqa: F401  (offline switches before the ML imports)
from bench.record import host, write_result
from conveyor.lineage import cpu_model
from conveyor.scaffold import REPO
from conveyor.settings import EdgeSettings, SynthSettings
from pipelines import synth
from pipelines.inference import ModelCard
from pipelines.model_source import ModelFiles
from serving import bundle
from serving.edge import run as runner
from serving.line_simulator import load_truth, score, simulate
from tests.serving_support import CHECKPOINT, export_checkpoint

RESULTS = REPO / "bench" / "results" / "edge.json"
PARTS, FPS, FRAMES_PER_PART, SEED, ROUNDS = 80, 10.0, 5, 1001, 5
console = Console()


def main() -> None:
    parser = argparse.ArgumentParser(description="the edge runner against the raw runtime")
    parser.add_argument("--weights", type=Path, default=None, help="a checkpoint (default: this checkout's champion)")
    args = parser.parse_args()
    champion = REPO / "artifacts" / "train" / "weights" / "best.pt"
    weights: Path = (args.weights or (champion if champion.is_file() else CHECKPOINT)).resolve()
    work = Path(tempfile.mkdtemp(prefix="bench-edge-"))
    artifacts = {k: Path(v) for k, v in export_checkpoint(work / "export", weights).items()}
    files = ModelFiles(
        "conveyor-defect-detector", "1", work / "export", ModelCard.load(artifacts["metadata"]), artifacts
    )
    edge = EdgeSettings()
    built = bundle.build(files, work / "bundle", 0.25, edge)
    line = simulate(work / "line", PARTS, FPS, FRAMES_PER_PART, seed=SEED)
    model = runner.Model("openvino", built.directory)
    rule = runner.RejectRule.load(built.directory)

    # Raw: the same frames, decoded before the clock starts.
    capture, frames = cv2.VideoCapture(str(line.video)), []
    while (read := capture.read())[0]:
        frames.append(read[1])
    model.detect(frames[0])  # warm-up, as the runner's first frame is not timed either

    def raw() -> float:
        started = time.perf_counter()
        for frame in frames:
            model.detect(frame)
        return len(frames) / (time.perf_counter() - started)

    def stream(every_frame: bool, log: bool = False) -> tuple[dict, list[dict]]:
        out = io.StringIO()
        reader = runner.FrameReader(str(line.video), every_frame=every_frame)
        config = {**edge.log.model_dump(mode="json"), "directory": str(work / "edge-log")}
        edge_log = runner.EdgeLog(config, "bench", edge.line, 320, built.directory) if log else None
        with redirect_stdout(out):
            summary = runner.run_stream(model, reader, rule, runner.JsonLines(), edge.line, log=edge_log)
        return summary, [json.loads(s) for s in out.getvalue().splitlines()]

    # Interleaved rounds, medians: a busy moment of the host falls on every side alike.
    raw_rounds, stream_rounds, logged_rounds = [], [], []
    for _ in range(ROUNDS):
        raw_rounds.append(raw())
        stream_rounds.append(stream(every_frame=True)[0]["frames_per_second"])
        logged_rounds.append(stream(every_frame=True, log=True)[0]["frames_per_second"])
    raw_fps, stream_fps = statistics.median(raw_rounds), statistics.median(stream_rounds)
    logged_fps = statistics.median(logged_rounds)
    paced, decisions = stream(every_frame=False, log=True)
    outcome = score(decisions, load_truth(line.truth))

    # The model on the still parts: a part is flagged when the rule rejects its image.
    settings = SynthSettings(seed=SEED, image_size=320, background_fraction=0.6)
    tp = fp = fn = 0
    for index in range(PARTS):
        image, boxes = synth.render_image(settings, "test", index)
        flagged = bool(rule.reasons(model.detect(image), image.shape[1], image.shape[0]))
        tp += flagged and bool(boxes)
        fp += flagged and not boxes
        fn += (not flagged) and bool(boxes)
    result = {
        "throughput_ratio": round(stream_fps / raw_fps, 3),
        "throughput_ratio_with_log": round(logged_fps / raw_fps, 3),
        "stream_fps": round(stream_fps, 2),
        "stream_with_log_fps": round(logged_fps, 2),
        "rounds": {
            "raw_fps": [round(v, 2) for v in raw_rounds],
            "stream_fps": stream_rounds,
            "with_log": logged_rounds,
        },
        "raw_fps": round(raw_fps, 2),
        "camera_fps": FPS,
        "p50_ms": paced["latency_p50_ms"],
        "p99_ms": paced["latency_p99_ms"],
        "skipped": paced["skipped"],
        "paced_frames": paced["frames"],
        "paced_logged": paced["logged"],
        "paced_log_dropped": paced["log_dropped"],
        "missed_rejects": outcome.missed_rejects,
        "false_rejects": outcome.false_rejects,
        "undecided_parts": outcome.undecided,
        "parts": outcome.parts,
        "defective": outcome.defective,
        "still_recall": round(tp / (tp + fn), 3) if tp + fn else None,
        "still_precision": round(tp / (tp + fp), 3) if tp + fp else None,
        "reject_rule": edge.reject.model_dump(mode="json"),
        "model": {
            "weights": str(weights.relative_to(REPO)) if weights.is_relative_to(REPO) else str(weights),
            "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        },
        "runtime": "openvino",
        "imgsz": 320,
        "host": host(),
        "date": time.strftime("%Y-%m-%d"),
    }
    table = Table(title=f"edge runner, {PARTS} parts at {FPS:g} fps, OpenVINO 320 px ({cpu_model()})")
    for column in ("measure", "value"):
        table.add_column(column, justify="right" if column == "value" else "left")
    rows = [
        (f"raw runtime, frames/s (median of {ROUNDS})", f"{raw_fps:.1f}"),
        ("stream (every frame), frames/s", f"{stream_fps:.1f}"),
        ("throughput ratio (goal >= 0.9)", f"{result['throughput_ratio']:.3f}"),
        ("stream with the prediction log, frames/s", f"{logged_fps:.1f}"),
        ("throughput ratio with the log", f"{result['throughput_ratio_with_log']:.3f}"),
        (
            "camera-paced, with the log: capture -> decision p50 / p99",
            f"{paced['latency_p50_ms']:.1f} / {paced['latency_p99_ms']:.1f} ms",
        ),
        ("camera-paced skipped frames", f"{paced['skipped']} of {line.frames}"),
        ("missed rejects (defective let through)", f"{outcome.missed_rejects} of {outcome.defective}"),
        ("false rejects (good rejected)", f"{outcome.false_rejects} of {outcome.parts - outcome.defective}"),
        ("still images: part recall / precision", f"{result['still_recall']} / {result['still_precision']}"),
    ]
    for row in rows:
        table.add_row(*row)
    console.print(table)
    write_result(RESULTS, result, console)


if __name__ == "__main__":
    main()
