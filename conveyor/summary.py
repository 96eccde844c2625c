"""The end-of-job summary: what data, which run, how good, what was exported, and where to look."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console

from conveyor.errors import ConveyorError
from conveyor.lineage import data_version
from conveyor.paths import ProjectPaths
from conveyor.tables import FoldingTable
from conveyor.tracking import RunRecord, is_embedded


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        found = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:  # a merge conflict's markers in metrics/*.json, a cut file
        raise SummaryInputError(
            f"{path} is not JSON ({exc}): a merge conflict? Re-run its stage or restore it"
        ) from None
    return found if isinstance(found, dict) else {}


class SummaryInputError(ConveyorError, ValueError):
    """A stage's output the summary reads is damaged."""


def ui_command(paths: ProjectPaths, record: RunRecord | None) -> str:
    if record and not is_embedded(record.tracking_uri):
        return f"open {record.tracking_uri}"
    return "conveyor ui   (MLflow UI on http://127.0.0.1:5000)"


def summary_rows(paths: ProjectPaths) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    data = data_version(paths.data_dvc)
    validation = _read(paths.validation / "report.json")
    counts = validation.get("counts", {})
    split_text = ", ".join(f"{s} {c.get('accepted', 0)}" for s, c in counts.items())
    rows.append(("data version", f"{data.md5} ({split_text} images)"))
    record = RunRecord.load(paths.run_record) if paths.run_record.is_file() else None
    if record:
        rows.append(("MLflow run", f"{record.run_id} (experiment {record.experiment_id}, {record.tracking_uri})"))
    evaluation = _read(paths.metrics / "evaluate.json")
    if evaluation:
        rows.append(
            (
                f"{evaluation['split']} metrics",
                f"mAP50 {evaluation['mAP50']:.3f}  mAP50-95 {evaluation['mAP50-95']:.3f}  "
                f"precision {evaluation['precision']:.3f}  recall {evaluation['recall']:.3f}",
            )
        )
        per_class = evaluation.get("per_class", {})
        rows.append(
            (
                "per-class AP50-95",
                "  ".join(
                    f"{name} {'-' if v is None else format(v['AP50-95'], '.3f')}" for name, v in per_class.items()
                ),
            )
        )
    export = _read(paths.export / "export.json")
    if export:
        rows.append(("pytorch", f"artifacts/train/weights/best.pt  {export['pytorch_latency_ms']:.1f} ms/image"))
        for name, r in export.get("exports", {}).items():
            rows.append(
                (
                    name,
                    f"{r['path']}  {r['size_mb']:.1f} MB  {r['latency_ms']:.1f} ms/image  "
                    f"max|Δ| {r['max_abs_diff']:.2g}  ΔmAP50-95 {r['delta_map50_95']:+.4f}",
                )
            )
        for name, why in export.get("skipped", {}).items():
            rows.append((name, f"skipped: {why}"))
    gate = _read(paths.gate / "report.json")
    if gate:
        verdict = "passed" if gate["passed"] else f"FAILED: {', '.join(gate['failed'])}"
        champion = f"champion v{gate['champion_version']}" if gate.get("champion_version") else "no champion then"
        rows.append(("gates", f"{verdict} (compared with {champion}); artifacts/gate/report.md"))
    rows.append(("MLflow UI", ui_command(paths, record)))
    return rows


def print_summary(paths: ProjectPaths, console: Console, title: str = "Conveyor run") -> None:
    table = FoldingTable(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in summary_rows(paths):
        table.add_row(key, value)
    console.print(table)
