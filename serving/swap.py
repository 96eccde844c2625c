"""Hot swap: the server follows the registry, and a new model replaces the old one without a failed request.

Rules:
- The watcher asks the registry every `serve.poll_seconds` which version the reference names (by default
  `models:/NAME@champion`). A promotion and `conveyor rollback` both move that alias, so both are followed.
- A new version is downloaded, opened on the runtime and warmed up *beside* the serving one; only then does the
  slot switch. Each batch takes the model from the slot once, so in-flight requests finish on the model they
  started with, and the old model is freed when its last batch ends.
- A version that fails to load leaves the old one serving. The failure is logged, counted
  (`conveyor_model_load_failures`) and shown in `/v2/models/{name}`; the same version is retried at each look up to
  `MAX_ATTEMPTS` times (a transient download error), then every `RETRY_SECONDS` (an artifact store that is down for
  longer comes back, and the server must not stay unready, or on the old version, until it is restarted). When the
  alias moves, what failed before is forgotten: a version promoted again is tried afresh.
- No version yet (no champion): the server is live but not ready, with the reason, and becomes ready by itself
  when one appears. An unreachable registry keeps the current model serving and is shown the same way.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from conveyor.errors import without_credentials
from pipelines import model_source as source
from pipelines.model_source import LoadedModel
from pipelines.registry import ModelRefError
from serving.metrics import ServingMetrics

LOG = logging.getLogger("conveyor.serving")
MAX_ATTEMPTS = 3  # tries at consecutive looks
RETRY_SECONDS = 300.0  # then one try this often


@dataclass
class SlotState:
    status: str = "waiting"  # waiting | serving
    reason: str = "no model loaded yet"
    last_error: str | None = None
    last_check: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # the swaps, newest last


class ModelSlot:
    """The model being served, replaced atomically (a reference swap: readers never lock)."""

    def __init__(self) -> None:
        self.current: LoadedModel | None = None
        self.state = SlotState()
        # The class names of each version served lately: a request answered by the version being swapped out is
        # named by that version's classes, not the new one's.
        self._names: dict[str, list[str]] = {}

    def names(self, version: str) -> list[str] | None:
        """The class names of a version this slot served (None when it never did, or too long ago)."""
        return self._names.get(str(version))

    @property
    def ready(self) -> bool:
        return self.current is not None

    def swap(self, model: LoadedModel) -> LoadedModel | None:
        previous, self.current = self.current, model
        self.state.status, self.state.reason = "serving", f"serving {model.name} v{model.version}"
        self.state.history.append(
            {"version": model.version, "at": model.loaded_at, "from": previous.version if previous else None}
        )
        del self.state.history[:-20]
        self._names.pop(str(model.version), None)  # newest last: the served version is never the one evicted
        self._names[str(model.version)] = list(model.card.names)
        for old in list(self._names)[:-20]:
            del self._names[old]
        return previous

    def describe(self) -> dict[str, Any]:
        model = self.current
        return {
            "state": self.state.status,
            "reason": self.state.reason,
            "version": model.version if model else None,
            "runtime": model.runtime if model else None,
            "loaded_at": model.loaded_at if model else None,
            "load_seconds": round(model.load_seconds, 3) if model else None,
            "last_error": self.state.last_error,
            "swaps": self.state.history,
        }


class RegistryWatcher:
    def __init__(
        self,
        client_factory: Callable[[], MlflowClient],
        model_name: str,
        ref: str | None,
        cache: Path,
        runtime: str,
        workers: int,
        conf: float,
        poll_seconds: float,
        slot: ModelSlot,
        metrics: ServingMetrics,
    ) -> None:
        self._client_factory = client_factory
        self.model_name = model_name
        self.ref = source.default_ref(model_name, ref)
        self.cache = cache
        self.runtime = runtime
        self.workers = workers
        self.conf = conf
        self.poll_seconds = poll_seconds
        self.slot = slot
        self.metrics = metrics
        self.retry_seconds = RETRY_SECONDS
        self._attempts: dict[str, tuple[int, float]] = {}  # version -> (failed loads, when the last one failed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="registry-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Tell the watcher to stop, and wait for it at most `timeout` seconds (default: a poll and a minute's load)."""
        self._stop.set()
        if self._thread.is_alive():  # stopped before it started when the server failed to come up
            self._thread.join(timeout=self.poll_seconds + 60 if timeout is None else timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            self.check()

    def check(self) -> None:
        """One look at the registry; loads and swaps in the version the reference names if it changed."""
        self.slot.state.last_check = time.time()
        try:
            client = self._client_factory()
            version = source.resolve_version(client, self.model_name, self.ref)
        except ModelRefError as exc:
            if not self.slot.ready:
                self.slot.state.reason = f"{self.ref} names no version yet ({without_credentials(str(exc))}); waiting"
            return
        except Exception as exc:  # the registry is down: keep serving what we have
            reason = f"registry unreachable: {without_credentials(str(exc))}"
            LOG.warning("%s", reason)
            if not self.slot.ready:
                self.slot.state.reason = reason
            return
        wanted = str(version.version)
        current = self.slot.current
        self._attempts = {v: tried for v, tried in self._attempts.items() if v == wanted}  # the alias moved: forget
        if current is not None and current.version == wanted:
            return
        failed, at = self._attempts.get(wanted, (0, 0.0))
        if failed >= MAX_ATTEMPTS and time.monotonic() - at < self.retry_seconds:
            return
        LOG.info("loading %s v%s on %s", self.model_name, wanted, self.runtime)
        try:
            files = source.fetch(client, version, self.cache)
            model = source.load(files, self.runtime, self.workers, self.conf)
        except Exception as exc:
            failed += 1
            self._attempts[wanted] = (failed, time.monotonic())
            then = "next look" if failed < MAX_ATTEMPTS else f"in {self.retry_seconds:.0f} s"
            message = (
                f"v{wanted} failed to load (attempt {failed}; tried again {then}): {without_credentials(str(exc))}"
            )
            LOG.error("%s; %s", message, f"still serving v{current.version}" if current else "nothing to serve")
            self.slot.state.last_error = message
            if current is None:
                self.slot.state.reason = message
            self.metrics.model_loads.labels("failed").inc()
            self.metrics.model_load_failures.inc()
            return
        previous = self.slot.swap(model)
        self._attempts.pop(wanted, None)
        self.metrics.model_loads.labels("loaded").inc()
        self.metrics.model_ready.set(1)
        self.metrics.model_info.info({"name": model.name, "version": model.version, "runtime": model.runtime})
        LOG.info(
            "now serving %s v%s (was %s; loaded and warmed in %.1f s)",
            model.name,
            model.version,
            f"v{previous.version}" if previous else "nothing",
            model.load_seconds,
        )
        # The one served and the one before (a rollback takes it back at once); older ones are downloaded again.
        kept = {model.version, *([previous.version] if previous else [])}
        for gone in source.prune(self.cache, self.model_name, kept):
            LOG.info("removed %s from the model cache", gone.name)
