"""The production stack for real: `conveyor stack up` starts PostgreSQL (Debian's), an S3 store (nanio), MLflow on
PostgreSQL with its artifacts in S3, Prefect on PostgreSQL with a worker, the model server and Prometheus, as
processes; the training flow runs through the worker; a clone with the code only restores the run's record from
MLflow and pulls its data and outputs from S3. Faults: wrong S3 credentials, PostgreSQL restarted between stages, the
S3 store stopped mid-push. `stack down` leaves nothing running.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from conveyor import storage
from conveyor.net import StartupError, free_port, http_answers
from conveyor.paths import ProjectPaths
from conveyor.settings import load_settings
from pipelines import registry
from stack import control, parts
from stack.control import Layout, read_env_file
from tests.conftest import base_env, make_project
from tests.flow_support import conveyor, flow_run_state, make_flow_project, set_params, wait_for

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class RunningStack:
    project: Path
    name: str
    env: dict[str, str]  # base environment + the stack's env file
    layout: Layout

    def url(self, part: str) -> str:
        return self.layout.url(part)

    @property
    def s3_credentials(self) -> tuple[str, str]:
        return self.env["AWS_ACCESS_KEY_ID"], self.env["AWS_SECRET_ACCESS_KEY"]

    def entry(self, part: str) -> parts.Started:
        return parts.load_state(self.layout.state_file)[part]


@pytest.fixture(scope="module")
def stack() -> Iterator[RunningStack]:
    if parts.shutil.which("postgres") is None and not list(Path("/usr/lib/postgresql").glob("*/bin/postgres")):
        pytest.skip("PostgreSQL is not installed (`make test` installs Debian's postgresql where it can)")
    if parts.shutil.which("prometheus") is None:
        pytest.skip("Prometheus is not installed (`make test` installs Debian's prometheus where it can)")
    # PostgreSQL runs as the `postgres` user when this is root: the stack's folder must be reachable by it, which
    # pytest's own temporary folders (mode 0700) are not.
    root = Path(tempfile.mkdtemp(prefix="conveyor-stack-test-"))
    root.chmod(0o755)
    project, name = make_flow_project(root)
    ports = {part: free_port() for part in ("postgres", "s3", "mlflow", "prefect", "prometheus")}
    set_params(
        project,
        stack={"directory": str(root / "stack"), "ports": ports},
        serve={"port": free_port(), "grpc_port": free_port(), "poll_seconds": 2},
        orchestration={"worker_poll_seconds": 1},
    )
    paths = ProjectPaths(project)
    layout = Layout.of(paths, load_settings(paths.params))
    try:
        up = conveyor(project, {**base_env(), "COLUMNS": "200"}, "stack", "up")
        assert "Conveyor stack up" in up.stdout
        env = {**base_env(), **read_env_file(layout.env_file)}
        yield RunningStack(project, name, env, layout)
    finally:
        down = conveyor(project, base_env(), "stack", "down", check=False)
        state = parts.load_state(layout.state_file)
        shutil.rmtree(root, ignore_errors=True)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not state, f"left in the state file: {list(state)}"


def test_stack_is_up_and_says_so(stack: RunningStack) -> None:
    status = conveyor(stack.project, {**base_env(), "COLUMNS": "200"}, "stack", "status")
    cells = {row[1]: row[2] for row in (line.split("│") for line in status.stdout.splitlines()) if len(row) > 3}
    states = {part.strip(): state.strip() for part, state in cells.items()}
    for part in ("postgres", "s3", "mlflow", "prefect", "worker", "server", "prometheus"):
        assert states.get(part) == "up", status.stdout
    assert stack.layout.env_file.stat().st_mode & 0o077 == 0  # it holds the credentials
    config_local = (stack.project / ".dvc/config.local").read_text()
    assert "s3://" in config_local and "endpointurl" in config_local
    assert "AWS_SECRET" not in (stack.project / ".dvc/config").read_text()
    # The database password is in no part's command line (the process list) nor in its log, readable by all.
    secret = dict(line.split("=", 1) for line in stack.layout.secrets_file.read_text().splitlines())["PG_PASSWORD"]
    for part in ("mlflow", "prefect", "worker", "server"):
        started = stack.entry(part)
        process = started.process()
        assert process is not None and secret not in " ".join(process.cmdline()), part
        assert secret not in Path(started.log).read_text() and Path(started.log).stat().st_mode & 0o077 == 0, part


def test_a_part_that_runs_but_does_not_answer_is_named_not_called_up(stack: RunningStack) -> None:
    """`stack up` finds a part's process alive: it is up only if it answers. A hung one (stopped by SIGSTOP here) is
    named with what to do, and `up` fails; answering again, it is "already up"."""
    entry = stack.entry("prometheus")
    process = entry.process()
    assert process is not None
    process.suspend()
    try:
        hung = conveyor(stack.project, {**base_env(), "COLUMNS": "300"}, "stack", "up", "--timeout", "4", check=False)
    finally:
        process.resume()
    assert hung.returncode == 1, hung.stdout[-3000:]
    said = " ".join(hung.stderr.split())
    assert f"prometheus (pid {entry.pid}) runs but has not answered at {entry.url} for 4 s" in said, said
    assert "`conveyor stack down`, then `conveyor stack up`" in said
    again = conveyor(stack.project, {**base_env(), "COLUMNS": "300"}, "stack", "up").stdout
    assert any("prometheus" in line and "already up" in line for line in again.splitlines()), again


def _status(url: str, body: bytes | None = None) -> int:
    """The HTTP status a server answers (0 when it does not answer at all)."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return 0


