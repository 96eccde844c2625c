# The two commands of the README: `make run` (the main job) and `make test` (the whole test suite).
# Each creates the environment from uv.lock when it is missing or stale.

PYTHON ?= python3
UV_VERSION := 0.13.8
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
STAMP := $(VENV)/.synced-$(shell cat uv.lock pyproject.toml | cksum | cut -d' ' -f1)

export UV_PYTHON := $(PYTHON)
export UV_PROJECT_ENVIRONMENT := $(VENV)

.PHONY: run test lint docs env bench bench-serving bench-monitoring bench-drift bench-labelling bench-edge bench-first-run bench-stack bench-concurrency bench-gate images test-images test-label-studio gpu-check ui clean system-packages

run: $(STAMP)
	$(VENV)/bin/conveyor run

test: $(STAMP) lint docs system-packages
	$(VENV)/bin/pytest

# The container images of infra/docker with podman (stand-in bases where no registry answers: stack/images.py), and
# the tests that run them. Not in `make test`: about 15 minutes and 12 GB here.
images: $(STAMP)
	@command -v podman >/dev/null && command -v runc >/dev/null && command -v mmdebstrap >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && echo "installing podman, runc and mmdebstrap" && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    podman runc mmdebstrap uidmap >/dev/null; } || \
	  { echo "make images needs podman, runc and mmdebstrap (apt-get install podman runc mmdebstrap)"; exit 1; }
	$(VENV)/bin/python -m stack.images

test-images: images
	$(VENV)/bin/pytest --images -m images tests/test_images.py

# The labelling round trip through a real Label Studio (installed into .tools/label-studio: its Django pins clash
# with the project's). Not in `make test`: its first start migrates a database for one to three minutes.
test-label-studio: $(STAMP)
	$(VENV)/bin/pytest --label-studio -m label_studio -n 0 tests/test_labelling.py

# The GPU path in one command (bench/gpu.py): NVIDIA's TensorRT from uv.lock's gpu group, an engine built on this GPU,
# the parity gate, `conveyor serve --runtime tensorrt` and its benchmark beside OpenVINO, bench/results/gpu.json.
# Without a CUDA device it refuses in one line, before installing TensorRT (the CPU environment comes first).
gpu-check: $(STAMP)
	@$(VENV)/bin/python -m bench.gpu --gpu-only
	$(UV) sync --locked --inexact --compile-bytecode --group gpu
	$(VENV)/bin/python -m bench.gpu

# The manual (docs/, MkDocs with Material) into site/, offline; --strict: a broken link or a missing page fails.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(VENV)/bin/python -m bench.pipeline

bench-serving: $(STAMP)
	$(VENV)/bin/python -m bench.serving

bench-monitoring: $(STAMP)
	$(VENV)/bin/python -m bench.monitoring

# Two small flow runs at once by OpenMP wait policy (about 7 minutes): why every Conveyor process sets PASSIVE.
bench-concurrency: $(STAMP)
	$(VENV)/bin/python -m bench.concurrency

# The latency gate's verdict on the same model and on a larger one, quiet and busy, by its statistic (about 6 minutes).
bench-gate: $(STAMP)
	$(VENV)/bin/python -m bench.latency_gate

# The shift bank against the drift check and the label-free estimate (about 20 minutes), then the drift loop timed
# from the first harmful window to the retrained champion serving (about 15 minutes).
bench-drift: $(STAMP)
	$(VENV)/bin/python -m bench.drift_power
	$(VENV)/bin/python -m bench.drift_loop

bench-labelling: $(STAMP)
	$(VENV)/bin/python -m bench.labelling

# The edge runner on the line simulator's stream against the raw runtime on the same frames (about 2 minutes).
bench-edge: $(STAMP)
	$(VENV)/bin/python -m bench.edge

# A fresh clone of this checkout to a promoted champion with `make run`, then a no-op `make run` (about 12 minutes).
bench-first-run: $(STAMP)
	$(VENV)/bin/python -m bench.first_run

# The production stack's start time, and the training flow on it against embedded defaults (about 5 minutes).
bench-stack: $(STAMP) system-packages
	$(VENV)/bin/python -m bench.stack

# Servers the tests start for real, from Debian's packages: Prometheus (the serving tests scrape the server),
# PostgreSQL (the production stack's tests), OpenStack Swift and memcached (an S3 store with bucket quotas, for the
# full-bucket test), mosquitto (the MQTT broker of the edge tests). Installed when this user can (root with apt);
# otherwise the tests that need them say why they skipped.
SYSTEM_PACKAGES := prometheus:prometheus postgresql:/usr/lib/postgresql/*/bin/postgres memcached:memcached \
	swift-proxy:swift-proxy-server swift-account:swift-account-server swift-container:swift-container-server \
	swift-object:swift-object-server mosquitto:/usr/sbin/mosquitto
system-packages:
	@missing=""; for entry in $(SYSTEM_PACKAGES); do \
	  package=$${entry%%:*}; program=$${entry#*:}; \
	  command -v $$program >/dev/null 2>&1 || ls $$program >/dev/null 2>&1 || missing="$$missing $$package"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing$$missing with apt-get"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing) \
	      >/dev/null 2>&1 || echo "could not install$$missing with apt-get: the tests that need them will skip"; \
	  else echo "not installed:$$missing (apt-get install$$missing): the tests that need them will skip"; fi; fi

ui: $(STAMP)
	$(VENV)/bin/conveyor ui

env: $(STAMP)

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet --upgrade pip
	$(TOOLS)/bin/python -m pip install --quiet uv==$(UV_VERSION)

# --locked: install exactly what uv.lock says, and fail if pyproject.toml and the lock disagree.
# --compile-bytecode: every Conveyor command is a fresh process (each DVC stage, each worker run); without .pyc files
# (PYTHONDONTWRITEBYTECODE=1, as on CI machines) each one recompiles the ~1500 modules it imports, ~7 s a time.
$(STAMP): $(UV) uv.lock pyproject.toml
	$(UV) sync --locked --compile-bytecode
	rm -f $(VENV)/.synced-*
	touch $@

clean:
	rm -rf artifacts .conveyor
