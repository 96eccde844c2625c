"""Benchmark: the drift loop, timed. From the first harmful window of traffic to the retrained champion serving.

    python -m bench.drift_loop [--weights PATH]      # or: make bench-drift (after bench.drift_power)

A fresh project on the demo dataset, with the demo's champion registered and profiled (the checkpoint of
`make run`, or Conveyor's demo checkpoint on a fresh clone). Then `conveyor demo drift` runs on it with the
project's own parameters (the fine-tune of `train.finetune`): control traffic, a new camera (an alert only), then
the line's harmful change with a labelled batch of it, the check, the automation's retraining, the gates, the
promotion and the hot swap. A client sends requests all the while; none may fail.

Measured: `loop_s`, from the first harmful image sent to the server answering with the new champion (the check runs
at once here; on a schedule, add the time to the next check), with its parts; the retraining's training seconds,
so the loop on a slower host can be worked out (`bench/results/epoch_time.json` has the host classes);
`recovered_map`, the new champion's mAP50-95 on 200 labelled images of the changed line minus the old champion's;
and the requests served during the loop, failed ones counted. Adds these keys to bench/results/drift_power.json.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

import conveyor  # noqa: F401  (offline switches before the ML imports)
from bench.drift_power import MODEL, RESULTS, render, setup
from bench.record import host, write_result
from conveyor.paths import ProjectPaths
from conveyor.scaffold import REPO
from conveyor.settings import SynthSettings, load_settings

console = Console()
LOOP_PHASES = ("shifted traffic", "data add", "drift check", "retraining", "hot swap")
TEST_IMAGES = 200


class Client:
    """Sends one request after another, counting answers, until stopped: the preprocessed-tensor model over the
    Open Inference Protocol (tritonclient's HTTP client), which the same slot serves and swaps, and which the
    prediction log leaves out, so this load does not change what the drift checks see."""

    def __init__(self, url: str, tensor: Any) -> None:
        self.url, self.tensor = url, tensor
        self.ok = self.failed = 0
        self.versions: set[str] = set()
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        import tritonclient.http as httpclient

        client = httpclient.InferenceServerClient(self.url.removeprefix("http://"), network_timeout=60)
        while not self._stop.is_set():
            try:
                tensor = httpclient.InferInput("images", list(self.tensor.shape), "FP32")
                tensor.set_data_from_numpy(self.tensor, binary_data=True)
                result = client.infer(f"{MODEL}_preprocessed", [tensor])
                self.ok += 1
                self.versions.update(v.decode() for v in result.as_numpy("model_version").reshape(-1))
            except Exception as exc:  # an error answer or a refused connection: a failed request
                self.failed += 1
                self.errors.append(repr(exc)[:200])
            time.sleep(0.2)


def demo_with_client(paths: ProjectPaths, clients: list[Client]) -> Any:
    from pipelines.runtimes import letterbox
    from stack.drift_demo import DemoSizes, DriftDemo

    frame = letterbox([render(SynthSettings(seed=777), 0)[0]], 320)

    class LoadedDemo(DriftDemo):
        @contextlib.contextmanager
        def _server(self) -> Iterator[str]:
            with super()._server() as url:
                client = Client(url, frame)
                clients.append(client)
                client.start()
                try:
                    yield url
                finally:
                    client.stop()

    settings = load_settings(paths.params)
    return LoadedDemo(paths, settings, Console(width=160), DemoSizes()).run(open_browser=False)


def shifted_map(paths: ProjectPaths, version: str) -> float:
    """A version's true mAP50-95 on labelled images of the changed line (the demo's shift, a new seed)."""
    from conveyor.settings import Settings
    from conveyor.tracking import Tracker
    from pipelines import model_source as source
    from pipelines import performance, shifts
    from stack.drift_demo import SHIFT

    settings: Settings = load_settings(paths.params)
    client = Tracker.client_for(paths)
    detector = source.open_version(paths, settings, f"models:/{MODEL}/{version}", client=client).detector
    changed = SynthSettings(seed=919, shift=SHIFT)
    labelled = []
    for i in range(TEST_IMAGES):
        image, labels = render(changed, i)
        found = detector.run([shifts.encode_decode(image, 92)])[0]
        labelled.append(performance.Labelled(found.candidates, labels))
    return performance.score(labelled)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=None, help="the champion's checkpoint (default: see above)")
    parser.add_argument("--keep", action="store_true", help="keep the project")
    args = parser.parse_args()
    from tests.serving_support import CHECKPOINT

    champion = REPO / "artifacts" / "train" / "weights" / "best.pt"
    weights: Path = args.weights or (champion if champion.is_file() else CHECKPOINT)
    work = Path(tempfile.mkdtemp(prefix="bench-loop-"))
    clients: list[Client] = []
    try:
        os.chdir(work)  # MLflow's default artifact root is relative to the working directory
        project = setup(work, weights)
        paths = ProjectPaths(project)
        # The registered version's run gets the weights the retraining warm-starts from (as the pipeline logs them).
        _log_weights(paths, weights)
        for args_ in (["git", "add", "-A"], ["git", "commit", "-qm", "the line's data and its champion"]):
            subprocess.run(args_, cwd=project, check=True, capture_output=True)
        result = demo_with_client(paths, clients)
        phases = {p.name: p.seconds for p in result.phases}
        # Each check's decision as the demo made it: the docs' table of the loop quotes these.
        checks = {
            p.name: {
                "status": p.details.get("status"),
                "action": p.details.get("alert_action") if p.details.get("alert") else "none",
                "groups": p.details.get("drifted_groups"),
                "estimated_cost": (p.details.get("estimate") or {}).get("cost"),
            }
            for p in result.phases
            if "status" in p.details
        }
        loop_s = sum(phases[name] for name in LOOP_PHASES)
        retraining = result.phase("retraining").details
        new_version = retraining["version"]
        train_s = _train_seconds(paths, retraining["flow_run"])
        before, after = shifted_map(paths, "1"), shifted_map(paths, new_version)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    client = clients[0] if clients else None
    table = Table(title=f"drift loop: {loop_s:.0f} s from the first harmful window to v{new_version} serving")
    table.add_column("phase")
    table.add_column("seconds", justify="right")
    for name in LOOP_PHASES:
        table.add_row(name, f"{phases[name]:.0f}")
    table.add_row("  of which training (fine-tune)", f"{train_s:.0f}" if train_s else "?")
    table.add_row("mAP50-95 on the changed line, old -> new", f"{before:.3f} -> {after:.3f} ({after - before:+.3f})")
    if client is not None:
        table.add_row("requests during the demo, failed", f"{client.ok + client.failed}, {client.failed}")
    console.print(table)
    loop = {
        "phases_s": {name: round(phases[name], 1) for name in LOOP_PHASES},
        "all_phases_s": {k: round(v, 1) for k, v in phases.items()},
        "train_s": train_s,
        "map_before": round(before, 4),
        "map_after": round(after, 4),
        "requests": None if client is None else client.ok + client.failed,
        "failed_requests": None if client is None else client.failed,
        "failures": [] if client is None else client.errors[:5],
        "versions_served": [] if client is None else sorted(client.versions),
        "checks": checks,
        "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "host": host(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
    }
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results.update({"loop_s": round(loop_s, 1), "recovered_map": round(after - before, 4), "loop": loop})
    write_result(RESULTS, results, console)


def _log_weights(paths: ProjectPaths, weights: Path) -> None:
    from conveyor.tracking import Tracker

    client = Tracker.client_for(paths)
    run_id = client.get_model_version(MODEL, "1").run_id
    assert run_id is not None
    staged = paths.scratch / "bench-weights" / "best.pt"
    staged.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(weights, staged)
    client.log_artifact(run_id, str(staged), "weights")


def _train_seconds(paths: ProjectPaths, flow_run: str) -> float | None:
    """The retraining's train stage, from its MLflow run (Conveyor logs each stage's seconds)."""
    from conveyor.tracking import Tracker

    client = Tracker.client_for(paths)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`conveyor.prefect_flow_run_id` = '{flow_run}'",
    )
    for run in runs:
        for key, value in run.data.metrics.items():
            if key == "stage_seconds/train":
                return round(float(value), 1)
    return None


if __name__ == "__main__":
    main()
