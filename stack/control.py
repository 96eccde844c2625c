"""`conveyor stack up | status | down`: the parts a team runs, as processes on this machine, data under one folder.

Order: PostgreSQL and the S3 store; then MLflow (PostgreSQL backend, artifacts proxied to s3://BUCKET/mlflow, so
clients need no S3 credentials of their own) and the Prefect server (PostgreSQL); then the deployments
(`conveyor deploy`), a worker on the project's work pool, the model server and Prometheus scraping it. `up` writes
`stack.env` (0600: it holds the stack's generated credentials) for a user to `source`, and points this project's DVC
default remote at s3://BUCKET/dvc in `.dvc/config.local` (never the committed config). `down` stops only what `up`
started and removes the stack's DVC remote (a local default set before `up` is not restored); the data stays for
the next `up`. `make run` never needs any of it. One `up` or `down` runs at a time.

The parts are a table (`_tiers`: a `PartSpec` per part, in tiers that start side by side) that `up` walks.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from conveyor import storage
from conveyor.net import StartupError, http_answers, port_free, wait_started
from conveyor.paths import ProjectPaths, exclusive, write_atomically
from conveyor.settings import Settings
from flows import local_server
from pipelines.dvc_repo import dvc
from stack import parts
from stack.parts import StackError, Started

REMOTE = "stack"  # the DVC remote `up` adds to .dvc/config.local
ORDER = ("postgres", "s3", "mlflow", "prefect", "worker", "server", "prometheus")
STOP_TIERS = (("prometheus", "server", "worker"), ("mlflow", "prefect"), ("s3", "postgres"))


@dataclass(frozen=True)
class Layout:
    root: Path
    settings: Settings
    project: Path

    @classmethod
    def of(cls, paths: ProjectPaths, settings: Settings) -> Layout:
        root = Path(settings.stack.directory).expanduser()  # `~/stack` is the home's, not a folder named ~
        return cls(root if root.is_absolute() else paths.root / root, settings, paths.root)

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def env_file(self) -> Path:
        return self.root / "stack.env"

    @property
    def secrets_file(self) -> Path:
        return self.root / "secrets.env"

    @property
    def prometheus_config(self) -> Path:
        return self.root / "prometheus.yml"

    def log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def url(self, part: str) -> str:
        ports = self.settings.stack.ports
        return {
            "postgres": f"postgresql://127.0.0.1:{ports.postgres}",
            "s3": f"http://127.0.0.1:{ports.s3}",
            "mlflow": f"http://127.0.0.1:{ports.mlflow}",
            "prefect": f"http://127.0.0.1:{ports.prefect}/api",
            "worker": f"work pool '{self.settings.orchestration.work_pool}'",
            "server": f"http://127.0.0.1:{self.settings.serve.port}",
            "prometheus": f"http://127.0.0.1:{ports.prometheus}",
        }[part]


SECRET_KEYS = ("S3_ACCESS_KEY", "S3_SECRET_KEY", "PG_SUPERUSER_PASSWORD", "PG_PASSWORD")


def _secrets(layout: Layout, create: bool = True) -> dict[str, str]:
    """The stack's credentials, generated at the first `up` and kept (0600, written whole) beside its data. A file
    that lost some of them, or lost while the database it opens is still there, is an error naming what to do: new
    passwords would not open the old database, and every later `up` waited two minutes and failed."""
    path = layout.secrets_file
    if path.is_file():
        values = dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
        missing = [key for key in SECRET_KEYS if not values.get(key)]
        if missing:
            raise StackError(
                f"{path} is damaged: {', '.join(missing)} missing. Restore it from a backup; or, to start the stack "
                f"over with its data lost, `conveyor stack down` and remove {layout.root}"
            )
        return values
    if (layout.root / "postgres" / "data" / "PG_VERSION").is_file():
        raise StackError(
            f"{path} is gone, and the stack's database under {layout.root / 'postgres'} opens only with the password "
            f"it held. Restore it from a backup; or, to start over with the stack's data lost, remove {layout.root}"
        )
    if not create:
        return {}
    values = {
        "S3_ACCESS_KEY": "conveyor-" + secrets.token_hex(4),
        "S3_SECRET_KEY": secrets.token_urlsafe(24),
        "PG_SUPERUSER_PASSWORD": secrets.token_urlsafe(18),
        "PG_PASSWORD": secrets.token_urlsafe(18),
    }
    if not layout.root.exists():
        # Its data (the store's objects, the database, the logs) is the stack user's: PostgreSQL's own user,
        # as root, needs only to pass through.
        layout.root.mkdir(parents=True, mode=0o711 if os.geteuid() == 0 else 0o700)
    write_atomically(path, "".join(f"{k}={v}\n" for k, v in values.items()), private=True)
    return values


def _refuse_concurrent(layout: Layout) -> Callable[[], None]:
    def busy() -> None:
        raise StackError(
            f"another `conveyor stack up` or `down` is running on {layout.root}: wait for it to finish (two at once "
            "started a second worker that no `down` stopped)"
        )

    return busy


def client_env(layout: Layout, keys: dict[str, str]) -> dict[str, str]:
    """What a client of the stack sets (the env file's contents)."""
    ports = layout.settings.stack.ports
    s3 = layout.url("s3")
    return {
        "MLFLOW_TRACKING_URI": layout.url("mlflow"),
        "PREFECT_API_URL": layout.url("prefect"),
        "AWS_ENDPOINT_URL": s3,
        "AWS_ACCESS_KEY_ID": keys["S3_ACCESS_KEY"],
        "AWS_SECRET_ACCESS_KEY": keys["S3_SECRET_KEY"],
        "AWS_DEFAULT_REGION": "us-east-1",
        # Prefect's client does not retry a 500, which its server answers while PostgreSQL restarts.
        "PREFECT_CLIENT_RETRY_EXTRA_CODES": "500",
        "CONVEYOR_STACK_DIR": str(layout.root),
        "CONVEYOR_STACK_PROMETHEUS": f"http://127.0.0.1:{ports.prometheus}",
    }


def _base_env() -> dict[str, str]:
    """This environment without another stack's or server's endpoints."""
    drop = ("MLFLOW_", "PREFECT_", "AWS_", "CONVEYOR_STACK")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


@dataclass
class UpReport:
    started: dict[str, Started] = field(default_factory=dict)
    already: dict[str, Started] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    env_file: Path | None = None
    seconds: float = 0.0


def _none() -> None:
    return None


@dataclass(frozen=True)
class PartSpec:
    """How `up` starts one part. At the part's turn, started or already up: `skip` (a reason not to start it),
    `prepare` (folders, the cluster's initdb, a config file), then `argv` and `user`; only a part that is not up is
    then started and waited on with `healthy`. Its address is `Layout.url(name)`."""

    name: str
    argv: Callable[[], list[str]]
    healthy: Callable[[], bool]
    env: dict[str, str]
    cwd: Path
    port: int | None = None  # checked free before anything starts (the worker listens on none)
    user: Callable[[], str | None] = _none
    prepare: Callable[[], object] = _none
    skip: Callable[[], str | None] = _none


@dataclass(frozen=True)
class Tier:
    """Parts started side by side: `before` runs first, `then` once every part of the tier is healthy."""

    parts: list[PartSpec]
    before: Callable[[], object] = _none
    then: Callable[[], object] = _none


def _tiers(
    paths: ProjectPaths, settings: Settings, layout: Layout, keys: dict[str, str], state: dict[str, Started]
) -> list[Tier]:
    """The stack, in the order `up` starts it (`ORDER`); `state` is read as `up` fills it."""
    ports = settings.stack.ports
    env = {**_base_env(), **client_env(layout, keys)}
    server_env = {
        **env,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_S3_ENDPOINT_URL": layout.url("s3"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    pg_url = f"conveyor:{keys['PG_PASSWORD']}@127.0.0.1:{ports.postgres}"
    pg_folder = layout.root / "postgres"
    s3_data = layout.root / "s3"
    prefect_home = layout.root / "prefect"

    def storage_ready() -> None:
        parts.ensure_databases(
            ports.postgres, keys["PG_SUPERUSER_PASSWORD"], keys["PG_PASSWORD"], ("mlflow", "prefect")
        )
        storage.ensure_bucket(settings.stack.bucket, layout.url("s3"), (keys["S3_ACCESS_KEY"], keys["S3_SECRET_KEY"]))

    def project_on_stack() -> None:
        use_dvc_remote(paths, settings, layout)
        write_env_file(layout, keys)
        if "worker" not in state:
            _deploy(paths, env)

    # 1. PostgreSQL and the S3 store.
    store = Tier(
        [
            PartSpec(
                "postgres",
                lambda: parts.postgres_argv(pg_folder, ports.postgres),
                lambda: parts.postgres_ready(ports.postgres, keys["PG_SUPERUSER_PASSWORD"]),
                env=_base_env(),
                cwd=pg_folder,
                port=ports.postgres,
                user=parts.postgres_user,
                prepare=lambda: parts.init_postgres(pg_folder, keys["PG_SUPERUSER_PASSWORD"]),
            ),
            PartSpec(
                "s3",
                lambda: [
                    str(parts.VENV_BIN / "nanio"),
                    "serve",
                    *("--host", "127.0.0.1", "--port", str(ports.s3), "--data-dir", str(s3_data)),
                    "--no-access-log",
                ],
                lambda: http_answers(layout.url("s3"), accept_errors=True),
                env={
                    **_base_env(),
                    "NANIO_ACCESS_KEY": keys["S3_ACCESS_KEY"],
                    "NANIO_SECRET_KEY": keys["S3_SECRET_KEY"],
                },
                cwd=layout.root,
                port=ports.s3,
                prepare=lambda: s3_data.mkdir(parents=True, exist_ok=True),
            ),
        ],
        then=storage_ready,
    )
    # 2. MLflow and Prefect, side by side (each takes ~8 s to come up).
    servers = Tier(
        [
            PartSpec(
                "mlflow",
                lambda: [
                    str(parts.VENV_BIN / "mlflow"),
                    "server",
                    *("--host", "127.0.0.1", "--port", str(ports.mlflow), "--workers", "1"),
                    *("--artifacts-destination", f"s3://{settings.stack.bucket}/mlflow"),
                ],
                lambda: http_answers(f"{layout.url('mlflow')}/health"),
                # In the environment, not on the command line: the password stays out of the process list and of
                # the log's first line (which records the command).
                env={**server_env, "MLFLOW_BACKEND_STORE_URI": f"postgresql://{pg_url}/mlflow"},
                cwd=layout.root,
                port=ports.mlflow,
            ),
            PartSpec(
                "prefect",
                lambda: local_server.server_argv("127.0.0.1", ports.prefect),
                lambda: http_answers(f"{layout.url('prefect')}/ready"),
                env={
                    **server_env,
                    **local_server.server_env(prefect_home, "127.0.0.1", ports.prefect),
                    "PREFECT_API_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://{pg_url}/prefect",
                },
                cwd=layout.root,
                port=ports.prefect,
                prepare=lambda: prefect_home.mkdir(parents=True, exist_ok=True),
            ),
        ]
    )
    # 3. This project on the stack: its DVC remote, its deployments, a worker, the model server, Prometheus.
    project = [
        PartSpec(
            "worker",
            lambda: [str(parts.VENV_BIN / "conveyor"), "worker"],
            lambda: _worker_online(layout.url("prefect"), settings.orchestration.work_pool),
            env=env,
            cwd=paths.root,
        )
    ]
    if settings.stack.serve:
        project += [
            PartSpec(
                "server",
                lambda: [str(parts.VENV_BIN / "conveyor"), "serve"],
                lambda: http_answers(f"{layout.url('server')}/v2/health/live"),
                env=env,
                cwd=paths.root,
                port=settings.serve.port,
            ),
            PartSpec(
                "prometheus",
                lambda: [
                    shutil.which("prometheus") or "prometheus",  # found: `skip` looked first
                    f"--config.file={layout.prometheus_config}",
                    f"--storage.tsdb.path={layout.root / 'prometheus'}",
                    f"--web.listen-address=127.0.0.1:{ports.prometheus}",
                ],
                lambda: http_answers(f"{layout.url('prometheus')}/-/ready"),
                env=_base_env(),
                cwd=layout.root,
                port=ports.prometheus,
                prepare=lambda: write_prometheus_config(layout),
                skip=lambda: None if shutil.which("prometheus") else "not installed (apt-get install prometheus)",
            ),
        ]
    return [store, servers, Tier(project, before=project_on_stack)]


@dataclass(frozen=True)
class _Starting:
    spec: PartSpec
    process: subprocess.Popen[bytes]
    log: Path
    began: float


def up(paths: ProjectPaths, settings: Settings, timeout: float = 120.0) -> UpReport:
    """Start what is not running, tier by tier (`_tiers`): every port is checked free first, then each tier's parts
    start side by side and are waited on until healthy before the next tier begins. One `up` or `down` at a time."""
    layout = Layout.of(paths, settings)
    layout.root.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(layout.root.parent / f".{layout.root.name}.lock", _refuse_concurrent(layout)):
        return _up(paths, settings, layout, timeout)


def _up(paths: ProjectPaths, settings: Settings, layout: Layout, timeout: float) -> UpReport:
    started_at = time.perf_counter()
    keys = _secrets(layout)
    state = parts.load_state(layout.state_file)
    report = UpReport()
    for name, entry in list(state.items()):
        if entry.process() is None:
            del state[name]  # died or stopped since: started again below
        else:
            report.already[name] = entry
    tiers = _tiers(paths, settings, layout, keys, state)
    for spec in (spec for tier in tiers for spec in tier.parts):
        # A part that will be skipped (Prometheus not installed) does not need its port.
        if spec.name not in state and spec.port is not None and not port_free(spec.port) and spec.skip() is None:
            raise StackError(
                f"port {spec.port} for {spec.name} is in use by another program: set stack.ports.{spec.name}"
            )
    try:
        for tier in tiers:
            tier.before()
            starting = []
            for spec in tier.parts:
                reason = spec.skip()
                if reason is not None:
                    report.skipped[spec.name] = reason
                    continue
                spec.prepare()
                argv, user = spec.argv(), spec.user()
                if spec.name not in state:
                    began, log = time.perf_counter(), layout.log(spec.name)
                    process = parts.start(
                        spec.name, argv, env=spec.env, log=log, cwd=spec.cwd, url=layout.url(spec.name), user=user
                    )
                    starting.append(_Starting(spec, process, log, began))
                    # Recorded at once: if another part of its tier fails to come up, `stack down` still finds it
                    # (it was left running, in no record).
                    state[spec.name] = parts.record(spec.name, process, layout.url(spec.name), log, 0.0)
                    parts.save_state(layout.state_file, state)
            for part in starting:
                name = part.spec.name
                wait_started(name, part.spec.healthy, timeout, part.process, part.log)
                state[name] = report.started[name] = parts.record(
                    name, part.process, layout.url(name), part.log, time.perf_counter() - part.began
                )
                parts.save_state(layout.state_file, state)
            for spec in tier.parts:
                if spec.name in report.already and spec.name not in report.skipped:
                    _check_answers(spec, report.already[spec.name], timeout)
            tier.then()
    finally:
        parts.save_state(layout.state_file, state)
    report.env_file = layout.env_file
    report.seconds = time.perf_counter() - started_at
    return report


def _check_answers(spec: PartSpec, entry: Started, timeout: float) -> None:
    """A part found running is up only if it answers: one left starting by an `up` that failed beside it may still
    come up; one that hangs is named, not reported as up."""
    try:
        wait_started(spec.name, spec.healthy, timeout)
    except StartupError:
        raise StackError(
            f"{spec.name} (pid {entry.pid}) runs but has not answered at {entry.url} for {timeout:.0f} s: "
            f"`conveyor stack down`, then `conveyor stack up`; its log: {entry.log}"
        ) from None


def _deploy(paths: ProjectPaths, env: dict[str, str]) -> None:
    result = subprocess.run(
        [str(parts.VENV_BIN / "conveyor"), "deploy"], cwd=paths.root, env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise StackError(f"`conveyor deploy` on the stack failed: {(result.stderr or result.stdout).strip()[-1500:]}")


def _worker_online(api: str, pool: str) -> bool:
    """The worker has told the server it is polling the pool."""
    request = urllib.request.Request(
        f"{api}/work_pools/{urllib.parse.quote(pool, safe='')}/workers/filter",
        data=b"{}",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=3) as response:
            return any(worker.get("status") == "ONLINE" for worker in json.loads(response.read()))
    except OSError:
        return False


def write_env_file(layout: Layout, keys: dict[str, str]) -> Path:
    lines = [
        "# Written by `conveyor stack up`. `source` it to use the stack: MLflow, Prefect, S3 (DVC remote, artifacts).",
        "# It holds the stack's generated credentials: keep it to yourself.",
        *(f"export {k}={shlex.quote(v)}" for k, v in client_env(layout, keys).items()),  # a path may hold a space
    ]
    write_atomically(layout.env_file, "\n".join(lines) + "\n", private=True)
    return layout.env_file


def read_env_file(path: Path) -> dict[str, str]:
    """The variables `write_env_file` exported, for a process that cannot `source` it."""
    exported = [line.removeprefix("export ").split("=", 1) for line in path.read_text().splitlines()
                if line.startswith("export ")]  # fmt: skip
    return {key: "".join(shlex.split(value)) for key, value in exported}


def write_prometheus_config(layout: Layout) -> Path:
    """Scraping the model server's /metrics; with the bearer token the server inherits (CONVEYOR_SERVE_TOKEN), in a
    file of its own that Prometheus reads (every scrape was a 401 otherwise, and nothing said so)."""
    from serving import TOKEN_ENV

    config = layout.prometheus_config
    target = layout.url("server").removeprefix("http://")
    token = os.environ.get(TOKEN_ENV)
    authorization = ""
    if token:
        token_file = config.with_name("server-token")
        write_atomically(token_file, token, private=True)
        authorization = f"    authorization: {{credentials_file: '{token_file}'}}\n"
    config.write_text(
        "# Written by `conveyor stack up`: the model server's /metrics every 5 s.\n"
        "global: {scrape_interval: 5s}\n"
        "scrape_configs:\n"
        "  - job_name: conveyor-server\n"
        f"{authorization}"
        f"    static_configs: [{{targets: ['{target}']}}]\n"
    )
    return config


def use_dvc_remote(paths: ProjectPaths, settings: Settings, layout: Layout) -> None:
    """This project's default DVC remote becomes s3://BUCKET/dvc on the stack, in .dvc/config.local only (the
    credentials stay in the environment: the env file)."""
    url = f"s3://{settings.stack.bucket}/dvc"
    for args in (
        ("remote", "add", "--local", "--force", "--default", REMOTE, url),
        ("remote", "modify", "--local", REMOTE, "endpointurl", layout.url("s3")),
    ):
        result = dvc(paths.root, *args, check=False, env=_base_env())
        if result.returncode != 0:
            raise StackError(f"dvc {' '.join(args)}: {result.stderr.strip()}")


def release_dvc_remote(paths: ProjectPaths) -> None:
    """Back to the committed default remote: the local default is unset only where it is the stack's (a user's
    own local default, set without the stack, is theirs)."""
    local = dvc(paths.root, "remote", "default", "--local", check=False, env=_base_env())
    if local.returncode == 0 and local.stdout.strip() == REMOTE:
        dvc(paths.root, "remote", "default", "--local", "--unset", check=False, env=_base_env())
    dvc(paths.root, "remote", "remove", "--local", REMOTE, check=False, env=_base_env())


@dataclass(frozen=True)
class PartStatus:
    name: str
    state: str  # up | down | not started | skipped
    url: str
    detail: str


def status(paths: ProjectPaths, settings: Settings) -> list[PartStatus]:
    layout = Layout.of(paths, settings)
    state = parts.load_state(layout.state_file)
    health = {
        "postgres": lambda: parts.postgres_ready(
            settings.stack.ports.postgres, _secrets(layout, create=False).get("PG_SUPERUSER_PASSWORD", "")
        ),
        "s3": lambda: http_answers(layout.url("s3"), accept_errors=True),
        "mlflow": lambda: http_answers(f"{layout.url('mlflow')}/health"),
        "prefect": lambda: http_answers(f"{layout.url('prefect')}/ready"),
        "worker": lambda: _worker_online(layout.url("prefect"), settings.orchestration.work_pool),
        "server": lambda: http_answers(f"{layout.url('server')}/v2/health/ready"),
        "prometheus": lambda: http_answers(f"{layout.url('prometheus')}/-/ready"),
    }
    rows = []
    for name in ORDER:
        entry = state.get(name)
        if entry is None:
            rows.append(PartStatus(name, "not started", layout.url(name), ""))
            continue
        if entry.process() is None:
            rows.append(PartStatus(name, "down", layout.url(name), f"process {entry.pid} is gone; log {entry.log}"))
            continue
        healthy = health[name]()
        detail = f"pid {entry.pid}, up in {entry.seconds:.1f} s"
        if name == "server" and not healthy and http_answers(f"{layout.url('server')}/v2/health/live"):
            healthy, detail = True, detail + "; live, no model loaded yet (waiting for a champion)"
        rows.append(PartStatus(name, "up" if healthy else "not healthy", layout.url(name), detail))
    return rows


def down(paths: ProjectPaths, settings: Settings) -> list[tuple[str, str]]:
    """Stop what `up` started, in tiers (clients, then servers, then storage) so that no server loses its store while
    a client still writes through it; the parts of a tier stop side by side."""
    layout = Layout.of(paths, settings)
    layout.root.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(layout.root.parent / f".{layout.root.name}.lock", _refuse_concurrent(layout)):
        return _down(paths, layout)


def _down(paths: ProjectPaths, layout: Layout) -> list[tuple[str, str]]:
    state = parts.load_state(layout.state_file)
    results = []
    for tier in STOP_TIERS:
        entries = [state[name] for name in tier if name in state]
        if not entries:
            continue
        with ThreadPoolExecutor(max_workers=len(entries)) as pool:
            outcomes = list(pool.map(parts.stop, entries))
        for entry, outcome in zip(entries, outcomes, strict=True):
            results.append((entry.name, outcome))
            state.pop(entry.name)
        parts.save_state(layout.state_file, state)
    release_dvc_remote(paths)
    return results
