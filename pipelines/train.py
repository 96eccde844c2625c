"""Train a YOLO detector on the validated data, tracked in MLflow (params, per-epoch metrics, weights, plots)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from conveyor.paths import ProjectPaths, available_cores
from conveyor.settings import ConfigError, Settings
from conveyor.tracking import TRAIN_STAGE, Tracker, flatten
from conveyor.yolo import load_yolo, resolve_device, use_channels_last
from pipelines.dataset_view import class_names, load_manifest, materialize

# Ultralytics files worth keeping in MLflow beside the weights.
PLOT_SUFFIXES = (".png", ".jpg")


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    weights: Path
    epochs_run: int
    seconds: float
    final_metrics: dict[str, float]


# The stages after training (evaluate, export, profile, gate) and the flow around them took a fifth of the training
# time in the measured first runs (bench/results/first_run*.json: 75 of 367 s on Zen 4, 106 of 470 s on a Xeon).
REST_OF_RUN = 0.2
# Ultralytics' training step (its loss, the optimizer, EMA, the data loader) took 0.78x the calibration's forward and
# backward pass over every output (measured on a Xeon: 0.55 against 0.71 s for the demo's batch of 8 at 320 px).
STEP_FACTOR = 0.78
# Training that would take less than this even at the first (slowest) pass's pace is timed by that pass alone.
SHORT_RUN_S = 60.0
BAR = 20


@dataclass(frozen=True)
class TrainingEstimate:
    """How long training will take on this machine, from a short calibration before it starts."""

    step_s: float  # one forward and backward pass of a batch
    steps_per_epoch: int
    validation_s: float  # one validation pass
    epochs: int

    @property
    def epoch_s(self) -> float:
        return self.step_s * self.steps_per_epoch + self.validation_s

    @property
    def seconds(self) -> float:
        return self.epoch_s * self.epochs

    def describe(self) -> str:
        return (
            f"on this machine training takes about {_duration(self.seconds)} ({self.epochs} epochs of about "
            f"{self.epoch_s:.0f} s: a training step {self.step_s:.2f} s x {self.steps_per_epoch}, validation "
            f"{self.validation_s:.1f} s), the whole run about {_duration(self.seconds * (1 + REST_OF_RUN))}"
        )


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _tensors(value: Any) -> Iterator[Any]:
    import torch

    if torch.is_tensor(value):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _tensors(item)


def estimate_training(
    model_source: str, cfg: Any, epochs: int, train_images: int, val_images: int, steps: int = 3
) -> TrainingEstimate:
    """Time a few forward and backward passes of the model on a batch of the configured size (and a validation
    forward pass) here, before training starts: a few seconds that say whether the run takes minutes or an hour."""
    import torch
    from ultralytics.utils import NUM_THREADS

    from conveyor.yolo import load_yolo

    torch.set_num_threads(NUM_THREADS)  # what Ultralytics' trainer sets on the CPU
    net: Any = load_yolo(model_source).model
    layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
    net = net.float().train().to(memory_format=layout)
    for parameter in net.parameters():  # a checkpoint loads frozen; the trainer unfreezes it the same way
        parameter.requires_grad_(True)
    batch = torch.rand(cfg.batch, 3, cfg.imgsz, cfg.imgsz).to(memory_format=layout)

    def step() -> None:
        loss = sum(t.float().mean() for t in _tensors(net(batch)))
        loss.backward()

    started = time.perf_counter()
    step()  # the first pass builds kernels: slower than the rest
    first_s = time.perf_counter() - started
    batches = max(1, math.ceil(train_images / cfg.batch))
    if first_s * batches * epochs > SHORT_RUN_S:
        started = time.perf_counter()
        for _ in range(steps):
            step()
        step_s = (time.perf_counter() - started) / steps * STEP_FACTOR
    else:  # even at the first pass's pace training is short: timing more passes would cost more than it tells
        step_s = first_s * STEP_FACTOR
    net.eval()
    with torch.inference_mode():
        net(batch)
        started = time.perf_counter()
        net(batch)
        per_image = (time.perf_counter() - started) / cfg.batch
    return TrainingEstimate(step_s, batches, per_image * val_images, epochs)


class EpochReporter:
    """One line per epoch for people (a bar, the metrics, the time left), one batched MLflow call per epoch for the
    record."""

    def __init__(self, tracker: Tracker, epochs: int, console: Console) -> None:
        self.tracker = tracker
        self.epochs = epochs
        self.console = console
        self.started = time.perf_counter()
        self.last: dict[str, float] = {}
        self.in_epoch = False  # Ultralytics also fires on_fit_epoch_end once after training, for best.pt

    def _final_eval(self, trainer: Any) -> None:
        """best.pt re-validated after the last epoch: logged as best/* (no step), not as an extra epoch."""
        best = {f"best/{k}": float(v) for k, v in trainer.metrics.items()}
        self.tracker.log_metrics(best)
        self.console.print(
            f"best.pt on val: mAP50 {best.get('best/metrics/mAP50(B)', 0.0):.3f}  "
            f"mAP50-95 {best.get('best/metrics/mAP50-95(B)', 0.0):.3f}",
            highlight=False,
        )

    def on_train_epoch_end(self, trainer: Any) -> None:
        self.in_epoch = True

    def on_fit_epoch_end(self, trainer: Any) -> None:
        if not self.in_epoch:
            self._final_eval(trainer)
            return
        self.in_epoch = False
        metrics: dict[str, float] = {
            **trainer.label_loss_items(trainer.tloss, prefix="train"),
            **trainer.metrics,
            **trainer.lr,
        }
        metrics = {k: float(v) for k, v in metrics.items()}
        self.tracker.log_metrics(metrics, step=trainer.epoch + 1)
        self.last = metrics
        elapsed = time.perf_counter() - self.started
        done = trainer.epoch + 1
        filled = round(BAR * done / self.epochs)
        left = elapsed / done * (self.epochs - done)
        self.console.print(
            f"epoch {done:>3}/{self.epochs} {'█' * filled}{'░' * (BAR - filled)}  "
            f"box {metrics.get('train/box_loss', float('nan')):.3f}  "
            f"cls {metrics.get('train/cls_loss', float('nan')):.3f}  "
            f"val mAP50 {metrics.get('metrics/mAP50(B)', 0.0):.3f}  "
            f"mAP50-95 {metrics.get('metrics/mAP50-95(B)', 0.0):.3f}  "
            f"[{elapsed:.0f} s{f', about {_duration(left)} left' if done < self.epochs else ''}]",
            highlight=False,
        )


OPTIMIZERS = {"Adam", "Adamax", "AdamW", "NAdam", "RAdam", "RMSprop", "SGD", "MuSGD", "auto"}  # Ultralytics' names


def check_extra(extra: dict[str, Any]) -> None:
    """`train.extra` (and `train.finetune.extra`) as Ultralytics checks them, before a run is opened. A misspelt key
    or a value of the wrong type was Ultralytics' SyntaxError or TypeError inside `model.train`: a traceback, a
    FAILED MLflow run, and the flow tried the stage again; an unknown optimizer failed after the first batch."""
    from ultralytics.cfg import DEFAULT_CFG, get_cfg

    try:
        get_cfg(DEFAULT_CFG, dict(extra))
    except (SyntaxError, TypeError, ValueError) as exc:
        raise ConfigError(f"train.extra (or train.finetune.extra): {str(exc).strip()}") from None
    optimizer = extra.get("optimizer")
    if optimizer is not None and str(optimizer).lower() not in {name.lower() for name in OPTIMIZERS}:
        raise ConfigError(
            f"train.extra (or train.finetune.extra): optimizer {optimizer!r} is not one of {sorted(OPTIMIZERS)}"
        )


def run(paths: ProjectPaths, settings: Settings, console: Console | None = None) -> TrainResult:
    """The train stage: YOLO from a model YAML (or warm start from a checkpoint) on train/val of the manifest."""
    console = console or Console()
    cfg = settings.train
    manifest_path = paths.validation / "manifest.json"
    manifest = load_manifest(manifest_path)
    if cfg.weights is not None and not (paths.root / cfg.weights).is_file():
        raise FileNotFoundError(f"train.weights: checkpoint {cfg.weights} not found (relative to {paths.root})")
    data_yaml = materialize(manifest_path, paths.data, paths.scratch / "views" / "train", ("train", "val"))

    # Loaded before a run is opened: a model that cannot load, or a device this machine lacks, leaves no failed run
    # and run.json as it was.
    device = resolve_device(cfg.device)
    model = load_yolo(str(paths.root / cfg.weights) if cfg.weights else cfg.model)
    check_extra(cfg.effective_extra)
    paths.train.mkdir(parents=True, exist_ok=True)
    tracker = Tracker.start(paths, settings, run_name=f"train-{time.strftime('%Y%m%d-%H%M%S')}")
    with tracker.stage(TRAIN_STAGE):
        splits = manifest["splits"]
        assert isinstance(splits, dict)
        tracker.log_params(
            {
                **flatten("train", settings.train.model_dump(mode="json")),
                "data.classes": ",".join(class_names(manifest)),
                **{f"data.{split}_images": str(len(files)) for split, files in splits.items()},
            }
        )

        epochs = cfg.effective_epochs
        reporter = EpochReporter(tracker, epochs, console)
        model.add_callback("on_train_epoch_end", reporter.on_train_epoch_end)
        model.add_callback("on_fit_epoch_end", reporter.on_fit_epoch_end)
        if cfg.channels_last:
            model.add_callback("on_pretrain_routine_end", use_channels_last)
        try:
            estimate = estimate_training(
                str(paths.root / cfg.weights) if cfg.weights else cfg.model,
                cfg,
                epochs,
                len(splits.get("train", [])),
                len(splits.get("val", [])),
            )
            console.print(estimate.describe(), highlight=False)
            tracker.log_metrics({"train/estimated_s": estimate.seconds})
        except Exception as exc:  # an estimate is a courtesy: training goes on without one
            console.print(f"no time estimate ({type(exc).__name__}: {exc})", highlight=False)
        console.print(
            f"{'fine-tuning' if cfg.weights else 'training'} {cfg.weights or cfg.model} for {epochs} epochs at "
            f"{cfg.imgsz} px on "
            f"{'CPU x' + str(available_cores()) if device == 'cpu' else 'CUDA:' + device}; MLflow run {tracker.run_id}"
        )
        started = time.perf_counter()
        # What an earlier training left (`conveyor train` by hand, where DVC has not emptied the folder): by content
        # and identity, not by time, which a stepped clock or a network filesystem's server moves.
        earlier = _files_of(paths.train)
        model.train(
            data=str(data_yaml),
            epochs=epochs,
            imgsz=cfg.imgsz,
            batch=cfg.batch,
            nbs=cfg.nbs,
            seed=cfg.seed,
            deterministic=True,
            patience=cfg.patience,
            workers=cfg.workers,
            device=device,
            close_mosaic=cfg.close_mosaic,
            project=str(paths.artifacts),
            name=paths.train.name,
            exist_ok=True,
            plots=cfg.plots,
            verbose=False,
            **cfg.effective_extra,
        )
        seconds = time.perf_counter() - started
        weights = paths.train / "weights" / "best.pt"
        written = sorted(path for path, signature in _files_of(paths.train).items() if earlier.get(path) != signature)
        if weights not in written:  # an earlier training's best.pt would be evaluated and exported as this one's
            raise RuntimeError(f"training finished without writing {weights} (train.extra save: false?)")

        epochs_run = len(_read_epochs(paths.train / "results.csv"))  # early stopping may end before cfg.epochs
        tracker.log_metrics({"train/epochs_run": epochs_run})
        # Only what this training wrote: an earlier training's plots and checkpoints were logged as this run's own.
        for path in written:
            if path.parent == paths.train / "weights":
                tracker.log_artifact(path, "weights")
            elif path.parent == paths.train and path.suffix in PLOT_SUFFIXES:
                tracker.log_artifact(path, "train_plots")
            elif path.parent == paths.train and path.name in ("results.csv", "args.yaml"):
                tracker.log_artifact(path, "train")
        return TrainResult(tracker.run_id, weights, epochs_run, seconds, reporter.last)


def _files_of(folder: Path) -> dict[Path, tuple[int, int, int]]:
    """Each file under `folder` by its modification time, size and inode: a file written again differs in one."""
    found = {}
    for path in folder.rglob("*"):
        if path.is_file():
            stat = path.stat()
            found[path] = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
    return found


def _read_epochs(results_csv: Path) -> list[str]:
    lines = results_csv.read_text().splitlines() if results_csv.is_file() else []
    return lines[1:]
