"""Benchmark: is `conveyor label select` worth a person's labelling time? One run, one table.

    python -m bench.labelling            # or: make bench-labelling

A pool of unlabelled frames, half like the training data and half from a shifted line (the drift scenario's shift:
0.45x lighting, blur sigma 1.6, defects 1.7x), is scored by the bundled model (tests/assets, trained on the default
domain). The same number of frames is taken three ways: by `labelling.select.select`, by its uncertainty alone
(novelty weight 0), and at random; they are "labelled" with the generator's true boxes. The model is then fine-tuned
on each set plus the same replay sample of its old training data (same epochs and settings), `REPEATS` times with
another training seed (and another random draw), and each result is scored on a held-out shifted test set and on an
in-distribution one. Also: the share of shifted frames each way picked, and the selection's time.

Writes bench/results/labelling.json with the shifted shares, the mean mAP50-95 per arm on both test sets
(`before`, `random`, `uncertainty only`, `label select`) and every run's scores.
"""

from __future__ import annotations

import json
import random
import shutil
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

import conveyor  # noqa: F401  (offline switches before the ML imports)
from bench.record import host, write_result
from conveyor.scaffold import REPO
from conveyor.settings import DomainShift, EvaluateSettings, LabelSettings, SynthSettings
from conveyor.yolo import load_yolo
from labelling.select import embed_files, select
from pipelines import synth
from pipelines.evaluate import evaluate_checkpoint
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
REPEATS = 3  # training seeds (and random draws): one fine-tune on 72 images is noisy


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


def _fine_tune(data_yaml: Path, out: Path, seed: int) -> Path:
    model = load_yolo(str(ASSET))
    model.train(
        data=str(data_yaml), epochs=EPOCHS, imgsz=320, batch=8, workers=0, seed=seed, deterministic=True,
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

        detector = Detector(TorchRuntime(ASSET), ModelCard(NAMES, 320))
        started = time.perf_counter()
        reference = embed_files(old_images, detector)
        chosen = [c.path for c in select(pool, detector, reference, LabelSettings(count=PICK))]
        select_s = time.perf_counter() - started
        unsure = [c.path for c in select(pool, detector, reference, LabelSettings(count=PICK, novelty_weight=0.0))]
        replay = random.Random(100).sample(old_images, REPLAY)
        # Each repeat: another training seed for every arm, and another random draw for the random arm.
        picks = {
            "random": [random.Random(r).sample(pool, PICK) for r in range(REPEATS)],
            "uncertainty only": [unsure] * REPEATS,
            "label select": [chosen] * REPEATS,
        }
        scores: dict[str, dict[str, list[float]]] = {
            "before": {
                "shifted": [_score(ASSET, test_shifted, work / "eval-before-s")],
                "same": [_score(ASSET, test_same, work / "eval-before-d")],
            }
        }
        for arm, draws in picks.items():
            scores[arm] = {"shifted": [], "same": []}
            for repeat, frames in enumerate(draws):
                console.print(f"fine-tuning on {arm} frames + replay ({EPOCHS} epochs, seed {repeat})")
                root = work / f"set-{arm}-{repeat}"
                for kind in ("images", "labels"):
                    (root / kind / "train").mkdir(parents=True)
                data_yaml = _training_set(root, frames, replay, test_shifted)
                weights = _fine_tune(data_yaml, work / f"train-{arm}-{repeat}", seed=repeat)
                scores[arm]["shifted"].append(_score(weights, test_shifted, work / f"eval-{arm}-{repeat}-s"))
                scores[arm]["same"].append(_score(weights, test_same, work / f"eval-{arm}-{repeat}-d"))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def shifted_share(frames: list[Path]) -> float:
        return sum(f.is_relative_to(shifted) for f in frames) / len(frames)

    def spread(values: list[float]) -> str:
        mean = statistics.fmean(values)
        return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ({min(values):.3f}-{max(values):.3f})"

    table = Table(
        title=f"labelling: {PICK} of {2 * POOL_EACH} frames (half shifted), fine-tuned {EPOCHS} epochs, "
        f"mean (min-max) of {REPEATS} seeds"
    )
    for column in ("frames", "shifted share", "mAP50-95 shifted test", "mAP50-95 in-distribution test"):
        table.add_column(column, justify="right" if column != "frames" else "left")
    for arm, score in scores.items():
        share = "-" if arm == "before" else f"{statistics.fmean(shifted_share(f) for f in picks[arm]):.2f}"
        label = "none (the model as it is)" if arm == "before" else arm
        table.add_row(label, share, spread(score["shifted"]), spread(score["same"]))
    console.print(table)
    console.print(f"selection of {PICK} among {len(pool)} frames took {select_s:.1f} s (model on CPU, PyTorch)")
    result = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": host(),
        "pool": {"frames": len(pool), "shifted": POOL_EACH, "picked": PICK, "replay": REPLAY, "epochs": EPOCHS},
        "repeats": REPEATS,
        "shifted_share_selected": shifted_share(chosen),
        "shifted_share_uncertainty_only": shifted_share(unsure),
        "shifted_share_random": statistics.fmean(shifted_share(f) for f in picks["random"]),
        "map50_95_shifted": {arm: statistics.fmean(s["shifted"]) for arm, s in scores.items()},
        "map50_95_in_distribution": {arm: statistics.fmean(s["same"]) for arm, s in scores.items()},
        "runs": scores,
        "select_s": round(select_s, 2),
    }
    write_result(RESULTS, result)
    return result


if __name__ == "__main__":
    main()