def _restart_postgres(stack: RunningStack) -> None:
    """PostgreSQL stopped, the outage seen by both servers (a request that reads the database fails with a 5xx; the
    servers themselves still answer), then started again by `stack up`, on the same data."""
    assert parts.stop(stack.entry("postgres")) == "stopped"
    mlflow_reads = f"{stack.env['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/experiments/search?max_results=1"
    prefect_reads = f"{stack.env['PREFECT_API_URL']}/flow_runs/count"
    wait_for(lambda: _status(mlflow_reads) >= 500, 30, "MLflow to fail without its database")
    wait_for(lambda: _status(prefect_reads, b"{}") >= 500, 30, "Prefect to fail without its database")
    conveyor(stack.project, base_env(), "stack", "up")  # starts what is down: PostgreSQL, on the same data
    assert _status(mlflow_reads) == 200 and _status(prefect_reads, b"{}") == 200


def test_the_flow_runs_through_the_worker_with_artifacts_in_s3(stack: RunningStack) -> None:
    """The training deployment runs on the stack's worker. PostgreSQL (under MLflow and Prefect) is restarted
    between its stages, after training: the run carries on (MLflow's client retries the 503s, Prefect's the 500s:
    PREFECT_CLIENT_RETRY_EXTRA_CODES in the env file) and completes."""
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: stack.env["PREFECT_API_URL"]}):
        flow_run = run_deployment("conveyor-training/scheduled-training", timeout=0, parameters={"reason": "test"})
    assert isinstance(flow_run, FlowRun)
    api, run_id = stack.env["PREFECT_API_URL"], str(flow_run.id)
    lock = stack.project / "dvc.lock"
    final = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
    wait_for(
        lambda: (lock.is_file() and "train:" in lock.read_text()) or flow_run_state(api, run_id) in final,
        900,
        "the worker's run to finish training",
    )
    _restart_postgres(stack)
    wait_for(lambda: flow_run_state(api, run_id) in final, 900, "the worker's run to end", 2)
    assert flow_run_state(api, run_id) == "COMPLETED", Path(stack.entry("worker").log).read_text()[-5000:]
    assert "evaluate:" in lock.read_text()  # the stages after the restart ran

    # MLflow on PostgreSQL, its artifacts in S3; a client with no S3 credentials reads them through the server.
    no_s3 = {k: v for k, v in stack.env.items() if not k.startswith("AWS_")}
    client = MlflowClient(stack.env["MLFLOW_TRACKING_URI"])
    champion = registry.current_champion(client, stack.name)
    assert champion is not None and champion.run_id
    keys = storage.list_keys(storage.S3Location("conveyor", "mlflow"), stack.url("s3"), stack.s3_credentials)
    assert any(key.endswith(f"{champion.run_id}/artifacts/weights/best.pt") for key in keys), keys[:20]
    fetched = subprocess.run(
        [
            str(parts.VENV_BIN / "python"),
            "-c",
            f"import mlflow; print(mlflow.artifacts.download_artifacts("
            f"run_id='{champion.run_id}', artifact_path='weights/best.pt', tracking_uri='{client.tracking_uri}'))",
        ],
        env=no_s3,
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(fetched.stdout.strip()).stat().st_size > 1_000_000

    # DVC pushed to S3. Another machine with the code only (the commit before the run, as a pod's image has it: the
    # run's dvc.lock stays where it ran) takes the run's record from MLflow and pulls its exact data and outputs.
    assert storage.list_keys(storage.S3Location("conveyor", "dvc"), stack.url("s3"), stack.s3_credentials)
    clone = stack.project.parent / "clone"
    subprocess.run(["git", "clone", "-q", str(stack.project), str(clone)], check=True)
    assert not (clone / "dvc.lock").exists()
    subprocess.run(
        ["dvc", "remote", "add", "--local", "-d", "team", "s3://conveyor/dvc"], cwd=clone, env=stack.env, check=True
    )
    conveyor(clone, {**stack.env, "COLUMNS": "300"}, "lineage", "@champion", "--restore")
    for name in ("dvc.lock", "params.yaml", "data.dvc"):
        assert (clone / name).read_text() == (stack.project / name).read_text(), name
    subprocess.run(["dvc", "pull", "-q"], cwd=clone, env=stack.env, check=True, timeout=300)
    status = subprocess.run(["dvc", "status"], cwd=clone, env=stack.env, capture_output=True, text=True, check=True)
    assert "up to date" in status.stdout, status.stdout

    # The model server follows the registry: ready with the champion; Prometheus scrapes it.
    server = stack.url("server")
    wait_for(lambda: http_answers(f"{server}/v2/health/ready"), 120, "the server to load the champion")

    def scraped() -> bool:
        query = urllib.parse.urlencode({"query": "conveyor_model_ready"})
        with urllib.request.urlopen(f"{stack.url('prometheus')}/api/v1/query?{query}", timeout=5) as response:
            result = json.loads(response.read())["data"]["result"]
        return bool(result) and result[0]["value"][1] == "1"

    assert "prometheus" in parts.load_state(stack.layout.state_file), "`stack up` did not start Prometheus"
    wait_for(scraped, 60, "Prometheus to scrape the ready server")


def test_wrong_or_missing_s3_credentials_fail_before_any_stage(stack: RunningStack) -> None:
    lock_file = stack.project / "dvc.lock"  # written by the flow test above, if it ran: this test runs alone too
    lock = lock_file.read_text() if lock_file.exists() else None
    where = f"bucket 'conveyor' on the S3 store {stack.url('s3')}"
    for env, expected in (
        ({**stack.env, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}, f"{where}: the store refused these credentials"),
        (
            {k: v for k, v in stack.env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")},
            f"no S3 credentials for {where}",
        ),
    ):
        started = time.monotonic()
        result = conveyor(stack.project, {**env, "COLUMNS": "300"}, "run", check=False)
        assert result.returncode == 1 and expected in result.stdout + result.stderr, result.stdout[-3000:]
        assert time.monotonic() - started < 90
    assert (lock_file.read_text() if lock_file.exists() else None) == lock  # no stage ran


def test_batch_predict_reads_images_from_s3(stack: RunningStack, tmp_path: Path) -> None:
    """`conveyor predict s3://bucket/prefix` over the stack's store with the champion the flow test promoted: images
    (nested keys) become detection lines, a damaged object an error line, other objects are ignored; a re-run skips
    what is done; a bucket that does not exist is a clear error."""
    if registry.current_champion(MlflowClient(stack.env["MLFLOW_TRACKING_URI"]), stack.name) is None:
        pytest.skip("needs the champion of test_the_flow_runs_through_the_worker_with_artifacts_in_s3")
    s3 = storage.client(stack.url("s3"), credentials=stack.s3_credentials)
    images = sorted(stack.project.glob("data/**/*.jpg"))[:3]
    assert len(images) == 3
    for i, image in enumerate(images):
        s3.upload_file(str(image), "conveyor", f"incoming/line-{i % 2}/{image.name}")
    s3.put_object(Bucket="conveyor", Key="incoming/line-0/damaged.jpg", Body=b"\xff\xd8 not a jpeg")
    s3.put_object(Bucket="conveyor", Key="incoming/notes.txt", Body=b"not an image")
    s3.put_object(Bucket="conveyor", Key="incoming-other/x.jpg", Body=images[0].read_bytes())  # another prefix

    out = tmp_path / "predictions.jsonl"
    first = conveyor(stack.project, stack.env, "predict", "s3://conveyor/incoming", "--out", str(out))
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(line["image"] for line in lines) == sorted(
        [f"s3://conveyor/incoming/line-{i % 2}/{image.name}" for i, image in enumerate(images)]
        + ["s3://conveyor/incoming/line-0/damaged.jpg"]
    ), first.stdout
    damaged = [line for line in lines if line["image"].endswith("damaged.jpg")]
    assert "error" in damaged[0] and all("detections" in line for line in lines if line not in damaged)
    assert sum(len(line["detections"]) for line in lines if line not in damaged) > 0
    again = conveyor(
        stack.project, {**stack.env, "COLUMNS": "200"}, "predict", "s3://conveyor/incoming", "--out", str(out)
    )
    assert len(out.read_text().splitlines()) == 4 and "4 images" in again.stdout

    missing = conveyor(stack.project, stack.env, "predict", "s3://no-such-bucket/x", "--out", str(out), check=False)
    assert missing.returncode == 1
    assert f"bucket 'no-such-bucket' on the S3 store {stack.url('s3')}: no such bucket" in missing.stderr, (
        missing.stderr
    )


def test_prediction_log_ships_to_s3_and_catches_up_after_an_outage(
    stack: RunningStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The prediction log's part files reach s3://conveyor/<prefix>, where a drift check's window reads them. With
    the store stopped, serving goes on (records stay local); once it is back, the next flush ships what is missing.
    Two logs (two replicas) ship to one prefix, and the window holds both."""
    from monitoring.current import from_log
    from pipelines.prediction_log import Pending, PredictionLog, read_log, s3_shipper
    from tests.test_serving_units import pending

    for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, stack.env[key])
    url = "s3://conveyor/predictions-test"

    def replica(name: str) -> PredictionLog:
        # Flushed by hand below; each log's shipper uploads on its own thread what a flush wrote.
        return PredictionLog(tmp_path / name, 100, 60, 48, shipper=s3_shipper(url)).start()

    def offer(log: PredictionLog, count: int) -> None:
        for _ in range(count):
            item: Pending = pending("7")
            log.offer(item)
        log.flush()

    first, second = replica("a"), replica("b")
    try:
        offer(first, 5)
        offer(second, 4)

        shippers = [log.shipper for log in (first, second) if log.shipper is not None]
        assert len(shippers) == 2
        # Caught up (the flag is set after the last upload) and every record in the store.
        wait_for(lambda: not any(s.behind for s in shippers) and len(read_log(url).records) == 9, 30, "both shipped")

        assert parts.stop(stack.entry("s3")) == "stopped"
        offer(first, 6)  # no exception: the request path never waits on the store
        assert first.shipper is not None and first.written == 11
        wait_for(lambda: first.shipper is not None and first.shipper.behind, 60, "the shipper to find the store gone")
        assert len(read_log(tmp_path / "a").records) == 11  # kept locally

        conveyor(stack.project, base_env(), "stack", "up")  # the store is back
        first.shipper.catch_up(first.directory)  # what the shipper's thread does once a cycle while behind
        assert not first.shipper.behind
        window = from_log(url, hours=1, version="7")
        assert len(window.records) == 15 and window.source.startswith(f"prediction log {url}")
    finally:
        first.close()
        second.close()


def _run_in_background(stack: RunningStack, log: Path) -> subprocess.Popen[bytes]:
    with log.open("w") as out:
        return subprocess.Popen(
            ["conveyor", "run"],
            cwd=stack.project,
            env=stack.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _dvc_push_started(run: subprocess.Popen[bytes]) -> bool:
    try:
        children = psutil.Process(run.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return True
    for child in children:
        with contextlib.suppress(psutil.Error):
            if child.cmdline()[-1:] == ["push"] and "dvc" in child.cmdline():
                return True
    return run.poll() is not None


def test_s3_store_lost_mid_push_then_back(stack: RunningStack) -> None:
    """The S3 store's process is killed once `dvc push` has started: the run fails saying so, the push is not
    recorded, and once the store is back the next run pushes the rest, after which the remote holds every object the
    lock names. (Only evaluation and the gate run again: an evaluate setting changed.)"""
    set_params(stack.project, evaluate={"batch": 4})
    last_push = stack.project / ".conveyor/last-push"
    pushed_before = last_push.read_text() if last_push.exists() else None  # the flow test's push, if it ran
    log = stack.project.parent / "push.log"
    run = _run_in_background(stack, log)
    s3_objects = stack.layout.root / "s3"
    try:
        before = sum(1 for _ in s3_objects.rglob("*"))
        wait_for(lambda: _dvc_push_started(run), 900, "dvc push to start", 0.02)
        assert run.poll() is None, log.read_text()[-5000:]
        # Kill the store as its first new object lands, or 3 s into the push if the push is still looking.
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and sum(1 for _ in s3_objects.rglob("*")) == before:
            time.sleep(0.01)
        store = stack.entry("s3").process()
        assert store is not None
        store.kill()  # the store's machine goes away mid-push
        assert run.wait(timeout=600) == 1, log.read_text()[-5000:]
    finally:
        if run.poll() is None:
            psutil.Process(run.pid).kill()
    text = log.read_text()
    assert "dvc push failed" in text, text[-5000:]
    assert "Task run 'stage evaluate-" in text and "Finished in state Completed" in text  # evaluate ran
    assert (last_push.read_text() if last_push.exists() else None) == pushed_before  # the failed push is not one

    conveyor(stack.project, base_env(), "stack", "up")  # the store is back
    again = conveyor(stack.project, stack.env, "run")
    assert "up to date" in again.stdout + again.stderr
    assert last_push.exists() and last_push.read_text() != pushed_before
    cloud = subprocess.run(
        ["dvc", "status", "--cloud"], cwd=stack.project, env=stack.env, capture_output=True, text=True, check=True
    )
    assert "Cache and remote 'stack' are in sync" in cloud.stdout, cloud.stdout


def test_a_part_started_beside_one_that_fails_is_recorded_and_stopped_by_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tier's parts start side by side. When one exits while starting, `up` fails naming it, and the others it had
    started are in the record already, so `stack down` stops them (they used to run on in no record). Two stand-in
    parts under real names: an HTTP server that answers, and a process that exits."""
    paths = ProjectPaths(make_project(tmp_path / "project"))
    settings = load_settings(paths.params)
    port = free_port()

    def part(name: str, argv: list[str], healthy: Callable[[], bool]) -> control.PartSpec:
        return control.PartSpec(name, lambda: argv, healthy, env=base_env(), cwd=tmp_path)

    failing = part("prefect", [sys.executable, "-c", "import time; time.sleep(1); raise SystemExit(3)"], lambda: False)
    answering = part(
        "mlflow",
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        lambda: http_answers(f"http://127.0.0.1:{port}/"),
    )
    monkeypatch.setattr(control, "_tiers", lambda *args: [control.Tier([failing, answering])])
    try:
        with pytest.raises(StartupError, match="prefect exited with 3 while starting"):
            control.up(paths, settings, timeout=60)
        recorded = parts.load_state(Layout.of(paths, settings).state_file)
        assert set(recorded) == {"prefect", "mlflow"}
        assert recorded["mlflow"].process() is not None  # started, never waited on: recorded when it started
        assert dict(control.down(paths, settings))["mlflow"] == "stopped"
        assert recorded["mlflow"].process() is None
    finally:  # whatever the record says, no stand-in outlives the test
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if str(port) in child.cmdline():
                    child.kill()
