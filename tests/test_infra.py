"""The deployment files under infra/ and .github/ against the code they deploy.

Nothing here builds an image or talks to Docker or a cluster (none exists on this machine). What is checked instead:
every YAML and JSON parses; what compose, the Dockerfiles and the kustomizations point at exists (and gets through
each Dockerfile's ignore file); every `conveyor ...` command line they name parses against the real CLI; ports match
params.yaml; probes hit routes the FastAPI app really has; each kustomization builds (with kubectl, where installed);
every metric the Grafana dashboard queries is one the code defines (or a Triton metric seen from PyTriton's Triton);
PromQL and the Prometheus config pass promtool (where installed); the generated Triton config.pbtxt is a valid
ModelConfig; and the small scripts (DVC remote from the environment, the bucket init, the Triton start) do their job.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from conveyor.net import free_port
from tests.conftest import nanio_store, stop_tree, wait_http

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
VENV_BIN = Path(sys.executable).parent
DASHBOARD = INFRA / "grafana" / "dashboards" / "conveyor.json"
COMPOSE = INFRA / "compose.yaml"
WORKFLOW = ROOT / ".github" / "workflows" / "model-ci.yaml"
K8S = INFRA / "k8s"
DOCKERFILES = sorted((INFRA / "docker").glob("Dockerfile.*[!e]"))  # not the .dockerignore files
SERVER_DOCKERFILES = [p for p in DOCKERFILES if p.name.startswith("Dockerfile.server")]

# Triton's series on PyTriton 0.7.0's Triton (2.51), read from its metrics port on this machine with a toy model.
TRITON_METRICS = {
    "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_input_duration_us",
    "nv_inference_compute_output_duration_us",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_pending_request_count",
    "nv_inference_queue_duration_us",
    "nv_inference_request_duration_us",
    "nv_inference_request_failure",
    "nv_inference_request_success",
}
PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or", "unless", "inf",
    "nan",
}  # fmt: skip


# --- helpers (grafana_queries is also for tests/test_serving.py's real Prometheus) ----------------------------------


def grafana_queries(rate_interval: str = "1m") -> list[str]:
    """Every PromQL expression of the Grafana dashboard, Grafana's interval variables replaced by `rate_interval`,
    so a real Prometheus' query API can run them."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in _panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable in ("$__rate_interval", "$__interval", "$__range"):
                expr = expr.replace(variable, rate_interval)
            queries.append(expr)
    return queries


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords, label names or durations."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = re.sub(r"\boffset\s+-?[\dsmhdwy]+", " ", text)  # offset modifiers
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)  # label lists
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word, rest = match.group(), text[match.end() :]
        if rest.lstrip().startswith("(") or word.lower() in PROMQL_WORDS:
            continue
        if re.fullmatch(r"\d*e\d+", word):  # the tail of a number such as 1e6
            continue
        names.add(word)
    return names


def defined_metric_names(tmp_path: Path) -> set[str]:
    """Series names the code exposes: the server's registry (by metric type, as prometheus_client names its
    samples) and the gauges the drift check writes (written for real, then read back)."""
    from prometheus_client.parser import text_string_to_metric_families

    from monitoring.check import write_gauges
    from monitoring.drift import EXPOSURE, DriftResult, FeatureDrift, GroupDrift
    from serving.metrics import ServingMetrics
    from tests.monitoring_support import outcome_of

    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "gauge": ("",),
        "info": ("_info",),
        "summary": ("", "_count", "_sum", "_created"),
    }
    names: set[str] = set()
    for family in ServingMetrics().registry.collect():
        names.update(family.name + suffix for suffix in suffixes[family.type])
    feature = FeatureDrift("brightness", EXPOSURE, "K-S, Wasserstein", 3.0, 1.0, 1e-9, True, 120.0, 60.0)
    result = DriftResult(
        "drift",
        "test",
        40,
        features=[feature],
        groups=[GroupDrift(EXPOSURE, True, 3.0, "brightness", "images are darker")],
    )
    path = tmp_path / "drift.prom"
    write_gauges(path, outcome_of(result, "model", "1", tmp_path))
    for family in text_string_to_metric_families(path.read_text()):
        names.update(sample.name for sample in family.samples)
    return names


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


def copy_sources(path: Path) -> list[str]:
    """What each COPY takes from the build context (COPY --from=... takes from a stage or an image)."""
    sources: list[str] = []
    for keyword, rest in dockerfile_instructions(path):
        if keyword != "COPY":
            continue
        words = shlex.split(rest)
        if any(w.startswith("--from") for w in words):
            continue
        operands = [w for w in words if not w.startswith("--")]
        sources.extend(operands[:-1])
    return sources


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's .dockerignore rule for one path: the last pattern that matches it or one of its parent folders
    decides; `!` lets a path back in."""
    parts = path.split("/")
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        body = body.strip("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        regex = fnmatch.translate(body).replace(".*", "[^/]*")
        if body.startswith("**/"):
            regex = "(?:.*/)?" + fnmatch.translate(body[3:]).replace(".*", "[^/]*")
        if any(re.match(regex, c) for c in candidates):
            excluded = not negate
    return excluded


def ignore_patterns(dockerfile: Path) -> list[str]:
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    return [line.strip() for line in ignore.read_text().splitlines() if line.strip() and not line.startswith("#")]


def infra_text_files() -> list[Path]:
    """Every file of the deployment (not the demo DVC remote's data)."""
    files = [p for p in INFRA.rglob("*") if p.is_file() and "demo-remote" not in p.parts and p.name != ".env"]
    return sorted([*files, WORKFLOW])


def yaml_documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s_documents(directory: Path) -> list[dict[str, Any]]:
    docs = []
    for path in sorted(directory.rglob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs.extend(yaml_documents(path))
    return docs


def pod_templates(doc: dict[str, Any]) -> list[tuple[str, dict[str, str], dict[str, Any]]]:
    """(name, the pod's labels, its spec) of every pod an object makes. An InferenceService's predictor pods carry
    its `labels` (KServe's own are added beside them)."""
    spec = doc.get("spec", {})
    if doc["kind"] == "InferenceService":
        predictor = spec["predictor"]
        return [(doc["metadata"]["name"], predictor.get("labels", {}), predictor)]
    if "template" in spec:
        return [(doc["metadata"]["name"], spec["template"]["metadata"].get("labels", {}), spec["template"]["spec"])]
    return []


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for _, _, pod in pod_templates(doc) for c in [*pod.get("initContainers", []), *pod.get("containers", [])]]


def params() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "params.yaml").read_text()))


