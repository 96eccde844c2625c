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

Each repetition is judged two ways from the same calls: the ratio of the two medians (the statistic the gate used
before) and the median of the pairs' ratios (the gate now), against `gates.latency_ratio` (1.10x). The same model
should never fail; the larger one always. The loaded conditions run again with the runtimes' threads pinned to cores
(OpenVINO's default on Linux; Conveyor's runtimes leave them unpinned), with the champion's median time per image.

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

import conveyor  # noqa: F401  (offline switches before the ML imports)
from bench.record import host, write_result
from conveyor.lineage import cpu_model
from conveyor.paths import available_cores
from conveyor.scaffold import REPO
from conveyor.settings import GateSettings
from conveyor.tables import FoldingTable
from pipelines import gate, runtimes
from tests.load_support import busy_core, busy_with_bursts, latency_exports

RESULTS = REPO / "bench" / "results" / "latency_gate.json"


def judged(key: str, values: list[float], threshold: float) -> dict[str, Any]:
    """One statistic's verdicts over a condition's comparisons: the values, how many the gate would have failed, and
    their spread."""
    return {
        key: [round(v, 4) for v in values],
        f"{key}_fails": sum(v > threshold for v in values),
        f"{key}_sd": round(statistics.pstdev(values), 4),
    }


def print_table(rows: list[dict[str, Any]], threshold: float, console: Console) -> None:
    """One row per condition: the champion's median ms, then each statistic's range and failures (and the pair
    ratios' spread across comparisons)."""
    title = f"the latency gate's verdict (<= {threshold:.2f}x), {cpu_model()}, {available_cores()} cores"
    table = FoldingTable(title=title)
    for column in ("comparison", "n", "ms", "ratio of medians", "fails", "pair ratios (sd)", "fails"):
        table.add_column(column, justify="left" if column == "comparison" else "right")
    for row in rows:
        cells: list[str] = []
        for key in ("ratio_of_medians", "median_of_pair_ratios"):
            values = row[key]
            spread = f" ({row[f'{key}_sd']:.3f})" if key == "median_of_pair_ratios" else ""
            cells += [f"{min(values):.3f}-{max(values):.3f}{spread}", f"{row[f'{key}_fails']}/{len(values)}"]
        model = "" if row["challenger"] == "the same model" else ", 5x larger"
        threads = ", pinned" if row["threads"] == "pinned" else ""
        ms = f"{statistics.median(row['champion_ms']):.1f}"
        table.add_row(f"{row['condition']}{model}{threads}", str(row["repeats"]), ms, *cells)
    console.print(table)
    console.print(
        "The same model against itself unless said; ms: the champion's median per image. Each comparison's calls are "
        "judged by the ratio of the two medians and by the median of the pair ratios (the gate); ranges are over the n "
        "comparisons; fails: those the gate would have failed (the same model should never fail, the larger always). "
        "pinned: threads pinned to cores, OpenVINO's default on Linux; Conveyor's runtimes leave them unpinned."
    )


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
        # (condition, challenger, repeats, threads pinned): Conveyor's runtimes leave threads unpinned; the pinned
        # rows are OpenVINO's own default, for the comparison.
        plan = [(condition, "same", max(args.repeats // 2, 2) if condition == "quiet" else args.repeats, False)
                for condition in conditions]  # fmt: skip
        plan.append(("busy, with bursts", "larger", 3, False))
        plan += [(condition, "same", args.repeats, True) for condition in ("one core busy", "busy, with bursts")]
        for condition, challenger, repeats, pinned in plan:
            of_medians: list[float] = []
            of_pairs: list[float] = []
            champion_ms: list[float] = []
            threads = "pinned" if pinned else "unpinned"
            with conditions[condition]():
                for i in range(repeats):
                    comparison = gate.compare_latency(
                        partial(runtimes.OpenVinoRuntime, models[challenger], pin_threads=pinned),
                        partial(runtimes.OpenVinoRuntime, models["champion"], pin_threads=pinned),
                        sample,
                        3,
                        20,
                    )
                    of_medians.append(comparison.challenger_ms / comparison.champion_ms)
                    of_pairs.append(comparison.ratio)
                    champion_ms.append(comparison.champion_ms)
                    console.print(
                        f"{condition}, {challenger}, {threads} {i + 1}/{repeats}: ratio of medians "
                        f"{of_medians[-1]:.3f}, median of pair ratios {of_pairs[-1]:.3f} "
                        f"(95 % CI {comparison.ratio_low:.3f}-{comparison.ratio_high:.3f}), champion "
                        f"{comparison.champion_ms:.1f} ms"
                    )
            rows.append(
                {
                    "condition": condition,
                    "challenger": "the same model" if challenger == "same" else "YOLO11s (5x larger)",
                    "threads": threads,
                    "repeats": repeats,
                    "champion_ms": [round(ms, 2) for ms in champion_ms],
                    **judged("ratio_of_medians", of_medians, threshold),
                    **judged("median_of_pair_ratios", of_pairs, threshold),
                }
            )

    print_table(rows, threshold, console)
    result = {
        "threshold": threshold,
        "rows": rows,
        "host": host(),
        "date": time.strftime("%Y-%m-%d"),
    }
    write_result(RESULTS, result, console)


if __name__ == "__main__":
    main()
