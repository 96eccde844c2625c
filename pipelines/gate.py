"""Validation gates: a challenger becomes champion only if it earns it.

Gates: absolute thresholds (mAP50-95, mAP50, the worst class's recall), no regression against the current champion
re-scored on the same test split with the same settings (not a number copied from its old run), export parity of
every served format (detections and the features output), and latency judged about the model, not the host: the
challenger's serving export against the champion's, measured side by side here (`gates.latency_ratio`), and an
absolute budget only on the declared serving hardware (`gates.latency_target`). A champion that detects other classes
than this data has (a class map merged or dropped some) cannot be compared on one test split: the regression gate
fails and says so, and a person promotes the new version deliberately (`conveyor promote N --force`). A failed gate is a
normal outcome with a report that says which gate and by how much, not a crash.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from conveyor.lineage import cpu_model
from conveyor.paths import ProjectPaths, read_stage_output
from conveyor.settings import GateSettings, Settings
from conveyor.tables import FoldingTable
from conveyor.tracking import Tracker
from pipelines import registry, runtimes
from pipelines.dataset_view import class_names, load_manifest, materialize
from pipelines.evaluate import Evaluation, checkpoint_names, evaluate_checkpoint, trained_imgsz


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
            # Which champion the regression gate compared against: a later promotion by hand checks it still is.
            registry.GATED_AGAINST: self.champion_version or "-",
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
    unscored = [name for name, recall in recalls.items() if not math.isfinite(recall)]
    threshold = f">= {cfg.min_class_recall:.3f}"
    unknown = ""
    if unscored:  # min() over a NaN keeps whichever it met first: the verdict hung on the classes' order
        unknown = f"recall of {', '.join(unscored)} is not a number"
    elif missing:
        unknown = f"no test instances of {', '.join(missing)}"
    if unknown:
        results.append(GateResult("min class recall", threshold, "unknown", False, f"{unknown}: cannot check"))
    else:
        worst = min(recalls, key=lambda name: recalls[name])
        results.append(
            GateResult(
                "min class recall",
                threshold,
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


def unscored_champion_gate(challenger: float, champion_version: str | None, why: str) -> GateResult:
    """The regression gate when the champion cannot be re-scored: not passed on trust, with what a person does next."""
    return GateResult(
        "no regression vs champion",
        "the champion re-scored on this test split",
        f"{challenger:.3f}",
        False,
        f"champion v{champion_version} cannot be re-scored ({why}). Review this version and promote it deliberately "
        "with `conveyor promote VERSION --force --reason ...`, or roll the champion back (`conveyor rollback`)",
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
    return results


@dataclass(frozen=True)
class LatencyComparison:
    """The challenger's and the champion's serving exports timed side by side at batch 1: the challenger's time over
    the champion's in each pair of back-to-back calls, and the median of those ratios with its distribution-free 95 %
    interval (order statistics, scipy's `quantile_test`). The interval takes the pairs as independent; pairs of one
    opening share its state, so it shows how steady the calls were, not a guarantee. The medians in ms are
    for the report."""

    challenger_ms: float
    champion_ms: float
    ratio: float
    ratio_low: float
    ratio_high: float
    pairs: int

    @classmethod
    def from_pairs(cls, challenger_ms: Sequence[float], champion_ms: Sequence[float]) -> LatencyComparison:
        from scipy.stats import quantile_test

        ratios = np.asarray(challenger_ms, float) / np.asarray(champion_ms, float)
        median = float(np.median(ratios))
        interval = quantile_test(ratios, q=median, p=0.5).confidence_interval(0.95)  # nan with under 6 pairs
        return cls(
            statistics.median(challenger_ms),
            statistics.median(champion_ms),
            median,
            float(interval.low),
            float(interval.high),
            len(ratios),
        )


def compare_latency(
    open_challenger: Callable[[], runtimes.Runtime],
    open_champion: Callable[[], runtimes.Runtime],
    sample: np.ndarray,
    warmup: int,
    runs: int,
    rounds: int = 6,
    champion_sample: np.ndarray | None = None,
) -> LatencyComparison:
    """Both models on the same input (`champion_sample` when the champion takes another size) on this host, one call
    each in turn (`rounds` x `runs` pairs, the order swapped every pair), judged by the median of the pairs' ratios.
    Whatever else the host does lands on both calls of a pair alike; a burst of other work that lands on one model's
    calls more than the other's moves a ratio of medians but not the median of ratios. Measured by `make bench-gate`
    (bench/latency_gate.py, the same calls judged both ways): the same model twice, with one core kept busy or with
    bursts of other work beside it, read 0.93x to 1.16x as a ratio of medians (1 of 20 over 1.10x) and 1.003x to
    1.007x as the median of pair ratios. Rounds of 20 calls compared by p95 gave 1.72x.

    Every round opens both runtimes afresh, challenger first in one round and champion first in the next (an even
    number of rounds, so that neither model is opened first more often). With OpenVINO's threads pinned to cores, as
    they were, where they landed stayed with a runtime while it was open and moved the verdict by 0.02-0.03 (sd);
    Conveyor's runtimes now leave them unpinned (`runtimes.OpenVinoRuntime`), and the openings cost 0.2 s each."""
    if rounds < 2 or rounds % 2:
        raise ValueError(f"rounds must be even and at least 2 (half open the challenger first), not {rounds}")
    theirs_sample = sample if champion_sample is None else champion_sample
    mine: list[float] = []
    theirs: list[float] = []
    pair = 0
    for r in range(rounds):
        if r % 2 == 0:
            challenger = open_challenger()
            champion = open_champion()
        else:
            champion = open_champion()
            challenger = open_challenger()
        for _ in range(warmup):
            challenger.infer(sample)
            champion.infer(theirs_sample)
        calls = ((challenger, sample, mine), (champion, theirs_sample, theirs))
        for _ in range(runs):
            # Across rounds too, so that with an odd `runs` neither model is called first more often.
            for runtime, given, times in calls[:: 1 if pair % 2 == 0 else -1]:
                started = time.perf_counter()
                runtime.infer(given)
                times.append((time.perf_counter() - started) * 1000)
            pair += 1
        del challenger, champion  # one pair of compiled models in memory at a time
    return LatencyComparison.from_pairs(mine, theirs)


def latency_gates(
    cfg: GateSettings, comparison: LatencyComparison | None, why_not: str, own_p95_ms: float | None, host: str
) -> list[GateResult]:
    """Latency judged where it means something: against the champion on this host (a ratio), and against an
    absolute budget only on the declared serving hardware (`host`: where the export stage measured the p95). `why_not`:
    why there is no comparison, or a note on it."""
    runtime = cfg.serving_runtime
    if comparison is None:
        results = [GateResult(f"latency vs champion ({runtime})", f"<= {cfg.latency_ratio:.2f}x", "-", True, why_not)]
    else:
        results = [
            GateResult(
                f"latency vs champion ({runtime})",
                f"<= {cfg.latency_ratio:.2f}x",
                f"{comparison.ratio:.2f}x",
                comparison.ratio <= cfg.latency_ratio,
                f"median of {comparison.pairs} back-to-back pairs on this host (95 % CI "
                f"{comparison.ratio_low:.2f}-{comparison.ratio_high:.2f}x); {comparison.challenger_ms:.1f} vs "
                f"{comparison.champion_ms:.1f} ms" + (f" ({why_not})" if why_not else ""),
            )
        ]
    target = cfg.latency_target
    if target is not None:
        here = hardware_matches(target.hardware, host)
        if own_p95_ms is None:
            results.append(
                GateResult(f"latency target ({target.hardware})", f"<= {target.budget_ms:.1f} ms", "not measured",
                           False, f"no {runtime} export")
            )  # fmt: skip
        elif here:
            results.append(
                GateResult(
                    f"latency target ({target.hardware})",
                    f"<= {target.budget_ms:.1f} ms",
                    f"{own_p95_ms:.1f} ms",
                    own_p95_ms <= target.budget_ms,
                    f"p95 per image, batch 1, measured on {host}",
                )
            )
        else:
            results.append(
                GateResult(
                    f"latency target ({target.hardware})",
                    f"<= {target.budget_ms:.1f} ms",
                    "not checked",
                    True,
                    f"measured on {host}: the budget is for {target.hardware}; checked where the export stage runs "
                    "there",
                )
            )
    return results


def hardware_matches(hardware: str, host: str) -> bool:
    """Whether the budget's hardware names the host's: whole words, so that 'L4' is not an 'L40S' and 'A10' not an
    'A100' (the host string is the CPU model and the GPU names, comma-separated)."""
    words = re.findall(r"[a-z0-9]+", hardware.lower())
    for part in host.lower().split(","):
        tokens = re.findall(r"[a-z0-9]+", part)
        if any(tokens[i : i + len(words)] == words for i in range(len(tokens) - len(words) + 1)):
            return True
    return False


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
    champion_export: Path | None = None,
    champion_export_missing: str = "",
    champion_weights_missing: str = "",
) -> GateReport:
    """Every gate, from this run's evaluation and export reports and (if any) the champion re-scored here, its
    serving export measured beside this one's. `champion_weights_missing`: why the champion's weights could not be
    had (it cannot be re-scored, so no regression cannot be shown)."""
    cfg = settings.gates
    evaluation = Evaluation.from_json(read_stage_output(paths.evaluate / "evaluation.json", "evaluate"))
    export = read_stage_output(paths.export / "export.json", "export")
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
    if champion_weights_missing:
        regression = unscored_champion_gate(evaluation.map50_95, champion_version, champion_weights_missing)
    elif champion_names == data_names:
        regression = regression_gate(evaluation.map50_95, champion_score, champion_version, cfg)
    else:
        regression = class_change_gate(champion_names, data_names, champion_version)
    gates = [
        *absolute_gates(evaluation, cfg),
        regression,
        *export_gates(export, cfg),
        *side_by_side_latency(paths, settings, export, champion_version, champion_is_challenger, champion_export,
                              champion_export_missing,
                              trained_imgsz(champion_weights) if champion_weights is not None else None),
    ]  # fmt: skip
    return GateReport(all(g.passed for g in gates), run_id, champion_version, gates)


