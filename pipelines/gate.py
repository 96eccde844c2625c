"""Validation gates: a challenger becomes champion only if it earns it.

Gates: absolute thresholds (mAP50-95, mAP50, the worst class's recall), no regression against the current champion
re-scored on the same test split with the same settings (not a number copied from its old run), export parity of
every served format, and the p95 latency budget on the serving runtime. A champion that detects other classes than
this data has (a class map merged or dropped some) cannot be compared on one test split: the regression gate fails
and says so, and a person promotes the new version deliberately (`conveyor promote N --force`). A failed gate is a
normal outcome with a report that says which gate and by how much, not a crash.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from conveyor.paths import ProjectPaths
from conveyor.settings import GateSettings, Settings
from conveyor.tracking import Tracker
from pipelines import registry
from pipelines.dataset_view import class_names, load_manifest, materialize
from pipelines.evaluate import Evaluation, checkpoint_names, evaluate_checkpoint


@dataclass(frozen=True)
class GateResult:
    gate: str
    threshold: str
    value: str
    passed: bool
    detail: str = ""


@dataclass
class GateReport:
    passed: bool
    challenger_run_id: str
    champion_version: str | None
    gates: list[GateResult] = field(default_factory=list)
    created_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    @property
    def failed(self) -> list[str]:
        return [g.gate for g in self.gates if not g.passed]

    def tags(self) -> dict[str, str]:
        """The verdict as MLflow tags, on the run and on the registered version."""
        return {
            "conveyor.gates.passed": str(self.passed).lower(),
            "conveyor.gates.failed": ",".join(self.failed) or "-",
        }

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "failed": self.failed}

    @classmethod
    def load(cls, path: Path) -> GateReport:
        raw = json.loads(path.read_text())
        raw.pop("failed", None)
        gates = [GateResult(**g) for g in raw.pop("gates")]
        return cls(gates=gates, **raw)

    def to_markdown(self) -> str:
        verdict = "**PASSED**: eligible for champion" if self.passed else f"**FAILED**: {', '.join(self.failed)}"
        champion = f"champion v{self.champion_version}" if self.champion_version else "no champion yet"
        lines = [
            f"### Gate report ({verdict})",
            "",
            f"Challenger run `{self.challenger_run_id}`, compared with {champion}.",
            "",
            "| gate | threshold | value | result |",
            "|---|---|---|---|",
        ]
        for g in self.gates:
            mark = "pass" if g.passed else "**FAIL**"
            detail = f" ({g.detail})" if g.detail else ""
            cells = (g.gate, g.threshold, f"{g.value}{detail}", mark)
            # "|ΔmAP50-95|" in a cell would end it: escaped, GitHub's and MLflow's Markdown show a plain bar.
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
        return "\n".join(lines) + "\n"


def absolute_gates(evaluation: Evaluation, cfg: GateSettings) -> list[GateResult]:
    results = [
        GateResult(
            "mAP50-95",
            f">= {cfg.min_map50_95:.3f}",
            f"{evaluation.map50_95:.3f}",
            evaluation.map50_95 >= cfg.min_map50_95,
        ),
        GateResult("mAP50", f">= {cfg.min_map50:.3f}", f"{evaluation.map50:.3f}", evaluation.map50 >= cfg.min_map50),
    ]
    # The worst class decides: a detector that never finds one defect class is not saved by a good mean.
    missing = [name for name, cls in evaluation.per_class.items() if cls is None]
    recalls = {name: cls.recall for name, cls in evaluation.per_class.items() if cls is not None}
    if missing:
        results.append(
            GateResult(
                "min class recall",
                f">= {cfg.min_class_recall:.3f}",
                "unknown",
                False,
                f"no test instances of {', '.join(missing)}: cannot check",
            )
        )
    else:
        worst = min(recalls, key=lambda name: recalls[name])
        results.append(
            GateResult(
                "min class recall",
                f">= {cfg.min_class_recall:.3f}",
                f"{recalls[worst]:.3f}",
                recalls[worst] >= cfg.min_class_recall,
                f"worst class: {worst}",
            )
        )
    return results


def regression_gate(
    challenger: float, champion: float | None, champion_version: str | None, cfg: GateSettings
) -> GateResult:
    if champion is None:
        return GateResult("no regression vs champion", "-", f"{challenger:.3f}", True, "no champion yet")
    floor = champion - cfg.regression_tolerance
    return GateResult(
        "no regression vs champion",
        f">= {floor:.3f} (champion {champion:.3f} - {cfg.regression_tolerance:.3f})",
        f"{challenger:.3f}",
        challenger >= floor,
        f"champion v{champion_version} re-scored on this test split",
    )


def class_change_gate(champion: list[str], data: list[str], champion_version: str | None) -> GateResult:
    """The regression gate when the classes changed: refused, with what a person does next."""
    return GateResult(
        "no regression vs champion",
        "same classes as the champion",
        f"classes {data}",
        False,
        f"champion v{champion_version} detects {champion}, this data has {data}: the classes changed, so the two "
        "models cannot be scored on one test split. Review this version and promote it deliberately with "
        "`conveyor promote VERSION --force --reason ...`",
    )


def export_gates(export: dict[str, Any], cfg: GateSettings) -> list[GateResult]:
    exports = export.get("exports", {})
    skipped = export.get("skipped", {})
    results = []
    for fmt in cfg.serving_formats:
        if fmt not in exports:
            why = skipped.get(fmt, "not in export.formats")
            results.append(
                GateResult(f"parity {fmt}", f"|ΔmAP50-95| <= {cfg.parity_max_delta:.3f}", "not exported", False, why)
            )
            continue
        delta = float(exports[fmt]["delta_map50_95"])
        results.append(
            GateResult(
                f"parity {fmt}",
                f"|ΔmAP50-95| <= {cfg.parity_max_delta:.3f}",
                f"{delta:+.4f}",
                abs(delta) <= cfg.parity_max_delta,
                f"max |Δ| raw output {float(exports[fmt]['max_abs_diff']):.2g}",
            )
        )
        results.append(features_gate(fmt, exports[fmt].get("features_rel_diff"), cfg))
    runtime = cfg.serving_runtime
    if runtime in exports:
        p95 = float(exports[runtime]["latency_p95_ms"])
        results.append(
            GateResult(
                f"latency p95 {runtime}",
                f"<= {cfg.latency_budget_ms:.1f} ms",
                f"{p95:.1f} ms",
                p95 <= cfg.latency_budget_ms,
                "per image, batch 1",
            )
        )
    else:
        results.append(
            GateResult(
                f"latency p95 {runtime}",
                f"<= {cfg.latency_budget_ms:.1f} ms",
                "not measured",
                False,
                skipped.get(runtime, "serving runtime not exported"),
            )
        )
    return results


def features_gate(fmt: str, rel_diff: float | None, cfg: GateSettings) -> GateResult:
    """The `features` output (what drift checks compare) must be the PyTorch model's, as the detections are."""
    threshold = f"max |Δ| <= {cfg.features_max_rel_diff:.0%} of max"
    if rel_diff is None:
        return GateResult(
            f"features parity {fmt}", threshold, "no output", True, "drift checks leave the embedding out"
        )
    return GateResult(
        f"features parity {fmt}",
        threshold,
        f"{rel_diff:.2%}",
        rel_diff <= cfg.features_max_rel_diff,
        "the model's features output vs PyTorch",
    )