# --- every file parses ----------------------------------------------------------------------------------------------


def test_every_yaml_and_json_file_parses() -> None:
    checked = 0
    for path in infra_text_files():
        if path.suffix in (".yaml", ".yml"):
            assert yaml_documents(path), f"{path} is empty"
            checked += 1
        elif path.suffix == ".json":
            json.loads(path.read_text())
            checked += 1
    assert checked >= 20


def test_the_env_example_holds_no_secret_and_compose_requires_each() -> None:
    values = dict(
        line.split("=", 1)
        for line in (INFRA / ".env.example").read_text().splitlines()
        if "=" in line and line[0] != "#"
    )
    secrets = [k for k in values if "PASSWORD" in k or "SECRET" in k or "TOKEN" in k]
    assert secrets and all(values[k] == "" for k in secrets), "secrets in .env.example must be left empty"
    compose = COMPOSE.read_text()
    for key in secrets:
        assert f"${{{key}:?" in compose, f"compose must refuse to start without {key}"
    assert "/.env" in (INFRA / ".gitignore").read_text().splitlines()


# --- compose --------------------------------------------------------------------------------------------------------


def test_compose_points_at_files_that_exist() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    for name, service in services.items():
        build = service.get("build")
        if build:
            context = (INFRA / build["context"]).resolve()
            assert context == ROOT, f"{name}: the Dockerfiles COPY paths relative to the repository root"
            dockerfile = context / build["dockerfile"]
            assert dockerfile.is_file(), f"{name}: {dockerfile}"
            assert dockerfile.with_name(dockerfile.name + ".dockerignore").is_file()
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (INFRA / source).exists(), f"{name} mounts {source}, which does not exist"
            else:
                assert source in compose["volumes"], f"{name}: named volume {source} is not declared"
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{name} depends on unknown service {dependency}"
        for secret in service.get("secrets", []):
            assert secret in compose["secrets"]
    expected = {"postgres", "minio", "bucket-init", "mlflow", "prefect-server", "worker", "model-server"}
    assert expected | {"prometheus", "grafana"} <= set(services)


