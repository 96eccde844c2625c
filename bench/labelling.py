"""Benchmark: is `conveyor label select` worth a person's labelling time? One run, one table.

    python -m bench.labelling            # or: make bench-labelling

A pool of unlabelled frames, half like the training data and half from a shifted line (the drift scenario's shift:
0.45x lighting, blur sigma 1.6, defects 1.7x), is scored by the bundled model (tests/assets, trained on the default
domain). The same number of frames is taken two ways, by `labelling.select.select` and at random (seeded), and
"labelled" with the generator's true boxes. The model is then fine-tuned on each set plus the same replay sample of
its old training data (same epochs, seed and settings), and each result is scored on a held-out shifted test set and
on an in-distribution one. Also: the share of shifted frames each way picked, and the selection's time.

Writes bench/results/labelling.json with `shifted_share_selected`, `shifted_share_random`, and mAP50-95 on the
shifted test set for `before`, `random` and `selected`.
"""

from __future__ import annotations

import json
import platform
import random
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

import conveyor  # noqa: F401  (offline switches before the ML imports)
from conveyor.paths import available_cores
from conveyor.scaffold import REPO
from conveyor.settings import DomainShift, EvaluateSettings, LabelSettings, SynthSettings
from conveyor.yolo import load_yolo
from labelling.select import embed_files, select
from pipelines import synth
from pipelines.evaluate import evaluate_checkpoint
from pipelines.features import Embedder
from pipelines.inference import Detector, ModelCard
from pipelines.runtimes import TorchRuntime

RESULTS = REPO / "bench" / "results" / "labelling.json"
ASSET = REPO / "tests" / "assets" / "yolo11n-defects-320.pt"
NAMES = ["scratch", "dent", "stain"]
SHIFT = DomainShift(brightness=0.45, blur_sigma=1.6, defect_scale=1.7)
POOL_EACH = 60  # frames of each kind in the pool
PICK = 24  # frames labelled, either way
REPLAY = 48  # old training images kept in each fine-tuning set
EPOCHS = 8


def _generate(root: Path, seed: int, shift: DomainShift, split: str, n: int) -> Path:
    counts = {"train": 0, "val": 0, "test": 0} | {split: n}
    synth.generate(SynthSettings(seed=seed, counts=counts, shift=shift), root)
    return root


def _training_set(root: Path, frames: list[Path], replay: list[Path], val: Path) -> Path:
    """A YOLO dataset: the picked frames (with their true labels) and the replay images; val is the shifted val."""
    for image in [*frames, *replay]:
        label = image.parents[2] / "labels" / image.parent.name / f"{image.stem}.txt"
        tag = image.parents[2].name
        shutil.copy2(image, (root / "images/train").joinpath(f"{tag}-{image.name}"))
        if label.is_file():
            shutil.copy2(label, (root / "labels/train").joinpath(f"{tag}-{image.stem}.txt"))
    spec = {"path": str(root), "train": "images/train", "val": str(val / "images/test"), "names": NAMES}
    (root / "data.yaml").write_text(json.dumps(spec))
    return root / "data.yaml"


def _fine_tune(data_yaml: Path, out: Path) -> Path:
    model = load_yolo(str(ASSET))
    model.train(
        data=str(data_yaml), epochs=EPOCHS, imgsz=320, batch=8, workers=0, seed=0, deterministic=True,
        project=str(out), name="run", exist_ok=True, plots=False, val=False, verbose=False, close_mosaic=2,
    )  # fmt: skip
    return out / "run" / "weights" / "last.pt"


def _score(weights: Path, test_root: Path, out: Path) -> float:
    spec = {"path": str(test_root), "train": "images/test", "val": "images/test", "test": "images/test", "names": NAMES}
    (test_root / "data.yaml").write_text(json.dumps(spec))
    result = evaluate_checkpoint(weights, test_root / "data.yaml", "test", EvaluateSettings(), out, plots=False)
    return result.map50_95


def main() -> dict[str, Any]:
    console = Console()
    work = Path(tempfile.mkdtemp(prefix="bench-labelling-"))
    try:
        same = _generate(work / "pool-same", 61, DomainShift(), "test", POOL_EACH)
        shifted = _generate(work / "pool-shifted", 62, SHIFT, "test", POOL_EACH)
        old = _generate(work / "old", 7, DomainShift(), "train", 120)  # the model's own training domain
        test_shifted = _generate(work / "test-shifted", 63, SHIFT, "test", 40)
        test_same = _generate(work / "test-same", 64, DomainShift(), "test", 40)
        pool = sorted((same / "images/test").glob("*.jpg")) + sorted((shifted / "images/test").glob("*.jpg"))
        old_images = sorted((old / "images/train").glob("*.jpg"))

        embedder = Embedder(ASSET)
        detector = Detector(TorchRuntime(ASSET), ModelCard(NAMES, 320))
        started = time.perf_counter()
        reference = embed_files(old_images, embedder)
        chosen = [c.path for c in select(pool, detector, embedder, reference, LabelSettings(count=PICK))]
        select_s = time.perf_counter() - started
        rng = random.Random(0)
        randomly = rng.sample(pool, PICK)
        replay = rng.sample(old_images, REPLAY)

        def shifted_share(frames: list[Path]) -> float:
            return sum(f.is_relative_to(shifted) for f in frames) / len(frames)

        scores: dict[str, dict[str, float]] = {
            "before": {
                "shifted": _score(ASSET, test_shifted, work / "eval-before-s"),
                "same": _score(ASSET, test_same, work / "eval-before-d"),
            }
        }
        for arm, frames in (("random", randomly), ("selected", chosen)):
            console.print(f"fine-tuning on {arm} frames + replay ({EPOCHS} epochs)")
            root = work / f"set-{arm}"
            for kind in ("images", "labels"):
                (root / kind / "train").mkdir(parents=True)
            weights = _fine_tune(_training_set(root, frames, replay, test_shifted), work / f"train-{arm}")
            scores[arm] = {
                "shifted": _score(weights, test_shifted, work / f"eval-{arm}-s"),
                "same": _score(weights, test_same, work / f"eval-{arm}-d"),
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)

    table = Table(title=f"labelling: {PICK} of {2 * POOL_EACH} frames (half shifted), fine-tuned {EPOCHS} epochs")
    for column in ("frames", "shifted share", "mAP50-95 shifted test", "mAP50-95 in-distribution test"):
        table.add_column(column, justify="right" if column != "frames" else "left")
    table.add_row(
        "none (the model as it is)", "-", f"{scores['before']['shifted']:.3f}", f"{scores['before']['same']:.3f}"
    )
    table.add_row(
        "random",
        f"{shifted_share(randomly):.2f}",
        f"{scores['random']['shifted']:.3f}",
        f"{scores['random']['same']:.3f}",
    )
    table.add_row(
        "label select",
        f"{shifted_share(chosen):.2f}",
        f"{scores['selected']['shifted']:.3f}",
        f"{scores['selected']['same']:.3f}",
    )
    console.print(table)
    console.print(f"selection of {PICK} among {len(pool)} frames took {select_s:.1f} s (model on CPU, PyTorch)")
    result = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": available_cores()},
        "pool": {"frames": len(pool), "shifted": POOL_EACH, "picked": PICK, "replay": REPLAY, "epochs": EPOCHS},
        "shifted_share_selected": shifted_share(chosen),
        "shifted_share_random": shifted_share(randomly),
        "map50_95_shifted": {arm: s["shifted"] for arm, s in scores.items()},
        "map50_95_in_distribution": {arm: s["same"] for arm, s in scores.items()},
        "select_s": round(select_s, 2),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
