"""Benchmark: where a training epoch's time goes. One run, one table.

    python -m bench.epoch_time [DATA_YAML] [--epochs 4]

Trains yolo11n from its YAML for a few epochs on the demo data (a dataset view's data.yaml: after `make run`, the
project's `.conveyor/views/train/data.yaml`), once per setting below, and times each epoch's training and validation
with Ultralytics callbacks. Settings: Ultralytics' defaults; channels-last tensors (Conveyor's `train.channels_last`);
no validation but after the last epoch; 2 loader processes; decoded images cached in RAM; batch 16; an optimizer
step per batch (`nbs` 8). Run it on a quiet machine.

Writes bench/results/epoch_time.json: per setting, the train and val seconds of every epoch and the total.
"""

from __future__ import annotations

import argparse
import itertools
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
from conveyor.lineage import cpu_model
from conveyor.paths import available_cores
from conveyor.scaffold import REPO
from conveyor.yolo import load_yolo, use_channels_last

RESULTS = REPO / "bench" / "results" / "epoch_time.json"
CHANNELS_LAST = "channels_last"  # Conveyor's setting (an Ultralytics callback), not an Ultralytics train argument
SETTINGS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "channels_last": {CHANNELS_LAST: True},
    "val: false": {"val": False},
    "val: false, workers: 2": {"val": False, "workers": 2},
    "val: false, cache: ram": {"val": False, "cache": "ram"},
    "val: false, nbs: 8": {"val": False, "nbs": 8},
    "val: false, batch: 16": {"val": False, "batch": 16},
}


def time_epochs(data_yaml: Path, overrides: dict[str, Any], epochs: int, project: Path) -> dict[str, Any]:
    model = load_yolo("yolo11n.yaml")
    train_overrides = dict(overrides)
    if train_overrides.pop(CHANNELS_LAST, False):
        model.add_callback("on_pretrain_routine_end", use_channels_last)
    marks: list[tuple[str, float]] = []
    model.add_callback("on_train_epoch_start", lambda _: marks.append(("start", time.perf_counter())))
    model.add_callback("on_train_epoch_end", lambda _: marks.append(("train_end", time.perf_counter())))
    model.add_callback("on_fit_epoch_end", lambda _: marks.append(("fit_end", time.perf_counter())))
    args: dict[str, Any] = {
        "data": str(data_yaml),
        "epochs": epochs,
        "imgsz": 320,
        "batch": 8,
        "seed": 0,
        "deterministic": True,
        "workers": 0,
        "device": "cpu",
        "close_mosaic": 10,
        "project": str(project),
        "name": "run",
        "exist_ok": True,
        "plots": True,
        "verbose": False,
    }
    started = time.perf_counter()
    model.train(**(args | train_overrides))
    total = time.perf_counter() - started
    pairs = list(itertools.pairwise(marks))
    return {
        "overrides": overrides,
        "total_s": round(total, 1),
        "train_s": [round(b[1] - a[1], 1) for a, b in pairs if (a[0], b[0]) == ("start", "train_end")],
        "val_s": [round(b[1] - a[1], 1) for a, b in pairs if (a[0], b[0]) == ("train_end", "fit_end")],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_yaml", type=Path, nargs="?", default=REPO / ".conveyor/views/train/data.yaml")
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    if not args.data_yaml.is_file():
        raise SystemExit(f"{args.data_yaml} not found: run `make run` first, or pass a dataset view's data.yaml")
    console = Console()
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for name, overrides in SETTINGS.items():
            console.print(f"{name} ...")
            results[name] = time_epochs(args.data_yaml, overrides, args.epochs, Path(work) / "runs")
    record = {
        "epochs": args.epochs,
        "settings": results,
        "host": host(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_result(RESULTS, record)
    table = Table(title=f"Training epoch time, yolo11n 320 px, {available_cores()} cores ({cpu_model()})")
    for column in ("setting", "train s/epoch (median)", "range", "val s/epoch (median)", "total s"):
        table.add_column(column)
    for name, r in results.items():
        train = r["train_s"]
        table.add_row(
            name,
            f"{statistics.median(train):.1f}",
            f"{min(train):.1f}–{max(train):.1f}",
            f"{statistics.median(r['val_s']):.1f}",
            f"{r['total_s']:.0f}",
        )
    console.print(table)
    console.print(f"written {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
