"""`conveyor demo drift`: the monitoring loop on one machine, every part real, both of its answers. It lives with
the stack (not in `flows/`: it is not a flow) because, like `conveyor stack up`, it starts and stops processes.

The champion serves; traffic like its training data is checked (the control: nothing happens). The camera is
changed to send larger frames: the inputs drifted, the estimate says the model is not hurt, so the event only
alerts and nothing retrains. Then the line's world changes (darker, blurred, larger defects), a labelled batch of it
is added with `conveyor data add`, the shifted traffic is checked by the monitoring deployment, whose drift event
(estimated cost past monitor.retrain_cost: action retrain) makes Prefect's automation run the training deployment
(reason=drift, a fine-tune from the champion); the new version passes the gates, becomes champion, the server swaps
to it, and the same shifted traffic checked again is no longer drift.

Servers: the Prefect API in PREFECT_API_URL, or one started here (stopped at the end); the MLflow of the project
(MLFLOW_TRACKING_URI or the embedded store); a worker and `conveyor serve` started here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from conveyor.net import free_port, http_answers, wait_started, wait_until
from conveyor.paths import ProjectPaths
from conveyor.settings import DomainShift, Settings

SHIFT = DomainShift(brightness=0.45, blur_sigma=1.6, defect_scale=1.7)
NEW_CAMERA = (640, 640)  # the benign change: the same parts, frames sent at twice the size


@dataclass(frozen=True)
class DemoSizes:
    """How much data the demo makes: a labelled shifted batch (added to data/) and the traffic of each phase."""

    batch: dict[str, int] = field(default_factory=lambda: {"train": 48, "val": 16, "test": 16})
    traffic: int = 60
    timeout_s: float = 1800


@dataclass
class Phase:
    name: str
    seconds: float
    outcome: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class DemoResult:
    phases: list[Phase] = field(default_factory=list)
    report: Path | None = None

    def phase(self, name: str) -> Phase:
        return next(p for p in self.phases if p.name == name)


@contextlib.contextmanager
def _process(args: list[str], cwd: Path, env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        process = subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield process
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=40)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()


class DriftDemo:
    def __init__(self, paths: ProjectPaths, settings: Settings, console: Console, sizes: DemoSizes) -> None:
        self.paths = paths
        self.settings = settings
        self.console = console
        self.sizes = sizes
        self.work = paths.scratch / "demo-drift"
        self.bin = Path(sys.executable).parent
        self.env = {**os.environ, "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.result = DemoResult()
        self.model_name = settings.registry.model_name
        self.check_started = 0.0
        self.retraining_run = ""

    # --- the steps ----------------------------------------------------------------------------------------------

    def run(self, open_browser: bool, keep_serving: bool = False) -> DemoResult:
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        with contextlib.ExitStack() as stack:
            api = self.env.get("PREFECT_API_URL") or stack.enter_context(self._prefect_server())
            self.env["PREFECT_API_URL"] = api
            from prefect.settings import PREFECT_API_URL, temporary_settings

            stack.enter_context(temporary_settings(updates={PREFECT_API_URL: api}))
            self._step("champion", self._ensure_champion)
            self._step("deploy", self._deploy)
            stack.enter_context(self._worker())
            server = stack.enter_context(self._server())
            control = self._synth("control", DomainShift(), seed_offset=101, counts={"train": 0, "val": 0, "test": 0})
            self._step("control traffic", lambda: self._send(server, control, "traffic like the training data"))
            self._step("control check", lambda: self._check(server, expect=None))
            camera = self._larger_frames(
                self._synth("new-camera", DomainShift(), seed_offset=151, counts={"train": 0, "val": 0, "test": 0})
            )
            self._step("new camera traffic", lambda: self._send(server, camera, f"frames at {NEW_CAMERA[0]} px"))
            self._step("new camera check", lambda: self._check(server, expect="alert"))
            alert_only_at = self.check_started
            batch = self._synth("shifted-batch", SHIFT, seed_offset=202, counts=self.sizes.batch)
            traffic = self._synth("shifted-traffic", SHIFT, seed_offset=303, counts={"train": 0, "val": 0, "test": 0})
            self._step("shifted traffic", lambda: self._send(server, traffic, "darker, blurred, larger defects"))
            self._step("data add", lambda: self._data_add(batch))
            self._step("drift check", lambda: self._check(server, expect="retrain"))
            self._step("retraining", self._wait_for_retraining)
            self._step("no retraining", lambda: self._no_retraining(alert_only_at))
            self._step("hot swap", lambda: self._wait_for_swap(server))
            self._step("shifted traffic again", lambda: self._send(server, traffic, "the same shifted traffic"))
            self._step("check after retraining", lambda: self._check(server, expect=None))
            if open_browser and self.result.report is not None:
                import webbrowser

                webbrowser.open(self.result.report.as_uri())
            if keep_serving:
                self.console.print(f"the retrained champion v{self.champion_after} serves on {server}; Ctrl-C stops")
                with contextlib.suppress(KeyboardInterrupt):
                    while True:
                        time.sleep(3600)
        return self.result

    def _step(self, name: str, action: Callable[[], tuple[str, dict[str, Any]]]) -> None:
        self.console.rule(f"[bold]{name}")
        started = time.perf_counter()
        outcome, details = action()
        phase = Phase(name, time.perf_counter() - started, outcome, details)
        self.result.phases.append(phase)
        self.console.print(f"{name}: {outcome} ({phase.seconds:.0f} s)", highlight=False)

    def _ensure_champion(self) -> tuple[str, dict[str, Any]]:
        from conveyor.tracking import Tracker
        from pipelines import registry

        client = Tracker.client_for(self.paths)
        champion = registry.current_champion(client, self.model_name)
        if champion is None:
            self.console.print("no champion yet: training one with the main job (`conveyor run`)")
            self._conveyor("run", log="run.log")
            champion = registry.current_champion(client, self.model_name)
            if champion is None:
                raise RuntimeError(f"the main job registered no champion: see {self.work / 'run.log'}")
        self.champion_before = str(champion.version)
        return f"v{champion.version} is champion", {"version": str(champion.version)}

    def _deploy(self) -> tuple[str, dict[str, Any]]:
        self._conveyor("deploy", log="deploy.log")
        return "training and drift-check deployments, drift -> retraining automation", {}

    def _synth(self, name: str, shift: DomainShift, seed_offset: int, counts: dict[str, int]) -> Path:
        """A labelled synthetic set: `counts` per split, or `sizes.traffic` test images as unlabelled traffic."""
        from pipelines import synth

        if not any(counts.values()):
            counts = {"train": 0, "val": 0, "test": self.sizes.traffic}
        cfg = self.settings.synth.model_copy(
            update={"seed": self.settings.synth.seed + seed_offset, "counts": counts, "shift": shift}
        )
        target = self.work / name
        synth.generate(cfg, target, overwrite=True)
        return target

    def _larger_frames(self, folder: Path) -> Path:
        """The same traffic as a camera with a higher resolution would send it."""
        import cv2

        from pipelines.shifts import encode

        for path in sorted(folder.rglob("*.jpg")):
            image = cv2.imread(str(path))
            path.write_bytes(encode(cv2.resize(image, NEW_CAMERA, interpolation=cv2.INTER_LINEAR), 92))
        return folder

    def _send(self, server: str, folder: Path, what: str) -> tuple[str, dict[str, Any]]:
        import httpx

        from pipelines.prediction_log import read_log

        images = sorted(folder.rglob("*.jpg"))
        log_dir = self.paths.prediction_log_dir(self.settings.serve.prediction_log.directory)
        before = len(read_log(log_dir).records) if log_dir.is_dir() else 0
        versions: set[str] = set()
        with httpx.Client(base_url=server, timeout=60) as client:
            for start in range(0, len(images), 8):
                files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in images[start : start + 8]]
                response = client.post("/predict", files=files)
                response.raise_for_status()
                versions.add(str(response.json()["model"]["version"]))
        wait_until(lambda: len(read_log(log_dir).records) >= before + len(images), 60, "the prediction log", 0.5)
        self.last_traffic = len(images)
        return f"{len(images)} images ({what}) served by v{', v'.join(sorted(versions))}", {"versions": versions}

    def _data_add(self, batch: Path) -> tuple[str, dict[str, Any]]:
        from pipelines.data import add_dataset

        summary = add_dataset(self.paths, batch)
        return f"labelled batch {summary.batch} ({summary.total_images} images) added; data {summary.md5[:12]}", {}

    def _check(self, server: str, expect: str | None) -> tuple[str, dict[str, Any]]:
        """One run of the monitoring deployment; `expect`: the alert's action (None: no alert)."""
        import httpx
        from prefect.deployments import run_deployment

        self.check_started = time.time()
        run = run_deployment(
            f"conveyor-monitoring/{self.settings.monitor.deployment}",
            parameters={"project_dir": str(self.paths.root), "last": self.last_traffic},
            timeout=600,
            poll_interval=1,
        )
        assert not hasattr(run, "__await__")
        if run.state is None or not run.state.is_completed():
            raise RuntimeError(f"the drift check run {run.name} ended {run.state}")
        result = self._latest_check()
        result["flow_run"] = str(run.id)
        metrics = httpx.get(f"{server}/metrics", timeout=10).text  # the check's gauges, on the server's scrape
        result["gauges"] = [line for line in metrics.splitlines() if line.startswith("conveyor_drift_")]
        self.result.report = Path(result["report"]) if Path(result["report"]).is_file() else self.result.report
        estimate = result.get("estimate", {})
        cost = f"estimated cost {estimate['cost']:+.3f}" if "cost" in estimate else "no estimate"
        action = result["alert_action"] if result["alert"] else None
        verdict = (
            f"v{result['model_version']}: {result['status']}; {result['message']}; {cost}; alert: {action or 'no'}"
        )
        if action != expect:
            raise RuntimeError(f"expected alert {expect or 'none'}, got: {verdict} ({result['alert_reason']})")
        return verdict, result

    def _no_retraining(self, alert_only_at: float) -> tuple[str, dict[str, Any]]:
        """The alert-only event started nothing: since its check, the one drift retraining is the one the retrain event
        asked for. The automation reads events in order, so by the time it acted on the later event it had read the
        alert-only one (no blind wait: the shifted traffic, its check and the retraining ran meanwhile)."""
        found = self._drift_runs(since=alert_only_at)
        stray = [r for r in found if str(r.id) != self.retraining_run]
        if stray:
            raise RuntimeError(f"an alert-only event started a retraining: {stray[0].name}")
        return "the automation ignored the alert-only event: the one drift retraining is the retrain event's", {}

    def _drift_runs(self, since: float | None = None) -> list[Any]:
        """Training runs with reason=drift created since `since` (default: the last check's start), newest first."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowRunFilter
        from prefect.client.schemas.sorting import FlowRunSort

        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(
                    name=DeploymentFilterName(any_=[self.settings.orchestration.deployment])
                ),
                flow_run_filter=FlowRunFilter(),
                sort=FlowRunSort.START_TIME_DESC,
                limit=10,
            )
        return [
            r
            for r in runs
            if r.parameters.get("reason") == "drift"
            and r.created
            and r.created.timestamp() >= (self.check_started if since is None else since)
        ]

    def _latest_check(self) -> dict[str, Any]:
        """The summary the check just wrote (the flow's return value is not persisted by Prefect)."""
        import json

        folders = sorted((self.paths.monitoring / "reports").glob("*/summary.json"))
        fresh = [f for f in folders if f.stat().st_mtime >= self.check_started]
        if not fresh:
            raise RuntimeError("the drift check completed but wrote no report")
        summary: dict[str, Any] = json.loads(fresh[-1].read_text())
        summary["report"] = str(fresh[-1].parent / "report.html")
        return summary

    def _wait_for_retraining(self) -> tuple[str, dict[str, Any]]:
        from prefect.client.orchestration import get_client

        run = wait_until(
            lambda: next(iter(self._drift_runs()), None), 120, "the automation to start the retraining", 1.0
        )
        self.retraining_run = str(run.id)
        self.console.print(f"retraining run {run.name} started by the drift event; waiting for it to finish")

        def finished() -> Any:
            with get_client(sync_client=True) as client:
                current = client.read_flow_run(run.id)
            return current if current.state and current.state.is_final() else None

        final = wait_until(finished, self.sizes.timeout_s, "the retraining run", 3)
        if not final.state.is_completed():
            raise RuntimeError(f"the retraining run {final.name} ended {final.state.name}")
        from conveyor.tracking import Tracker
        from pipelines import registry

        champion = registry.current_champion(Tracker.client_for(self.paths), self.model_name)
        assert champion is not None
        if str(champion.version) == self.champion_before:
            raise RuntimeError(f"the retrained model did not become champion (still v{champion.version})")
        self.champion_after = str(champion.version)
        return f"run {final.name} (reason=drift): v{champion.version} passed the gates, champion", {
            "flow_run": str(final.id),
            "version": str(champion.version),
            "parameters": final.parameters,
        }

    def _wait_for_swap(self, server: str) -> tuple[str, dict[str, Any]]:
        import httpx

        def served() -> bool:
            body = httpx.get(f"{server}/v2/models/{self.model_name}", timeout=10).json()
            return bool(body.get("conveyor", {}).get("version") == self.champion_after)

        wait_until(served, 120, f"the server to serve v{self.champion_after}", 1.0)
        return f"the server serves v{self.champion_after}", {}

    # --- processes --------------------------------------------------------------------------------------------

    def _conveyor(self, *args: str, log: str) -> None:
        with (self.work / log).open("wb") as out:
            result = subprocess.run(
                [str(self.bin / "conveyor"), *args], cwd=self.paths.root, env=self.env, stdout=out, stderr=out
            )
        if result.returncode != 0:
            raise RuntimeError(f"`conveyor {' '.join(args)}` failed: see {self.work / log}")

    @contextlib.contextmanager
    def _prefect_server(self) -> Iterator[str]:
        from flows import local_server

        home = self.work / "prefect"
        # A run waiting for the deployment's one slot asks again this often (Prefect's default: 30 s).
        server = local_server.start(
            port=free_port(), home=home, extra_env={"PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "2"}
        )
        self.console.print(
            f"started a Prefect server on port {server.port} for the demo (set PREFECT_API_URL to use yours)"
        )
        try:
            yield server.api_url
        finally:
            local_server.stop(home)

    @contextlib.contextmanager
    def _worker(self) -> Iterator[None]:
        with _process([str(self.bin / "conveyor"), "worker"], self.paths.root, self.env, self.work / "worker.log"):
            yield

    @contextlib.contextmanager
    def _server(self) -> Iterator[str]:
        port, grpc = free_port(), free_port()
        args = [str(self.bin / "conveyor"), "serve", "--port", str(port), "--grpc-port", str(grpc)]
        log = self.work / "serve.log"
        with _process(args, self.paths.root, self.env, log) as process:
            url = f"http://127.0.0.1:{port}"
            wait_started("`conveyor serve`", lambda: http_answers(f"{url}/v2/health/ready"), 300, process, log)
            yield url


def run_demo(
    paths: ProjectPaths,
    settings: Settings,
    console: Console,
    sizes: DemoSizes | None = None,
    open_browser: bool = True,
    keep_serving: bool = False,
) -> DemoResult:
    return DriftDemo(paths, settings, console, sizes or DemoSizes()).run(open_browser, keep_serving)