def test_compose_stack_is_wired_consistently() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    mlflow = services["mlflow"]
    allowed = next(a for a in mlflow["command"] if a.startswith("--allowed-hosts=")).split("=", 1)[1].split(",")
    for name in ("worker", "model-server"):
        uri = services[name]["environment"]["MLFLOW_TRACKING_URI"]
        host = uri.removeprefix("http://").rstrip("/")
        assert host in allowed, f"{name} reaches MLflow as {host}, which --allowed-hosts refuses (403)"
    assert services["worker"]["environment"]["PREFECT_API_URL"].startswith("http://prefect-server:4200/")
    assert "postgresql+asyncpg://" in services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert mlflow["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    # PostgreSQL is healthy only once it listens on TCP: the postgres image's init scripts run against a server on the
    # Unix socket alone, where pg_isready said "accepting" before the prefect database existed. (The image's entrypoint
    # is not run here: no registry answers for it; this is the healthcheck's argument as compose passes it.)
    healthcheck = services["postgres"]["healthcheck"]["test"]
    assert healthcheck[:2] == ["CMD", "pg_isready"] and healthcheck[healthcheck.index("--host") + 1] == "127.0.0.1"
    serve = params()["serve"]
    for name in ("model-server", "model-server-tensorrt"):
        published = {int(p.split(":")[-1]) for p in services[name]["ports"]}
        assert published == {serve["port"], serve["grpc_port"]}, f"{name} publishes {published}"
        assert services[name]["environment"]["CONVEYOR_SERVE_TOKEN"].startswith("${CONVEYOR_SERVE_TOKEN:?")
    # The drift check (worker) and the server that appends its gauges to /metrics share the project's .conveyor/.
    state = {v.split(":")[0] for n in ("worker", "model-server") for v in services[n]["volumes"] if ".conveyor" in v}
    assert state == {"conveyor-state"}
    from conveyor.paths import DRIFT_METRICS_FILE

    assert DRIFT_METRICS_FILE in (INFRA / "prometheus" / "prometheus.yml").read_text()
    # Prometheus reads the serving token where compose mounts the secret.
    prometheus = yaml.safe_load((INFRA / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in prometheus["scrape_configs"] if j["job_name"] == "conveyor-model-server")
    assert job["authorization"]["credentials_file"] == "/run/secrets/" + services["prometheus"]["secrets"][0]
    assert f"model-server:{params()['serve']['port']}" in job["static_configs"][0]["targets"]
    assert "labels" not in job["static_configs"][0], "a target label `runtime` would rename conveyor_model_info's"
    # Grafana's provisioning is mounted where the provider and datasource files say.
    grafana = services["grafana"]["volumes"]
    provider = yaml.safe_load((INFRA / "grafana/provisioning/dashboards/conveyor.yaml").read_text())
    assert f"./grafana/dashboards:{provider['providers'][0]['options']['path']}:ro" in grafana
    datasource = yaml.safe_load((INFRA / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


# --- Dockerfiles ------------------------------------------------------------------------------------------------------


def test_dockerfiles_copy_what_exists_and_gets_through_their_ignore_file() -> None:
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.server", "Dockerfile.server-tensorrt", "Dockerfile.worker"]
    for dockerfile in DOCKERFILES:
        patterns = ignore_patterns(dockerfile)
        sources = copy_sources(dockerfile)
        binds = re.findall(r"type=bind,source=([^,\s]+)", dockerfile.read_text())
        assert sources and binds
        for source in [*sources, *binds]:
            assert (ROOT / source).exists(), f"{dockerfile.name} copies {source}, which is not in the repository"
            assert not dockerignore_excludes(patterns, source), f"{dockerfile.name}: {source} is ignored"
        # Never in an image: environments, git, local stores, secrets.
        for never in (".venv/bin/python", ".git/HEAD", "mlflow.db", "infra/.env", "conveyor/__pycache__/cli.pyc"):
            assert dockerignore_excludes(patterns, never), f"{dockerfile.name} would let {never} into the context"


def test_dockerfiles_install_every_package_of_the_project() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = project["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    for dockerfile in DOCKERFILES:
        sources = copy_sources(dockerfile)
        missing = [p for p in packages if p not in sources]
        assert not missing, f"{dockerfile.name} does not COPY {missing} (pyproject.toml's packages)"
        text = dockerfile.read_text()
        assert "uv sync --locked --no-dev" in text, "install exactly uv.lock"
        assert re.search(r"^USER 10001", text, re.M), "a numeric non-root user (runAsNonRoot can check it)"
        assert text.count("\nFROM ") >= 2, "multi-stage: the runtime image carries no build tools"
        uv_version = re.search(r"ARG UV_VERSION=(\S+)", text)
        makefile = re.search(r"UV_VERSION := (\S+)", (ROOT / "Makefile").read_text())
        assert uv_version and makefile and uv_version.group(1) == makefile.group(1)


def test_server_images_expose_the_serving_ports_and_check_health_on_a_real_route() -> None:
    serve = params()["serve"]
    routes = app_routes()
    for dockerfile in SERVER_DOCKERFILES:
        instructions = dockerfile_instructions(dockerfile)
        exposed = {int(p) for k, rest in instructions if k == "EXPOSE" for p in rest.split()}
        assert exposed == {serve["port"], serve["grpc_port"]}, dockerfile.name
        health = next(rest for k, rest in instructions if k == "HEALTHCHECK")
        url = re.search(r"http://127\.0\.0\.1:(\d+)(/[\w/]+)", health)
        assert url and int(url.group(1)) == serve["port"] and url.group(2) in routes


# --- conveyor commands named anywhere ---------------------------------------------------------------------------------


def conveyor_command_lines() -> list[tuple[Path, list[str]]]:
    """Every `conveyor ...` command line in the deployment files, comments included, as arguments (exec-form lists
    are joined first; `kubectl -n conveyor ...` is a namespace, not the CLI)."""
    found = []
    for path in infra_text_files():
        if path.suffix not in ("", ".yaml", ".yml", ".sh", ".py", ".md", ".worker", ".server", ".server-tensorrt"):
            continue
        if path.name.endswith(".dockerignore"):
            continue
        text = re.sub(r'"\s*,\s*"', " ", path.read_text())  # ["conveyor", "serve"] -> conveyor serve
        for match in re.finditer(r"(?:^|[\s\[\"'`/(])(?<!-n )(?<!--namespace )conveyor[ \t]+([^\n\"'`\])&;|#]*)", text):
            words = match.group(1).split()
            if words and re.fullmatch(r"[a-z][a-z-]*", words[0]):
                found.append((path, words))
    return found


def test_every_conveyor_command_named_is_a_real_cli_command_line() -> None:
    """Each line, with --help appended, through the real CLI: an unknown command, an unknown option or an extra
    argument exits 2 before --help is reached (click parses every argument first); a good line prints its help."""
    from typer.testing import CliRunner

    from conveyor.cli import app

    lines = conveyor_command_lines()
    named = {words[0] for _, words in lines}
    assert {"serve", "worker", "deploy", "run", "triton-repository", "data"} <= named, named
    runner = CliRunner()
    for path, words in lines:
        result = runner.invoke(app, [*words, "--help"])
        assert result.exit_code == 0, f"{path.relative_to(ROOT)}: `conveyor {' '.join(words)}`: {result.output}"
    assert runner.invoke(app, ["serve", "--no-such-option", "--help"]).exit_code == 2  # the check can fail


# --- Kubernetes -----------------------------------------------------------------------------------------------------


def kustomizations() -> list[Path]:
    return sorted(K8S.rglob("kustomization.yaml"))


def test_every_kustomization_lists_files_that_exist() -> None:
    assert {p.parent.name for p in kustomizations()} == {"base", "kserve", "triton", "monitoring"}
    for kustomization in kustomizations():
        spec = yaml.safe_load(kustomization.read_text())
        listed = [*spec.get("resources", []), *spec.get("components", [])]
        listed += [f for g in spec.get("configMapGenerator", []) for f in g.get("files", [])]
        listed += [p["path"] for p in spec.get("patches", []) if "path" in p]
        assert listed
        for entry in listed:
            assert (kustomization.parent / entry).exists(), f"{kustomization}: {entry} does not exist"


@functools.cache
def built_overlays() -> dict[str, list[dict[str, Any]]]:
    """Each kustomization as kustomize builds it (what `kubectl apply -k` would send), by its folder's name; built
    once for every test that reads them."""
    out = {}
    for kustomization in kustomizations():
        result = subprocess.run(
            ["kubectl", "kustomize", str(kustomization.parent)], capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, f"{kustomization.parent}: {result.stderr}"
        out[kustomization.parent.name] = [d for d in yaml.safe_load_all(result.stdout) if d]
    return out


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (its built-in kustomize) is not installed")
def test_every_kustomization_builds() -> None:
    for overlay, docs in built_overlays().items():
        kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
        assert ("Namespace", "conveyor") in kinds
        assert all(d["metadata"].get("namespace") == "conveyor" for d in docs if d["kind"] != "Namespace")
        served = ("Deployment", "conveyor-model-server") in kinds
        assert served == (overlay in ("base", "monitoring")), overlay
        for doc in docs:  # every Conveyor image went through an `images:` entry (a tag is set)
            for container in containers(doc):
                assert ":" in container["image"], f"{overlay}: {container['image']} has no tag"


# Kubernetes' own schemas (kubernetes-validate bundles them, offline), for the oldest minor version still supported
# upstream when this was written, and the newest the package has.
KUBERNETES_VERSIONS = ("1.32.0", "1.37.0")
# Custom resources: their schemas are their operators' CRDs, not Kubernetes'; each is checked by the tests above
# (names, ports, images) and by its operator when applied.
CUSTOM_KINDS = {"InferenceService": "KServe's CRD", "ServiceMonitor": "the Prometheus Operator's CRD"}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (its built-in kustomize) is not installed")
def test_every_built_manifest_is_valid_against_kubernetes_schemas() -> None:
    """Each overlay built by kustomize, each object validated strictly (unknown fields are errors) against the
    OpenAPI schemas of Kubernetes itself."""
    import kubernetes_validate

    checked: dict[str, int] = {}
    for overlay, docs in built_overlays().items():
        for doc in docs:
            if doc["kind"] in CUSTOM_KINDS:
                continue
            for version in KUBERNETES_VERSIONS:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    raise AssertionError(
                        f"{overlay}: {doc['kind']}/{doc['metadata']['name']} is not valid "
                        f"Kubernetes {version}: {exc.message} at {'.'.join(map(str, exc.path))}"
                    ) from None
            checked[doc["kind"]] = checked.get(doc["kind"], 0) + 1
    assert {"Deployment", "Service", "Job", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Role"} <= set(checked)


def test_k8s_server_ports_probes_and_secret_match_the_code() -> None:
    from pipelines.log_parts import LOG_CLOSE_SECONDS
    from serving.server import GRACEFUL_SHUTDOWN_SECONDS
    from serving.triton import TRITON_EXIT_SECONDS

    serve = params()["serve"]
    routes = app_routes()
    from serving.app import HEALTH_ROUTES
    from serving.server import TOKEN_ENV

    servers = [
        d
        for d in [*k8s_documents(K8S / "base"), *k8s_documents(K8S / "overlays/kserve")]
        if d["kind"] in ("Deployment", "InferenceService") and d["metadata"]["name"] != "conveyor-prefect-worker"
    ]
    assert {d["kind"] for d in servers} == {"Deployment", "InferenceService"}
    for doc in servers:
        (container,) = containers(doc)
        args = container["args"]
        assert args[:2] == ["conveyor", "serve"]
        assert args[args.index("--port") + 1] == str(serve["port"])
        assert args[args.index("--grpc-port") + 1] == str(serve["grpc_port"])
        assert args[args.index("--host") + 1] == "0.0.0.0"
        assert {p["containerPort"] for p in container["ports"]} <= {serve["port"], serve["grpc_port"]}
        assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert container[probe]["httpGet"]["path"] in routes
        token = next(e for e in container["env"] if e["name"] == TOKEN_ENV)
        assert token["valueFrom"]["secretKeyRef"]["name"] == "conveyor-secrets"
        # The prediction log's S3 keys, under the names boto3 reads (conveyor/storage.py): without them every
        # upload failed quietly and the cluster's drift check saw no records.
        keys = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if e["name"].startswith("AWS_")}
        assert set(keys) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
        assert all(ref["name"] == "conveyor-secrets" and ref["key"] == name for name, ref in keys.items())
        # A read-only root, as the image is tested (tests/test_images.py): the server's caches in a /tmp of its own.
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/app/.conveyor", "/tmp"}
        assert container["readinessProbe"]["timeoutSeconds"] >= 3 and container["livenessProbe"]["timeoutSeconds"] >= 5
        # The stop fits the grace period: a pause while the Service drops the pod (connections were refused on every
        # rollout), requests in flight, Triton, then the prediction log's writer (killed, its last records were lost).
        pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
        ((_, _, pod),) = pod_templates(doc)
        stop = pause + GRACEFUL_SHUTDOWN_SECONDS + TRITON_EXIT_SECONDS + LOG_CLOSE_SECONDS
        assert pause >= 3 and stop <= pod["terminationGracePeriodSeconds"], (stop, pod["terminationGracePeriodSeconds"])
    deployment = next(d for d in servers if d["kind"] == "Deployment")
    # The autoscaler sets the replicas: a count in the Deployment would scale it back at every `kubectl apply`.
    assert "replicas" not in deployment["spec"]
    service = next(d for d in k8s_documents(K8S / "base") if d["kind"] == "Service")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {
        "http": serve["port"],
        "grpc": serve["grpc_port"],
    }
    hpa = next(d for d in k8s_documents(K8S / "base") if d["kind"] == "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2" and hpa["spec"]["scaleTargetRef"]["name"] == "conveyor-model-server"
    assert hpa["spec"]["minReplicas"] == 2
    # A replica that is not ready (no champion yet) serves nothing: drains must not wait for a first promotion.
    budgets = [
        d for o in ("base", "overlays/triton") for d in k8s_documents(K8S / o) if d["kind"] == "PodDisruptionBudget"
    ]
    assert len(budgets) == 2 and all(b["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow" for b in budgets)
    monitor = next(d for d in k8s_documents(K8S / "overlays/monitoring") if d["kind"] == "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["path"] in routes
    # Plain Triton answers the same KServe v2 health routes as the API in front of PyTriton.
    (triton,) = [d for d in k8s_documents(K8S / "overlays/triton") if d["kind"] == "Deployment"]
    main = containers(triton)[-1]
    assert {main[p]["httpGet"]["path"] for p in ("readinessProbe", "livenessProbe")} == set(HEALTH_ROUTES)
    assert main["readinessProbe"]["timeoutSeconds"] >= 3 and main["livenessProbe"]["timeoutSeconds"] >= 5
    assert "replicas" not in triton["spec"]
    init = containers(triton)[0]
    args = init["args"]
    # --overwrite: an init container may run again on the same emptyDir, and without it the pod never started.
    assert args[:2] == ["conveyor", "triton-repository"] and args[args.index("--out") + 1] == "/models"
    assert "--overwrite" in args


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels is read here: {selector}"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def ingress_allowed(policies: list[dict[str, Any]], labels: dict[str, str], port: dict[str, Any]) -> bool:
    """Whether a NetworkPolicy spec among `policies` lets connections from anywhere into this container port of a pod
    with these labels (a port named or numbered, TCP unless said)."""
    for policy in policies:
        if not selects(policy["podSelector"], labels):
            continue
        for rule in policy.get("ingress", []):
            assert "from" not in rule, "a rule with sources: read them here before trusting this test"
            for allowed in rule.get("ports", []):
                same_protocol = allowed.get("protocol", "TCP") == port.get("protocol", "TCP")
                if same_protocol and allowed["port"] in (port.get("name"), port["containerPort"]):
                    return True
    return False


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (its built-in kustomize) is not installed")
def test_only_the_model_servers_serving_ports_take_connections() -> None:
    """NetworkPolicy, as Kubernetes reads it: a policy that selects a pod for Ingress makes everything it does not
    allow refused. Every overlay denies all ingress to the namespace, then lets in a model server's declared ports,
    from anywhere (clients on the line are rarely pods). A port a server declares but the policy leaves out, or a
    Service pointing at one, would be an outage only a cluster with an enforcing network plugin shows."""
    reachable: dict[str, set[tuple[str, str]]] = {}
    for overlay, docs in built_overlays().items():
        policies = [d["spec"] for d in docs if d["kind"] == "NetworkPolicy"]
        deny_all = [p for p in policies if p["podSelector"] == {} and p["policyTypes"] == ["Ingress"]]
        assert len(deny_all) == 1 and not deny_all[0].get("ingress"), f"{overlay}: no default deny of ingress"
        assert all("Egress" not in p["policyTypes"] for p in policies)  # the stack is the team's: left open

        pods = [(name, labels, spec) for d in docs for name, labels, spec in pod_templates(d)]
        assert pods
        reachable[overlay] = set()
        for name, labels, spec in pods:
            for container in spec["containers"]:
                probed = {
                    container[probe]["httpGet"]["port"]
                    for probe in ("startupProbe", "readinessProbe", "livenessProbe")
                    if probe in container
                }
                for port in container.get("ports", []):
                    label = port.get("name", str(port["containerPort"]))
                    if labels.get("app.kubernetes.io/component") == "model-server":
                        # A server's every declared port is let in (KServe makes its own Service to it).
                        reached = ingress_allowed(policies, labels, port)
                        assert reached, f"{overlay}: {name} declares {port} and nobody can reach it"
                        reachable[overlay].add((name, label))
                    else:
                        # Any other listener is the kubelet's: its probes come from the node, which a
                        # NetworkPolicy never blocks (Kubernetes' documentation), and nothing else may connect.
                        probe_only = {port.get("name"), port["containerPort"]} & probed
                        assert probe_only and not ingress_allowed(policies, labels, port), (overlay, name, port)
        for service in (d for d in docs if d["kind"] == "Service"):
            targets = [(n, s) for n, labels, s in pods if selects({"matchLabels": service["spec"]["selector"]}, labels)]
            assert targets, f"{overlay}: Service {service['metadata']['name']} selects no pod"
            for service_port in service["spec"]["ports"]:
                for name, spec in targets:
                    declared = [p for c in spec["containers"] for p in c.get("ports", [])]
                    target = [p for p in declared if service_port["targetPort"] in (p.get("name"), p["containerPort"])]
                    assert target, f"{overlay}: Service port {service_port['name']} targets nothing on {name}"
                    assert (name, target[0].get("name", str(target[0]["containerPort"]))) in reachable[overlay]
    assert reachable == {
        "base": {("conveyor-model-server", "http"), ("conveyor-model-server", "grpc")},
        "monitoring": {("conveyor-model-server", "http"), ("conveyor-model-server", "grpc")},
        "triton": {("conveyor-triton", "http"), ("conveyor-triton", "grpc"), ("conveyor-triton", "metrics")},
        "kserve": {("conveyor-defect-detector", "http")},
    }


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (its built-in kustomize) is not installed")
def test_model_server_replicas_spread_evenly_over_nodes() -> None:
    """Two replicas on one node are one node's failure, or drain, away from none (the PDB's minAvailable 1 only makes
    a drain wait). Each overlay's server spreads its own replicas, per revision, evenly over nodes (at most one more on
    any node: two share a node only when every node has one), and across zones where the cluster has them."""
    servers = 0
    for overlay, docs in built_overlays().items():
        for doc in docs:
            for name, labels, spec in pod_templates(doc):
                if labels.get("app.kubernetes.io/component") != "model-server":
                    continue
                servers += 1
                spread = {c["topologyKey"]: c for c in spec.get("topologySpreadConstraints", [])}
                assert set(spread) == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}, (overlay, name)
                assert spread["kubernetes.io/hostname"]["whenUnsatisfiable"] == "DoNotSchedule"
                assert spread["topology.kubernetes.io/zone"]["whenUnsatisfiable"] == "ScheduleAnyway"
                for constraint in spread.values():
                    assert constraint["maxSkew"] == 1
                    # It counts this server's own pods, and of one revision: a rollout's surge pod is not held back
                    # by the old pods on the other nodes.
                    assert selects(constraint["labelSelector"], labels), (overlay, name, constraint)
                    assert constraint["labelSelector"]["matchLabels"].get("app.kubernetes.io/name") == name
                    assert constraint["matchLabelKeys"] == ["pod-template-hash"]
                    # A node the pod may not run on (a control plane's taint) counted with its zero replicas: with
                    # DoNotSchedule, a second replica would stay pending.
                    assert constraint["nodeTaintsPolicy"] == "Honor"
    assert servers == 4  # base, monitoring (the base's), triton, kserve


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (its built-in kustomize) is not installed")
def test_only_the_pods_that_call_the_kubernetes_api_hold_a_token() -> None:
    """A pod gets its service account's API token mounted unless it says otherwise. The model servers and the flow-run
    Jobs never call the Kubernetes API (nothing in Conveyor's packages does): a token there only serves whoever takes
    the pod. The worker (it creates the flow-run Jobs) and the deploy Job (it reads its own pod's image) call it, as the
    worker's service account, which the Role binds."""
    import ast

    with_token: set[str] = set()
    for overlay, docs in built_overlays().items():
        for doc in docs:
            for name, _, spec in pod_templates(doc):
                if spec.get("automountServiceAccountToken", True):
                    with_token.add(name)
                    assert spec.get("serviceAccountName") == "conveyor-prefect-worker", (overlay, name)
    assert with_token == {"conveyor-prefect-worker", "conveyor-deploy"}
    template = json.loads((K8S / "base" / "prefect" / "base-job-template.json").read_text())
    assert (
        template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["automountServiceAccountToken"]
        is False
    )
    # What the flow-run pods run never reaches for the API: no Kubernetes client, no token, no API URL.
    for package in ("conveyor", "pipelines", "flows", "monitoring", "serving", "labelling"):
        for path in (ROOT / package).rglob("*.py"):
            tree = ast.parse(path.read_text())
            imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
            assert not any(m.split(".")[0] in ("kubernetes", "kubernetes_asyncio") for m in imported), path
            assert "serviceaccount" not in path.read_text().lower(), path


def test_flow_run_pods_send_the_heartbeats_the_zombie_automation_waits_for() -> None:
    """`conveyor worker` turns heartbeats on for its runs; in the cluster the runs are Jobs of Prefect's Kubernetes
    worker, which read the ConfigMap: without the setting there, no run ever sent one."""
    (config,) = [
        d
        for d in k8s_documents(K8S / "base")
        if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "conveyor-config"
    ]
    assert int(config["data"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"]) == params()["orchestration"]["heartbeat_seconds"]


def test_prefect_worker_runs_a_kubernetes_pool_with_jobs_it_may_create() -> None:
    base = k8s_documents(K8S / "base")
    worker = next(d for d in base if d["kind"] == "Deployment" and d["metadata"]["name"] == "conveyor-prefect-worker")
    (container,) = containers(worker)
    command = container["command"]
    assert command[:3] == ["prefect", "worker", "start"]
    assert "--pool=conveyor-k8s" in command and "--type=kubernetes" in command
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PREFECT_WORKER_QUERY_SECONDS"] == str(params()["orchestration"]["worker_poll_seconds"])
    assert "-kubernetes" in container["image"], "the worker needs prefect-kubernetes"
    role = next(d for d in base if d["kind"] == "Role")
    jobs = next(r for r in role["rules"] if "jobs" in r["resources"])
    assert jobs["apiGroups"] == ["batch"] and {"create", "get", "list", "watch", "delete"} <= set(jobs["verbs"])
    binding = next(d for d in base if d["kind"] == "RoleBinding")
    account = worker["spec"]["template"]["spec"]["serviceAccountName"]
    assert binding["subjects"][0]["name"] == account and binding["roleRef"]["name"] == role["metadata"]["name"]
    job = next(d for d in base if d["kind"] == "Job")
    assert job["spec"]["template"]["spec"]["serviceAccountName"] == account
    assert next(e for e in containers(job)[0]["env"] if e["name"] == "CONVEYOR_WORK_POOL")["value"] == "conveyor-k8s"


def test_the_flow_run_job_template_gets_this_image_and_the_stack_config() -> None:
    sys.path.insert(0, str(K8S / "base" / "prefect"))
    try:
        from deploy_to_pool import flow_run_template, pinned_image
    finally:
        sys.path.pop(0)
    # Flow runs start on the digest this pod runs, not on a tag that may have moved (`:latest` pushed again).
    name = "registry.example:5000/conveyor-worker"
    pod = {
        "spec": {"containers": [{"name": "deploy", "image": f"{name}:latest"}]},
        "status": {"containerStatuses": [{"name": "deploy", "imageID": f"{name}@sha256:ab12"}]},
    }
    assert pinned_image(pod) == "registry.example:5000/conveyor-worker@sha256:ab12"
    assert pinned_image({"spec": pod["spec"]}) == "registry.example:5000/conveyor-worker:latest"  # not reported yet
    template = json.loads((K8S / "base" / "prefect" / "base-job-template.json").read_text())
    patched = flow_run_template(template, "registry.example/conveyor-worker:1", "team-ns")
    assert patched["variables"]["properties"]["image"]["default"] == "registry.example/conveyor-worker:1"
    assert patched["variables"]["properties"]["namespace"]["default"] == "team-ns"
    assert template["variables"]["properties"]["image"]["default"] is None, "the template file itself is untouched"
    manifest = patched["job_configuration"]["job_manifest"]
    (container,) = manifest["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "{{ image }}" and container["args"] == "{{ command }}"
    # `args`, not `command`: the image's entrypoint (DVC remote from the environment) still runs in flow-run pods.
    assert "command" not in container
    config = next(d for d in k8s_documents(K8S / "base") if d["kind"] == "ConfigMap")
    assert container["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]  # the Secret: by key
    assert "CONVEYOR_DVC_REMOTE" in config["data"] and "MLFLOW_TRACKING_URI" in config["data"]
    # The drift check's pod reads the log where the server pods ship it: the same variable, from the same ConfigMap,
    # in the stack's bucket (without it the check's pod had no log at all, and said "insufficient data" every hour).
    from conveyor.settings import PREDICTION_LOG_S3_ENV

    shipped = config["data"][PREDICTION_LOG_S3_ENV]
    assert shipped.split("/")[2] == config["data"]["CONVEYOR_DVC_REMOTE"].split("/")[2]
    servers = [d for d in k8s_documents(K8S / "base") if d["kind"] == "Deployment" and "serve" in str(d)]
    assert servers and all(
        {"configMapRef": {"name": config["metadata"]["name"]}} in containers(d)[0]["envFrom"] for d in servers
    )


def test_flow_run_pods_get_the_stores_keys_and_not_the_serving_token() -> None:
    """The flow-run Job as the Kubernetes worker renders it, by prefect-kubernetes' own code (the release of the
    worker's image) from the pool's template and a deployment's variables. The pod took the whole Secret
    (`envFrom`): the model server's bearer token too, which no flow run uses. Now the S3 store's keys, by reference;
    Prefect's settings and the deployment's own variables still reach the pod."""
    import asyncio
    import uuid

    from prefect.client.schemas.objects import FlowRun
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    from serving.server import TOKEN_ENV

    template = json.loads((K8S / "base" / "prefect" / "base-job-template.json").read_text())
    variables = {"env": {"CONVEYOR_FROM_DEPLOYMENT": "1"}, "image": "registry.example/conveyor-worker:1"}
    with temporary_settings(updates={PREFECT_API_URL: "http://prefect.example:4200/api"}):
        job = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(template, variables))
        job.prepare_for_flow_run(FlowRun(id=uuid.uuid4(), name="run", flow_id=uuid.uuid4()))
    pod = job.job_manifest["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {entry["name"]: entry for entry in container["env"]}
    assert env["CONVEYOR_FROM_DEPLOYMENT"]["value"] == "1" and "PREFECT__FLOW_RUN_ID" in env
    assert env["PREFECT_API_URL"]["value"] == "http://prefect.example:4200/api"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # the names boto3 and DVC read
        assert env[key] == {"name": key, "valueFrom": {"secretKeyRef": {"name": "conveyor-secrets", "key": key,
                                                                         "optional": True}}}  # fmt: skip
    assert TOKEN_ENV not in env and all("secretRef" not in source for source in container["envFrom"])
    assert pod["automountServiceAccountToken"] is False and container["image"] == variables["image"]


# --- Grafana and Prometheus ---------------------------------------------------------------------------------------


def test_dashboard_queries_only_metrics_the_code_defines(tmp_path: Path) -> None:
    defined = defined_metric_names(tmp_path)
    queries = grafana_queries()
    assert len(queries) >= 25
    used = set().union(*(promql_metric_names(q) for q in queries))
    unknown = used - defined - TRITON_METRICS
    assert not unknown, f"the dashboard queries metrics nothing defines: {sorted(unknown)}"
    # The panels the dashboard promises, each on its real series.
    for name in (
        "conveyor_http_requests_total",
        "conveyor_request_seconds_bucket",
        "conveyor_batch_size_bucket",
        "conveyor_queue_seconds_bucket",
        "conveyor_inference_seconds_bucket",
        "conveyor_detections_total",
        "conveyor_detection_confidence_bucket",
        "conveyor_model_info",
        "conveyor_model_load_failures_total",
        "conveyor_prediction_log_dropped_total",
        "conveyor_drift_detected",
        "conveyor_drift_groups",
        "conveyor_drift_group_drifted",
        "conveyor_drift_feature_effect",
        "conveyor_performance_estimate",
        "conveyor_performance_cost",
        "conveyor_drift_retrain",
        "nv_inference_count",
    ):
        assert name in used, f"no panel shows {name}"
    assert "$__rate_interval" not in "".join(queries)


def test_promql_metric_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, route) (rate(conveyor_request_seconds_bucket{route!~"/metrics"}[5m])))'
        " / ignoring(x) sum without (le) (a_total offset 5m) or vector(0) * 1e6"
    )
    assert promql_metric_names(expr) == {"conveyor_request_seconds_bucket", "a_total"}


def test_dashboard_is_provisionable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    datasource = yaml.safe_load((INFRA / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    uid = datasource["datasources"][0]["uid"]
    (variable,) = dashboard["templating"]["list"]
    assert variable["type"] == "datasource" and variable["current"]["value"] == uid
    ids = [p["id"] for p in _panels(dashboard["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in _panels(dashboard["panels"]):
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
            assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian's prometheus package) is not installed")
def test_promtool_accepts_the_queries_and_the_config(tmp_path: Path) -> None:
    rules = {
        "groups": [
            {"name": "dashboard", "rules": [{"record": f"q:{i}", "expr": q} for i, q in enumerate(grafana_queries())]}
        ]
    }
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    result = subprocess.run(["promtool", "check", "rules", str(tmp_path / "rules.yml")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    config = INFRA / "prometheus" / "prometheus.yml"
    result = subprocess.run(
        ["promtool", "check", "config", "--syntax-only", str(config)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- the CI workflow ------------------------------------------------------------------------------------------------


def test_workflow_triggers_runs_and_reports_where_the_pipeline_writes(tmp_path: Path) -> None:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as true
    paths = ["data.dvc", "params.yaml", "dvc.yaml", "pipelines/**", "flows/**", "conveyor/**"]
    assert triggers["pull_request"]["paths"] == paths
    assert triggers["push"] == {"branches": ["main"], "paths": paths}
    (job,) = workflow["jobs"].values()
    steps = job["steps"]
    uses = [s["uses"] for s in steps if "uses" in s]
    assert all(re.fullmatch(r"[\w-]+/[\w-]+@v\d+", u) for u in uses), uses
    setup_uv = next(s for s in steps if s.get("uses", "").startswith("astral-sh/setup-uv"))
    makefile = re.search(r"UV_VERSION := (\S+)", (ROOT / "Makefile").read_text())
    assert makefile and setup_uv["with"]["version"] == makefile.group(1)
    runs = "\n".join(s.get("run", "") for s in steps)
    assert "uv sync --locked" in runs and "dvc pull" in runs and "infra/docker/with-dvc-remote.sh" in runs
    # Promotion only on main: the pull request runs the stages (no registry step), main runs the flow.
    pr_step = next(s for s in steps if "dvc repro" in s.get("run", ""))
    main_step = next(s for s in steps if "conveyor run" in s.get("run", ""))
    assert pr_step["if"] == "github.event_name == 'pull_request'" and main_step["if"] == "github.event_name == 'push'"
    # The comment posts the report the gate stage writes.
    from conveyor.paths import ProjectPaths
    from pipelines.gate import GateReport, GateResult, write_report

    write_report(GateReport(True, "run", None, [GateResult("mAP50", ">= 0.6", "0.9", True)]), tmp_path)
    (markdown,) = [p.name for p in tmp_path.iterdir() if p.suffix == ".md"]
    report = str(ProjectPaths(ROOT).gate.relative_to(ROOT) / markdown)
    comment = next(s for s in steps if s.get("uses", "").startswith("marocchino/sticky-pull-request-comment"))
    assert comment["with"]["path"] == report
    for name in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert job["env"][name] == f"${{{{ secrets.{name} }}}}"
    assert workflow["permissions"]["pull-requests"] == "write"


# --- the scripts --------------------------------------------------------------------------------------------------


def test_dvc_remote_comes_from_the_environment(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "DVC_NO_ANALYTICS": "1",
        "CONVEYOR_DVC_REMOTE": "s3://bucket/dvc",
        "AWS_ENDPOINT_URL": "http://store.invalid:9000",
    }
    subprocess.run([VENV_BIN / "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, env=env, check=True)
    script = INFRA / "docker" / "with-dvc-remote.sh"
    assert os.access(script, os.X_OK)
    for _ in range(2):  # idempotent: a restarted container runs it again
        result = subprocess.run(
            [script, "dvc", "remote", "default"], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
        )
        assert result.stdout.strip() == "team"
    local = (tmp_path / ".dvc" / "config.local").read_text()
    assert "url = s3://bucket/dvc" in local and "endpointurl = http://store.invalid:9000" in local
    assert "secret" not in local.lower() and "access_key" not in local.lower()
    # Unset: the repository's remotes are left as they are, and the command still runs.
    bare = {k: v for k, v in env.items() if k != "CONVEYOR_DVC_REMOTE"}
    assert subprocess.run([script, "true"], cwd=tmp_path, env=bare, check=False).returncode == 0


def test_triton_config_is_a_valid_model_config() -> None:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from conveyor.settings import load_settings
    from serving.triton_repository import config_pbtxt

    cfg = load_settings(ROOT / "params.yaml").serve
    config = text_format.Parse(config_pbtxt("conveyor-defect-detector", cfg), model_config_pb2.ModelConfig())
    assert config.backend == "python" and config.max_batch_size == cfg.max_batch_size
    assert [i.name for i in config.input] == ["image"]
    assert {o.name for o in config.output} == {"detections", "num_detections", "model_version", "error"}
    assert config.dynamic_batching.max_queue_delay_microseconds == int(cfg.max_queue_delay_ms * 1000)
    assert config.dynamic_batching.default_queue_policy.max_queue_size == cfg.max_queue_size
    assert config.instance_group[0].count == cfg.workers
    assert config.parameters["runtime"].string_value == cfg.runtime
    assert float(config.parameters["conf"].string_value) == cfg.conf  # the one threshold, read by the model code
    # What the model code reads back, from the JSON Triton's Python backend hands it: serve's runtime, threshold and
    # image limits (the limits were ImageLimits' defaults whatever serve said).
    from google.protobuf import json_format

    from serving.triton_repository import ServedSettings

    cfg = cfg.model_copy(update={"max_image_bytes": 123_456, "max_image_pixels": 60_000_000})
    config = text_format.Parse(config_pbtxt("conveyor-defect-detector", cfg), model_config_pb2.ModelConfig())
    as_sent = json_format.MessageToJson(config, preserving_proto_field_name=True)  # as Triton writes it
    served = ServedSettings.from_model_config(json.loads(as_sent))
    assert (served.runtime, served.conf) == (cfg.runtime, cfg.conf)
    assert (served.limits.max_bytes, served.limits.max_pixels) == (123_456, 60_000_000)


def test_a_triton_repository_is_replaced_only_by_a_whole_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`conveyor triton-repository --overwrite` writes the new copy beside the old one and swaps it in whole: a copy
    that fails (a full disk) leaves the served repository as it was and nothing half-written beside it."""
    import errno
    from types import SimpleNamespace

    from conveyor.settings import load_settings
    from serving import triton_repository

    cfg = load_settings(ROOT / "params.yaml").serve
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.bin").write_bytes(b"v1")
    out = tmp_path / "repository"
    written = triton_repository.write(SimpleNamespace(name="m", version="1", root=model), out, cfg)  # type: ignore[arg-type]
    with pytest.raises(FileExistsError, match="--overwrite"):
        triton_repository.write(SimpleNamespace(name="m", version="1", root=model), out, cfg)  # type: ignore[arg-type]

    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    (model / "weights.bin").write_bytes(b"v2")
    v2 = SimpleNamespace(name="m", version="2", root=model)
    with monkeypatch.context() as patched:
        patched.setattr(triton_repository.shutil, "copytree", disk_full)
        with pytest.raises(OSError, match="No space left"):
            triton_repository.write(v2, out, cfg, overwrite=True)  # type: ignore[arg-type]
    assert (written / "1/conveyor-model/weights.bin").read_bytes() == b"v1"
    assert json.loads((written / "1/conveyor-model/version.json").read_text())["version"] == "1"
    assert [p.name for p in out.iterdir()] == ["m"], "a half-written copy was left beside the repository"
    triton_repository.write(v2, out, cfg, overwrite=True)  # type: ignore[arg-type]
    assert (written / "1/conveyor-model/weights.bin").read_bytes() == b"v2"
    assert json.loads((written / "1/conveyor-model/version.json").read_text())["version"] == "2"


@pytest.mark.slow
def test_triton_start_script_serves_a_model_repository(tmp_path: Path) -> None:
    """The Triton overlay's start script: PyTriton's tritonserver with the stub for this Python, up and healthy."""
    (tmp_path / "models").mkdir()
    http, grpc, metrics = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "TRITON_MODEL_REPOSITORY": str(tmp_path / "models"),
        "TRITON_BACKEND_DIR": str(tmp_path / "backends"),
    }
    process = subprocess.Popen(
        ["sh", str(K8S / "overlays/triton/start-triton.sh"), f"--http-port={http}", f"--grpc-port={grpc}",
         f"--metrics-port={metrics}", "--http-address=127.0.0.1", "--grpc-address=127.0.0.1"],
        env=env,
        stdout=(tmp_path / "triton.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{http}/v2/health/live", 60, process)
        wait_http(f"http://127.0.0.1:{http}/v2/health/ready", 30, process)
        # Triton starts its metrics service just after the HTTP one (tens of ms later): ready does not imply it.
        wait_http(f"http://127.0.0.1:{metrics}/metrics", 30, process)
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        assert (tmp_path / "backends" / "python" / "triton_python_backend_stub").is_file(), version
        # The administrative extensions take a key nobody holds; the protocol's routes stay open in the cluster.
        import urllib.error
        import urllib.request

        base = f"http://127.0.0.1:{http}"
        assert json.loads(urllib.request.urlopen(f"{base}/v2", timeout=10).read())["name"] == "triton"
        for path in ("/v2/logging", "/v2/systemsharedmemory/status", "/v2/trace/setting"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(f"{base}{path}", timeout=10)
            assert "restricted" in refused.value.read().decode(), path
    except Exception:
        print((tmp_path / "triton.log").read_text(errors="replace")[-3000:])
        raise
    finally:
        stop_tree(process)


@pytest.mark.slow
def test_bucket_init_creates_the_bucket_once(tmp_path: Path) -> None:
    """compose's bucket-init script against a real S3-compatible server (nanio, where installed)."""
    if shutil.which("nanio", path=str(VENV_BIN)) is None:
        pytest.skip("nanio is not installed in this environment")
    script = INFRA / "compose" / "minio" / "create_bucket.py"
    with nanio_store(tmp_path / "s3", "infra-test") as store:
        env = {**store, "S3_BUCKET": "conveyor"}
        first = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=120)
        second = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0 and "created bucket conveyor" in first.stdout, first.stderr
    assert second.returncode == 0 and "bucket conveyor exists" in second.stdout, second.stderr


# --- shared -----------------------------------------------------------------------------------------------------


def app_routes() -> set[str]:
    """The paths of the server's FastAPI app, built without Triton or a model (nothing is started)."""
    from pipelines.inference import ImageLimits
    from serving.app import ApiConfig, create_app
    from serving.metrics import ServingMetrics
    from serving.swap import ModelSlot
    from serving.triton import TritonPorts

    config = ApiConfig("conveyor-defect-detector", TritonPorts(1, 2, 3, "127.0.0.1"), ImageLimits(), 1, 1, None)
    app = create_app(config, ModelSlot(), ServingMetrics())
    return {str(getattr(route, "path", "")) for route in app.routes}


def test_thread_counts_follow_a_pods_cpu_limit(tmp_path: Path) -> None:
    """Without the kubelet's static CPU manager a pod may run on every core of its node: the runtimes started one
    thread per node core against the pod's 2-core limit and were throttled. The quota caps the count (cgroup v2's
    cpu.max, v1's CFS files, as a container sees them)."""
    from conveyor.paths import available_cores, cpu_quota

    affinity = len(os.sched_getaffinity(0))
    v2 = tmp_path / "v2"
    v2.mkdir()
    for text, quota in (("max 100000\n", None), ("150000 100000\n", 1.5), ("50000 100000\n", 0.5)):
        (v2 / "cpu.max").write_text(text)
        assert cpu_quota(v2) == quota
    assert available_cores(v2) == 1  # half a core: one thread, never none
    (v2 / "cpu.max").write_text(f"{(affinity + 8) * 100000} 100000\n")
    assert available_cores(v2) == affinity  # a quota above the cores it may run on changes nothing
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_quota(v1) == 2.0 and available_cores(v1) == min(affinity, 2)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # no limit
    assert cpu_quota(v1) is None and cpu_quota(tmp_path / "none") is None
