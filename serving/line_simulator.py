"""A line simulator: a video of synthetic parts passing under the camera, with the true defective parts known, so an
edge runner's decisions can be scored (missed rejects, false rejects) and its speed measured on a real stream.

Parts are the synthetic dataset's renderings (`pipelines.synth`, another seed than training's), each in view for
`frames_per_part` frames while it moves across the field of view (the surface beyond its edges mirrored, so a frame
has no belt edge the model never saw); a part is defective when it has at least one defect. The video is Motion JPEG
in AVI (OpenCV writes and reads it everywhere); `truth.json` beside it lists every part's frames and defects. A part
counts as rejected when any of its frames was decided reject.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2

from conveyor.errors import ConveyorError
from conveyor.paths import write_atomically
from conveyor.settings import SynthSettings
from pipelines import synth


@dataclass(frozen=True)
class Part:
    index: int
    first_frame: int
    last_frame: int
    defects: list[str]

    @property
    def defective(self) -> bool:
        return bool(self.defects)


@dataclass(frozen=True)
class LineVideo:
    video: Path
    truth: Path
    fps: float
    frames: int
    parts: list[Part]


def simulate(
    out: Path,
    parts: int = 40,
    fps: float = 10.0,
    frames_per_part: int = 5,
    defect_rate: float = 0.4,
    seed: int = 1001,
    size: int = 320,
    *,
    overwrite: bool = False,
) -> LineVideo:
    """`line.avi` and `truth.json` in `out`: `parts` parts, `defect_rate` of them (about) defective. Both are written
    under temporary names and renamed at the end: an interrupted run left a new partial video beside the old truth,
    and scoring that pair gave wrong results without a word."""
    video, record = out / "line.avi", out / "truth.json"
    if (video.exists() or record.exists()) and not overwrite:
        raise FileExistsError(f"{out} already holds a simulated line: pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    settings = SynthSettings(seed=seed, image_size=size, background_fraction=1 - defect_rate)
    width, height = size + size // 4, size  # the camera sees a little belt on both sides of a part
    partial = out / ".line.partial.avi"  # OpenCV picks the container by the extension
    writer = cv2.VideoWriter(str(partial), cv2.VideoWriter.fourcc(*"MJPG"), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write Motion JPEG to {video}")
    truth: list[Part] = []
    frame_index = 0
    travel = width - size  # the part moves across this many pixels while it is under the camera
    try:
        for index in range(parts):
            image, boxes = synth.render_image(settings, "test", index)
            names = [synth.CLASS_NAMES[int(b[0])] for b in boxes]
            first = frame_index
            for step in range(frames_per_part):
                x = round(travel * step / max(1, frames_per_part - 1))
                # The surface continues beyond the part's edges (mirrored), as on a line of sheet or a web: a
                # grey belt would put a hard edge into every frame that the model never saw in training.
                frame = cv2.copyMakeBorder(image, 0, 0, x, travel - x, cv2.BORDER_REFLECT_101)
                writer.write(frame)
                frame_index += 1
            truth.append(Part(index, first, frame_index - 1, names))
    except BaseException:
        writer.release()
        partial.unlink(missing_ok=True)
        raise
    writer.release()
    record.unlink(missing_ok=True)  # never a new video beside the old truth: a failure below leaves no truth at all
    partial.replace(video)
    write_atomically(
        record, json.dumps({"fps": fps, "frames": frame_index, "parts": [asdict(p) for p in truth]}, indent=1)
    )
    return LineVideo(video, record, fps, frame_index, truth)


class ScoreInputError(ConveyorError, ValueError):
    """Decisions or a truth file that are not the runner's or the simulator's; the message says which line."""


def load_truth(path: Path) -> list[Part]:
    try:
        return [Part(**p) for p in json.loads(path.read_text())["parts"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ScoreInputError(
            f"{path}: not the truth.json `conveyor edge simulate` writes ({type(exc).__name__}: {exc})"
        ) from None


def load_decisions(path: Path) -> list[dict[str, Any]]:
    """The runner's decision lines (its stdout: JSON objects; other lines, such as its summary, are skipped)."""
    decisions = []
    try:
        text = path.read_text()
    except UnicodeDecodeError:  # the video given where the decisions go (the arguments swapped)
        raise ScoreInputError(f"{path}: not text: the runner's decisions are JSON lines (its stdout)") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip().startswith("{"):
            continue
        try:
            decision = json.loads(line)
            if "frame" in decision:
                decisions.append({**decision, "frame": int(decision["frame"]), "reject": bool(decision["reject"])})
        except (ValueError, KeyError, TypeError) as exc:
            raise ScoreInputError(
                f"{path}, line {number}: not a decision of the runner ({type(exc).__name__}: {exc}): each needs "
                "`frame` (a number) and `reject`"
            ) from None
    if not decisions:  # the runner wrote none: it failed, which is not the model missing every defect
        raise ScoreInputError(f"{path}: no decision lines (the runner's stdout holds one JSON object per frame)")
    return decisions


@dataclass(frozen=True)
class LineScore:
    parts: int
    defective: int
    rejected: int
    missed_rejects: int  # defective parts let through
    false_rejects: int  # good parts rejected
    undecided: int  # parts none of whose frames was decided (all skipped)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def one_camera(decisions: list[dict[str, Any]], device: str | None = None) -> list[dict[str, Any]]:
    """The decisions of one camera: `device`'s, or all of them when they come from one. Frame numbers are each
    camera's own, so decisions of two cameras (one line's topic, recorded) cannot be scored together."""
    found = sorted({str(d["device"]) for d in decisions if "device" in d})
    if device is not None:
        if device not in found:
            raise ScoreInputError(f"no decisions of device '{device}': the file has {', '.join(found) or 'none named'}")
        return [d for d in decisions if d.get("device") == device]
    if len(found) > 1:
        raise ScoreInputError(
            f"decisions of {len(found)} cameras ({', '.join(found)}), each numbering its own frames: score one at a "
            "time (--device NAME)"
        )
    return decisions


def score(decisions: Iterable[dict[str, Any]], parts: list[Part]) -> LineScore:
    """One camera's decisions (the runner's JSON: `frame`, `reject`) against the true parts."""
    by_frame = {int(d["frame"]): bool(d["reject"]) for d in decisions if "frame" in d}
    missed = false = rejected = undecided = 0
    for part in parts:
        frames = [by_frame[f] for f in range(part.first_frame, part.last_frame + 1) if f in by_frame]
        if not frames:
            undecided += 1
        reject = any(frames)
        rejected += reject
        missed += part.defective and not reject
        false += (not part.defective) and reject
    return LineScore(len(parts), sum(p.defective for p in parts), rejected, missed, false, undecided)
