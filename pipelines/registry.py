"""The MLflow Model Registry with a memory: versions, `challenger` / `champion` aliases, and the history of every
alias move (MLflow keeps none), kept as tags on the registered model so every client sees the same history.

Rules: a new version gets `challenger`; `champion` moves only when every gate passed, or by an explicit human
command (`--force` needs a reason, and is recorded). Rollback walks back along the champion's promotions and never
returns to a version it rolled back from.

A move is three writes (record, alias, record confirmed), so a process killed between any two leaves no half-recorded
move: a record still pending counts only if the alias did move, and is otherwise dropped (the next move reuses its
sequence number).
"""

from __future__ import annotations

import getpass
import json
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from conveyor.errors import ConveyorError
from conveyor.tracking import FLOW_RUN_TAG, MAX_REASON

CHALLENGER = "challenger"
CHAMPION = "champion"
HISTORY_PREFIX = "conveyor.alias_history."
GATES_PASSED = "conveyor.gates.passed"
GATED_AGAINST = "conveyor.gates.champion"  # the champion version a gate compared against ("-": none)
MODEL_DESCRIPTION = "YOLO defect detector trained by Conveyor."
DESCRIPTION_LIMIT = 5000  # MLflow's description column (VARCHAR(5000) on PostgreSQL)


class PromotionRefusedError(ConveyorError, RuntimeError):
    """The version may not become champion (gates failed and no --force, or it does not exist)."""


@dataclass(frozen=True)
class AliasMove:
    seq: int
    alias: str
    from_version: str | None
    to_version: str
    at: str
    kind: str  # register | promote | force | rollback
    reason: str
    actor: str  # a Prefect flow run, or user:NAME
    pending: bool = False  # recorded, the alias not yet confirmed moved
    id: str = ""  # unique to the move (older records have none)

    def to_tag(self) -> tuple[str, str]:
        # The key carries the move's own id after its sequence number: two moves at once that read the same history
        # pick the same number, and with the number alone one record overwrote the other.
        suffix = f".{self.id}" if self.id else ""
        return f"{HISTORY_PREFIX}{self.seq:06d}{suffix}", json.dumps(asdict(self), sort_keys=True)


def default_actor() -> str:
    try:
        return f"user:{getpass.getuser()}"
    except (KeyError, OSError):
        return "user:unknown"


def ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.create_registered_model(name, description=MODEL_DESCRIPTION)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def version_by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>[0-9]+))$")


class ModelRefError(ConveyorError, ValueError):
    """A model reference that names no version."""


def resolve(client: MlflowClient, default_name: str, ref: str) -> ModelVersion:
    """`models:/NAME@alias`, `models:/NAME/3`, `@champion`, or a version number of the configured model."""
    match = _MODEL_URI.match(ref)
    name, alias, version = (match["name"], match["alias"], match["version"]) if match else (default_name, None, None)
    if not match:
        if re.fullmatch(r"@[\w-]+", ref):
            alias = ref[1:]
        elif re.fullmatch(r"v?[0-9]+", ref):
            version = ref.lstrip("v")
        else:
            raise ModelRefError(f"'{ref}' is not models:/NAME@alias, models:/NAME/VERSION, @alias or a version")
    if version is not None:
        version = str(int(version))  # `02` is version 2
    if alias:
        found = version_by_alias(client, name, alias)
        if found is None:
            raise ModelRefError(f"{name} has no version with alias '{alias}'")
        return found
    if int(str(version)) > MAX_VERSION:  # past the store's integers: "Python int too large ..." was a traceback
        raise ModelRefError(f"{name} has no version {version}")
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise ModelRefError(f"{name} has no version {version}") from exc
        raise  # a server that is down is not a version that is missing


MAX_VERSION = 2**63 - 1  # the registry's version numbers are 64-bit integers in its database


def current_champion(client: MlflowClient, name: str) -> ModelVersion | None:
    return version_by_alias(client, name, CHAMPION)


def history(client: MlflowClient, name: str) -> list[AliasMove]:
    """Every alias move that happened, oldest first. A move left pending by a killed process counts when its alias
    points where it says (the kill came after the alias moved), and is left out when not (it never happened)."""
    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return []
        raise
    recorded = sorted(
        (AliasMove(**json.loads(v)) for k, v in model.tags.items() if k.startswith(HISTORY_PREFIX)),
        key=lambda m: (m.seq, m.at),
    )
    moves = []
    for move in recorded:
        if move.pending:
            if str(model.aliases.get(move.alias)) != move.to_version:
                continue
            move = replace(move, pending=False)
        moves.append(move)
    return moves


