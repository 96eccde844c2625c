"""Benchmark: Conveyor runs beside other work, by how PyTorch's OpenMP threads wait (`OMP_WAIT_POLICY`).

    python -m bench.concurrency            # or: make bench-concurrency

A small flow run (`conveyor run` on the test suite's project: 40 synthetic 320 px images, a 1-epoch fine-tune of the
demo checkpoint, exports, gates, registry, push), against real MLflow and Prefect servers, timed:
- alone, and two at once (what the test suite's two workers do, or a training beside a busy model server);
- with OpenMP's waiting threads sleeping (PASSIVE: what `conveyor/offline.py` sets), spinning (ACTIVE), and as
  libgomp does when nothing is set (spin for a while, then sleep; emulated with an empty value, which libgomp
  rejects with one warning line and then uses its default).

Prints one table and writes bench/results/concurrency.json.
"""

from __future__ import annotations

import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

import conveyor  # noqa: F401  (offline switches before the ML imports)
from bench.record import host, write_result
from conveyor.lineage import cpu_model
from conveyor.net import free_port
from conveyor.paths import available_cores
from conveyor.scaffold import REPO
from tests.conftest import base_env, start_mlflow_server, start_prefect_server, stop_tree
from tests.flow_support import make_flow_project

RESULTS = REPO / "bench" / "results" / "concurrency.json"
POLICIES = {"PASSIVE (Conveyor's)": "PASSIVE", "ACTIVE": "ACTIVE", "libgomp's default": ""}


def timed_run(project: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(["conveyor", "run"], cwd=project, env=env, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise SystemExit(f"conveyor run failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def at_once(projects: list[Path], env: dict[str, str]) -> list[float]:
    times: list[float] = [0.0] * len(projects)

    def one(i: int) -> None:
        times[i] = timed_run(projects[i], env)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(projects))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return times


def main() -> None:
    console = Console()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="conveyor-bench-concurrency-") as tmp:
        root = Path(tmp)
        (root / "mlflow").mkdir()
        mlflow_port, prefect_port = free_port(), free_port()
        mlflow = start_mlflow_server(root / "mlflow", mlflow_port)
        (root / "prefect").mkdir()
        prefect = start_prefect_server(root / "prefect", prefect_port)
        try:
            servers = {
                "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
                "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
            }
            timed_run(make_flow_project(root / "warm-up")[0], base_env(**servers))  # caches, compiled kernels
            for label, policy in POLICIES.items():
                env = base_env(**servers, OMP_WAIT_POLICY=policy)
                alone = None
                if policy != "ACTIVE":
                    alone = timed_run(make_flow_project(root / uuid.uuid4().hex)[0], env)
                    console.print(f"{label}: one run alone {alone:.1f} s")
                pair = at_once([make_flow_project(root / uuid.uuid4().hex)[0] for _ in range(2)], env)
                console.print(f"{label}: two at once {pair[0]:.1f} s and {pair[1]:.1f} s")
                rows.append({"policy": label, "alone_s": alone, "two_at_once_s": [round(t, 1) for t in pair]})
        finally:
            stop_tree(prefect)
            stop_tree(mlflow)

    table = Table(title=f"a small flow run, by OpenMP wait policy ({cpu_model()}, {available_cores()} cores)")
    for column in ("OMP_WAIT_POLICY", "alone s", "two at once, s each", "slowdown"):
        table.add_column(column, justify="left" if column == "OMP_WAIT_POLICY" else "right")
    passive_alone = rows[0]["alone_s"]
    for row in rows:
        mean = statistics.mean(row["two_at_once_s"])
        table.add_row(
            row["policy"],
            f"{row['alone_s']:.1f}" if row["alone_s"] else "-",
            " / ".join(f"{t:.1f}" for t in row["two_at_once_s"]),
            f"{mean / passive_alone:.2f}x",
        )
    console.print(table)
    console.print("slowdown: the mean of the two runs at once over one PASSIVE run alone")
    result = {
        "rows": rows,
        "passive_vs_default_two_at_once": round(
            statistics.mean(rows[2]["two_at_once_s"]) / statistics.mean(rows[0]["two_at_once_s"]), 2
        ),
        "host": host(),
        "date": time.strftime("%Y-%m-%d"),
    }
    write_result(RESULTS, result, console)


if __name__ == "__main__":
    main()
