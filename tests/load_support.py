"""Other work on the host, and the models the latency gate compares on it (test_gate.py, bench/latency_gate.py)."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from tests.serving_support import CHECKPOINT

# Another worker's work: bursts of matrix products on numpy's BLAS threads, with pauses, until killed or orphaned.
BURSTS = """
import os, random, time, numpy as np
parent = os.getppid()
x = np.random.default_rng(0).random((600, 600))
while os.getppid() == parent:  # ends with its parent, however that ends
    end = time.time() + random.uniform(0.05, 0.5)
    while time.time() < end:
        x = x @ x
        x /= np.abs(x).max()
    time.sleep(random.uniform(0.0, 0.3))
"""


@contextmanager
def busy_core() -> Iterator[None]:
    """A thread of this process that keeps one core busy multiplying matrices."""
    stop = threading.Event()

    def burn() -> None:
        x = np.random.default_rng(0).random((400, 400))
        while not stop.is_set():
            x = x @ x
            x /= np.abs(x).max()

    thread = threading.Thread(target=burn, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextmanager
def busy_with_bursts() -> Iterator[None]:
    """`busy_core`, and another process doing 50-500 ms bursts of BLAS work with 0-300 ms pauses, as a second test
    worker or a training beside the measurement does."""
    other = subprocess.Popen([sys.executable, "-c", BURSTS])
    try:
        with busy_core():
            yield
    finally:
        other.kill()
        other.wait()


def latency_exports(root: Path) -> dict[str, Path]:
    """OpenVINO exports of the demo checkpoint twice (a challenger exactly as fast as its champion), and of a model five
    times its size (YOLO11s, untrained)."""
    from conveyor.yolo import load_yolo
    from pipelines.export import VARIANTS, export_variant

    larger = root / "yolo11s.pt"
    model = load_yolo("yolo11s.yaml")
    model.model.names = {0: "scratch", 1: "dent", 2: "stain"}  # type: ignore[union-attr]
    model.save(str(larger))
    return {
        "champion": export_variant(CHECKPOINT, VARIANTS["openvino"], 320, root / "champion", root),
        "same": export_variant(CHECKPOINT, VARIANTS["openvino"], 320, root / "same", root),
        "larger": export_variant(larger, VARIANTS["openvino"], 320, root / "larger", root),
    }