class ConcurrentMoveError(PromotionRefusedError):
    """Another promotion or rollback moved the alias while this one was being made; nothing was changed."""


UNSET = "<unset>"


def move_alias(
    client: MlflowClient,
    name: str,
    alias: str,
    version: str,
    *,
    kind: str,
    reason: str,
    actor: str,
    expected: str | None = UNSET,
) -> AliasMove:
    """Point `alias` at `version` and record the move: recorded pending, moved, confirmed. A kill between any two
    writes leaves a history that `history` reads truthfully (see the module docstring).

    The registry has no compare-and-set. So the alias is read again just before it moves: when another move took it
    elsewhere meanwhile (a `conveyor promote` during a flow's decision), this one is withdrawn, naming that one, and
    nothing changes; a move recorded from one champion never lands on another. `expected`: the version the caller
    decided against (a gate's champion), checked the same way."""
    previous = version_by_alias(client, name, alias)
    read = str(previous.version) if previous else None
    if expected != UNSET and read != expected:
        raise ConcurrentMoveError(f"{name}@{alias} is v{read}, not v{expected} as decided: nothing was changed")
    _confirm_pending(client, name)
    past = history(client, name)
    move = AliasMove(
        seq=(past[-1].seq + 1) if past else 1,
        alias=alias,
        from_version=read,
        to_version=str(version),
        at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        kind=kind,
        reason=reason,
        actor=actor,
        id=uuid.uuid4().hex[:8],
    )
    pending_key, pending_value = replace(move, pending=True).to_tag()
    client.set_registered_model_tag(name, pending_key, pending_value)
    now = version_by_alias(client, name, alias)
    if (str(now.version) if now else None) != read:
        client.delete_registered_model_tag(name, pending_key)
        raise ConcurrentMoveError(
            f"{name}@{alias} moved to v{now.version if now else None} by another promotion or rollback while this "
            f"one was made: nothing was changed; check `conveyor history`, then run it again if it still applies"
        )
    client.set_registered_model_alias(name, alias, str(version))
    client.set_registered_model_tag(name, *move.to_tag())
    client.update_registered_model(name, description=history_markdown([*past, move]))
    return move


def _confirm_pending(client: MlflowClient, name: str) -> None:
    """Confirm the moves a killed process left pending whose alias points where they say: they happened. `history`
    counts them only while the alias stays there, so the next move of that alias would otherwise erase one from the
    history, and a rollback would skip it (v1, v2, v3 killed after the alias moved, v4: rolled back to v2)."""
    model = client.get_registered_model(name)
    for key, value in model.tags.items():
        if not key.startswith(HISTORY_PREFIX):
            continue
        move = AliasMove(**json.loads(value))
        if not move.pending:
            continue
        if str(model.aliases.get(move.alias)) == move.to_version:
            client.set_registered_model_tag(name, *replace(move, pending=False).to_tag())
        elif move.id:
            # It never happened (killed before the alias moved, or withdrawn): its own key would otherwise outlive
            # it, and count as a second move of its number once the alias came to its version another way.
            client.delete_registered_model_tag(name, key)


def history_markdown(moves: list[AliasMove]) -> str:
    """The alias history for people (the registered model's description in the MLflow UI), newest first; the tags
    stay the machine-readable record."""
    header = [
        MODEL_DESCRIPTION,
        "",
        "**Alias history** (newest first; `conveyor history` prints all of it)",
        "",
        "| # | when | alias | move | kind | reason | by |",
        "|---|---|---|---|---|---|---|",
    ]
    text = "\n".join(header)
    for move in reversed(moves):
        source = f"v{move.from_version}" if move.from_version else "none"
        reason = move.reason.replace("|", "/")
        when = move.at[:16].replace("T", " ")  # to the minute: the tags keep the full time
        row = (
            f"\n| {move.seq} | {when} | {move.alias} | {source} → v{move.to_version} | {move.kind} | {reason} "
            f"| {move.actor} |"
        )
        if len(text) + len(row) > DESCRIPTION_LIMIT - 40:
            return text + "\n\n(older moves: `conveyor history`)"
        text += row
    return text