def evaluate_gates(
    paths: ProjectPaths,
    settings: Settings,
    champion_weights: Path | None,
    champion_version: str | None,
    run_id: str,
    *,
    champion_is_challenger: bool = False,
) -> GateReport:
    """Every gate, from this run's evaluation and export reports and (if any) the champion re-scored here."""
    cfg = settings.gates
    evaluation = Evaluation.from_json(json.loads((paths.evaluate / "evaluation.json").read_text()))
    export = json.loads((paths.export / "export.json").read_text())
    # A re-run of the champion's own pipeline compares the model with itself: same split, same score.
    champion_score: float | None = evaluation.map50_95 if champion_is_challenger else None
    data_names = class_names(load_manifest(paths.validation / "manifest.json"))
    champion_names = checkpoint_names(champion_weights) if champion_weights is not None else data_names
    if champion_weights is not None and champion_names == data_names:
        view = materialize(
            paths.validation / "manifest.json", paths.data, paths.scratch / "views" / "gate", (settings.evaluate.split,)
        )
        champion_eval = evaluate_checkpoint(
            champion_weights,
            view,
            settings.evaluate.split,
            settings.evaluate,
            paths.scratch / "gate-eval" / "champion",
            plots=False,
        )
        champion_score = champion_eval.map50_95
    gates = [
        *absolute_gates(evaluation, cfg),
        regression_gate(evaluation.map50_95, champion_score, champion_version, cfg)
        if champion_names == data_names
        else class_change_gate(champion_names, data_names, champion_version),
        *export_gates(export, cfg),
    ]
    return GateReport(all(g.passed for g in gates), run_id, champion_version, gates)


def print_gate_report(report: GateReport, console: Console) -> None:
    verdict = "[green]PASSED[/]" if report.passed else f"[red]FAILED[/]: {', '.join(report.failed)}"
    table = Table(title=f"gates: {verdict}")
    for column in ("gate", "threshold", "value", "result", "detail"):
        table.add_column(column)
    for g in report.gates:
        table.add_row(g.gate, g.threshold, g.value, "[green]pass[/]" if g.passed else "[red]FAIL[/]", g.detail)
    console.print(table)


def run(paths: ProjectPaths, settings: Settings, console: Console | None = None) -> GateReport:
    """The gate stage: score the champion on this split, apply every gate, write and log the report."""
    console = console or Console()
    tracker = Tracker.resume(paths)
    with tracker.stage("gate"):
        return _gate(paths, settings, tracker, console)


def _gate(paths: ProjectPaths, settings: Settings, tracker: Tracker, console: Console) -> GateReport:
    champion = registry.current_champion(tracker.client, settings.registry.model_name)
    weights = None
    if champion is not None and champion.run_id != tracker.run_id:
        weights = registry.download_weights(tracker.client, champion, paths.scratch / "champion")
    report = evaluate_gates(
        paths,
        settings,
        weights,
        str(champion.version) if champion else None,
        tracker.run_id,
        champion_is_challenger=champion is not None and champion.run_id == tracker.run_id,
    )
    write_report(report, paths.gate)
    tracker.log_artifact(paths.gate, "gate")
    tracker.set_tags(report.tags())
    tracker.log_metrics({"gates/passed": float(report.passed)})
    print_gate_report(report, console)
    return report


def write_report(report: GateReport, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report.to_json(), indent=2))
    (out / "report.md").write_text(report.to_markdown())
