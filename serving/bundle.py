"""`conveyor bundle MODEL_REF --out DIR`: a self-contained folder (and .tar.gz) for a device on the line.

Contents: `model/` (OpenVINO IR, ONNX, metadata.json with class names, input size and thresholds), `run.py` (the
edge runner: numpy, OpenCV and one runtime), `requirements.txt`, and `manifest.json` (which model version, and the
SHA-256 of every file, checked by `run.py --verify`). Nothing in it imports torch, Ultralytics or Conveyor.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from pipelines.model_source import ModelFiles

EDGE_RUNNER = Path(__file__).parent / "edge" / "run.py"
REQUIREMENTS = "numpy\nopencv-python-headless\n# one runtime:\nopenvino\n# or: onnxruntime\n"


@dataclass(frozen=True)
class Bundle:
    directory: Path
    archive: Path
    files: int
    size_mb: float


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build(files: ModelFiles, out: Path, conf: float, *, overwrite: bool = False) -> Bundle:
    """The bundle folder and its .tar.gz; its runner returns detections at `conf` (serve.conf) unless told otherwise."""
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty: pass --overwrite to replace it")
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "model").mkdir(parents=True)
    card = {**json.loads(files.artifact("metadata").read_text()), "conf": conf}
    (staging / "model" / "metadata.json").write_text(json.dumps(card, indent=2) + "\n")
    shutil.copyfile(files.artifact("onnx"), staging / "model" / "model.onnx")
    shutil.copytree(files.artifact("openvino"), staging / "model" / "openvino")
    if "openvino_int8" in files.artifacts:  # passed the parity gate at registration
        shutil.copytree(files.artifact("openvino_int8"), staging / "model" / "openvino_int8")
    shutil.copyfile(EDGE_RUNNER, staging / "run.py")
    (staging / "requirements.txt").write_text(REQUIREMENTS)
    listed = sorted(p for p in staging.rglob("*") if p.is_file())
    manifest = {
        "model": files.name,
        "version": files.version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "imgsz": files.card.imgsz,
        "names": files.card.names,
        "conf": conf,
        "sha256": {p.relative_to(staging).as_posix(): sha256(p) for p in listed},
    }
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)  # the bundle appears whole or not at all
    archive = out.with_name(out.name + ".tar.gz")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(out, arcname=out.name)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e6
    return Bundle(out, archive, len(listed) + 1, round(size, 2))
