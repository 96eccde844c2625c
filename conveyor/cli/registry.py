"""`conveyor models | promote | rollback | history | lineage`: the registry, its champion and where a model came
from."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from conveyor.cli.common import console, friendly_errors, open_registry
from conveyor.tables import FoldingTable

app = typer.Typer()

# --- registry -------------------------------------------------------------------------------------------------------


@app.command()
@friendly_errors
def models() -> None:
    """Registered versions with their aliases, gate status and test metrics."""
    from pipelines import registry

    _, settings, client = open_registry()
    name = settings.registry.model_name
    table = FoldingTable(title=f"registered model {name}")
    for column in ("version", "aliases", "gates", "test mAP50-95", "data", "created", "run"):
        table.add_column(column)
    found = registry.versions(client, name)
    aliases = registry.aliases_by_version(client, name) if found else {}
    for v in found:
        metrics = _run_metrics(client, v.run_id)
        gates = "pass" if registry.gates_passed(v) else f"FAIL ({v.tags.get('conveyor.gates.failed', '?')})"
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(v.creation_timestamp / 1000))
        table.add_row(
            str(v.version),
            registry.alias_text(aliases, v.version),
            gates,
            f"{metrics.get('test/mAP50-95', float('nan')):.3f}",
            v.tags.get("conveyor.data_md5", "?"),  # whole: `conveyor lineage --data` takes it as shown
            created,
            str(v.run_id)[:12] if v.run_id else "-",
        )
    console.print(table)


def _run_metrics(client: Any, run_id: str | None) -> dict[str, float]:
    """A version's run's metrics; none for a version registered by hand (no run) or whose run was deleted since
    (`mlflow gc`): that one row shows no metric, where the whole table was a traceback."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return {}
    try:
        return dict(client.get_run(run_id).data.metrics)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return {}
        raise


@app.command()
@friendly_errors
def promote(
    version: Annotated[str, typer.Argument(help="the version to make champion")],
    reason: Annotated[str, typer.Option(help="why (recorded in the history)")],
    force: Annotated[bool, typer.Option(help="promote even though its gates failed (recorded)")] = False,
) -> None:
    """Make a version the champion (refused if its gates failed, unless --force)."""
    from pipelines import registry

    _, settings, client = open_registry()
    move = registry.promote(client, settings.registry.model_name, version, reason=reason, force=force)
    console.print(f"champion: v{move.from_version or '-'} -> v{move.to_version} ({move.kind}: {move.reason})")


@app.command()
@friendly_errors
def rollback(reason: Annotated[str, typer.Option(help="why (recorded in the history)")]) -> None:
    """Move the champion back to the previous champion."""
    from pipelines import registry

    _, settings, client = open_registry()
    channel, line = settings.edge.channel, settings.edge.line

    def line_can_follow(target: str) -> None:
        """The line follows the champion back to the bundle it ran of that version: one it never ran refuses the
        rollback before the registry moves, so the two never disagree."""
        if channel:
            from serving import bundle

            try:
                bundle.last_run_of(channel, line, target)
            except bundle.ChannelError as exc:
                raise bundle.ChannelError(f"nothing was rolled back: {exc}") from None

    move = registry.rollback(client, settings.registry.model_name, reason=reason, before_move=line_can_follow)
    console.print(f"champion: v{move.from_version} -> v{move.to_version} (rollback: {move.reason})")
    if channel:
        from serving import bundle

        try:
            entry = bundle.roll_back_channel(channel, line, str(move.to_version))
        except bundle.ChannelError as exc:  # the store failed between the check and the write
            raise bundle.ChannelError(f"the registry rolled back, the edge channel did not: {exc}") from None
        console.print(f"edge channel {channel}: line {line} back to {entry['bundle']}")


@app.command()
@friendly_errors
def history() -> None:
    """Every alias move: from, to, when, why, by whom."""
    from pipelines import registry

    _, settings, client = open_registry()
    table = FoldingTable(title=f"alias history of {settings.registry.model_name}")
    for column in ("#", "when", "alias", "from", "to", "kind", "by", "reason"):
        table.add_column(column)
    for m in registry.history(client, settings.registry.model_name):
        table.add_row(
            str(m.seq),
            m.at,
            m.alias,
            f"v{m.from_version}" if m.from_version else "-",
            f"v{m.to_version}",
            m.kind,
            m.actor,
            m.reason,
        )
    console.print(table)


@app.command()
@friendly_errors
def lineage(
    ref: Annotated[str, typer.Argument(help="models:/NAME@alias, models:/NAME/VERSION, @champion or a version")] = (
        "@champion"
    ),
    data: Annotated[str | None, typer.Option("--data", help="list the versions trained on this data md5")] = None,
    restore: Annotated[
        bool,
        typer.Option(
            "--restore",
            help="write the version's run record (dvc.lock, params.yaml, data.dvc, metrics/) into this project; "
            "`dvc pull` then brings back its exact data and stage outputs",
        ),
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="with --restore: replace files with uncommitted changes")
    ] = False,
) -> None:
    """Where a model came from (data, code, params, runs, gates, exports), or what a data version produced."""
    from pipelines import lineage_report, registry

    if data and restore:
        raise typer.BadParameter("--restore takes a version (REF), not --data", param_hint="--restore")
    if force and not restore:
        raise typer.BadParameter("--force only goes with --restore", param_hint="--force")
    paths, settings, client = open_registry()
    name = settings.registry.model_name
    if restore:
        version, files = lineage_report.restore_run_record(client, paths, name, ref, force=force)
        console.print(
            f"{version.name} v{version.version}: restored {', '.join(str(f) for f in files)} from run "
            f"{version.run_id}\nnext: `dvc pull` brings back its data and stage outputs from the DVC remote "
            "(`dvc checkout` where this cache has them)"
        )
        return
    if data:
        found = lineage_report.versions_for_data(client, name, data)
        table = FoldingTable(title=f"versions of {name} trained on data {data}")
        for column in ("version", "aliases", "gates", "run"):
            table.add_column(column)
        aliases = registry.aliases_by_version(client, name) if found else {}
        for v in found:
            table.add_row(
                str(v.version),
                registry.alias_text(aliases, v.version),
                v.tags.get("conveyor.gates.passed", "?"),
                str(v.run_id),
            )
        console.print(table if found else f"no version of {name} was trained on data {data}")
        return
    result = lineage_report.lineage(client, paths, name, ref, settings.monitor.experiment)
    table = FoldingTable(
        title=f"{result.model} v{result.version} ({', '.join(result.aliases) or 'no alias'})", show_header=False
    )
    table.add_column(style="bold")
    table.add_column()
    for key, value in result.rows:
        table.add_row(key, value)
    console.print(table)
