"""Benchmark: the first ten minutes. A fresh clone of this checkout goes to a promoted champion with the README's
`make run`, then `make run` again with nothing changed. One run, one table.

    python -m bench.first_run [--keep]          # or: make bench-first-run

The clone gets its own Prefect home (so starting the local Prefect server is counted) and the package caches as they
are (pip's and uv's: "warm"). The environment install (`make env`: uv, then `uv sync`) and the first `make run` are
timed apart and summed. The no-op is run three times; its median is reported. The champion's test metrics are read
from the clone's metrics/evaluate.json. --keep leaves the clone (and its MLflow store) for a look in the UI.

Writes bench/results/first_run.json: fresh_to_champion_s, noop_run_s, their parts, the demo's test metrics per class,
and the targets (600 s, 10 s).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.record import host, write_result
from conveyor.lineage import cpu_model
from conveyor.paths import available_cores
from conveyor.scaffold import REPO

RESULTS = REPO / "bench" / "results" / "first_run.json"
FRESH_TARGET_S = 600.0
NOOP_TARGET_S = 10.0
NOOP_REPEATS = 3
FLOW_LINE = re.compile(r"flow ([\d.]+) s = stages ([\d.]+) s \((.*?)\)\s*\+ orchestration ([\d.]+) s", re.S)

console = Console()


def _timed(args: list[str], cwd: Path, env: dict[str, str], log: Path) -> tuple[float, str]:
    started = time.perf_counter()
    with log.open("w") as out:
        result = subprocess.run(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - started
    text = log.read_text()
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({result.returncode}); its output: {log}\n{text[-3000:]}")
    return seconds, text


def _flow_parts(output: str) -> dict[str, Any]:
    flat = " ".join(output.split())
    match = FLOW_LINE.search(flat)
    if match is None:
        return {}
    stages = dict(re.findall(r"(\w+) ([\d.]+)", match.group(3)))
    return {
        "flow_s": float(match.group(1)),
        "stages_s": float(match.group(2)),
        "stage_s": {name: float(seconds) for name, seconds in stages.items()},
        "orchestration_s": float(match.group(4)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the clone (printed) for a look in the MLflow UI")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the results file (one per host class)")
    args = parser.parse_args()
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
    if dirty.strip():
        console.print("[yellow]the checkout has uncommitted changes: the clone measures the last commit[/]")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()

    work = Path(tempfile.mkdtemp(prefix="conveyor-first-run-"))
    clone = work / "conveyor"
    logs = work / "logs"
    logs.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "VIRTUAL_ENV", "UV_"))}
    env["PREFECT_HOME"] = str(work / "prefect-home")
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p)
    try:
        subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
        console.print(f"fresh clone of {commit[:10]} in {clone}; `make env` ...")
        env_s, _ = _timed(["make", "env"], clone, env, logs / "make-env.log")
        console.print(f"environment installed in {env_s:.0f} s; `make run` ...")
        run_s, run_output = _timed(["make", "run"], clone, env, logs / "make-run-1.log")
        if "is the new champion" not in run_output:
            raise SystemExit(f"the first run promoted no champion; its output: {logs / 'make-run-1.log'}")
        console.print(f"champion after {env_s + run_s:.0f} s; no-op `make run` x{NOOP_REPEATS} ...")
        noops = []
        noop_parts = {}
        for i in range(NOOP_REPEATS):
            seconds, output = _timed(["make", "run"], clone, env, logs / f"make-run-noop-{i}.log")
            if "champion unchanged" not in output:
                raise SystemExit(f"the no-op run did something: {logs / f'make-run-noop-{i}.log'}")
            noops.append(seconds)
            noop_parts = _flow_parts(output)
        evaluation = json.loads((clone / "metrics" / "evaluate.json").read_text())
    finally:
        if (clone / ".venv" / "bin" / "conveyor").exists():
            subprocess.run([str(clone / ".venv/bin/conveyor"), "server", "stop"], cwd=clone, env=env, check=False)
    result: dict[str, Any] = {
        "fresh_to_champion_s": round(env_s + run_s, 1),
        "env_install_s": round(env_s, 1),
        "first_run_s": round(run_s, 1),
        "first_run": _flow_parts(run_output),
        "noop_run_s": round(statistics.median(noops), 2),
        "noop_runs_s": [round(s, 2) for s in noops],
        "noop_run": noop_parts,
        "targets": {"fresh_to_champion_s": FRESH_TARGET_S, "noop_run_s": NOOP_TARGET_S},
        "test": {
            "mAP50": evaluation["mAP50"],
            "mAP50-95": evaluation["mAP50-95"],
            "recall_per_class": {name: (c or {}).get("recall") for name, c in evaluation["per_class"].items()},
        },
        "commit": commit,
        "host": host(PYTHONDONTWRITEBYTECODE=os.environ.get("PYTHONDONTWRITEBYTECODE", "")),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_result(args.out, result)

    table = Table(title=f"First run on {available_cores()} cores ({cpu_model()})")
    for column in ("measure", "seconds", "target"):
        table.add_column(column)
    table.add_row("environment install (make env, warm caches)", f"{env_s:.0f}", "")
    stage_text = ", ".join(f"{k} {v:.0f}" for k, v in result["first_run"].get("stage_s", {}).items())
    table.add_row(f"first make run ({stage_text})", f"{run_s:.0f}", "")
    table.add_row("[bold]fresh clone -> champion", f"[bold]{env_s + run_s:.0f}", f"<= {FRESH_TARGET_S:.0f}")
    table.add_row("[bold]no-op make run (median)", f"[bold]{result['noop_run_s']:.1f}", f"<= {NOOP_TARGET_S:.0f}")
    recalls = "  ".join(f"{k} {v:.2f}" for k, v in result["test"]["recall_per_class"].items() if v is not None)
    table.add_row(f"demo: test mAP50 {evaluation['mAP50']:.3f}; recall {recalls}", "", "mAP50 >= 0.8, recall >= 0.5")
    console.print(table)
    console.print(f"written {args.out}")
    if args.keep:
        console.print(f"the clone: {clone} (MLflow UI: cd there and `make ui`)")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
