"""`conveyor drift` and `conveyor demo drift`: the drift check and the whole monitoring loop as a demo."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from conveyor.cli.common import console, friendly_errors, open_project, window_hours
from conveyor.tables import FoldingTable

if TYPE_CHECKING:
    from monitoring.check import CheckOutcome

app = typer.Typer()
demo_app = typer.Typer(help="Guided demonstrations on this machine.", no_args_is_help=True)
app.add_typer(demo_app, name="demo")


@app.command()
@friendly_errors
def drift(
    source: Annotated[
        Path | None, typer.Option(help="check a folder of images instead of the serving prediction log")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="the version to compare with (default: the one that served the window)")
    ] = None,
    hours: Annotated[
        float | None,
        typer.Option(callback=window_hours, help="window: the last T hours (default monitor.window_hours)"),
    ] = None,
    last: Annotated[
        int | None, typer.Option(min=1, help="window: only its last N records (monitor.window_records)")
    ] = None,
    device: Annotated[
        str, typer.Option(help="whose records in the log: 'server', or an edge runner's --device name")
    ] = "server",
    open_report: Annotated[bool, typer.Option("--open", help="open the report in a browser")] = False,
) -> None:
    """Check what the served model sees and predicts against its version's reference profile: a verdict per group
    of features (Evidently's statistics), the label-free performance estimate, and whether to alert or retrain.
    The log holds the server's records and those the edge runners ship (`edge.log.s3`, `run.py --log-s3`): one
    device per check."""
    from monitoring.check import CheckOptions, run_check

    paths, settings = open_project()
    outcome = run_check(paths, settings, CheckOptions(source, model, hours, last, device), console)
    print_outcome(outcome)
    if open_report and (outcome.report_dir / "report.html").is_file():
        import webbrowser

        webbrowser.open((outcome.report_dir / "report.html").as_uri())


def print_outcome(outcome: CheckOutcome) -> None:
    """The verdict per group in words, the performance estimate, the features that moved, and what was done."""
    result = outcome.result
    colour = {"drift": "red", "no drift": "green", "insufficient data": "yellow"}[result.status]
    groups = FoldingTable(
        title=f"{outcome.model_name} v{outcome.model_version}{where_from(outcome)}: [{colour}]{result.status}[/] "
        f"({result.current_rows} current rows vs {result.reference_rows} reference, batch '{result.reference_batch}')"
    )
    for column in ("group", "verdict", "strength", "deciding feature", "what changed"):
        groups.add_column(column, justify="right" if column == "strength" else "left", overflow="fold")
    for g in result.groups:
        groups.add_row(
            g.group,
            "[red]drift[/]" if g.drifted else "ok",
            f"{g.strength:.2f}",
            g.feature,
            g.words if g.drifted else "",
        )
    console.print(groups if result.groups else groups.title)
    moved = [f for f in result.features if f.drifted]
    if moved:
        table = FoldingTable(title=f"features past their thresholds ({len(moved)} of {len(result.features)})")
        for column in ("feature", "group", "effect", "threshold", "p-value", "reference mean", "current mean"):
            table.add_column(column, justify="left" if column in ("feature", "group") else "right")
        for f in sorted(moved, key=lambda f: -f.strength):
            table.add_row(
                f.name,
                f.group,
                f"{f.effect:.3g}",
                f"{f.threshold:.3g}",
                f"{f.p_value:.2g}",
                f"{f.reference_mean:.4g}",
                f"{f.current_mean:.4g}",
            )
        console.print(table)
    console.print(result.message, highlight=False, soft_wrap=True)
    found = outcome.estimate.estimate
    if found is not None:
        from monitoring.estimate import described

        console.print(
            f"performance (label-free): {described(found)}; {outcome.estimate.reason}",
            highlight=False,
            soft_wrap=True,
        )
    else:
        console.print(f"[yellow]no performance estimate[/]: {outcome.estimate.reason}", highlight=False, soft_wrap=True)
    for name, why in result.skipped.items():
        console.print(f"[yellow]skipped[/] {name}: {why}", highlight=False)
    if outcome.data.other_versions:
        left_out = ", ".join(f"v{v}: {n} rows" for v, n in outcome.data.other_versions.items())
        console.print(f"left out (served by other versions): {left_out}", highlight=False)
    for problem in outcome.data.unreadable:
        console.print(f"[yellow]unreadable[/] {problem}", highlight=False)
    decision = outcome.decision
    unsent = (
        "; not sent from here: the monitoring deployment (`conveyor deploy`) sends the events" if decision.alert else ""
    )
    console.print(
        f"alert: {decision.action if decision.alert else 'no'} ({decision.reason}){unsent}",
        highlight=False,
        soft_wrap=True,
    )
    where = outcome.mlflow_run_url or f"run {outcome.mlflow_run_id}"
    report = outcome.report_dir / "report.html"
    console.print(
        f"report: {report if report.is_file() else outcome.report_dir / 'summary.json'}; MLflow: {where}",
        highlight=False,
        soft_wrap=True,
    )


def where_from(outcome: CheckOutcome) -> str:
    """' on DEVICE' for an edge runner's window; nothing for the server's or a folder."""
    return f" on {outcome.data.device}" if outcome.data.device not in ("server", "folder") else ""


@demo_app.command("drift")
@friendly_errors
def demo_drift(
    browser: Annotated[bool, typer.Option(help="open the drift report in a browser at the end")] = True,
    keep_serving: Annotated[
        bool, typer.Option(help="leave the retrained champion serving at the end, until Ctrl-C")
    ] = False,
) -> None:
    """The whole monitoring loop on this machine: serve, control traffic, shifted traffic, drift event, retraining
    through the gates, hot swap, and no drift on the same traffic after it."""
    import time

    from stack.drift_demo import run_demo

    paths, settings = open_project()
    started = time.perf_counter()
    result = run_demo(paths, settings, console, open_browser=browser, keep_serving=keep_serving)
    table = FoldingTable(title=f"conveyor demo drift ({time.perf_counter() - started:.0f} s)")
    for column in ("step", "seconds", "outcome"):
        table.add_column(column, justify="right" if column == "seconds" else "left")
    for phase in result.phases:
        table.add_row(phase.name, f"{phase.seconds:.0f}", phase.outcome)
    console.print(table)
    if result.report is not None:
        console.print(f"drift report: {result.report}")
