"""Benchmark: the latency gate on a busy host, by the statistic it judges with.

    python -m bench.latency_gate            # or: make bench-gate

The gate's own measurement (`pipelines.gate.compare_latency`: the challenger's and the champion's OpenVINO exports at
batch 1, 120 pairs of back-to-back calls over six fresh openings, in turns challenger first and champion first) of
the tests' demo checkpoint against itself (exported twice: a model exactly as fast as its champion) and of a five
times larger model (YOLO11s) against it, repeated on this host:
- quiet: nothing else running;
- one core busy: a thread of this process multiplying matrices;
- busy, with bursts: that thread, and another process doing bursts of BLAS work (50-500 ms on, 0-300 ms off) the way
  a second test worker or a training beside the gate does (what `tests/test_gate.py` runs the gate beside).

Each repetition is judged two ways from the same calls: the ratio of the two medians (the gate before this bench)
and the median of the pairs' ratios (the gate now), against `gates.latency_ratio` (1.10x). The same model should
never fail; the larger one always.

Prints one table and writes bench/results/latency_gate.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

import conveyor  # noqa: F401  (offline switches before the ML imports)
from bench.record import host, write_result
from conveyor.lineage import cpu_model
from conveyor.paths import available_cores
from conveyor.scaffold import REPO
from conveyor.settings import GateSettings
from pipelines import gate, runtimes
from tests.load_support import busy_core, busy_with_bursts, latency_exports

RESULTS = REPO / "bench" / "results" / "latency_gate.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10, help="comparisons of the same model per loaded condition")
    args = parser.parse_args()
    console = Console()
    threshold = GateSettings().latency_ratio
    sample = np.full((1, 3, 320, 320), 114 / 255, np.float32)
    conditions: dict[str, Callable[[], AbstractContextManager[None]]] = {
        "quiet": nullcontext,
        "one core busy": busy_core,
        "busy, with bursts": busy_with_bursts,
    }
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="conveyor-bench-gate-") as tmp:
        models = latency_exports(Path(tmp))
        plan = [(condition, "same", max(args.repeats // 2, 2) if condition == "quiet" else args.repeats)
                for condition in conditions]  # fmt: skip
        plan.append(("busy, with bursts", "larger", 3))
        for condition, challenger, repeats in plan:
            of_medians: list[float] = []
            of_pairs: list[float] = []
            with conditions[condition]():
                for i in range(repeats):
                    comparison = gate.compare_latency(
                        partial(runtimes.OpenVinoRuntime, models[challenger]),
                        partial(runtimes.OpenVinoRuntime, models["champion"]),
                        sample,
                        3,
                        20,
                    )
                    of_medians.append(comparison.challenger_ms / comparison.champion_ms)
                    of_pairs.append(comparison.ratio)
                    console.print(
                        f"{condition}, {challenger} {i + 1}/{repeats}: ratio of medians {of_medians[-1]:.3f}, "
                        f"median of pair ratios {of_pairs[-1]:.3f} "
                        f"(95 % CI {comparison.ratio_low:.3f}-{comparison.ratio_high:.3f})"
                    )
            rows.append(
                {
                    "condition": condition,
                    "challenger": "the same model" if challenger == "same" else "YOLO11s (5x larger)",
                    "repeats": repeats,
                    "ratio_of_medians": [round(r, 4) for r in of_medians],
                    "median_of_pair_ratios": [round(r, 4) for r in of_pairs],
                }
            )

    table = Table(title=f"the latency gate's verdict (<= {threshold:.2f}x) on {cpu_model()}, {available_cores()} cores")
    for column in ("condition", "challenger", "n", "ratio of medians: median, range", "fails",
                   "median of pair ratios: median, range", "fails"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("condition", "challenger") else "right")
    for row in rows:
        cells: list[str] = []
        for key in ("ratio_of_medians", "median_of_pair_ratios"):
            values = row[key]
            row[f"{key}_fails"] = sum(v > threshold for v in values)
            cells += [
                f"{statistics.median(values):.3f}, {min(values):.3f}-{max(values):.3f}",
                f"{row[f'{key}_fails']}/{len(values)}",
            ]
        table.add_row(row["condition"], row["challenger"], str(row["repeats"]), *cells)
    console.print(table)
    console.print("fails: comparisons the gate would have failed. The same model should never fail, the larger always.")
    result = {
        "threshold": threshold,
        "rows": rows,
        "host": host(),
        "date": time.strftime("%Y-%m-%d"),
    }
    write_result(RESULTS, result, console)


if __name__ == "__main__":
    main()