def side_by_side_latency(
    paths: ProjectPaths,
    settings: Settings,
    export: dict[str, Any],
    champion_version: str | None,
    champion_is_challenger: bool,
    champion_export: Path | None,
    champion_export_missing: str,
    champion_imgsz: int | None = None,
) -> list[GateResult]:
    """The challenger's serving export against the champion's, each at the input size it was trained and is served
    at: dynamic exports take any size, and a challenger timed at the champion's size (or the champion at the
    challenger's) would pass a model several times slower in service."""
    cfg = settings.gates
    mine = export.get("exports", {}).get(cfg.serving_runtime)
    own_p95 = float(mine["latency_p95_ms"]) if mine else None
    # The budget is judged on the hardware that measured the p95: the export stage's (an export.json from before it
    # said: this host's, as the stage ran here then).
    host = export.get("host") or cpu_model()
    comparison = None
    if mine is None:  # the model would be served on a runtime nobody measured: not passed on trust, first model too
        skipped = export.get("skipped", {}).get(cfg.serving_runtime) or "not in export.formats"
        unmeasured, *budget = latency_gates(
            cfg, None, f"no {cfg.serving_runtime} export of this model to measure: {skipped}", own_p95, host
        )
        return [replace(unmeasured, passed=False), *budget]
    if champion_version is None:
        why_not = "no champion yet: nothing to compare with"
    elif champion_is_challenger:
        why_not = "this run is the champion's own: the same model"
    elif champion_export is None:
        why_not = f"champion v{champion_version}: {champion_export_missing or 'no serving export to measure'}"
    else:
        size, theirs = int(export["imgsz"]), champion_imgsz or int(export["imgsz"])
        latency = settings.export.latency
        comparison = compare_latency(
            partial(runtimes.open_serving_export, cfg.serving_runtime, paths.root / mine["path"]),
            partial(runtimes.open_serving_export, cfg.serving_runtime, champion_export),
            np.full((1, 3, size, size), 114 / 255, np.float32),
            latency.warmup,
            latency.runs,
            champion_sample=np.full((1, 3, theirs, theirs), 114 / 255, np.float32),
        )
        why_not = "" if theirs == size else f"this model at {size} px, the champion at {theirs} px"
    return latency_gates(cfg, comparison, why_not, own_p95, host)


def print_gate_report(report: GateReport, console: Console) -> None:
    verdict = "[green]PASSED[/]" if report.passed else f"[red]FAILED[/]: {', '.join(report.failed)}"
    table = FoldingTable(title=f"gates: {verdict}")
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
    weights = champion_export = None
    missing = weights_missing = ""
    if champion is not None and champion.run_id != tracker.run_id:
        try:
            weights = registry.download_weights(tracker.client, champion, paths.scratch / "champion")
        except FileNotFoundError as exc:  # registered by hand, or its run's artifacts deleted: a verdict, not a crash
            weights_missing = str(exc)
        try:
            champion_export = registry.download_export(
                tracker.client, champion, settings.gates.serving_runtime, paths.scratch / "champion-export"
            )
        except FileNotFoundError as exc:
            missing = str(exc)
    report = evaluate_gates(
        paths,
        settings,
        weights,
        str(champion.version) if champion else None,
        tracker.run_id,
        champion_is_challenger=champion is not None and champion.run_id == tracker.run_id,
        champion_export=champion_export,
        champion_export_missing=missing,
        champion_weights_missing=weights_missing,
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
