"""Evaluate the trained model on the held-out split: mAP50, mAP50-95, precision, recall, per class, confusion matrix.

The same function evaluates any checkpoint on any manifest, so a champion can be scored on the challenger's test
split with identical settings (`rect=False`: the letterboxed square input that exported static models also see).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from conveyor.paths import ProjectPaths
from conveyor.settings import EvaluateSettings, Settings
from conveyor.tables import FoldingTable
from conveyor.tracking import RunRecord, Tracker, set_review_view
from conveyor.yolo import load_yolo
from pipelines.dataset_view import materialize


@dataclass(frozen=True)
class ClassMetrics:
    ap50: float
    ap50_95: float
    precision: float
    recall: float
    instances: int


@dataclass(frozen=True)
class Evaluation:
    split: str
    images: int
    map50: float
    map50_95: float
    precision: float
    recall: float
    per_class: dict[str, ClassMetrics | None]  # None: the class has no instance in the split
    latency_ms: dict[str, float]  # Ultralytics' per-image preprocess / inference / postprocess

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Evaluation:
        per_class = {name: None if c is None else ClassMetrics(**c) for name, c in raw["per_class"].items()}
        return cls(**{**raw, "per_class": per_class})


def evaluate_checkpoint(
    weights: Path,
    data_yaml: Path,
    split: str,
    cfg: EvaluateSettings,
    save_dir: Path,
    *,
    imgsz: int | None = None,
    batch: int | None = None,
    plots: bool = True,
) -> Evaluation:
    """Score one model file (a .pt or an export Ultralytics can load) on one split of a dataset view.

    `imgsz` defaults to the size a .pt checkpoint was trained at; pass it for exported models.
    """
    model = load_yolo(str(weights))
    imgsz = imgsz or trained_imgsz(weights)
    metrics = model.val(
        data=str(data_yaml),
        split=split,
        imgsz=imgsz,
        batch=batch or cfg.batch,
        conf=cfg.conf,
        iou=cfg.iou,
        rect=False,
        plots=plots,
        project=str(save_dir.parent),
        name=save_dir.name,
        exist_ok=True,
        verbose=False,
    )
    box = metrics.box
    names: dict[int, str] = metrics.names
    per_class: dict[str, ClassMetrics | None] = {name: None for name in names.values()}
    counts = metrics.nt_per_class
    for i, cls in enumerate(box.ap_class_index):
        per_class[names[int(cls)]] = ClassMetrics(
            ap50=float(box.ap50[i]),
            ap50_95=float(box.ap[i]),
            precision=float(box.p[i]),
            recall=float(box.r[i]),
            instances=int(counts[int(cls)]),
        )
    images = sum(1 for f in (data_yaml.parent / "images" / split).rglob("*") if f.is_file())
    return Evaluation(
        split=split,
        images=images,
        map50=float(box.map50),
        map50_95=float(box.map),
        precision=float(box.mp),
        recall=float(box.mr),
        per_class=per_class,
        latency_ms={k: float(v) for k, v in metrics.speed.items()},
    )


def trained_imgsz(weights: Path) -> int:
    """The input size a checkpoint was trained at: evaluation and export must not silently change it."""
    import torch

    checkpoint = torch.load(weights, map_location="cpu", weights_only=False)
    imgsz = (checkpoint.get("train_args") or {}).get("imgsz", 640)
    return int(imgsz[0] if isinstance(imgsz, list | tuple) else imgsz)


def checkpoint_names(weights: Path) -> list[str]:
    """The classes a checkpoint detects, in id order (the gate refuses to compare models of different classes)."""
    names = load_yolo(str(weights)).names
    return [str(names[i]) for i in sorted(names)]


def metrics_for_tracking(evaluation: Evaluation, prefix: str) -> dict[str, float]:
    out = {
        f"{prefix}/mAP50": evaluation.map50,
        f"{prefix}/mAP50-95": evaluation.map50_95,
        f"{prefix}/precision": evaluation.precision,
        f"{prefix}/recall": evaluation.recall,
        f"{prefix}/latency_ms_per_image/pytorch": evaluation.latency_ms.get("inference", 0.0),
    }
    for name, cls in evaluation.per_class.items():
        if cls is not None:
            out[f"{prefix}/AP50-95/{name}"] = cls.ap50_95
            out[f"{prefix}/AP50/{name}"] = cls.ap50
            out[f"{prefix}/recall/{name}"] = cls.recall
    return out


def run(paths: ProjectPaths, settings: Settings, console: Console | None = None) -> Evaluation:
    """The evaluate stage: score best.pt on the held-out split, log to the training run, write DVC metrics."""
    console = console or Console()
    cfg = settings.evaluate
    tracker = Tracker.resume(paths)
    weights = paths.train / "weights" / "best.pt"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing: run the train stage first (`conveyor train`)")
    view = materialize(
        paths.validation / "manifest.json", paths.data, paths.scratch / "views" / "evaluate", (cfg.split,)
    )
    with tracker.stage("evaluate"):
        shutil.rmtree(paths.evaluate, ignore_errors=True)
        (paths.metrics / "evaluate.json").unlink(missing_ok=True)  # a failure from here leaves no older figures
        evaluation = evaluate_checkpoint(weights, view, cfg.split, cfg, paths.evaluate)

        (paths.evaluate / "evaluation.json").write_text(json.dumps(evaluation.to_json(), indent=2))
        paths.metrics.mkdir(parents=True, exist_ok=True)
        (paths.metrics / "evaluate.json").write_text(json.dumps(dvc_metrics(evaluation), indent=2) + "\n")
        tracker.log_metrics(metrics_for_tracking(evaluation, cfg.split))
        tracker.log_artifact(paths.evaluate, "evaluate")
        record = RunRecord.load(paths.run_record)
        set_review_view(
            tracker.client,
            record.experiment_id,
            metrics=[
                f"{cfg.split}/mAP50-95",
                f"{cfg.split}/mAP50",
                *(f"{cfg.split}/recall/{name}" for name in evaluation.per_class),
                "gates/passed",
                f"latency_ms/{settings.gates.serving_runtime}",
            ],
            params=["train.epochs", "train.imgsz", "train.weights"],
        )
        print_evaluation(evaluation, console)
        return evaluation


def dvc_metrics(evaluation: Evaluation) -> dict[str, Any]:
    """The small, flat-ish file `dvc metrics show/diff` reads."""
    return {
        "split": evaluation.split,
        "mAP50": round(evaluation.map50, 4),
        "mAP50-95": round(evaluation.map50_95, 4),
        "precision": round(evaluation.precision, 4),
        "recall": round(evaluation.recall, 4),
        "per_class": {
            name: None if cls is None else {"AP50-95": round(cls.ap50_95, 4), "recall": round(cls.recall, 4)}
            for name, cls in evaluation.per_class.items()
        },
        "latency_ms_per_image": {"pytorch": round(evaluation.latency_ms.get("inference", 0.0), 2)},
    }


def print_evaluation(evaluation: Evaluation, console: Console) -> None:
    table = FoldingTable(
        title=f"evaluation on {evaluation.split}: mAP50 {evaluation.map50:.3f}, mAP50-95 {evaluation.map50_95:.3f}"
    )
    for column in ("class", "instances", "AP50", "AP50-95", "precision", "recall"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name, cls in evaluation.per_class.items():
        if cls is None:
            table.add_row(name, "0", "-", "-", "-", "-")
        else:
            table.add_row(
                name,
                str(cls.instances),
                f"{cls.ap50:.3f}",
                f"{cls.ap50_95:.3f}",
                f"{cls.precision:.3f}",
                f"{cls.recall:.3f}",
            )
    console.print(table)