def gates_passed(version: ModelVersion) -> bool:
    return version.tags.get(GATES_PASSED) == "true"


def _check_reason_length(reason: str) -> None:
    if len(reason) > MAX_REASON:  # it was MLflow's "exceeds the maximum length" traceback
        raise PromotionRefusedError(f"--reason is {len(reason)} characters; at most {MAX_REASON}: say it shorter")


def promote(
    client: MlflowClient,
    name: str,
    version: str,
    *,
    reason: str,
    actor: str | None = None,
    force: bool = False,
    expected_champion: str | None = UNSET,
) -> AliasMove:
    """Make `version` the champion. Refused when its gates failed, unless forced with a reason (recorded).
    `expected_champion`: the champion the caller's gates compared against; another one by now is refused."""
    if not reason.strip():
        raise PromotionRefusedError("a promotion needs a reason (--reason)")
    _check_reason_length(reason)
    if not re.fullmatch(r"v?[0-9]+", str(version)):  # ASCII digits: `３` passed `\d`, and `02` is not `2`
        raise PromotionRefusedError(f"'{version}' is not a version number of {name}")
    version = str(int(str(version).lstrip("v")))
    if int(version) > MAX_VERSION:
        raise PromotionRefusedError(f"{name} has no version {version}")
    try:
        target = client.get_model_version(name, version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise PromotionRefusedError(f"{name} has no version {version}") from exc
        raise  # a server that does not answer
    passed = gates_passed(target)
    if not passed and not force:
        failed = target.tags.get("conveyor.gates.failed", "not gated")
        raise PromotionRefusedError(
            f"{name} v{version} did not pass its gates ({failed}); use --force with a --reason to override"
        )
    champion = current_champion(client, name)
    if champion is not None and str(champion.version) == str(version):
        raise PromotionRefusedError(f"{name} v{version} is already the champion")
    now = str(champion.version) if champion is not None else "-"
    gated_against = target.tags.get(GATED_AGAINST)
    stale = gated_against is not None and gated_against != now
    if passed and not force and stale:
        # Its "no regression" was against another champion: v5 gated against v3 went in over a better v6.
        against = f"v{gated_against}" if gated_against != "-" else "no champion"
        raise PromotionRefusedError(
            f"{name} v{version} passed its gates against {against}, but the champion is now "
            f"{'v' + now if now != '-' else 'none'}: that comparison no longer holds. Run the pipeline for it again, "
            "or use --force with a --reason"
        )
    kind = "promote" if passed and not stale else "force"
    return move_alias(
        client,
        name,
        CHAMPION,
        str(version),
        kind=kind,
        reason=reason,
        actor=actor or default_actor(),
        # The champion the checks above read: one that moved since (a flow promoting) is refused, not replaced.
        expected=(None if now == "-" else now) if expected_champion == UNSET else expected_champion,
    )


def rollback_target(
    moves: list[AliasMove], current: str | None, exists: Callable[[str], bool] = lambda v: True
) -> str | None:
    """The champion before the current one, skipping versions that were rolled back from, and those that no longer
    `exist` (deleted from the registry).

    The champions form a stack: a promotion (forced or not) pushes its version, a rollback returns to the last time
    its target was champion. A version promoted again after others (v1, v2, v1) is a new entry, so the previous
    champion of the last v1 is v2, not nothing."""
    stack: list[str] = []
    rolled_back: set[str] = set()
    for move in (m for m in moves if m.alias == CHAMPION):
        if move.kind != "rollback":
            stack.append(move.to_version)
            rolled_back.discard(move.to_version)  # promoted again since (fixed, or deliberately): a champion again
            continue
        if move.from_version is not None:
            rolled_back.add(move.from_version)
        if move.to_version in stack:
            del stack[len(stack) - stack[::-1].index(move.to_version) :]
        else:
            stack.append(move.to_version)
    if current in stack:
        stack = stack[: len(stack) - 1 - stack[::-1].index(current)]
    candidates = [v for v in stack if v not in rolled_back and v != current]
    return next((v for v in reversed(candidates) if exists(v)), None)


def rollback(
    client: MlflowClient,
    name: str,
    *,
    reason: str,
    actor: str | None = None,
    before_move: Callable[[str], object] | None = None,
) -> AliasMove:
    """The champion moved back (`rollback_target`). `before_move(target)` is called first and may raise to refuse:
    what else must follow the champion (an edge channel) is checked before the alias moves, not after."""
    if not reason.strip():
        raise PromotionRefusedError("a rollback needs a reason (--reason)")
    _check_reason_length(reason)
    champion = current_champion(client, name)
    registered = {str(v.version) for v in versions(client, name)}
    target = rollback_target(
        history(client, name), str(champion.version) if champion else None, registered.__contains__
    )
    if target is None:
        raise PromotionRefusedError(f"{name} has no earlier champion to roll back to")
    if before_move is not None:
        before_move(target)
    return move_alias(
        client,
        name,
        CHAMPION,
        target,
        kind="rollback",
        reason=reason,
        actor=actor or default_actor(),
        expected=str(champion.version) if champion else None,
    )


def versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    found = client.search_model_versions(f"name = '{name}'", max_results=1000)
    return sorted(found, key=lambda v: int(v.version))


def aliases_by_version(client: MlflowClient, name: str) -> dict[str, list[str]]:
    """Version -> its aliases (version searches do not return aliases; the registered model does)."""
    out: dict[str, list[str]] = {}
    for alias, version in client.get_registered_model(name).aliases.items():
        out.setdefault(str(version), []).append(alias)
    return out


def alias_text(aliases: dict[str, list[str]], version: str | int) -> str:
    """A version's aliases for a table cell, from `aliases_by_version`."""
    return ", ".join(sorted(aliases.get(str(version), []))) or "-"


def registered_by_flow_run(client: MlflowClient, name: str, flow_run_id: str) -> bool:
    """Whether the training flow run `flow_run_id` registered a version of `name` (it may have failed after that:
    its push)."""
    found = client.search_model_versions(f"name = '{name}' and tags.`{FLOW_RUN_TAG}` = '{flow_run_id}'", max_results=1)
    return bool(found)


SERVED_FILES = "conveyor.served_files"  # a digest of the files a version serves, as it was registered with them


def version_for_run(client: MlflowClient, name: str, run_id: str, served: str) -> ModelVersion | None:
    """The version registered from `run_id` with the files whose digest is `served`. A run's exports or profile made
    again (export, profile re-run into the same run) are other files: another version. A version registered before
    digests were kept is its run's, whatever its files."""
    return next(
        (v for v in versions(client, name) if v.run_id == run_id and v.tags.get(SERVED_FILES, served) == served),
        None,
    )


def download_weights(client: MlflowClient, version: ModelVersion, dest: Path) -> Path:
    """The PyTorch weights of a registered version, from its run's artifacts."""
    dest.mkdir(parents=True, exist_ok=True)
    if not version.run_id:
        raise FileNotFoundError(f"{version.name} v{version.version} has no MLflow run to take its weights from")
    # Listed first: a missing file was MLflow's "failed to download artifacts", indistinguishable from a server down.
    if "weights/best.pt" not in {a.path for a in client.list_artifacts(version.run_id, "weights")}:
        raise FileNotFoundError(
            f"{version.name} v{version.version}'s MLflow run {version.run_id} has no weights/best.pt"
        )
    local = client.download_artifacts(version.run_id, "weights/best.pt", str(dest))
    return Path(local)


def download_export(client: MlflowClient, version: ModelVersion, name: str, dest: Path) -> Path:
    """One export of a registered version (`export/<name>` in its run, as the export stage logs it): the ONNX file
    or the OpenVINO folder. FileNotFoundError, saying so, when its run has none."""
    if not version.run_id:
        raise FileNotFoundError(f"{version.name} v{version.version} has no MLflow run to take its {name} export from")
    if not any(a.path == f"export/{name}" for a in client.list_artifacts(version.run_id, "export")):
        raise FileNotFoundError(f"v{version.version}'s run has no export/{name} to measure")
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True, exist_ok=True)
    local = Path(client.download_artifacts(version.run_id, f"export/{name}", str(dest)))
    found = next((p for p in (*local.rglob("*.xml"), *local.rglob("*.onnx"))), None)
    if found is None:
        raise FileNotFoundError(f"v{version.version}'s export/{name} holds no model file")
    return found.parent if found.suffix == ".xml" else found
