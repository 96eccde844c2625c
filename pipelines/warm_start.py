"""Warm start: train from a checkpoint (the champion's, downloaded from the registry, or a local file) by pointing
`train.weights` in params.yaml at it, so DVC sees the change and the train stage re-runs from it."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from conveyor.paths import ProjectPaths, write_atomically
from conveyor.settings import Settings, set_param


def _warm_starts(paths: ProjectPaths) -> Path:
    return paths.scratch / "warm-start"


def _set_by_hand(paths: ProjectPaths) -> Path:
    """What train.weights was before a warm start replaced it: put back when a run asks for none."""
    return _warm_starts(paths) / "set-by-hand.json"


def _is_warm_start(paths: ProjectPaths, weights: str | Path | None) -> bool:
    return weights is not None and (paths.root / weights).resolve().is_relative_to(_warm_starts(paths).resolve())


def set_warm_start(paths: ProjectPaths, settings: Settings, warm_start: str) -> None:
    """Point train.weights at the checkpoint (the champion's, downloaded, or a local file) in params.yaml."""
    from conveyor.tracking import Tracker
    from pipelines import registry

    if warm_start == "champion":
        tracker_client = Tracker.client_for(paths)
        champion = registry.current_champion(tracker_client, settings.registry.model_name)
        if champion is None:
            raise FileNotFoundError("warm_start=champion, but there is no champion yet")
        weights = registry.download_weights(tracker_client, champion, _warm_starts(paths) / str(champion.version))
    else:
        given = Path(warm_start).resolve()
        if not given.is_file():
            raise FileNotFoundError(f"warm-start checkpoint {warm_start} not found")
        # Kept under its content's hash: DVC sees train.weights by its value, so a file changed at the same path
        # would otherwise not re-run the train stage (the champion's copy is named by its version for the same reason).
        content = given.read_bytes()
        digest = hashlib.sha256(content).hexdigest()[:16]
        weights = _warm_starts(paths) / f"file-{digest}" / given.name
        # Checked, not only found: a copy cut short (a kill, a full disk) was trained from at every later run.
        if not weights.is_file() or hashlib.sha256(weights.read_bytes()).hexdigest()[:16] != digest:
            write_atomically(weights, content)
    current = None if settings.train.weights is None else str(settings.train.weights)
    if not _is_warm_start(paths, current):  # the team's own value (or none): kept to be put back
        write_atomically(_set_by_hand(paths), json.dumps({"weights": current}))
    set_param(paths.params, ("train", "weights"), os.path.relpath(weights, paths.root))


def clear_earlier_warm_start(paths: ProjectPaths, settings: Settings) -> bool:
    """A warm start that `set_warm_start` wrote for an earlier run is that run's: a run that asks for none trains as
    before it (a scheduled training after a drift fine-tune had stayed a fine-tune from that day's champion, and a
    committed params.yaml named a file other clones do not have). train.weights goes back to what it was before the
    warm start: train.model (none), or a checkpoint set by hand, which a warm start had deleted from params.yaml for
    good. A checkpoint set by hand since is left alone. Returns whether train.weights was changed."""
    if not _is_warm_start(paths, settings.train.weights):
        return False
    record = _set_by_hand(paths)
    try:
        before = json.loads(record.read_text())["weights"]
    except (OSError, ValueError, KeyError, TypeError):  # none kept (a warm start from before this record existed)
        before = None
    set_param(paths.params, ("train", "weights"), before)
    record.unlink(missing_ok=True)
    return True
